package steer

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
)

// key names copy worker of generation gen in a receiver map.
func key(gen, worker int) int { return gen*100 + worker }

// takeCopies gives generation gen n copies' sockets, into socks.
func takeCopies(t *testing.T, g *Group, gen, n int, socks map[int]*os.File) {
	t.Helper()
	for w := range n {
		f, _, err := g.Take(gen, w)
		if err != nil {
			t.Fatal(err)
		}
		socks[key(gen, w)] = f
	}
}

// spreadCount dials n connections from host and counts where each landed.
func spreadCount(t *testing.T, g *Group, host string, n int, socks map[int]*os.File) map[int]int {
	t.Helper()
	got := map[int]int{}
	for range n {
		c := dialTo(t, g, host, nil)
		got[receiver(t, socks)]++
		c.Close()
	}
	return got
}

// A generation of several copies gets every new connection, spread over
// its copies' sockets by the hash of the source address and port: with
// 240 connections from one client, every copy gets at least a quarter of
// its fair share (binomially, a fair hash misses that about once in 10^9
// runs), the copies of the other generation none. Switching moves them all
// to the next generation's copies; the probe rule reaches one copy alone.
func TestSpreadOverCopies(t *testing.T) {
	const conns = 240
	for _, host := range []string{"127.0.0.1", "::1"} {
		for _, copies := range []int{2, 3, 4} {
			t.Run(fmt.Sprintf("%s/%d copies", host, copies), func(t *testing.T) {
				addr := "127.0.0.1:0"
				if strings.Contains(host, ":") {
					addr = "[::1]:0"
				}
				g := newTestGroup(t, addr)
				socks := map[int]*os.File{}
				takeCopies(t, g, 1, copies, socks)
				if err := g.Switch(1); err != nil {
					t.Fatal(err)
				}
				takeCopies(t, g, 2, copies, socks)

				check := func(what string, got map[int]int, gen int) {
					t.Helper()
					t.Logf("%s: %v", what, got)
					for k, n := range got {
						if k/100 != gen {
							t.Fatalf("%s: %d connections reached generation %d, copy %d", what, n, k/100, k%100)
						}
					}
					for w := range copies {
						if n := got[key(gen, w)]; n < conns/copies/4 {
							t.Fatalf("%s: copy %d of generation %d got %d of %d connections, want at least %d", what, w, gen, n, conns, conns/copies/4)
						}
					}
				}
				check("generation 1 serving", spreadCount(t, g, host, conns, socks), 1)

				// A probe reaches its copy; the public traffic still spreads.
				dialTo(t, g, host, ProbeControl([]*Group{g}, 2, copies-1))
				if got := receiver(t, socks); got != key(2, copies-1) {
					t.Fatalf("the probe of generation 2, copy %d, reached %d", copies-1, got)
				}
				check("generation 1 serving, during a probe", spreadCount(t, g, host, conns, socks), 1)

				if err := g.Switch(2); err != nil {
					t.Fatal(err)
				}
				check("generation 2 serving", spreadCount(t, g, host, conns, socks), 2)

				// Generation 1 exits: its sockets leave, and the moves that
				// makes in the kernel's array keep generation 2 the target.
				g.Release(1)
				for w := range copies {
					delete(socks, key(1, w))
				}
				check("generation 2 serving, generation 1 gone", spreadCount(t, g, host, conns, socks), 2)
				if q, err := g.Queued(2); err != nil || q != 0 {
					t.Fatalf("Queued(2) = %d, %v after every connection was accepted", q, err)
				}
			})
		}
	}
}

