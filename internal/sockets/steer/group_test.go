package steer

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// listen makes a listening TCP socket like the one relay binds.
func listen(t *testing.T, addr string, reusePort bool) *os.File {
	t.Helper()
	ap := netip.MustParseAddrPort(addr)
	family := unix.AF_INET
	var sa unix.Sockaddr
	if ap.Addr().Is4() {
		sa = &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	} else {
		family = unix.AF_INET6
		sa = &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if reusePort {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			t.Fatal(err)
		}
	}
	if family == unix.AF_INET6 && ap.Addr().IsUnspecified() {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		if ap.Addr().Is6() {
			t.Skipf("no IPv6 here: %v", err)
		}
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 128); err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), addr)
	t.Cleanup(func() { f.Close() })
	return f
}

// dialTo connects to the group's port on host, through control if set, and
// returns the connection.
func dialTo(t *testing.T, g *Group, host string, control func(string, string, syscall.RawConn) error) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if control != nil {
		d.Control = control
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(int(g.Addr().Port()))))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// receiver finds which of the generations' sockets has the one connection
// waiting, and accepts it. It fails if none or several have one.
func receiver(t *testing.T, socks map[int]*os.File) int {
	t.Helper()
	var fds []unix.PollFd
	var gens []int
	for gen, f := range socks {
		fds = append(fds, unix.PollFd{Fd: int32(f.Fd()), Events: unix.POLLIN})
		gens = append(gens, gen)
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		for i := range fds {
			fds[i].Revents = 0
		}
		n, err := unix.Poll(fds, 100)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			continue
		}
		got := -1
		for i, p := range fds {
			if p.Revents&unix.POLLIN != 0 {
				if got != -1 {
					t.Fatalf("connections queued on generations %d and %d", got, gens[i])
				}
				got = gens[i]
				nfd, _, err := unix.Accept4(int(p.Fd), unix.SOCK_CLOEXEC)
				if err != nil {
					t.Fatal(err)
				}
				unix.Close(nfd)
			}
		}
		return got
	}
	t.Fatal("no socket got the connection")
	return 0
}

func take(t *testing.T, g *Group, gen int, socks map[int]*os.File) {
	t.Helper()
	f, _, err := g.Take(gen, 0)
	if err != nil {
		t.Fatal(err)
	}
	socks[gen] = f
}

func expect(t *testing.T, what string, got, want int) {
	t.Helper()
	if got != want {
		t.Fatalf("%s: got generation %d, want %d", what, got, want)
	}
}

func TestGroupSteers(t *testing.T) {
	for _, tc := range []struct{ bind, dial string }{
		{"127.0.0.1:0", "127.0.0.1"},
		{"[::1]:0", "::1"},
		{"[::]:0", "127.0.0.1"}, // IPv4 into a dual-stack group
		{"[::]:0", "::1"},
	} {
		t.Run(tc.bind+"/"+tc.dial, func(t *testing.T) {
			orig := listen(t, tc.bind, true)
			g, err := New(orig, Options{Name: "test"})
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			if g.size() != 1 {
				t.Fatalf("size after New: %d", g.size())
			}
			socks := map[int]*os.File{}
			take(t, g, 1, socks)
			if socks[1] != orig {
				t.Fatal("the first generation did not get the original socket")
			}
			dialTo(t, g, tc.dial, nil)
			expect(t, "gen 1 alone", receiver(t, socks), 1)

			take(t, g, 2, socks)
			dialTo(t, g, tc.dial, nil)
			expect(t, "public, before the switch", receiver(t, socks), 1)
			dialTo(t, g, tc.dial, ProbeControl([]*Group{g}, 2, 0))
			expect(t, "probe for gen 2", receiver(t, socks), 2)
			dialTo(t, g, tc.dial, nil)
			expect(t, "public, after a probe", receiver(t, socks), 1)

			if err := g.Switch(2); err != nil {
				t.Fatal(err)
			}
			for range 3 {
				dialTo(t, g, tc.dial, nil)
				expect(t, "public, after the switch", receiver(t, socks), 2)
			}
			g.Release(1)
			delete(socks, 1)
			if g.size() != 1 {
				t.Fatalf("size after gen 1 left: %d", g.size())
			}
			// Gen 2's socket moved to index 0; the program followed.
			for range 3 {
				dialTo(t, g, tc.dial, nil)
				expect(t, "public, after gen 1 left", receiver(t, socks), 2)
			}
		})
	}
}

