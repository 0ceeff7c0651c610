package udpsteer

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// The QUIC probe: a readiness check of one generation's own socket.
//
// A QUIC server that gets a long-header packet of a version it does not
// support, in a datagram of at least 1200 bytes, answers with a Version
// Negotiation packet (RFC 8999 section 6, RFC 9000 section 6): version 0,
// the client's connection IDs swapped, and the versions it speaks. It needs
// no TLS and no connection state, so relay can ask it without speaking QUIC.
// The probe's flow is put in the flow table first, naming gen's slot, so
// the program steers it to gen's socket and to no other: an answer proves
// that this generation reads its socket and speaks QUIC, which the old
// generation answering on the same address could not fake.
const (
	// probeVersion is a reserved version (RFC 9000 section 15: 0x?a?a?a?a
	// is kept for exercising version negotiation): no server speaks it.
	probeVersion = 0x1a2a3a4a
	// probeSize is the datagram's size: servers ignore smaller ones with
	// an unknown version, so that they cannot be made amplifiers.
	probeSize = 1200
	// probeCIDLen is the length of each connection ID the probe sends.
	probeCIDLen = 8
	// probeWait bounds one probe when ctx has no earlier deadline.
	probeWait = time.Second
)

// ErrNoProbe is ProbeQUIC's error for a generation without a socket.
var ErrNoProbe = errors.New("the generation has no socket in the group")

// ProbeQUIC sends one QUIC packet of an unknown version to generation
// gen's own socket and returns nil once a Version Negotiation packet
// answers it, within ctx (a second at most). The probe comes from an
// ephemeral port of the loopback address of the group's family (the
// group's own address where it is bound to one).
func (g *Group) ProbeQUIC(ctx context.Context, gen int) error {
	target, key, err := g.probeTarget()
	if err != nil {
		return err
	}
	conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(target))
	if err != nil {
		return fmt.Errorf("opening the QUIC probe's socket: %w", err)
	}
	defer conn.Close()
	local := conn.LocalAddr().(*net.UDPAddr).AddrPort()
	key.Src = local.Addr().As16()
	binary.BigEndian.PutUint16(key.Ports[0:2], local.Port())
	if err := g.pin(key, gen); err != nil {
		return err
	}
	defer g.unpin(key)

	packet, scid, err := probePacket()
	if err != nil {
		return err
	}
	deadline := time.Now().Add(probeWait)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := conn.SetDeadline(deadline); err != nil {
		return fmt.Errorf("QUIC probe: setting the deadline of its socket: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	if _, err := conn.Write(packet); err != nil {
		return fmt.Errorf("QUIC probe %s→%s: sending: %w", local, target, err)
	}
	buf := make([]byte, 1500)
	for {
		n, err := conn.Read(buf)
		if err != nil {
			if ctx.Err() != nil {
				err = ctx.Err()
			}
			return fmt.Errorf("QUIC probe %s→%s: no Version Negotiation from generation %d's socket: %w", local, target, gen, err)
		}
		if isVersionNegotiation(buf[:n], scid) {
			// Only an answer that came while the probe's flow still
			// named gen's socket is gen's: a flow the table evicted
			// (more flows than MaxFlows) would have made the probe a
			// new flow, for the serving generation.
			if !g.pinned(key, gen) {
				return fmt.Errorf("QUIC probe %s→%s: the probe's flow left the flow table before the answer, which may be another generation's", local, target)
			}
			return nil
		}
	}
}

// probeTarget is the address the probe is sent to, and the flow key of its
// datagrams without their source.
func (g *Group) probeTarget() (netip.AddrPort, flowKey, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return netip.AddrPort{}, flowKey{}, errors.New("steering group closed")
	}
	a := g.sock.Addr
	host := a.Addr().Unmap()
	if host.IsUnspecified() {
		// A dual-stack or IPv4 socket is reached on 127.0.0.1, an
		// IPv6-only one on ::1.
		host = netip.AddrFrom4([4]byte{127, 0, 0, 1})
		if g.sock.Family == unix.AF_INET6 && g.sock.V6Only {
			host = netip.IPv6Loopback()
		}
	}
	target := netip.AddrPortFrom(host, a.Port())
	var key flowKey
	key.Dst = host.As16()
	binary.BigEndian.PutUint16(key.Ports[2:4], a.Port())
	return target, key, nil
}

