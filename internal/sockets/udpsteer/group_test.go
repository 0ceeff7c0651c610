package udpsteer

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
)

// newGroup makes a group on addr, or skips the test where eBPF steering
// cannot be loaded (not root, no CAP_BPF, an old kernel) or there is no
// IPv6.
func newGroup(t *testing.T, addr string, opts Options) *Group {
	t.Helper()
	if err := Available(); err != nil {
		t.Skipf("eBPF steering unavailable here (it needs CAP_BPF or CAP_SYS_ADMIN; run the tests as root): %v", err)
	}
	g, err := New(netip.MustParseAddrPort(addr), opts)
	if err != nil {
		if strings.HasPrefix(addr, "[") && (errors.Is(err, unix.EADDRNOTAVAIL) || errors.Is(err, unix.EAFNOSUPPORT)) {
			t.Skipf("no IPv6 here: %v", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	return g
}

// gens are the sockets the generations got: what each would read.
type gens map[int]*os.File

func take(t *testing.T, g *Group, gen int, socks gens) {
	t.Helper()
	f, _, err := g.Take(gen)
	if err != nil {
		t.Fatal(err)
	}
	socks[gen] = f
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// client is a UDP socket on the loopback address of the group's family,
// with a port of its own: one flow.
type client struct {
	fd int
	to unix.Sockaddr
}

func newClient(t *testing.T, g *Group) *client {
	t.Helper()
	family := g.sock.Family
	var local unix.Sockaddr = &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}
	if family == unix.AF_INET6 {
		local = &unix.SockaddrInet6{Addr: netip.IPv6Loopback().As16()}
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, local); err != nil {
		t.Fatal(err)
	}
	return &client{fd: fd, to: g.sa}
}

func clients(t *testing.T, g *Group, n int) []*client {
	t.Helper()
	var out []*client
	for range n {
		out = append(out, newClient(t, g))
	}
	return out
}

// key is the flow key the program makes for c's datagrams.
func (c *client) key(t *testing.T) flowKey {
	t.Helper()
	sa, err := unix.Getsockname(c.fd)
	if err != nil {
		t.Fatal(err)
	}
	src, dst := sockaddr.AddrPort(sa), sockaddr.AddrPort(c.to)
	k := flowKey{Src: src.Addr().As16(), Dst: dst.Addr().As16()}
	binary.BigEndian.PutUint16(k.Ports[0:], src.Port())
	binary.BigEndian.PutUint16(k.Ports[2:], dst.Port())
	return k
}

var seq atomic.Uint32

// landsOn sends a datagram from c whose payload begins with first, and
// returns the generation whose socket got it.
func landsOn(t *testing.T, c *client, socks gens, first byte) int {
	t.Helper()
	payload := binary.BigEndian.AppendUint32([]byte{first}, seq.Add(1))
	if err := unix.Sendto(c.fd, payload, 0, c.to); err != nil {
		t.Fatalf("send: %v", err)
	}
	return receiver(t, socks, payload)
}

// receiver waits up to 5 s for payload on the generations' sockets, and
// returns the generation that read it. Any other datagram fails the test.
func receiver(t *testing.T, socks gens, payload []byte) int {
	t.Helper()
	var fds []unix.PollFd
	var which []int
	for gen, f := range socks {
		fds = append(fds, unix.PollFd{Fd: int32(f.Fd()), Events: unix.POLLIN})
		which = append(which, gen)
	}
	buf := make([]byte, 2048)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		for i := range fds {
			fds[i].Revents = 0
		}
		n, err := unix.Poll(fds, 100)
		if errors.Is(err, unix.EINTR) || n == 0 {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		for i, p := range fds {
			if p.Revents&unix.POLLIN == 0 {
				continue
			}
			got, _, err := unix.Recvfrom(int(p.Fd), buf, unix.MSG_DONTWAIT)
			if err != nil {
				t.Fatalf("reading generation %d's socket: %v", which[i], err)
			}
			if !bytes.Equal(buf[:got], payload) {
				t.Fatalf("generation %d read %x, not the datagram sent (%x)", which[i], buf[:got], payload)
			}
			return which[i]
		}
	}
	t.Fatal("no generation's socket got the datagram in 5 s")
	return 0
}

func expect(t *testing.T, what string, got, want int) {
	t.Helper()
	if got != want {
		t.Fatalf("%s: the datagram went to generation %d, want %d", what, got, want)
	}
}

func expectFlows(t *testing.T, g *Group, want map[int]int) {
	t.Helper()
	got := g.Flows()
	if len(got) != len(want) {
		t.Fatalf("Flows() = %v, want %v", got, want)
	}
	for gen, n := range want {
		if got[gen] != n {
			t.Fatalf("Flows() = %v, want %v", got, want)
		}
	}
}

var families = []struct{ name, addr string }{
	{"IPv4", "127.0.0.1:0"},
	{"IPv6", "[::1]:0"},
}

// Known flows stay with their generation across a switch; new ones go to
// the serving generation; a released generation's flows follow the serving
// one.
func TestSteersFlows(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			g := newGroup(t, fam.addr, Options{})
			socks := gens{}
			take(t, g, 1, socks)
			must(t, g.Switch(1))
			a := clients(t, g, 4)
			for _, c := range a {
				expect(t, "gen 1 serving", landsOn(t, c, socks, 0), 1)
			}

			take(t, g, 2, socks)
			b := clients(t, g, 4)
			for _, c := range b {
				expect(t, "a new flow while gen 2 starts", landsOn(t, c, socks, 0), 1)
			}
			for _, c := range a {
				expect(t, "a known flow while gen 2 starts", landsOn(t, c, socks, 0), 1)
			}

			must(t, g.Switch(2))
			for _, c := range append(a, b...) {
				expect(t, "a flow begun before the switch, after it", landsOn(t, c, socks, 0), 1)
			}
			cs := clients(t, g, 4)
			for _, c := range cs {
				expect(t, "a new flow after the switch", landsOn(t, c, socks, 0), 2)
			}
			for _, c := range a {
				expect(t, "a flow begun before the switch, after new ones", landsOn(t, c, socks, 0), 1)
			}
			expectFlows(t, g, map[int]int{1: 8, 2: 4})
			if d := g.Idle(1); d <= 0 || d > time.Second {
				t.Fatalf("Idle(1) = %v right after a datagram", d)
			}

			g.Release(1)
			delete(socks, 1)
			for _, c := range append(append(a, b...), cs...) {
				expect(t, "a flow of the released generation, or a new one", landsOn(t, c, socks, 0), 2)
			}
			expectFlows(t, g, map[int]int{2: 12})
			if d := g.Idle(1); d != 0 {
				t.Fatalf("Idle(1) = %v for a released generation", d)
			}
			t.Logf("%s: 12 flows steered through a switch and a release; Idle(2) = %v", fam.name, g.Idle(2))
		})
	}
}

