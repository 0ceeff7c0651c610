package steer

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockdiag"
	"github.com/relaysh/relay/internal/sockets/steer/steertest"
)

// requireMigration turns net.ipv4.tcp_migrate_req on, as relay does, or
// skips the test where it cannot be (fails it where RELAY_REQUIRE_ALL=1).
// It stays on, as relay leaves it: other tests running at the same time
// may need it.
func requireMigration(t *testing.T) {
	t.Helper()
	if _, err := EnableMigration(); err != nil {
		why := fmt.Sprintf("the kernel would reset a shut down socket's queue, not move it: %v", err)
		if os.Getenv("RELAY_REQUIRE_ALL") == "1" {
			t.Fatal(why + " (RELAY_REQUIRE_ALL=1: nothing may be skipped)")
		}
		t.Skip(why)
	}
}

// deferAccept makes a client that connected and sent nothing stay a
// handshake in progress on f: a slow client, held as long as needed.
func deferAccept(t *testing.T, f *os.File) {
	t.Helper()
	if err := unix.SetsockoptInt(int(f.Fd()), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 30); err != nil {
		t.Fatal(err)
	}
}

// request connects to the group's port on host and sends line.
func request(t *testing.T, g *Group, host, line string) net.Conn {
	t.Helper()
	c := dialTo(t, g, host, nil)
	if _, err := c.Write([]byte(line + "\n")); err != nil {
		t.Fatal(err)
	}
	return c
}

// served accepts n connections from the generations' sockets socks and
// reads a line from each. It returns which generation got each line, and
// fails if a line comes twice or the n do not come within 5 s.
func served(t *testing.T, socks map[int]*os.File, n int) map[string]int {
	t.Helper()
	var fds []unix.PollFd
	var gens []int
	for gen, f := range socks {
		fds = append(fds, unix.PollFd{Fd: int32(f.Fd()), Events: unix.POLLIN})
		gens = append(gens, gen)
	}
	got := map[string]int{}
	deadline := time.Now().Add(5 * time.Second)
	for len(got) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d connections served in 5 s: %v", len(got), n, got)
		}
		for i := range fds {
			fds[i].Revents = 0
		}
		if _, err := unix.Poll(fds, 100); err != nil && !errors.Is(err, unix.EINTR) {
			t.Fatal(err)
		}
		for i, p := range fds {
			if p.Revents&unix.POLLIN == 0 {
				continue
			}
			line := steertest.AcceptLine(t, int(p.Fd))
			if gen, dup := got[line]; dup {
				t.Fatalf("%q served twice, by generations %d and %d", line, gen, gens[i])
			}
			got[line] = gens[i]
		}
	}
	return got
}