// Three generations at once: a socket whose leaving would move the one the
// program names stays, free, until that is safe, and is reused meanwhile.
func TestGroupDefersUnsafeRemoval(t *testing.T) {
	orig := listen(t, "127.0.0.1:0", true)
	g, err := New(orig, Options{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	socks := map[int]*os.File{}
	public := func(want int) {
		t.Helper()
		dialTo(t, g, "127.0.0.1", nil)
		expect(t, "public", receiver(t, socks), want)
	}
	take(t, g, 1, socks) // [1]
	take(t, g, 2, socks) // [1 2]
	if err := g.Switch(2); err != nil {
		t.Fatal(err)
	}
	take(t, g, 3, socks) // [1 2 3]
	dialTo(t, g, "127.0.0.1", ProbeControl([]*Group{g}, 3, 0))
	expect(t, "probe", receiver(t, socks), 3)

	g.Release(1) // would move 3, the probe's target, with 2 left: stays
	delete(socks, 1)
	if g.size() != 3 {
		t.Fatalf("size: got %d, want 3", g.size())
	}
	public(2)
	if err := g.Switch(3); err != nil {
		t.Fatal(err)
	}
	public(3)
	g.Release(2) // [free free 3]: any removal moves 3 with another left
	delete(socks, 2)
	if g.size() != 3 {
		t.Fatalf("size: got %d, want 3", g.size())
	}
	public(3)
	take(t, g, 4, socks) // reuses a free socket: no growth
	if g.size() != 3 {
		t.Fatalf("size after take: got %d, want 3", g.size())
	}
	public(3)
	if err := g.Switch(4); err != nil {
		t.Fatal(err)
	}
	if g.size() != 2 {
		t.Fatalf("size after the switch to 4: got %d, want 2", g.size())
	}
	public(4)
	g.Release(3)
	delete(socks, 3)
	if g.size() != 1 {
		t.Fatalf("size at the end: got %d, want 1", g.size())
	}
	public(4)
}

// A generation that exits while its socket is the public target leaves
// the socket in place: connections queue there for the next one.
func TestGroupKeepsActiveSocketOfCrashedGeneration(t *testing.T) {
	orig := listen(t, "127.0.0.1:0", true)
	g, err := New(orig, Options{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	socks := map[int]*os.File{}
	take(t, g, 1, socks)
	g.Release(1)
	if g.size() != 1 {
		t.Fatalf("size: %d", g.size())
	}
	dialTo(t, g, "127.0.0.1", nil) // queued while nothing serves
	take(t, g, 2, socks)
	if socks[2] != orig {
		t.Fatal("the replacement did not get the socket with the queued connection")
	}
	delete(socks, 1)
	expect(t, "queued connection", receiver(t, socks), 2)
}

func TestGroupRefuses(t *testing.T) {
	if _, err := New(listen(t, "127.0.0.1:0", false), Options{}); err == nil {
		t.Fatal("a socket without SO_REUSEPORT was accepted")
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	udp := os.NewFile(uintptr(fd), "udp")
	defer udp.Close()
	if _, err := New(udp, Options{}); !errors.Is(err, ErrNotStream) {
		t.Fatalf("udp socket: got %v, want ErrNotStream", err)
	}
}

func TestProgramShape(t *testing.T) {
	p, err := program([]uint32{2})
	if err != nil || len(p) != 1 {
		t.Fatalf("plain program: %v %v", p, err)
	}
	for _, from := range []string{"127.0.0.1:40000", "[::1]:40000"} {
		p, err := program([]uint32{0}, probeRule{from: netip.MustParseAddrPort(from), index: 1})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := assemble(p); err != nil {
			t.Fatalf("%s: %v", from, err)
		}
	}
}

// size is the number of sockets in the group.
func (g *Group) size() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.members)
}

// Covers is what ProbeControl steers: an address the group covers that is
// surely on this host, the group's own or, for a wildcard, a loopback one.
func TestCovers(t *testing.T) {
	for _, tc := range []struct {
		bind string
		dst  map[string]bool
	}{
		{"127.0.0.1:0", map[string]bool{"127.0.0.1": true, "127.0.0.2": false, "0.0.0.0": false, "::1": false}},
		{"0.0.0.0:0", map[string]bool{"127.0.0.1": true, "127.0.0.2": true, "10.1.2.3": false, "0.0.0.0": false, "::1": false}},
		{"[::]:0", map[string]bool{"127.0.0.1": true, "::1": true, "::": false, "2001:db8::1": false}},
	} {
		t.Run(tc.bind, func(t *testing.T) {
			g, err := New(listen(t, tc.bind, true), Options{Name: "test"})
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			port := g.Addr().Port()
			for host, want := range tc.dst {
				if got := g.Covers(netip.AddrPortFrom(netip.MustParseAddr(host), port)); got != want {
					t.Errorf("Covers(%s) = %v, want %v", host, got, want)
				}
				if g.Covers(netip.AddrPortFrom(netip.MustParseAddr(host), port+1)) {
					t.Errorf("Covers(%s) on another port", host)
				}
			}
		})
	}
}
