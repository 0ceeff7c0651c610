package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/socketpass"
)

// Steering 1 and 2: a backend that just calls http.Server.Shutdown on
// SIGTERM (no lame duck) loses no request across 20 restarts under
// new-connection load when relay steers, and after each switch no new
// connection reaches the old generation. With one shared socket, the same
// backend fails requests and the old generation takes new connections
// until its stop. Both stay in the suite so the difference stays visible.
func TestSteeredDrainWithPlainShutdown(t *testing.T) {
	const restarts = 20
	for _, tc := range []struct {
		name  string
		flags []string
	}{
		{"steered", nil}, // the defaults: steering, --drain 1s
		{"shared", []string{"--steer", "off", "--drain", "1s"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"--listen", "127.0.0.1:0"}, tc.flags...)
			args = append(args, "--", built.hello, "-plain-shutdown", "-lame-duck", "0")
			r := startRelay(t, nil, args...)
			listening := r.listenAddrs(1)[0]
			wantDrain := map[string]string{"steered": "steered", "shared": "shared"}[tc.name]
			if got := listening.str("drain"); got != wantDrain {
				t.Fatalf("listening line says drain=%q, want %q", got, wantDrain)
			}
			first, from := r.waitMsg(0, "generation ready", 1)
			ld := startLoad(httpURL(listening.str("addr")), 16, 3*time.Minute)
			// lateToOld counts requests sent after a switch and answered
			// by the generation it replaced.
			lateToOld := 0
			oldPid := first.num("pid")
			for gen := 2; gen <= restarts+1; gen++ {
				// Let the load reach the serving generation first.
				waitUntil(t, 30*time.Second, "the serving generation to answer", func() bool {
					n, _ := ld.served(oldPid)
					return n > 0
				})
				r.signal(syscall.SIGHUP)
				var ready logLine
				ready, from = r.waitMsg(from, "generation ready", gen)
				switched := time.Now() // after the switch: it precedes the line
				_, from = r.waitMsg(from, "old generation exited", gen-1)
				if last := ld.lastSent(oldPid); last.After(switched) {
					lateToOld++
					if tc.name == "steered" {
						t.Errorf("restart %d: old pid %d answered a request sent %v after the switch to pid %d",
							gen-1, oldPid, last.Sub(switched), ready.num("pid"))
					}
				}
				oldPid = ready.num("pid")
			}
			waitUntil(t, 30*time.Second, "the last generation to answer", func() bool {
				n, _ := ld.served(oldPid)
				return n > 0
			})
			ld.stop()
			requests, failures := ld.summary()
			t.Logf("%s: %d requests, %d failed, %d of %d restarts with requests answered by the old generation after the switch",
				tc.name, requests, len(failures), lateToOld, restarts)
			switch tc.name {
			case "steered":
				noFailures(t, failures, requests)
			case "shared":
				if len(failures) == 0 {
					t.Errorf("no request failed with one shared socket and a plain Shutdown: the comparison shows nothing")
				}
				if lateToOld == 0 {
					t.Errorf("with one shared socket the old generation never took a connection after the switch: the check above would prove nothing")
				}
			}
			r.signal(syscall.SIGTERM)
			r.wait(30 * time.Second)
		})
	}
}

var healthzLine = regexp.MustCompile(`testchild: healthz gen=(\d+) pid=\d+ agent=(\S*) code=(\d+)`)

// probes counts the /healthz requests relay's checker made, by generation
// and answer.
func probes(out string) map[string]int {
	n := map[string]int{}
	for _, m := range healthzLine.FindAllStringSubmatch(out, -1) {
		if m[2] == "relay-health" {
			n["gen"+m[1]+"/"+m[3]]++
		}
	}
	return n
}