// The sockets Take gives are blocking (outside Go's poller), close-on-exec,
// SO_REUSEPORT, and not SO_REUSEADDR; a socket of the same user without
// SO_REUSEPORT cannot bind the address, even with SO_REUSEADDR.
func TestMemberSockets(t *testing.T) {
	g := newGroup(t, "127.0.0.1:0", Options{})
	socks := gens{}
	take(t, g, 1, socks)
	take(t, g, 2, socks)
	for gen, f := range socks {
		fd := int(f.Fd())
		fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		must(t, err)
		if fl&unix.O_NONBLOCK != 0 {
			t.Errorf("generation %d's socket is non-blocking", gen)
		}
		fdfl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		must(t, err)
		if fdfl&unix.FD_CLOEXEC == 0 {
			t.Errorf("generation %d's socket is not close-on-exec", gen)
		}
		if v, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT); v == 0 {
			t.Errorf("generation %d's socket lacks SO_REUSEPORT", gen)
		}
		if v, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR); v != 0 {
			t.Errorf("generation %d's socket has SO_REUSEADDR", gen)
		}
		if got := sockaddr.AddrPort(mustName(t, fd)); got != g.Addr() {
			t.Errorf("generation %d's socket is on %v, not %v", gen, got, g.Addr())
		}
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	must(t, err)
	defer unix.Close(fd)
	must(t, unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1))
	if err := unix.Bind(fd, g.sa); !errors.Is(err, unix.EADDRINUSE) {
		t.Fatalf("a socket with SO_REUSEADDR bound the group's address: %v", err)
	}
	if _, _, err := g.Take(3); err != nil {
		t.Fatal(err)
	}
}