// waitQueued waits until n connections are in generation gen's accept
// queue.
func waitQueued(t *testing.T, g *Group, gen, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		q, err := g.Queued(gen)
		if err != nil {
			t.Fatal(err)
		}
		if q == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("generation %d's queue: %d connections, want %d", gen, q, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// handshakes counts the handshakes in progress towards the group's port.
func handshakes(t *testing.T, g *Group) int {
	t.Helper()
	diag, err := sockdiag.Dial()
	if err != nil {
		t.Skipf("no socket diagnostics here: %v", err)
	}
	defer diag.Close()
	l, err := g.list(diag)
	if err != nil {
		t.Skipf("no socket diagnostics here: %v", err)
	}
	return len(l.Handshakes)
}

// notListening checks that f, a socket taken out of the group, accepts
// nothing any more.
func notListening(t *testing.T, f *os.File) {
	t.Helper()
	if on, err := unix.GetsockoptInt(int(f.Fd()), unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || on != 0 {
		t.Fatalf("the evicted socket still listens (SO_ACCEPTCONN %d, %v)", on, err)
	}
}

// A hung generation's queue, and a handshake towards it in progress,
// reach the new generation when Evict takes its socket out, without its
// ever accepting.
func TestEvictHandsTheQueueOver(t *testing.T) {
	requireMigration(t)
	for _, host := range []string{"127.0.0.1", "::1"} {
		t.Run(host, func(t *testing.T) {
			orig := listen(t, net.JoinHostPort(host, "0"), true)
			deferAccept(t, orig)
			g, err := New(orig, Options{Name: "test"})
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			socks := map[int]*os.File{}
			take(t, g, 1, socks) // the original socket, with TCP_DEFER_ACCEPT
			take(t, g, 2, socks)
			const n = 8
			want := map[string]bool{}
			for i := range n {
				line := fmt.Sprintf("queued %d", i)
				want[line] = true
				request(t, g, host, line)
			}
			waitQueued(t, g, 1, n)
			slow := dialTo(t, g, host, nil)
			if hs := handshakes(t, g); hs != 1 {
				t.Fatalf("%d handshakes in progress, want the slow client's", hs)
			}
			if err := g.Switch(2); err != nil {
				t.Fatal(err)
			}

			start := time.Now()
			queued, err := g.Evict(1)
			if err != nil {
				t.Fatalf("Evict: %v", err)
			}
			if queued != n {
				t.Errorf("Evict reported %d queued, want %d", queued, n)
			}
			notListening(t, socks[1])
			gen2 := map[int]*os.File{2: socks[2]}
			for line, gen := range served(t, gen2, n) {
				if !want[line] || gen != 2 {
					t.Fatalf("served %q by generation %d", line, gen)
				}
			}
			t.Logf("%d queued connections served by generation 2 %v after the eviction", n, time.Since(start))
			if g.size() != 1 {
				t.Fatalf("size after Evict: %d, want 1", g.size())
			}
			if q, err := g.Queued(1); err != nil || q != 0 {
				t.Fatalf("Queued(1) after Evict: %d, %v", q, err)
			}

			// The slow client completes its handshake now: into
			// generation 2's queue.
			if _, err := slow.Write([]byte("slow\n")); err != nil {
				t.Fatal(err)
			}
			if got := served(t, gen2, 1); got["slow"] != 2 {
				t.Fatalf("the slow client's request: %v", got)
			}
			request(t, g, host, "new")
			if got := served(t, gen2, 1); got["new"] != 2 {
				t.Fatalf("a new connection: %v", got)
			}

			// Generation 1 exits: nothing left to do.
			g.Release(1)
			g.Release(1)
			if q, err := g.Evict(1); q != 0 || err != nil {
				t.Fatalf("Evict after Release: %d, %v", q, err)
			}
			if g.size() != 1 {
				t.Fatalf("size after Release: %d, want 1", g.size())
			}
			request(t, g, host, "after")
			if got := served(t, gen2, 1); got["after"] != 2 {
				t.Fatalf("a connection after Release: %v", got)
			}
		})
	}
}

// With three sockets, evicting the middle one moves the serving
// generation's socket, the last, into its slot: the program follows it,
// and the queue is spread over the sockets left.
func TestEvictMovesTheLastSocket(t *testing.T) {
	requireMigration(t)
	for _, tc := range []struct {
		name string
		gen1 bool // generation 1 still holds its socket at the eviction
	}{
		{"another generation left", true},
		{"a free socket left", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, err := New(listen(t, "127.0.0.1:0", true), Options{Name: "test"})
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			socks := map[int]*os.File{}
			take(t, g, 1, socks)
			take(t, g, 2, socks)
			if err := g.Switch(2); err != nil {
				t.Fatal(err)
			}
			const n = 8
			for i := range n {
				request(t, g, "127.0.0.1", fmt.Sprintf("queued %d", i))
			}
			waitQueued(t, g, 2, n)
			take(t, g, 3, socks)
			if err := g.Switch(3); err != nil {
				t.Fatal(err)
			}
			if !tc.gen1 {
				g.Release(1) // its leaving would move 3: it stays, free
				delete(socks, 1)
				if g.size() != 3 {
					t.Fatalf("size after Release(1): %d, want 3", g.size())
				}
			}

			queued, err := g.Evict(2)
			if err != nil || queued != n {
				t.Fatalf("Evict: %d, %v; want %d", queued, err, n)
			}
			notListening(t, socks[2])
			delete(socks, 2)
			// Without generation 1 the free socket could leave once
			// 2's had, and what reached it went on to 3's.
			wantSize := 1
			if tc.gen1 {
				wantSize = 2
			}
			if g.size() != wantSize {
				t.Fatalf("size after Evict: %d, want %d", g.size(), wantSize)
			}
			got := served(t, socks, n)
			per := map[int]int{}
			for line, gen := range got {
				if !strings.HasPrefix(line, "queued ") || (gen != 1 && gen != 3) {
					t.Fatalf("served %q by generation %d", line, gen)
				}
				per[gen]++
			}
			t.Logf("the queue went to generations %v", per)
			if !tc.gen1 && per[3] != n {
				t.Fatalf("the queue went to %v, want all to generation 3", per)
			}
			for range n {
				dialTo(t, g, "127.0.0.1", nil)
				expect(t, "public, after Evict", receiver(t, socks), 3)
			}
			g.Release(2)
			if tc.gen1 {
				g.Release(1)
				delete(socks, 1)
			}
			if g.size() != 1 {
				t.Fatalf("size at the end: %d, want 1", g.size())
			}
			dialTo(t, g, "127.0.0.1", nil)
			expect(t, "public, at the end", receiver(t, socks), 3)
		})
	}
}

func TestEvictRefuses(t *testing.T) {
	orig := listen(t, "127.0.0.1:0", true)
	g, err := New(orig, Options{Name: "test", Pin: true})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	socks := map[int]*os.File{}
	take(t, g, 1, socks) // the pinned original
	take(t, g, 2, socks)
	dialTo(t, g, "127.0.0.1", nil)
	waitQueued(t, g, 1, 1)
	if _, err := g.Evict(1); !errors.Is(err, ErrTarget) {
		t.Fatalf("Evict of the public target: %v, want ErrTarget", err)
	}
	dialTo(t, g, "127.0.0.1", ProbeControl([]*Group{g}, 2, 0))
	if _, err := g.Evict(2); !errors.Is(err, ErrTarget) {
		t.Fatalf("Evict of the probe's target: %v, want ErrTarget", err)
	}
	if err := g.Switch(2); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Evict(2); !errors.Is(err, ErrTarget) {
		t.Fatalf("Evict of the public target: %v, want ErrTarget", err)
	}
	if q, err := g.Evict(1); !errors.Is(err, ErrPinned) || q != 0 {
		t.Fatalf("Evict of the pinned socket: %d, %v; want ErrPinned", q, err)
	}
	for _, gen := range []int{0, 7} {
		if q, err := g.Evict(gen); q != 0 || err != nil {
			t.Fatalf("Evict(%d), no such socket: %d, %v", gen, q, err)
		}
	}
	if g.size() != 2 {
		t.Fatalf("size: %d, want 2", g.size())
	}
	// The pinned socket still listens, with its queue.
	if q, err := g.Queued(1); err != nil || q != 1 {
		t.Fatalf("the pinned socket's queue: %d, %v; want 1", q, err)
	}
	acceptOne(t, socks[1])
	expect(t, "the probe's connection", receiver(t, map[int]*os.File{2: socks[2]}), 2)
}
