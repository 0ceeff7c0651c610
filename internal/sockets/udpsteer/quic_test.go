package udpsteer

import (
	"encoding/binary"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The beginnings of datagrams: QUIC long headers (first byte, version) and
// what other protocols begin with.
var (
	v1Initial   = []byte{0xc3, 0x00, 0x00, 0x00, 0x01} // type 0
	v1ZeroRTT   = []byte{0xd3, 0x00, 0x00, 0x00, 0x01} // type 1
	v1Handshake = []byte{0xe3, 0x00, 0x00, 0x00, 0x01} // type 2
	v2Initial   = []byte{0xd3, 0x6b, 0x33, 0x43, 0xcf} // RFC 9369: type 1
	v2Retry     = []byte{0xc3, 0x6b, 0x33, 0x43, 0xcf} // type 0: v1's Initial, v2's Retry
	v2Handshake = []byte{0xf3, 0x6b, 0x33, 0x43, 0xcf} // type 3
	draft29     = []byte{0xc3, 0xff, 0x00, 0x00, 0x1d} // an Initial of a version not recognised
	short       = []byte{0x41}                         // a QUIC short header (1-RTT)
	rtp         = []byte{0x80, 0x60, 0x00, 0x01}       // RTP version 2, payload type 96
	rtpMarker   = []byte{0xbf, 0xe0, 0x00, 0x01}       // RTP with padding, extension, 15 CSRCs, marker
	// A DNS query for example.com, type A, with RD.
	dnsQuery = []byte{0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
		7, 'e', 'x', 'a', 'm', 'p', 'l', 'e', 3, 'c', 'o', 'm', 0, 0x00, 0x01, 0x00, 0x01}
)

// packet is a datagram of size bytes (more if head needs it) that begins
// with head, then a sequence number that tells it from any other, then
// zeros.
func packet(head []byte, size int) []byte {
	p := binary.BigEndian.AppendUint32(append([]byte{}, head...), seq.Add(1))
	if len(p) < size {
		p = append(p, make([]byte, size-len(p))...)
	}
	return p
}

// sends sends payload from c and returns the generation whose socket got
// it.
func sends(t *testing.T, c *client, socks gens, payload []byte) int {
	t.Helper()
	if err := unix.Sendto(c.fd, payload, 0, c.to); err != nil {
		t.Fatalf("send: %v", err)
	}
	return receiver(t, socks, payload)
}

// expectHandshakes checks g.Handshakes(gen).
func expectHandshakes(t *testing.T, g *Group, gen, want int) {
	t.Helper()
	n, err := g.Handshakes(gen)
	if err != nil {
		t.Fatal(err)
	}
	if n != want {
		t.Fatalf("generation %d has %d QUIC handshakes in progress, want %d", gen, n, want)
	}
}

// flowFlags are the flags of c's flow in the table.
func flowFlags(t *testing.T, g *Group, c *client) uint32 {
	t.Helper()
	var v flowValue
	if err := g.maps.flows.Lookup(c.key(t), &v); err != nil {
		t.Fatalf("the flow is not in the table: %v", err)
	}
	return v.Flags
}

// The program recognises QUIC v1 and v2 long-header packets by their first
// byte and version, and Initials by the type each version gives them; RTP,
// DNS, short headers, unknown versions and datagrams too short to hold a
// version are not QUIC. The flow's flag says what its first datagram was;
// an Initial of a flow idle for longer than QUICInitialIdle goes to the
// serving generation, and nothing else does.
func TestQUICRecognition(t *testing.T) {
	const quicIdle = 200 * time.Millisecond
	cases := []struct {
		name          string
		payload       func() []byte
		quic, initial bool
	}{
		{"a QUIC v1 Initial of 1200 bytes", func() []byte { return packet(v1Initial, 1200) }, true, true},
		{"a QUIC v2 Initial of 1200 bytes", func() []byte { return packet(v2Initial, 1200) }, true, true},
		{"a QUIC v1 0-RTT packet", func() []byte { return packet(v1ZeroRTT, 300) }, true, false},
		{"a QUIC v1 Handshake packet", func() []byte { return packet(v1Handshake, 300) }, true, false},
		{"a QUIC v2 Retry (v1's Initial type)", func() []byte { return packet(v2Retry, 100) }, true, false},
		{"a QUIC v2 Handshake packet", func() []byte { return packet(v2Handshake, 300) }, true, false},
		{"an Initial of draft-29", func() []byte { return packet(draft29, 1200) }, false, false},
		{"a QUIC short header", func() []byte { return packet(short, 60) }, false, false},
		{"an RTP packet", func() []byte { return packet(rtp, 172) }, false, false},
		{"an RTP packet with every bit of its first byte", func() []byte { return packet(rtpMarker, 172) }, false, false},
		{"a DNS query", func() []byte { return append(append([]byte{}, dnsQuery...), byte(seq.Add(1))) }, false, false},
		{"4 bytes of a v1 Initial", func() []byte { return []byte{0xc3, 0x00, 0x00, 0x00} }, false, false},
		{"an empty datagram", func() []byte { return []byte{} }, false, false},
	}
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			g := newGroup(t, fam.addr, Options{QUIC: true, QUICInitialIdle: quicIdle, IdleTimeout: time.Hour})
			socks := gens{}
			take(t, g, 1, socks)
			must(t, g.Switch(1))
			cs := clients(t, g, len(cases))
			for i, tc := range cases {
				expect(t, tc.name+", gen 1 serving", sends(t, cs[i], socks, tc.payload()), 1)
				want := uint32(0)
				if tc.quic {
					want = flagQUIC
				}
				if got := flowFlags(t, g, cs[i]); got != want {
					t.Fatalf("%s made a flow with flags %#x, want %#x", tc.name, got, want)
				}
			}
			take(t, g, 2, socks)
			must(t, g.Switch(2))
			// The last flow is the youngest: once it is idle, all are.
			waitIdle(t, g, cs[len(cs)-1], quicIdle, nil, nil, 0)
			for i, tc := range cases {
				want := 1
				if tc.initial {
					want = 2
				}
				expect(t, tc.name+" after a pause", sends(t, cs[i], socks, tc.payload()), want)
			}
			t.Logf("%s: %d kinds of datagram recognised", fam.name, len(cases))
		})
	}
}