func mustName(t *testing.T, fd int) unix.Sockaddr {
	t.Helper()
	sa, err := unix.Getsockname(fd)
	must(t, err)
	return sa
}

// The serving generation's socket outlives the generation: what arrives
// meanwhile waits in it for the next generation, which gets that socket.
func TestReleaseOfTheServingGenerationKeepsItsSocket(t *testing.T) {
	g := newGroup(t, "127.0.0.1:0", Options{})
	socks := gens{}
	take(t, g, 1, socks)
	must(t, g.Switch(1))
	a := newClient(t, g)
	expect(t, "gen 1 serving", landsOn(t, a, socks, 0), 1)
	f1 := socks[1]
	g.Release(1) // it crashed
	delete(socks, 1)
	payload := []byte("sent while no generation runs")
	must(t, unix.Sendto(a.fd, payload, 0, a.to))
	take(t, g, 2, socks)
	if socks[2] != f1 {
		t.Fatal("the replacement did not get the serving socket")
	}
	must(t, g.Switch(2))
	expect(t, "the datagram that waited", receiver(t, socks, payload), 2)
	expect(t, "the flow after", landsOn(t, a, socks, 0), 2)
	expect(t, "a new flow", landsOn(t, newClient(t, g), socks, 0), 2)
}

// A slot taken again is swept first: a flow of the socket that left it
// goes to the serving generation, not to the newcomer.
func TestReusedSlotIsSwept(t *testing.T) {
	g := newGroup(t, "127.0.0.1:0", Options{Slots: 2})
	socks := gens{}
	take(t, g, 1, socks)
	must(t, g.Switch(1))
	a := newClient(t, g)
	expect(t, "gen 1 serving", landsOn(t, a, socks, 0), 1)
	take(t, g, 2, socks)
	must(t, g.Switch(2))
	expect(t, "a flow of gen 1", landsOn(t, a, socks, 0), 1)
	if _, _, err := g.Take(3); err == nil || !strings.Contains(err.Error(), "no free slot") {
		t.Fatalf("a third socket in 2 slots: %v", err)
	}
	g.Release(1)
	delete(socks, 1)
	take(t, g, 3, socks) // gen 1's slot, while a's flow still names it
	expect(t, "a flow of the socket that left the slot", landsOn(t, a, socks, 0), 2)
	must(t, g.Switch(3))
	expect(t, "the same flow after the next switch", landsOn(t, a, socks, 0), 2)
	expect(t, "a new flow", landsOn(t, newClient(t, g), socks, 0), 3)
}

// flowAge is how long ago the program last saw c's flow; ok is false if
// the flow table does not hold it.
func flowAge(t *testing.T, g *Group, c *client) (age time.Duration, ok bool) {
	t.Helper()
	var v flowValue
	if err := g.maps.flows.Lookup(c.key(t), &v); err != nil {
		return 0, false
	}
	return time.Duration(monotonic() - v.Last), true
}

// waitIdle waits, bounded, until c's flow has been silent for longer than
// d, while keep (if any) goes on talking, each datagram landing on gen.
func waitIdle(t *testing.T, g *Group, c *client, d time.Duration, keep *client, socks gens, gen int) {
	t.Helper()
	deadline := time.Now().Add(d + 5*time.Second)
	for {
		age, ok := flowAge(t, g, c)
		if !ok {
			t.Fatal("the flow is not in the table")
		}
		if age > d {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the flow is still not idle for %v after %v", d, d+5*time.Second)
		}
		if keep != nil {
			expect(t, "a flow that keeps talking", landsOn(t, keep, socks, 0), gen)
		}
		time.Sleep(min(d-age, 50*time.Millisecond) + time.Millisecond)
	}
}