// Steering 3: --health http://PUBLIC/healthz reaches the new generation
// and only it, so a new generation that answers 503 is not taken for
// ready because the old one answers 200. With a shared socket it is.
func TestProbeOfPublicAddressReachesOnlyTheNewGeneration(t *testing.T) {
	for _, steered := range []bool{true, false} {
		name := map[bool]string{true: "steered", false: "shared"}[steered]
		t.Run(name, func(t *testing.T) {
			l, addr := mustFreeTCPAddr(t)
			l.Close()
			gate := filepath.Join(t.TempDir(), "gate")
			writeMode(t, gate, "1")
			args := []string{"--listen", addr, "--health", "http://" + addr + "/healthz"}
			if !steered {
				args = append(args, "--steer", "off")
			}
			args = append(args, "--", built.testchild, "-health-gate", gate)
			r := startRelay(t, nil, args...)
			_, from := r.waitMsg(0, "generation ready", 1)
			// The children's stderr reaches relay's through a copier of
			// its own, so their lines may trail relay's: wait for them.
			// relay stops probing at the first success, so generation 1
			// answered exactly one probe with 200.
			waitUntil(t, 10*time.Second, "generation 1's probe line", func() bool {
				return probes(r.output())["gen1/200"] >= 1
			})
			const before = 1

			r.signal(syscall.SIGHUP)
			_, from = r.waitMsg(from, "generation starting", 2)
			if steered {
				// Generation 2 answers 503 until the gate opens. Every
				// probe must reach it; none may reach generation 1.
				waitUntil(t, 30*time.Second, "three probes answered 503 by generation 2", func() bool {
					return probes(r.output())["gen2/503"] >= 3
				})
				if n := r.count("generation ready"); n != 1 {
					t.Fatalf("generation 2 was made ready while its /healthz answered 503 (%d ready lines)", n)
				}
				writeMode(t, gate, "2")
				r.waitMsg(from, "generation ready", 2)
				waitUntil(t, 10*time.Second, "generation 2's probe answered 200", func() bool {
					return probes(r.output())["gen2/200"] >= 1
				})
			} else {
				// The old generation answers some probe with 200 and
				// generation 2 is taken for ready with its gate shut.
				r.waitMsg(from, "generation ready", 2)
				waitUntil(t, 10*time.Second, "a probe answered by generation 1", func() bool {
					return probes(r.output())["gen1/200"] > before
				})
			}
			r.signal(syscall.SIGTERM)
			r.wait(30 * time.Second)
			// Every child's line is in now.
			p := probes(r.output())
			if steered && p["gen1/200"] != before {
				t.Errorf("generation 1 answered %d probes meant for generation 2: %v", p["gen1/200"]-before, p)
			}
			if !steered && p["gen2/200"] != 0 {
				t.Errorf("generation 2 answered 200 with its gate shut: %v", p)
			}
		})
	}
}

// Steering 4: across 200 restarts the reuseport group holds one socket per
// live generation (one once the old generation has exited), and relay's
// fd count ends where it started.
func TestReuseportGroupDoesNotGrow(t *testing.T) {
	const restarts = 200
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--drain", "0", "--", built.testchild)
	listening := r.listenAddrs(1)[0]
	if listening.str("drain") != "steered" {
		t.Fatalf("listener not steered: %v", listening)
	}
	_, port, _ := strings.Cut(listening.str("addr"), "127.0.0.1:")
	p, _ := strconv.Atoi(port)
	_, from := r.waitMsg(0, "generation ready", 1)
	if n := listenSockets(t, p); n != 1 {
		t.Fatalf("%d listening sockets on port %d at the start, want 1", n, p)
	}
	fdsBefore := countFDs(t, r.pid())
	maxSockets := 0
	for gen := 2; gen <= restarts+1; gen++ {
		r.signal(syscall.SIGHUP)
		_, from = r.waitMsg(from, "generation ready", gen)
		maxSockets = max(maxSockets, listenSockets(t, p))
		// relay takes the old socket out of the group before it logs
		// the exit, so one socket is left by the time the line is read.
		_, from = r.waitMsg(from, "old generation exited", gen-1)
		if n := listenSockets(t, p); n != 1 {
			t.Fatalf("%d listening sockets after restart %d, want 1", n, gen-1)
		}
	}
	if maxSockets > 2 {
		t.Errorf("up to %d listening sockets on port %d with at most 2 live generations", maxSockets, p)
	}
	if fdsAfter := countFDs(t, r.pid()); fdsAfter != fdsBefore {
		t.Errorf("relay had %d fds after the first generation was ready and %d after %d restarts", fdsBefore, fdsAfter, restarts)
	}
	t.Logf("%d restarts: at most %d listening sockets at once, relay fds %d before and after", restarts, maxSockets, fdsBefore)
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// listenSockets counts the TCP sockets in LISTEN state on port, in this
// network namespace: every member of a reuseport group is one.
func listenSockets(t *testing.T, port int) int {
	t.Helper()
	want := fmt.Sprintf(":%04X", port)
	n := 0
	for _, path := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		f, err := os.Open(path)
		if err != nil {
			continue // no IPv6
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			// sl local_address rem_address st ...; 0A is LISTEN.
			if len(fields) > 3 && strings.HasSuffix(fields[1], want) && fields[3] == "0A" {
				n++
			}
		}
		f.Close()
	}
	return n
}

func countFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// passedSocket makes a listening TCP socket on loopback, as a .socket unit
// would pass it, with or without ReusePort=yes.
func passedSocket(t *testing.T, reusePort bool) *os.File {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if reusePort {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 128); err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "web")
	t.Cleanup(func() { f.Close() })
	return f
}

