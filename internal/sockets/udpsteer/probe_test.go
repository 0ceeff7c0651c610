package udpsteer

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

// responder answers what a QUIC server answers a packet of an unknown
// version: Version Negotiation, from the socket f (a generation's). It
// counts the probes it saw.
type responder struct {
	probes atomic.Int64
	done   chan struct{}
}

func respond(t *testing.T, f *os.File) *responder {
	t.Helper()
	// A duplicate of its own: net.FilePacketConn makes its copy
	// non-blocking, which the test's other holders do not mind.
	pc, err := net.FilePacketConn(f)
	if err != nil {
		t.Fatal(err)
	}
	r := &responder{done: make(chan struct{})}
	t.Cleanup(func() { pc.Close(); <-r.done })
	go func() {
		defer close(r.done)
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			b := buf[:n]
			if n < probeSize || b[0]&0x80 == 0 || binary.BigEndian.Uint32(b[1:5]) == 1 {
				continue
			}
			r.probes.Add(1)
			dcid := b[6 : 6+int(b[5])]
			rest := b[6+len(dcid):]
			scid := rest[1 : 1+int(rest[0])]
			vn := []byte{0x80 | 0x3f, 0, 0, 0, 0, byte(len(scid))}
			vn = append(vn, scid...)
			vn = append(vn, byte(len(dcid)))
			vn = append(vn, dcid...)
			vn = binary.BigEndian.AppendUint32(vn, 1) // QUIC v1
			pc.WriteTo(vn, from)
		}
	}()
	return r
}

// ProbeQUIC reaches the generation it names and no other: a generation
// that does not answer fails its probe even though the serving one would
// answer on the same address; once it answers, the probe passes, and the
// serving generation never saw a probe.
func TestProbeQUIC(t *testing.T) {
	for _, addr := range []string{"127.0.0.1:0", "[::]:0", "[::1]:0"} {
		t.Run(addr, func(t *testing.T) {
			g := newGroup(t, addr, Options{QUIC: true})
			socks := gens{}
			take(t, g, 1, socks)
			old := respond(t, socks[1])
			take(t, g, 2, socks)

			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			err := g.ProbeQUIC(ctx, 2)
			cancel()
			if err == nil {
				t.Fatal("the probe of generation 2, which does not read its socket, passed")
			}
			t.Logf("generation 2 silent: %v", err)

			respond(t, socks[2])
			if err := g.ProbeQUIC(context.Background(), 2); err != nil {
				t.Fatalf("probe of generation 2, which answers: %v", err)
			}
			if err := g.ProbeQUIC(context.Background(), 1); err != nil {
				t.Fatalf("probe of generation 1: %v", err)
			}
			// Generation 1 saw its own probe only.
			if n := old.probes.Load(); n != 1 {
				t.Errorf("generation 1 saw %d probes, want 1 (its own)", n)
			}
			if err := g.ProbeQUIC(context.Background(), 3); !errors.Is(err, ErrNoProbe) {
				t.Errorf("probe of a generation without a socket: %v, want ErrNoProbe", err)
			}
			// The probes left no flow behind.
			if f := g.Flows(); f[1]+f[2] != 0 {
				t.Errorf("flows after the probes: %v, want none", f)
			}
		})
	}
}

// The answer is checked: a datagram that is not Version Negotiation, or
// answers another probe, does not count.
func TestIsVersionNegotiation(t *testing.T) {
	scid := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	vn := func(dcid []byte, version uint32, versions int) []byte {
		b := []byte{0xc0}
		b = binary.BigEndian.AppendUint32(b, version)
		b = append(b, byte(len(dcid)))
		b = append(b, dcid...)
		b = append(b, 8, 9, 9, 9, 9, 9, 9, 9, 9)
		for range versions {
			b = binary.BigEndian.AppendUint32(b, 1)
		}
		return b
	}
	for _, c := range []struct {
		name string
		b    []byte
		want bool
	}{
		{"Version Negotiation", vn(scid, 0, 2), true},
		{"another probe's", vn([]byte{8, 7, 6, 5, 4, 3, 2, 1}, 0, 1), false},
		{"version 1", vn(scid, 1, 1), false},
		{"no version listed", vn(scid, 0, 0), false},
		{"short header", append([]byte{0x40}, vn(scid, 0, 1)[1:]...), false},
		{"truncated", vn(scid, 0, 1)[:10], false},
		{"empty", nil, false},
	} {
		if got := isVersionNegotiation(c.b, scid); got != c.want {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
	// The probe itself is what a server answers: long header, an
	// unknown version, 1200 bytes.
	p, s, err := probePacket()
	if err != nil {
		t.Fatal(err)
	}
	if len(p) != probeSize || p[0]&0xc0 != 0xc0 || binary.BigEndian.Uint32(p[1:5]) != probeVersion || string(p[7+probeCIDLen:7+2*probeCIDLen]) != string(s) {
		t.Errorf("probe packet % x... (scid % x)", p[:24], s)
	}
}

// A probe's flow that an earlier image left in the table (relay upgraded
// in the middle of a probe) is not counted, and Restore takes it out.
func TestRestoreDropsProbeFlows(t *testing.T) {
	g := newGroup(t, "127.0.0.1:0", Options{QUIC: true})
	socks := gens{}
	take(t, g, 1, socks)
	_, key, err := g.probeTarget()
	if err != nil {
		t.Fatal(err)
	}
	key.Src = netip.MustParseAddr("127.0.0.1").As16()
	binary.BigEndian.PutUint16(key.Ports[0:2], 40000)
	if err := g.pin(key, 1); err != nil {
		t.Fatal(err)
	}
	if f := g.Flows(); f[1] != 0 {
		t.Errorf("flows with a probe's flow in the table: %v, want none counted", f)
	}
	s, err := g.Save()
	if err != nil {
		t.Fatal(err)
	}
	r := restoreAcross(t, s)
	t.Cleanup(r.Close)
	r.Settle()
	var v flowValue
	if err := r.maps.flows.Lookup(key, &v); !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Errorf("the probe's flow after Restore: %+v, %v; want it gone", v, err)
	}
}
