package udpsteer

import (
	"errors"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// takeFresh takes gen's socket and checks what Take says of it.
func takeFresh(t *testing.T, g *Group, gen int, socks gens, want bool) *os.File {
	t.Helper()
	f, fresh, err := g.Take(gen)
	must(t, err)
	if fresh != want {
		t.Fatalf("Take(%d): fresh %v, want %v", gen, fresh, want)
	}
	socks[gen] = f
	return f
}

// Take says whether another generation had the socket before: not for a
// new socket, nor for the group's first the first time; for the serving
// socket taken again by a replacement, it had. Taking again says the
// same.
func TestTakeFresh(t *testing.T) {
	g := newGroup(t, "127.0.0.1:0", Options{})
	socks := gens{}
	f1 := takeFresh(t, g, 1, socks, true)
	if again := takeFresh(t, g, 1, socks, true); again != f1 {
		t.Fatal("Take(1) twice gave two sockets")
	}
	must(t, g.Switch(1))
	f2 := takeFresh(t, g, 2, socks, true)
	must(t, g.Switch(2))
	g.Release(2) // the serving generation exited: its socket waits
	if f3 := takeFresh(t, g, 3, socks, false); f3 != f2 {
		t.Fatal("the replacement did not get the serving socket")
	}
	takeFresh(t, g, 3, socks, false)
	must(t, g.Switch(3))
	g.Release(1)
	takeFresh(t, g, 4, socks, true)

	t.Run("FromFile", func(t *testing.T) {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		must(t, err)
		must(t, unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1))
		must(t, unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}))
		f := os.NewFile(uintptr(fd), "udp")
		t.Cleanup(func() { f.Close() })
		g, err := FromFile(f, Options{})
		must(t, err)
		defer g.Close()
		socks := gens{}
		if takeFresh(t, g, 1, socks, true) != f {
			t.Fatal("the first generation did not get the caller's socket")
		}
		must(t, g.Switch(1))
		g.Release(1)
		takeFresh(t, g, 2, socks, false)
	})
}

// waitQueued waits, bounded, until Queued(gen) is not 0.
func waitQueued(t *testing.T, g *Group, gen int) int {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, err := g.Queued(gen)
		must(t, err)
		if n != 0 {
			return n
		}
		if time.Now().After(deadline) {
			t.Fatalf("Queued(%d) still 0 after 5 s", gen)
		}
		time.Sleep(time.Millisecond)
	}
}

func queued(t *testing.T, g *Group, gen int) int {
	t.Helper()
	n, err := g.Queued(gen)
	must(t, err)
	return n
}

// Queued tells what waits in a socket nobody reads: the size of the first
// datagram, 0 when none (or when the first is empty).
func TestQueued(t *testing.T) {
	g := newGroup(t, "127.0.0.1:0", Options{})
	socks := gens{}
	take(t, g, 1, socks)
	must(t, g.Switch(1))
	if n := queued(t, g, 1); n != 0 {
		t.Fatalf("Queued(1) = %d before any datagram", n)
	}
	if n := queued(t, g, 2); n != 0 {
		t.Fatalf("Queued(2) = %d for a generation without a socket", n)
	}
	c := newClient(t, g)
	first, second := make([]byte, 100), make([]byte, 300)
	must(t, unix.Sendto(c.fd, first, 0, c.to))
	must(t, unix.Sendto(c.fd, second, 0, c.to))
	if n := waitQueued(t, g, 1); n != len(first) {
		t.Fatalf("Queued(1) = %d with datagrams of %d and %d bytes waiting", n, len(first), len(second))
	}
	fd := int(socks[1].Fd())
	buf := make([]byte, 1024)
	recv := func(want int) {
		t.Helper()
		n, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
		must(t, err)
		if n != want {
			t.Fatalf("read %d bytes, want %d", n, want)
		}
	}
	recv(len(first))
	if n := queued(t, g, 1); n != len(second) {
		t.Fatalf("Queued(1) = %d with the %d-byte datagram waiting", n, len(second))
	}
	recv(len(second))
	if n := queued(t, g, 1); n != 0 {
		t.Fatalf("Queued(1) = %d after both were read", n)
	}
	// An empty datagram waits, and reads 0.
	must(t, unix.Sendto(c.fd, nil, 0, c.to))
	p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for deadline := time.Now().Add(5 * time.Second); p[0].Revents&unix.POLLIN == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the empty datagram did not come in 5 s")
		}
		if _, err := unix.Poll(p, 100); err != nil && !errors.Is(err, unix.EINTR) {
			t.Fatal(err)
		}
	}
	if n := queued(t, g, 1); n != 0 {
		t.Fatalf("Queued(1) = %d with an empty datagram waiting", n)
	}
	recv(0)
	g.Close()
	if _, err := g.Queued(1); err == nil {
		t.Fatal("Queued on a closed group")
	}
}