// pin puts the probe's flow in the table, with gen's slot.
func (g *Group) pin(key flowKey, gen int) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return errors.New("steering group closed")
	}
	m := g.memberLocked(gen)
	if m == nil {
		return fmt.Errorf("%s: generation %d: %w", g.name, gen, ErrNoProbe)
	}
	// Marked QUIC, so that a retired generation keeps it too.
	v := flowValue{Slot: m.slot, Flags: flagQUIC | flagProbe, Last: monotonic()}
	if err := g.maps.flows.Update(key, v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("%s: putting the QUIC probe's flow in the flow table: %w", g.name, err)
	}
	return nil
}

// pinned reports whether the probe's flow still names gen's socket.
func (g *Group) pinned(key flowKey, gen int) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	m := g.memberLocked(gen)
	var v flowValue
	return m != nil && g.maps.flows.Lookup(key, &v) == nil && v.Slot == m.slot && v.Flags&flagProbe != 0
}

// unpinAllLocked takes every probe's flow out of the table.
func (g *Group) unpinAllLocked() {
	var stale []flowKey
	if err := g.eachFlowLocked(func(k flowKey, v flowValue) {
		if v.Flags&flagProbe != 0 {
			stale = append(stale, k)
		}
	}); err != nil {
		g.log.Warn("reading the flow table for probes left by the earlier image", "listener", g.name, "err", err)
		return
	}
	for _, k := range stale {
		if err := g.maps.flows.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			g.log.Warn("taking a probe's flow left by the earlier image out of the flow table", "listener", g.name, "err", err)
		}
	}
}

// unpin takes the probe's flow out of the table.
func (g *Group) unpin(key flowKey) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return
	}
	if err := g.maps.flows.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		g.log.Warn("taking the QUIC probe's flow out of the flow table", "listener", g.name, "err", err)
	}
}

// probePacket makes the probe: a long header (form and fixed bits set) of
// probeVersion, random connection IDs, padded to probeSize. It returns the
// packet and its source connection ID, which the answer's destination
// connection ID must be.
func probePacket() (packet, scid []byte, err error) {
	cids := make([]byte, 2*probeCIDLen)
	if _, err := rand.Read(cids); err != nil {
		return nil, nil, fmt.Errorf("QUIC probe: random connection IDs: %w", err)
	}
	dcid, scid := cids[:probeCIDLen], cids[probeCIDLen:]
	p := make([]byte, probeSize)
	p[0] = 0xc0 // long header, fixed bit; the type bits mean nothing in an unknown version
	binary.BigEndian.PutUint32(p[1:5], probeVersion)
	p[5] = probeCIDLen
	copy(p[6:], dcid)
	p[6+probeCIDLen] = probeCIDLen
	copy(p[7+probeCIDLen:], scid)
	return p, scid, nil
}

// isVersionNegotiation reports whether b is a Version Negotiation packet
// answering a probe whose source connection ID was scid: a long header of
// version 0 whose destination connection ID is scid, listing at least one
// version.
func isVersionNegotiation(b, scid []byte) bool {
	if len(b) < 7 || b[0]&0x80 == 0 || binary.BigEndian.Uint32(b[1:5]) != 0 {
		return false
	}
	dlen := int(b[5])
	if len(b) < 6+dlen+1 || !bytes.Equal(b[6:6+dlen], scid) {
		return false
	}
	slen := int(b[6+dlen])
	rest := len(b) - (7 + dlen + slen)
	return rest >= 4 && rest%4 == 0
}
