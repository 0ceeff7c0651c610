package sockets

import (
	"errors"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	"github.com/relaysh/relay/internal/sockets/steer"
	"github.com/relaysh/relay/internal/sockets/steer/steertest"
)

// HandOver moves what waits in a generation's steered TCP sockets to the
// serving generation's, and retires it on the UDP ones.
func TestHandOver(t *testing.T) {
	set := openSet(t, SteerAuto, "127.0.0.1:0", "udp:127.0.0.1:0")
	if !set.Migrates() {
		why := "net.ipv4.tcp_migrate_req is off and relay could not turn it on: a shut down socket's queue would be reset"
		if os.Getenv("RELAY_REQUIRE_ALL") == "1" {
			t.Fatal(why + " (RELAY_REQUIRE_ALL=1: nothing may be skipped)")
		}
		t.Skip(why)
	}
	tcp, udp := port(t, set, 0), port(t, set, 1)
	gen1, err := set.Take(1, 0)
	if err != nil {
		t.Fatal(err)
	}
	gen2, err := set.Take(2, 0)
	if err != nil {
		t.Fatal(err)
	}
	if fileInode(t, gen1[1]) == fileInode(t, gen2[1]) {
		t.Fatal("the UDP listener is not steered: one socket for both generations")
	}
	// A UDP client heard while generation 1 serves: its flow is
	// generation 1's.
	c, err := net.Dial("udp", fmt.Sprintf("127.0.0.1:%d", udp))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	readUDP := func(f *os.File, want string) {
		t.Helper()
		pc, err := net.FilePacketConn(f)
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		if err := pc.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 16)
		if k, _, err := pc.ReadFrom(buf); err != nil || string(buf[:k]) != want {
			t.Fatalf("read %q, %v; want %q", buf[:k], err, want)
		}
	}
	if _, err := c.Write([]byte("one")); err != nil {
		t.Fatal(err)
	}
	readUDP(gen1[1], "one")
	const n = 4
	for i := range n {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", tcp), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := fmt.Fprintf(c, "queued %d\n", i); err != nil {
			t.Fatal(err)
		}
	}
	g := set.entries[0].Group
	deadline := time.Now().Add(5 * time.Second)
	for q, _ := g.Queued(1); q != n; q, _ = g.Queued(1) {
		if time.Now().After(deadline) {
			t.Fatalf("generation 1's queue: %d connections, want %d", q, n)
		}
		time.Sleep(time.Millisecond)
	}
	if err := set.Switch(2, 1); err != nil {
		t.Fatal(err)
	}

	if _, err := set.HandOver(2); !errors.Is(err, steer.ErrTarget) {
		t.Fatalf("HandOver of the serving generation: %v, want steer.ErrTarget", err)
	}
	queued, err := set.HandOver(1)
	if err != nil || queued != n {
		t.Fatalf("HandOver: %d, %v; want %d", queued, err, n)
	}
	got := map[string]bool{}
	raw, err := gen2[0].SyscallConn() // not Fd(): it would make the socket blocking
	if err != nil {
		t.Fatal(err)
	}
	if err := raw.Control(func(fd uintptr) {
		for range n {
			got[steertest.AcceptLine(t, int(fd))] = true
		}
	}); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if !got[fmt.Sprintf("queued %d", i)] {
			t.Fatalf("generation 2 served %v, want queued 0 to %d", got, n-1)
		}
	}

	// HandOver retired generation 1 on the UDP listener: the plain UDP
	// flow it had goes to generation 2.
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	readUDP(gen2[1], "ping")
	set.Release(1)
	if q, err := set.HandOver(1); q != 0 || err != nil {
		t.Fatalf("HandOver after Release: %d, %v", q, err)
	}
}