// newTestGroup makes a group on a fresh listening socket of addr.
func newTestGroup(t *testing.T, addr string) *Group {
	t.Helper()
	g, err := New(listen(t, addr, true), Options{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	return g
}

// A copy that takes again gets its own socket back, not another; copies
// of one generation never share one, and Take refuses generation 0.
func TestTakeCopies(t *testing.T) {
	g := newTestGroup(t, "127.0.0.1:0")
	a, fresh, err := g.Take(1, 0)
	if err != nil || !fresh {
		t.Fatalf("Take(1, 0): fresh %v, %v", fresh, err)
	}
	b, _, err := g.Take(1, 1)
	if err != nil {
		t.Fatal(err)
	}
	if a == b {
		t.Fatal("two copies of generation 1 got one socket")
	}
	again, fresh, err := g.Take(1, 1)
	if err != nil || again != b || fresh {
		t.Fatalf("Take(1, 1) again: %v (fresh %v, err %v), want copy 1's socket back, not fresh", again, fresh, err)
	}
	if _, _, err := g.Take(0, 0); err == nil {
		t.Fatal("Take(0, 0) gave a socket to no generation")
	}
	if g.Held(1, 1) != b || g.Held(1, 2) != nil {
		t.Fatal("Held does not name the copies' sockets")
	}
}

// A group whose public targets are several copies crosses the exec: the
// restored group has them as targets, by worker, and switches on.
func TestSaveRestoreCopies(t *testing.T) {
	g := newTestGroup(t, "127.0.0.1:0")
	socks := map[int]*os.File{}
	takeCopies(t, g, 1, 3, socks)
	if err := g.Switch(1); err != nil {
		t.Fatal(err)
	}
	s, err := g.Save()
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Actives) != 3 || s.Actives[0] != s.Active {
		t.Fatalf("saved targets: active %d, actives %v", s.Active, s.Actives)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
	dup := s
	dup.Members = append([]SavedMember(nil), s.Members...)
	for i := range dup.Members {
		if dup.Members[i].Gen == 1 {
			dup.Members[i].Worker = 0
		}
	}
	if err := dup.Check(); err == nil {
		t.Fatal("a saved group with one copy's socket twice passed the check")
	}
	// Restored from duplicates, as after an exec: a group of the same
	// fds would close them twice, once by the finalizers of its files.
	r, _ := restored(t, s)
	r.mu.Lock()
	n := len(r.active)
	workers := []int{}
	for _, m := range r.active {
		workers = append(workers, m.worker)
	}
	r.mu.Unlock()
	if n != 3 || fmt.Sprint(workers) != "[0 1 2]" {
		t.Fatalf("restored targets: workers %v", workers)
	}
	takeCopies(t, r, 2, 2, socks)
	if err := r.Switch(2); err != nil {
		t.Fatal(err)
	}
	got := spreadCount(t, r, "127.0.0.1", 40, socks)
	for k := range got {
		if k/100 != 2 {
			t.Fatalf("after the switch on the restored group, connections reached %v", got)
		}
	}
}

// The program refuses more sockets than it can spread over, and none.
func TestProgramSpreadBounds(t *testing.T) {
	if _, err := program(nil); err == nil {
		t.Fatal("a program with no target")
	}
	many := make([]uint32, maxSpread+1)
	if _, err := program(many); err == nil {
		t.Fatalf("a program spreading over %d sockets", len(many))
	}
	if p, err := program(make([]uint32, maxSpread)); err != nil {
		t.Fatal(err)
	} else if _, err := assemble(p); err != nil {
		t.Fatal(err)
	}
}

// boundClient is a TCP socket bound to a port of host's own, not yet
// connected, and that source address.
func boundClient(t *testing.T, host string) (int, netip.AddrPort) {
	t.Helper()
	ip := netip.MustParseAddr(host)
	family := unix.AF_INET
	var sa unix.Sockaddr = &unix.SockaddrInet6{Addr: ip.As16()}
	if ip.Is4() {
		family, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: ip.As4()}
	} else {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, sa); err != nil {
		t.Fatal(err)
	}
	bound, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return fd, sockaddr.AddrPort(bound)
}

// connectTo connects the bound client fd to g's address.
func connectTo(t *testing.T, fd int, g *Group) {
	t.Helper()
	a := g.Addr()
	var sa unix.Sockaddr = &unix.SockaddrInet6{Addr: a.Addr().As16(), Port: int(a.Port())}
	if a.Addr().Is4() {
		sa = &unix.SockaddrInet4{Addr: a.Addr().As4(), Port: int(a.Port())}
	}
	if err := unix.Connect(fd, sa); err != nil {
		t.Fatalf("connecting to %s: %v", a, err)
	}
}

// The readiness probes of a generation's copies run at once: each copy's
// rule holds until its own probe connects, whatever rules the others set
// meanwhile, and the public traffic still goes to the serving generation.
func TestProbesOfCopiesAtOnce(t *testing.T) {
	for _, host := range []string{"127.0.0.1", "::1"} {
		t.Run(host, func(t *testing.T) {
			const copies = 3
			addr := "127.0.0.1:0"
			if strings.Contains(host, ":") {
				addr = "[::1]:0"
			}
			g := newTestGroup(t, addr)
			socks := map[int]*os.File{}
			takeCopies(t, g, 1, 1, socks)
			if err := g.Switch(1); err != nil {
				t.Fatal(err)
			}
			takeCopies(t, g, 2, copies, socks)
			fds := make([]int, copies)
			for w := range copies {
				var from netip.AddrPort
				fds[w], from = boundClient(t, host)
				if err := g.Probe(2, w, from); err != nil {
					t.Fatal(err)
				}
			}
			// The last copy probes again from a new port: its old rule goes.
			again, from := boundClient(t, host)
			if err := g.Probe(2, copies-1, from); err != nil {
				t.Fatal(err)
			}
			if n := len(g.probes); n != copies {
				t.Fatalf("%d probe rules, want %d", n, copies)
			}
			fds[copies-1] = again
			for w := range copies {
				connectTo(t, fds[w], g)
				if got := receiver(t, socks); got != key(2, w) {
					t.Fatalf("the probe of copy %d reached %d", w, got)
				}
			}
			dialTo(t, g, host, nil)
			expect(t, "public, during the probes", receiver(t, socks), key(1, 0))
		})
	}
}

// A copy that exited is absent: the new connections spread over its
// siblings, while those queued on its socket stay there for its
// replacement; present again, it gets its share. With every copy absent,
// connections wait on the last target's socket. A generation not yet serving
// keeps the mark for its Switch.
func TestAbsentCopy(t *testing.T) {
	const copies, conns = 3, 120
	g := newTestGroup(t, "127.0.0.1:0")
	socks := map[int]*os.File{}
	takeCopies(t, g, 1, copies, socks)
	if err := g.Switch(1); err != nil {
		t.Fatal(err)
	}
	// A connection waits on copy 1's socket when it exits.
	queuedOn1 := socks[key(1, 1)]
	reached := false
	for range conns {
		c := dialTo(t, g, "127.0.0.1", nil)
		if reached = waitingOn(t, socks) == key(1, 1); reached {
			break
		}
		receiver(t, socks)
		c.Close()
	}
	if !reached {
		t.Fatalf("none of %d connections reached copy 1", conns)
	}
	delete(socks, key(1, 1))
	if err := g.Absent(1, 1, true); err != nil {
		t.Fatal(err)
	}
	got := spreadCount(t, g, "127.0.0.1", conns, socks)
	t.Logf("copy 1 absent: %v", got)
	for _, w := range []int{0, 2} {
		if got[key(1, w)] < conns/4 {
			t.Fatalf("copy %d got %d of %d connections while copy 1 was absent", w, got[key(1, w)], conns)
		}
	}
	if !pending(queuedOn1) {
		t.Fatal("the connection queued on the absent copy's socket left it")
	}
	// The replacement takes the same socket, and its connection.
	f, fresh, err := g.Take(1, 1)
	if err != nil || fresh || f != queuedOn1 {
		t.Fatalf("Take(1, 1) for the replacement: same socket %v, fresh %v, %v", f == queuedOn1, fresh, err)
	}
	socks[key(1, 1)] = f
	expect(t, "the waiting connection", receiver(t, socks), key(1, 1))
	if err := g.Absent(1, 1, false); err != nil {
		t.Fatal(err)
	}
	got = spreadCount(t, g, "127.0.0.1", conns, socks)
	t.Logf("copy 1 back: %v", got)
	for w := range copies {
		if got[key(1, w)] < conns/copies/4 {
			t.Fatalf("copy %d got %d of %d connections once copy 1 was back", w, got[key(1, w)], conns)
		}
	}
	// Every copy absent: the connections still queue, on all of them.
	for w := range copies {
		if err := g.Absent(1, w, true); err != nil {
			t.Fatal(err)
		}
	}
	got = spreadCount(t, g, "127.0.0.1", conns, socks)
	t.Logf("every copy absent: %v", got)
	if len(got) != 1 {
		t.Fatalf("with every copy absent, the connections reached %v, want the last target alone", got)
	}
	// Generation 2 with copy 0 absent before its switch.
	takeCopies(t, g, 2, 2, socks)
	if err := g.Absent(2, 0, true); err != nil {
		t.Fatal(err)
	}
	if err := g.Switch(2); err != nil {
		t.Fatal(err)
	}
	got = spreadCount(t, g, "127.0.0.1", 20, socks)
	if got[key(2, 1)] != 20 {
		t.Fatalf("generation 2 with copy 0 absent: %v", got)
	}
}

// pending reports whether a connection waits in f's accept queue.
func pending(f *os.File) bool {
	fds := []unix.PollFd{{Fd: int32(f.Fd()), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n == 1
}

// waitingOn waits for a connection on one of socks, up to 5 s, and names
// that socket without accepting it.
func waitingOn(t *testing.T, socks map[int]*os.File) int {
	t.Helper()
	var keys []int
	var fds []unix.PollFd
	for k, f := range socks {
		keys = append(keys, k)
		fds = append(fds, unix.PollFd{Fd: int32(f.Fd()), Events: unix.POLLIN})
	}
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		n, err := unix.Poll(fds, int(time.Until(deadline).Milliseconds())+1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		for i, p := range fds {
			if n > 0 && p.Revents&unix.POLLIN != 0 {
				return keys[i]
			}
		}
	}
	t.Fatal("no socket got the connection")
	return 0
}

// A rolling restart's spread mixes two generations' copies: the new
// connections reach exactly the copies named, and QueuedCopy counts one
// copy's queue alone.
func TestSpreadOverTwoGenerations(t *testing.T) {
	const conns = 120
	g := newTestGroup(t, "127.0.0.1:0")
	socks := map[int]*os.File{}
	takeCopies(t, g, 1, 2, socks)
	takeCopies(t, g, 2, 2, socks)
	if err := g.Switch(1); err != nil {
		t.Fatal(err)
	}
	if err := g.Spread([]Copy{{Gen: 1, Worker: 1}, {Gen: 2, Worker: 0}}); err != nil {
		t.Fatal(err)
	}
	got := spreadCount(t, g, "127.0.0.1", conns, socks)
	t.Logf("generation 1 copy 1 and generation 2 copy 0: %v", got)
	if len(got) != 2 || got[key(1, 1)] < conns/4 || got[key(2, 0)] < conns/4 {
		t.Fatalf("the connections reached %v, want both named copies and no other", got)
	}
	c := dialTo(t, g, "127.0.0.1", nil)
	k := waitingOn(t, socks)
	gen, w := k/100, k%100
	if n, err := g.QueuedCopy(gen, w); err != nil || n != 1 {
		t.Errorf("QueuedCopy(%d, %d) = %d, %v with one connection waiting there", gen, w, n, err)
	}
	if n, err := g.QueuedCopy(1, 0); err != nil || n != 0 {
		t.Errorf("QueuedCopy(1, 0) = %d, %v for a copy out of the spread", n, err)
	}
	c.Close()
	if err := g.Spread([]Copy{{Gen: 3, Worker: 0}}); err == nil {
		t.Error("Spread to a copy with no socket")
	}
	if err := g.Spread(nil); err == nil {
		t.Error("Spread to no copy")
	}
}

// Absent on a spread over two generations takes out, or puts back, the
// one socket and keeps the others, whatever their generation.
func TestAbsentKeepsAMixedSpread(t *testing.T) {
	const conns = 120
	g := newTestGroup(t, "127.0.0.1:0")
	socks := map[int]*os.File{}
	takeCopies(t, g, 1, 2, socks)
	takeCopies(t, g, 2, 2, socks)
	if err := g.Spread([]Copy{{Gen: 1, Worker: 0}, {Gen: 1, Worker: 1}, {Gen: 2, Worker: 0}}); err != nil {
		t.Fatal(err)
	}
	if err := g.Absent(2, 1, true); err != nil { // not a target: nothing changes
		t.Fatal(err)
	}
	if err := g.Absent(1, 1, true); err != nil {
		t.Fatal(err)
	}
	got := spreadCount(t, g, "127.0.0.1", conns, socks)
	t.Logf("generation 1's copy 1 absent: %v", got)
	if len(got) != 2 || got[key(1, 0)] < conns/4 || got[key(2, 0)] < conns/4 {
		t.Fatalf("generation 1's copy 1 absent: %v, want generation 1's copy 0 and generation 2's copy 0", got)
	}
	if err := g.Absent(1, 1, false); err != nil {
		t.Fatal(err)
	}
	got = spreadCount(t, g, "127.0.0.1", conns, socks)
	t.Logf("back: %v", got)
	if len(got) != 3 || got[key(1, 1)] < conns/6 {
		t.Fatalf("generation 1's copy 1 back: %v, want the three targets", got)
	}
	// The last target stays, absent: connections wait on it.
	if err := g.Spread([]Copy{{Gen: 2, Worker: 1}}); err != nil {
		t.Fatal(err)
	}
	if err := g.Absent(2, 1, true); err != nil {
		t.Fatal(err)
	}
	if got := spreadCount(t, g, "127.0.0.1", 10, socks); got[key(2, 1)] != 10 {
		t.Fatalf("the last target absent: %v", got)
	}
}
