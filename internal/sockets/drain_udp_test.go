package sockets

import (
	"context"
	"errors"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockets/steer"
)

// A QUIC client that began its handshake with the old generation before
// the switch holds the old generation's drain until its first short-header
// packet: the drain hears of it (Backlog.QUIC), the handshake's later
// packets, Initials included, still reach the old generation, and the
// drain ends once the short header has come.
func TestDrainWaitsForQUICHandshakes(t *testing.T) {
	set := openSet(t, SteerAuto, "udp:127.0.0.1:0")
	if !set.UDPSteered() {
		t.Skip("UDP steering unavailable here (needs CAP_BPF or root)")
	}
	gen1 := takeFD(t, set, 1)
	if err := set.Switch(1, 0); err != nil {
		t.Fatal(err)
	}
	to := &unix.SockaddrInet4{Port: int(port(t, set, 0)), Addr: [4]byte{127, 0, 0, 1}}
	client, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(client) })
	send := func(what string, first byte, size int) {
		t.Helper()
		p := make([]byte, size)
		p[0] = first
		p[4] = 1 // QUIC version 1 in bytes 1-4
		if err := unix.Sendto(client, p, 0, to); err != nil {
			t.Fatalf("sending %s: %v", what, err)
		}
	}
	send("an Initial", 0xc3, 1200)
	recvOn(t, gen1, "the Initial")

	gen2 := takeFD(t, set, 2)
	if err := set.Switch(2, 1); err != nil {
		t.Fatal(err)
	}
	heard := make(chan steer.Backlog, 1)
	done := make(chan error, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	go func() {
		done <- set.WaitDrained(ctx, 1, func(b steer.Backlog) { heard <- b })
	}()
	select {
	case b := <-heard:
		if b.QUIC != 1 {
			t.Fatalf("the drain waits for %+v, want 1 QUIC handshake", b)
		}
	case err := <-done:
		t.Fatalf("the drain ended (%v) with a QUIC handshake in progress", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the drain did not say what it waits for within 10s")
	}
	// Generation 1 is retired now: its handshake's packets still reach it.
	send("a Handshake packet", 0xe3, 300)
	recvOn(t, gen1, "the Handshake packet")
	send("a second Initial", 0xc3, 1200)
	recvOn(t, gen1, "the second Initial")
	select {
	case err := <-done:
		t.Fatalf("the drain ended (%v) before the client's first short header", err)
	default:
	}
	send("a short-header packet", 0x41, 60)
	recvOn(t, gen1, "the short-header packet")
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the drain: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the drain did not end within 10s of the client's short header")
	}
	// A new connection from the same 4-tuple goes to generation 2.
	send("a new connection's Initial", 0xc3, 1200)
	recvOn(t, gen2, "the new connection's Initial")
}

// takeFD takes generation gen's sockets and returns the first one's fd.
func takeFD(t *testing.T, set *Set, gen int) int {
	t.Helper()
	files, err := set.Take(gen, 0)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := fileFD(files[0])
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

// recvOn waits, at most 5 s, for a datagram on fd.
func recvOn(t *testing.T, fd int, what string) {
	t.Helper()
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(pfd, 5000)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			t.Fatalf("%s did not reach the socket within 5s", what)
		}
		break
	}
	buf := make([]byte, 2048)
	if _, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT); err != nil {
		t.Fatalf("reading %s: %v", what, err)
	}
}