// Steering 5: a passed socket without SO_REUSEPORT falls back to one shared
// socket with one warning under --steer auto, and is an error under
// --steer on. One with SO_REUSEPORT is steered, and stays a listener in the
// group for relay's life, since the service manager holds a copy.
func TestPassedSocketSteering(t *testing.T) {
	shim := socketpass.ShimLauncher(built.relay, built.relay)
	env := []string{"LISTEN_FDS=1", "LISTEN_FDNAMES=web"}

	t.Run("fallback", func(t *testing.T) {
		r := startRelayWrapped(t, shim, "relay", env, []*os.File{passedSocket(t, false)}, "--", built.testchild)
		if l := r.listenAddrs(1)[0]; l.str("drain") != "shared" {
			t.Errorf("listening line: %v, want drain=shared", l)
		}
		warn, _ := r.waitMsg(0, "steering unavailable; this listener keeps one socket shared by every generation", 0)
		if !strings.Contains(warn.str("err"), "ReusePort=yes") {
			t.Errorf("the warning does not say how to fix it: %v", warn)
		}
		r.waitMsg(0, "generation ready", 1)
		if n := r.count("steering unavailable; this listener keeps one socket shared by every generation"); n != 1 {
			t.Errorf("%d fallback warnings, want 1", n)
		}
		r.signal(syscall.SIGTERM)
		r.wait(30 * time.Second)
	})

	t.Run("required", func(t *testing.T) {
		r := startRelayWrapped(t, shim, "relay", env, []*os.File{passedSocket(t, false)}, "--steer", "on", "--", built.testchild)
		if code := r.wait(30 * time.Second); code == 0 {
			t.Fatal("relay --steer on started with a socket it cannot steer")
		}
		out := r.output()
		if !strings.Contains(out, "--steer on: listener web") || !strings.Contains(out, "--steer auto") {
			t.Errorf("no clear error naming the listener and the way out:\n%s", out)
		}
		if strings.Contains(out, "generation starting") {
			t.Errorf("a child was started:\n%s", out)
		}
	})

	t.Run("steered", func(t *testing.T) {
		sock := passedSocket(t, true)
		addr := sockAddr(t, sock)
		_, port, _ := strings.Cut(addr, "127.0.0.1:")
		p, _ := strconv.Atoi(port)
		r := startRelayWrapped(t, shim, "relay", env, []*os.File{sock}, "--drain", "0", "--", built.testchild)
		if l := r.listenAddrs(1)[0]; l.str("drain") != "steered" {
			t.Fatalf("listening line: %v, want drain=steered", l)
		}
		_, from := r.waitMsg(0, "generation ready", 1)
		for gen := 2; gen <= 4; gen++ {
			r.signal(syscall.SIGHUP)
			var ready logLine
			ready, from = r.waitMsg(from, "generation ready", gen)
			_, from = r.waitMsg(from, "old generation exited", gen-1)
			if pid, err := get(newConnClient(), httpURL(addr)); err != nil || pid != ready.num("pid") {
				t.Errorf("after restart %d: pid %d, %v; want %d", gen-1, pid, err, ready.num("pid"))
			}
			// The passed socket stays, free or in use, next to at most
			// the serving generation's.
			if n := listenSockets(t, p); n > 2 {
				t.Errorf("after restart %d: %d listening sockets, want at most 2", gen-1, n)
			}
		}
		// The service manager's copy still listens.
		if on, err := unix.GetsockoptInt(int(sock.Fd()), unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || on != 1 {
			t.Errorf("the passed socket no longer listens: %d, %v", on, err)
		}
		r.signal(syscall.SIGTERM)
		r.wait(30 * time.Second)
	})
}

// Steering 5: a client whose handshake towards the old generation began
// before the switch and is still in progress (it connected and sent
// nothing: the old child's socket defers accept until data) holds the old
// generation's drain open, while new connections go to the new one. Once
// it sends its request, the old generation answers it, and only then gets
// its stop signal.
func TestDrainWaitsForAHandshakeBegunBeforeTheSwitch(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--drain", "1m", "--", built.testchild, "-defer-accept")
	addr := r.listenAddrs(1)[0].str("addr")
	first, from := r.waitMsg(0, "generation ready", 1)
	slow, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	r.signal(syscall.SIGHUP)
	second, from := r.waitMsg(from, "generation ready", 2)
	w, _ := r.waitMsg(from, "connections still on their way to the old generation; its drain waits for them", 1)
	if w.num("handshakes") != 1 || w.num("pid") != first.num("pid") {
		t.Errorf("the drain waits for %v, want one handshake towards pid %d", w, first.num("pid"))
	}
	for range 3 {
		if pid, err := get(newConnClient(), httpURL(addr)); err != nil || pid != second.num("pid") {
			t.Fatalf("a new connection during the drain: pid %d, %v; want the new generation's %d", pid, err, second.num("pid"))
		}
	}
	if n := r.count("old generation drained"); n != 0 {
		t.Fatalf("the old generation's drain ended with a handshake towards it in progress")
	}
	if _, err := slow.Write([]byte("GET / HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	slow.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(slow), nil)
	if err != nil {
		t.Fatalf("the slow client's request: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("the slow client's answer: %v", err)
	}
	if pid, err := pidHeader(resp, body); err != nil || pid != first.num("pid") {
		t.Errorf("the slow client was answered by pid %d (%v), want the old generation's %d", pid, err, first.num("pid"))
	}
	d, _ := r.waitMsg(from, "old generation drained", 1)
	if d.str("ended") != "empty" {
		t.Errorf("drained line %v, want ended=empty", d)
	}
	r.waitMsg(from, "stopping generation", 1)
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}