// A flow silent for longer than the idle timeout is a new flow; one that
// keeps talking stays.
func TestIdleFlowCountsAsNew(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			const idle = 300 * time.Millisecond
			g := newGroup(t, fam.addr, Options{IdleTimeout: idle})
			socks := gens{}
			take(t, g, 1, socks)
			must(t, g.Switch(1))
			quiet, talky := newClient(t, g), newClient(t, g)
			expect(t, "gen 1 serving", landsOn(t, quiet, socks, 0), 1)
			expect(t, "gen 1 serving", landsOn(t, talky, socks, 0), 1)
			take(t, g, 2, socks)
			must(t, g.Switch(2))
			expect(t, "a known flow after the switch", landsOn(t, quiet, socks, 0), 1)
			start := time.Now()
			waitIdle(t, g, quiet, idle, talky, socks, 1)
			expect(t, "a flow idle for longer than the timeout", landsOn(t, quiet, socks, 0), 2)
			expect(t, "a flow that kept talking", landsOn(t, talky, socks, 0), 1)
			expectFlows(t, g, map[int]int{1: 1, 2: 1})
			t.Logf("%s: the quiet flow moved to gen 2 after %v (timeout %v); the talking one stayed on gen 1", fam.name, time.Since(start).Round(time.Millisecond), idle)
		})
	}
}

// QUIC Initials (Options.QUIC): an Initial of a flow idle for longer than
// QUICInitialIdle is a new connection; one during the handshake, and other
// packets, follow the flow. Without the option, the payload is never read.
func TestQUICInitial(t *testing.T) {
	const quicIdle = 200 * time.Millisecond
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			g := newGroup(t, fam.addr, Options{QUIC: true, QUICInitialIdle: quicIdle, IdleTimeout: time.Hour})
			socks := gens{}
			take(t, g, 1, socks)
			must(t, g.Switch(1))
			a := newClient(t, g)
			expect(t, "gen 1 serving", sends(t, a, socks, packet(short, 60)), 1)
			take(t, g, 2, socks)
			must(t, g.Switch(2))
			expect(t, "an Initial of a busy flow (a retransmission)", sends(t, a, socks, packet(v1Initial, 1200)), 1)
			waitIdle(t, g, a, quicIdle, nil, nil, 0)
			expect(t, "a Handshake packet after a pause", sends(t, a, socks, packet(v1Handshake, 200)), 1)
			waitIdle(t, g, a, quicIdle, nil, nil, 0)
			expect(t, "a 1-RTT packet after a pause", sends(t, a, socks, packet(short, 60)), 1)
			waitIdle(t, g, a, quicIdle, nil, nil, 0)
			expect(t, "an RTP packet after a pause", sends(t, a, socks, packet(rtp, 172)), 1)
			waitIdle(t, g, a, quicIdle, nil, nil, 0)
			expect(t, "an Initial after a pause (a new connection)", sends(t, a, socks, packet(v1Initial, 1200)), 2)
			expect(t, "the new connection's next packet", sends(t, a, socks, packet(short, 60)), 2)
		})
	}
	t.Run("off", func(t *testing.T) {
		g := newGroup(t, "127.0.0.1:0", Options{QUICInitialIdle: quicIdle, IdleTimeout: time.Hour})
		socks := gens{}
		take(t, g, 1, socks)
		must(t, g.Switch(1))
		a := newClient(t, g)
		expect(t, "gen 1 serving", sends(t, a, socks, packet(v1Initial, 1200)), 1)
		if f := flowFlags(t, g, a); f != 0 {
			t.Fatalf("without the option, an Initial made a flow with flags %#x", f)
		}
		take(t, g, 2, socks)
		must(t, g.Switch(2))
		waitIdle(t, g, a, quicIdle, nil, nil, 0)
		expect(t, "an Initial after a pause, without the option", sends(t, a, socks, packet(v1Initial, 1200)), 1)
	})
}

// Idle counts from the last datagram steered to the generation, or from
// Take.
func TestIdle(t *testing.T) {
	g := newGroup(t, "127.0.0.1:0", Options{})
	socks := gens{}
	take(t, g, 1, socks)
	must(t, g.Switch(1))
	take(t, g, 2, socks)
	a := newClient(t, g)
	expect(t, "gen 1 serving", landsOn(t, a, socks, 0), 1)
	must(t, g.Switch(2))
	mark := time.Now()
	deadline := mark.Add(5 * time.Second)
	for g.Idle(1) < 100*time.Millisecond {
		if time.Now().After(deadline) {
			t.Fatalf("Idle(1) = %v after 5 s without a datagram", g.Idle(1))
		}
		expect(t, "a new flow", landsOn(t, newClient(t, g), socks, 0), 2)
		time.Sleep(10 * time.Millisecond)
	}
	if d := g.Idle(2); d > 50*time.Millisecond {
		t.Fatalf("Idle(2) = %v while it gets a datagram every 10 ms", d)
	}
	if d, since := g.Idle(1), time.Since(mark); d > since+5*time.Millisecond {
		t.Fatalf("Idle(1) = %v, more than the %v since its last datagram", d, since)
	}
	t.Logf("Idle(1) = %v, Idle(2) = %v", g.Idle(1), g.Idle(2))
}