// After Retire, a retired generation's flows go to the serving generation
// at their next datagram, except the QUIC connections' (begun by a long
// header), which stay until Release, Initials of a handshake in progress
// included; an Initial on the 4-tuple of a connection whose client sent a
// short header is a new connection's, and goes to the serving generation.
// Handshakes counts the QUIC flows without a short header.
func TestRetire(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			// The default QUICInitialIdle (3 s): the Initial below moves
			// because the generation retired, not because the flow idled.
			g := newGroup(t, fam.addr, Options{QUIC: true, IdleTimeout: time.Hour})
			socks := gens{}
			take(t, g, 1, socks)
			must(t, g.Switch(1))
			dns, media, conn, conn2, again := newClient(t, g), newClient(t, g), newClient(t, g), newClient(t, g), newClient(t, g)
			expect(t, "a DNS query, gen 1 serving", sends(t, dns, socks, packet(dnsQuery, 0)), 1)
			expect(t, "RTP, gen 1 serving", sends(t, media, socks, packet(rtp, 172)), 1)
			expect(t, "a QUIC v1 Initial, gen 1 serving", sends(t, conn, socks, packet(v1Initial, 1200)), 1)
			expect(t, "a QUIC v2 Initial, gen 1 serving", sends(t, conn2, socks, packet(v2Initial, 1200)), 1)
			expect(t, "a QUIC v1 Initial, gen 1 serving", sends(t, again, socks, packet(v1Initial, 1200)), 1)
			take(t, g, 2, socks)
			must(t, g.Switch(2))
			expect(t, "a DNS query, before the retirement", sends(t, dns, socks, packet(dnsQuery, 0)), 1)
			expect(t, "an Initial within QUICInitialIdle, before the retirement", sends(t, again, socks, packet(v1Initial, 1200)), 1)

			if err := g.Retire(2); err == nil || !strings.Contains(err.Error(), "serves") {
				t.Fatalf("Retire of the serving generation: %v", err)
			}
			must(t, g.Retire(1))
			must(t, g.Retire(1)) // twice is once
			must(t, g.Retire(9)) // no socket: nothing to retire
			expectFlows(t, g, map[int]int{1: 3})
			expectHandshakes(t, g, 1, 3) // three QUIC flows, no short header yet
			expectHandshakes(t, g, 2, 0)

			expect(t, "a DNS query of a retired generation's flow", sends(t, dns, socks, packet(dnsQuery, 0)), 2)
			expect(t, "the next DNS query", sends(t, dns, socks, packet(dnsQuery, 0)), 2)
			expect(t, "RTP of a retired generation's flow", sends(t, media, socks, packet(rtp, 172)), 2)
			expect(t, "a 1-RTT packet of a QUIC connection", sends(t, conn, socks, packet(short, 60)), 1)
			expect(t, "a Handshake packet of a QUIC connection", sends(t, conn, socks, packet(v1Handshake, 300)), 1)
			expect(t, "a 1-RTT packet of a QUIC v2 connection", sends(t, conn2, socks, packet(short, 60)), 1)
			// An Initial within QUICInitialIdle of a retired generation's
			// QUIC flow may be its handshake's second flight: it stays.
			expect(t, "an Initial from a QUIC connection's 4-tuple within QUICInitialIdle", sends(t, again, socks, packet(v1Initial, 1200)), 1)
			if f := flowFlags(t, g, again); f != flagQUIC {
				t.Fatalf("the connection's flow has flags %#x before its first short header, want %#x", f, flagQUIC)
			}
			expectHandshakes(t, g, 1, 1)
			expect(t, "the connection's next packet", sends(t, again, socks, packet(short, 60)), 1)
			if f := flowFlags(t, g, again); f != flagQUIC|flagEstablished {
				t.Fatalf("the connection's flow has flags %#x after a short header, want %#x", f, flagQUIC|flagEstablished)
			}
			if f := flowFlags(t, g, dns); f != 0 {
				t.Fatalf("the DNS flow has flags %#x", f)
			}
			expectFlows(t, g, map[int]int{1: 3, 2: 2})
			expectHandshakes(t, g, 1, 0)

			// An Initial from the 4-tuple of a connection that finished its
			// handshake begins a new connection: the serving generation's,
			// at once, though the flow is not idle.
			expect(t, "an Initial from an established QUIC connection's 4-tuple", sends(t, conn2, socks, packet(v1Initial, 1200)), 2)
			if f := flowFlags(t, g, conn2); f != flagQUIC {
				t.Fatalf("the new connection's flow has flags %#x, want %#x", f, flagQUIC)
			}
			expectHandshakes(t, g, 2, 1)
			expect(t, "the new connection's Handshake packet", sends(t, conn2, socks, packet(v1Handshake, 300)), 2)
			expect(t, "its second Initial", sends(t, conn2, socks, packet(v1Initial, 1200)), 2)
			expectFlows(t, g, map[int]int{1: 2, 2: 3})

			g.Release(1)
			delete(socks, 1)
			expect(t, "a QUIC connection's packet after the release", sends(t, conn, socks, packet(short, 60)), 2)
			expect(t, "the new connection's packet after the release", sends(t, conn2, socks, packet(short, 60)), 2)
			expect(t, "the third QUIC connection's packet after the release", sends(t, again, socks, packet(short, 60)), 2)
			expectFlows(t, g, map[int]int{2: 5})
		})
	}
	t.Run("without QUIC", func(t *testing.T) {
		g := newGroup(t, "127.0.0.1:0", Options{IdleTimeout: time.Hour})
		socks := gens{}
		take(t, g, 1, socks)
		must(t, g.Switch(1))
		conn := newClient(t, g)
		expect(t, "a QUIC Initial, gen 1 serving", sends(t, conn, socks, packet(v1Initial, 1200)), 1)
		take(t, g, 2, socks)
		must(t, g.Switch(2))
		must(t, g.Retire(1))
		expect(t, "a 1-RTT packet: no flow is QUIC without the option", sends(t, conn, socks, packet(short, 60)), 2)
	})
	// A slot given to a new socket is not retired; a retired generation
	// switched to is retired no more.
	t.Run("slots", func(t *testing.T) {
		g := newGroup(t, "127.0.0.1:0", Options{Slots: 2, IdleTimeout: time.Hour})
		socks := gens{}
		take(t, g, 1, socks)
		must(t, g.Switch(1))
		take(t, g, 2, socks)
		must(t, g.Switch(2))
		must(t, g.Retire(1))
		g.Release(1)
		delete(socks, 1)
		take(t, g, 3, socks) // gen 1's retired slot
		must(t, g.Switch(3))
		a := newClient(t, g)
		expect(t, "gen 3 serving", sends(t, a, socks, packet(dnsQuery, 0)), 3)
		must(t, g.Switch(2))
		expect(t, "a flow of gen 3, in a slot that was retired", sends(t, a, socks, packet(dnsQuery, 0)), 3)
		must(t, g.Retire(3))
		expect(t, "a flow of gen 3, retired", sends(t, a, socks, packet(dnsQuery, 0)), 2)
		must(t, g.Switch(3)) // retired no more
		d := newClient(t, g)
		expect(t, "gen 3 serving again", sends(t, d, socks, packet(dnsQuery, 0)), 3)
		must(t, g.Switch(2))
		expect(t, "a flow of gen 3, switched to after its retirement", sends(t, d, socks, packet(dnsQuery, 0)), 3)
		must(t, g.Retire(3))
		expect(t, "the flow, gen 3 retired again", sends(t, d, socks, packet(dnsQuery, 0)), 2)
		if err := g.Retire(2); err == nil {
			t.Fatal("gen 2 serves, and retired")
		}
	})
}
