package sockdiag

import (
	"io"
	"net"
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// deferListener listens on loopback with TCP_DEFER_ACCEPT, so that a
// client that connected and sent nothing stays a request socket.
func deferListener(t *testing.T, network, addr string) *net.TCPListener {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 30)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	l, err := lc.Listen(t.Context(), network, addr)
	if err != nil {
		t.Skipf("no %s listener on %s: %v", network, addr, err)
	}
	t.Cleanup(func() { l.Close() })
	return l.(*net.TCPListener)
}

// waitFor polls Handshakes until want says yes, for at most 5s.
func waitFor(t *testing.T, c *Conn, family uint8, port uint16, want func([]Handshake) bool) []Handshake {
	t.Helper()
	return pollUntil(t, c.Handshakes, family, port, want)
}

// connectionsTo polls List until want says yes of its connections, for at
// most 5s.
func connectionsTo(t *testing.T, c *Conn, family uint8, port uint16, want func([]Connection) bool) []Connection {
	t.Helper()
	connections := func(family uint8, port uint16) ([]Connection, error) {
		l, err := c.List(family, port)
		return l.Connections, err
	}
	return pollUntil(t, connections, family, port, want)
}

// pollUntil calls list until want says yes of what it lists, for at most 5s.
func pollUntil[T any](t *testing.T, list func(uint8, uint16) ([]T, error), family uint8, port uint16, want func([]T) bool) []T {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		xs, err := list(family, port)
		if err != nil {
			t.Fatal(err)
		}
		if want(xs) {
			return xs
		}
		if time.Now().After(deadline) {
			t.Fatalf("on port %d: %+v", port, xs)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestHandshakesSeesAPendingOneUntilItCompletes(t *testing.T) {
	for _, tc := range []struct {
		network, addr string
		family        uint8
	}{{"tcp4", "127.0.0.1:0", unix.AF_INET}, {"tcp6", "[::1]:0", unix.AF_INET6}} {
		t.Run(tc.network, func(t *testing.T) {
			l := deferListener(t, tc.network, tc.addr)
			port := uint16(l.Addr().(*net.TCPAddr).Port)
			c, err := Dial()
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if hs, err := c.Handshakes(tc.family, port); err != nil || len(hs) != 0 {
				t.Fatalf("before any client: %v, %v", hs, err)
			}
			client, err := net.Dial(tc.network, l.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			me := client.LocalAddr().(*net.TCPAddr).AddrPort()
			want := Handshake{Local: l.Addr().(*net.TCPAddr).AddrPort(), Remote: me}
			waitFor(t, c, tc.family, port, func(hs []Handshake) bool { return slices.Contains(hs, want) })

			// Data completes it into the accept queue.
			if _, err := client.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			waitFor(t, c, tc.family, port, func(hs []Handshake) bool { return !slices.Contains(hs, want) })
			conn, err := l.AcceptTCP()
			if err != nil {
				t.Fatal(err)
			}
			conn.Close()
		})
	}
}

func TestHandshakesOfADualStackListenerShowIPv4Unmapped(t *testing.T) {
	l := deferListener(t, "tcp", "[::]:0")
	port := uint16(l.Addr().(*net.TCPAddr).Port)
	c, err := Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	client, err := net.Dial("tcp4", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port).String())
	if err != nil {
		t.Skipf("no IPv4 to a dual-stack listener: %v", err)
	}
	defer client.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		var all []Handshake
		for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
			hs, err := c.Handshakes(family, port)
			if err != nil {
				t.Fatal(err)
			}
			all = append(all, hs...)
		}
		if len(all) == 1 {
			if all[0].Local != netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port) {
				t.Fatalf("local address %v, want 127.0.0.1:%d", all[0].Local, port)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("handshakes on port %d: %v, want one", port, all)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestParseRefusesAShortMessage(t *testing.T) {
	if _, _, err := parse(make([]byte, sizeofMsg-1)); err == nil {
		t.Fatal("a short message parsed")
	}
}

// loopbacks are the loopback listeners the tests run on, by family.
func loopbacks() []struct {
	network, addr string
	family        uint8
} {
	return []struct {
		network, addr string
		family        uint8
	}{{"tcp4", "127.0.0.1:0", unix.AF_INET}, {"tcp6", "[::1]:0", unix.AF_INET6}}
}

// diagConn opens a socket diagnostics connection for the test.
func diagConn(t *testing.T) *Conn {
	t.Helper()
	c, err := Dial()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// dialTCP connects to addr for the test; closing it early is harmless.
func dialTCP(t *testing.T, network, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestConnectionsShowWhatTheServerHasNotRead(t *testing.T) {
	for _, tc := range loopbacks() {
		t.Run(tc.network, func(t *testing.T) {
			l, err := net.Listen(tc.network, tc.addr)
			if err != nil {
				t.Skipf("no %s listener: %v", tc.network, err)
			}
			defer l.Close()
			other, err := net.Listen(tc.network, tc.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer other.Close()
			port := uint16(l.Addr().(*net.TCPAddr).Port)
			c := diagConn(t)

			// A connection to the other listener is not listed.
			dialTCP(t, tc.network, other.Addr().String())
			client := dialTCP(t, tc.network, l.Addr().String())
			me := client.LocalAddr().(*net.TCPAddr).AddrPort()
			mine := func(cs []Connection) (Connection, bool) {
				for _, x := range cs {
					if x.Remote == me {
						return x, true
					}
				}
				return Connection{}, false
			}

			// Connected, nothing sent: listed, in the accept queue.
			cs := connectionsTo(t, c, tc.family, port, func(cs []Connection) bool { _, ok := mine(cs); return ok })
			if x, _ := mine(cs); x.Unread != 0 || x.Received != 0 || x.Inode != 0 || x.Local.Port() != port {
				t.Errorf("before any data: %+v", x)
			}
			for _, x := range cs {
				if x.Local.Port() != port {
					t.Errorf("listed a connection to another port: %+v", x)
				}
			}

			// Sent, not yet read: unread.
			if _, err := client.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			connectionsTo(t, c, tc.family, port, func(cs []Connection) bool {
				x, ok := mine(cs)
				return ok && x.Unread == 5 && x.Received == 5
			})

			// Accepted and read: nothing unread, still received.
			server, err := l.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer server.Close()
			if _, err := io.ReadFull(server, make([]byte, 5)); err != nil {
				t.Fatal(err)
			}
			connectionsTo(t, c, tc.family, port, func(cs []Connection) bool {
				x, ok := mine(cs)
				return ok && x.Unread == 0 && x.Received == 5 && x.Inode != 0
			})

			// Closed by both: gone.
			client.Close()
			server.Close()
			connectionsTo(t, c, tc.family, port, func(cs []Connection) bool { _, ok := mine(cs); return !ok })
		})
	}
}

func TestLookFindsOneTupleAsListDoes(t *testing.T) {
	for _, tc := range loopbacks() {
		t.Run(tc.network, func(t *testing.T) {
			l := deferListener(t, tc.network, tc.addr)
			c := diagConn(t)
			client := dialTCP(t, tc.network, l.Addr().String())
			tuple := Handshake{Local: l.Addr().(*net.TCPAddr).AddrPort(), Remote: client.LocalAddr().(*net.TCPAddr).AddrPort()}
			look := func(want func(Listing) bool) Listing {
				t.Helper()
				return pollUntil(t, func(uint8, uint16) ([]Listing, error) {
					got, err := c.Look([]Handshake{tuple})
					return []Listing{got}, err
				}, tc.family, tuple.Local.Port(), func(ls []Listing) bool { return want(ls[0]) })[0]
			}

			// Connected, nothing sent, behind TCP_DEFER_ACCEPT: a handshake.
			look(func(l Listing) bool {
				return len(l.Handshakes) == 1 && l.Handshakes[0] == tuple && len(l.Connections) == 0
			})

			// Sent: a connection with its bytes unread.
			if _, err := client.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			got := look(func(l Listing) bool { return len(l.Connections) == 1 && l.Connections[0].Unread == 5 })
			if x := got.Connections[0]; x.Local != tuple.Local || x.Remote != tuple.Remote || x.Received != 5 || len(got.Handshakes) != 0 {
				t.Errorf("after the client's bytes: %+v", got)
			}

			// Read, then closed by both: gone.
			server, err := l.Accept()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(server, make([]byte, 5)); err != nil {
				t.Fatal(err)
			}
			look(func(l Listing) bool {
				return len(l.Connections) == 1 && l.Connections[0].Unread == 0 && l.Connections[0].Inode != 0
			})
			client.Close()
			server.Close()
			look(func(l Listing) bool { return len(l.Handshakes) == 0 && len(l.Connections) == 0 })
		})
	}
}

// A lookup's deadline is its own: a walk of the table after it, on the
// same connection, is not cut short once that deadline has passed.
func TestListAfterALookupsDeadline(t *testing.T) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Skipf("no tcp4 listener: %v", err)
	}
	defer l.Close()
	c := diagConn(t)
	c.replyTimeout = 50 * time.Millisecond
	client := dialTCP(t, "tcp4", l.Addr().String())
	tuple := Handshake{Local: l.Addr().(*net.TCPAddr).AddrPort(), Remote: client.LocalAddr().(*net.TCPAddr).AddrPort()}
	looked := time.Now()
	if _, err := c.Look([]Handshake{tuple}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Until(looked.Add(2 * c.replyTimeout))) // the lookup's deadline has passed
	if _, err := c.List(unix.AF_INET, tuple.Local.Port()); err != nil {
		t.Fatalf("a walk after a lookup's deadline: %v", err)
	}
	if _, err := c.Handshakes(unix.AF_INET, tuple.Local.Port()); err != nil {
		t.Fatalf("a walk after a lookup's deadline: %v", err)
	}
}