// FromFile takes the caller's bound socket as the first member; the first
// generation gets it, and the caller keeps it. A socket without
// SO_REUSEPORT is refused.
func TestFromFile(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("eBPF steering unavailable here: %v", err)
	}
	bound := func(reusePort bool) *os.File {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		must(t, err)
		if reusePort {
			must(t, unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1))
		}
		must(t, unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}))
		f := os.NewFile(uintptr(fd), "udp")
		t.Cleanup(func() { f.Close() })
		return f
	}
	if _, err := FromFile(bound(false), Options{}); err == nil || !strings.Contains(err.Error(), "SO_REUSEPORT") {
		t.Fatalf("a socket without SO_REUSEPORT: %v", err)
	}
	f := bound(true)
	g, err := FromFile(f, Options{})
	must(t, err)
	defer g.Close()
	socks := gens{}
	take(t, g, 1, socks)
	if socks[1] != f {
		t.Fatal("the first generation did not get the caller's socket")
	}
	must(t, g.Switch(1))
	a := newClient(t, g)
	expect(t, "gen 1 serving", landsOn(t, a, socks, 0), 1)
	take(t, g, 2, socks)
	must(t, g.Switch(2))
	expect(t, "a known flow", landsOn(t, a, socks, 0), 1)
	g.Release(1)
	delete(socks, 1)
	expect(t, "gen 1's flow after its release", landsOn(t, a, socks, 0), 2)
	if _, err := unix.GetsockoptInt(int(f.Fd()), unix.SOL_SOCKET, unix.SO_TYPE); err != nil {
		t.Fatalf("Release closed the caller's socket: %v", err)
	}
}

// A dual-stack group ([::]) steers IPv4 and IPv6 flows alike; an IPv4 flow's
// key holds its addresses as ::ffff:a.b.c.d.
func TestDualStack(t *testing.T) {
	g := newGroup(t, "[::]:0", Options{})
	if g.sock.V6Only {
		t.Fatal("an unspecified IPv6 address made an IPv6-only socket")
	}
	socks := gens{}
	take(t, g, 1, socks)
	must(t, g.Switch(1))
	port := int(g.Addr().Port())
	v4 := &client{to: &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: port}}
	v6 := &client{to: &unix.SockaddrInet6{Addr: netip.IPv6Loopback().As16(), Port: port}}
	for _, c := range []*client{v4, v6} {
		family, local := unix.AF_INET6, unix.Sockaddr(&unix.SockaddrInet6{Addr: netip.IPv6Loopback().As16()})
		if _, ok := c.to.(*unix.SockaddrInet4); ok {
			family, local = unix.AF_INET, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}
		}
		fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		must(t, err)
		t.Cleanup(func() { unix.Close(fd) })
		must(t, unix.Bind(fd, local))
		c.fd = fd
		expect(t, "gen 1 serving", landsOn(t, c, socks, 0), 1)
	}
	take(t, g, 2, socks)
	must(t, g.Switch(2))
	for _, c := range []*client{v4, v6} {
		expect(t, "a known flow", landsOn(t, c, socks, 0), 1)
	}
	k := v4.key(t)
	if !netip.AddrFrom16(k.Src).Is4In6() || !netip.AddrFrom16(k.Dst).Is4In6() {
		t.Fatalf("the test's IPv4 key is not v4-mapped: %v", k)
	}
	if _, ok := flowAge(t, g, v4); !ok {
		t.Fatal("no flow under the v4-mapped key of the IPv4 client")
	}
	expectFlows(t, g, map[int]int{1: 2})
}
