package integration

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// io_uring and the bind takeover: the filter cannot see a ring's
// operations, so a server that binds with IORING_OP_BIND (Linux 6.11)
// would put a socket of its own on relay's port. Under the takeover relay
// refuses io_uring_setup(2) (EPERM) unless it runs with --allow-io-uring.
// These tests restart a server that binds its own port with bind(2)
// (hello -bind, taken over) into uringbind, which binds the same address
// through io_uring with SO_REUSEPORT, and look at the port's listeners with
// ss and /proc.

// msgRingRefused is the line relay logs, once per generation, when it
// refuses io_uring_setup.
const msgRingRefused = "io_uring_setup refused (EPERM): a bind made through io_uring would bypass the takeover and put the child's own socket on the port; the server must use bind(2), or relay must run with --allow-io-uring (docs/takeover.md)"

// uringRelay starts relay with flags and --listen 127.0.0.1:PORT on a free
// port, running hello -bind on that address (taken over), and waits for
// generation 1 to be ready. It returns relay, the listener's address as
// relay logged it, its port and hello's pid.
func uringRelay(t *testing.T, flags ...string) (*relayProc, string, int, int) {
	t.Helper()
	requireIOURingBind(t)
	port := freeLoopbackPort(t)
	want := "127.0.0.1:" + strconv.Itoa(port)
	args := append(append([]string{"--listen", want}, flags...), "--", built.hello, "-bind", "-addr", want, "-lame-duck", "100ms")
	r := startRelay(t, nil, args...)
	addr := r.listenAddrs(1)[0].str("addr")
	if addr != want {
		t.Fatalf("relay listens on %s, want %s", addr, want)
	}
	ready, _ := r.waitMsg(0, "generation ready", 1)
	if got := ready.str("sockets"); !strings.HasSuffix(got, "=bind") {
		t.Fatalf("generation 1 ready with sockets=%q: hello's bind was not taken over", got)
	}
	return r, addr, port, ready.num("pid")
}

// requireIOURingBind skips unless this kernel lets this process bind
// through io_uring: uringbind run here, outside relay, must get past
// io_uring_setup (exit 3) and IORING_OP_BIND (exit 4: -EINVAL before
// Linux 6.11). It binds 127.0.0.1:0 and is stopped once it says it listens.
func requireIOURingBind(t *testing.T) {
	t.Helper()
	cmd := exec.Command(built.uringbind, "-addr", "127.0.0.1:0")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Its first line says whether it listens; SIGTERM then ends it, and
	// the rest is read to EOF before Wait.
	sc := bufio.NewScanner(stderr)
	var first string
	if sc.Scan() {
		first = sc.Text()
	}
	cmd.Process.Signal(syscall.SIGTERM)
	for sc.Scan() {
	}
	cmd.Wait()
	requireOrSkip(t, strings.Contains(first, "via io_uring"),
		fmt.Sprintf("io_uring cannot bind here (Linux 6.11+ with io_uring enabled, kernel.io_uring_disabled=0): uringbind said %q", first))
}

// TestTakeoverRefusesIOURing: under the takeover (the default), a
// restart into a server that would bind relay's port through io_uring
// fails at its io_uring_setup, which relay answers EPERM and logs; the
// restart is rolled back, the port's only listener is relay's, and the old
// generation serves on.
func TestTakeoverRefusesIOURing(t *testing.T) {
	t.Parallel()
	r, addr, port, hello := uringRelay(t)
	out, errOut, code := r.client("restart", "--", built.uringbind, "-addr", addr)
	t.Logf("relay restart -- uringbind -addr %s: exit %d\n%s%s", addr, code, out, errOut)
	if code != 3 {
		t.Errorf("relay restart into uringbind: exit %d, want 3 (rolled back)", code)
	}
	starting, _ := r.waitMsg(0, "generation starting", 2)
	refused, _ := r.waitMsg(0, msgRingRefused, 2)
	gen2 := starting.num("pid")
	if refused.str("level") != "WARN" || refused.num("pid") != gen2 || refused.num("caller_pid") != gen2 {
		t.Errorf("refusal: %v; want a WARN with pid and caller_pid %d (uringbind calls io_uring_setup itself)", refused, gen2)
	}
	rolled, _ := r.waitMsg(0, "new generation failed; rolled back", 2)
	if rolled.num("still_serving_pid") != hello {
		t.Errorf("rollback: %v; want hello (pid %d) still serving", rolled, hello)
	}
	if n := len(r.lines(msgRingRefused, 0)); n != 1 {
		t.Errorf("%d %q lines, want 1", n, msgRingRefused)
	}
	// The restart shows uringbind's own stderr (its tail).
	if want := "uringbind: io_uring_setup: operation not permitted"; !strings.Contains(out+errOut, want) {
		t.Errorf("relay restart's output lacks the child's %q", want)
	}

	// The port's listeners: all relay's. ss (pid=…) and /proc agree.
	socks := portOwners(t, port)
	relays := socketInodes(t, r.pid())
	if len(socks) == 0 {
		t.Fatalf("no listening socket on port %d", port)
	}
	for _, s := range socks {
		if relays[s.inode] == nil {
			t.Errorf("the listening socket %s (inode %s) is not relay's (pid %d): relay's sockets are %v", s.local, s.inode, r.pid(), relays)
		}
	}
	ssRan := ssCheck(t, port, func(lines []ssLine) {
		for _, l := range lines {
			if !slices.Contains(l.pids, r.pid()) {
				t.Errorf("ss: a listener on port %d that relay (pid %d) does not hold: %s", port, r.pid(), l.text)
			}
		}
	})

	if got, err := get(newConnClient(), httpURL(addr)); err != nil || got != hello {
		t.Errorf("after the refused restart: answered by %d, %v; want hello, pid %d", got, err, hello)
	}
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
	ssSkip(t, ssRan)
}

// TestTakeoverIOURingAllowedBypasses is the control that shows what the
// refusal prevents, and that the checks above can fail: with
// --allow-io-uring, uringbind's IORING_OP_BIND goes past the filter and,
// with SO_REUSEPORT, joins relay's group with a socket of its own on the
// public port, which relay neither holds nor saw. relay takes the
// generation's READY=1 as readiness and believes it serves on the
// inherited fd 3 (sockets=…=fd): the restart succeeds and the old
// generation is stopped. Then the public connections all go to
// uringbind's own socket (it accepts on no other), and relay's socket for
// the generation gets none of them: the steering no longer decides where
// connections go, and what relay reports is not what serves.
func TestTakeoverIOURingAllowedBypasses(t *testing.T) {
	t.Parallel()
	r, addr, port, hello := uringRelay(t, "--allow-io-uring")

	out, errOut, code := r.client("restart", "--", built.uringbind, "-addr", addr)
	t.Logf("relay restart -- uringbind -addr %s: exit %d\n%s%s", addr, code, out, errOut)
	if code != 0 {
		t.Fatalf("relay restart into uringbind under --allow-io-uring: exit %d, want 0 (it sends READY=1)", code)
	}
	starting, _ := r.waitMsg(0, "generation starting", 2)
	uring := starting.num("pid")
	r.waitRaw("uringbind: listening on " + addr + " via io_uring")
	// Readiness: the child's READY=1; relay saw no bind of it and takes
	// it for a child on the inherited socket.
	r.waitMsg(0, "child sent READY=1", 2)
	ready, _ := r.waitMsg(0, "generation ready", 2)
	if got, want := ready.str("sockets"), r.listenAddrs(1)[0].str("name")+"=fd"; got != want {
		t.Errorf("generation 2 ready with sockets=%q, want %q (no bind relay saw)", got, want)
	}
	if l := r.lines(msgTakenOver, 2); len(l) != 0 {
		t.Errorf("relay took over a bind of uringbind's: %v", l)
	}
	if n := len(r.lines(msgRingRefused, 0)); n != 0 {
		t.Errorf("%d %q lines under --allow-io-uring, want none", n, msgRingRefused)
	}
	// The restart went through: hello was stopped, uringbind serves.
	r.waitMsg(0, "old generation exited", 1)
	if state, took := r.genStatus(t, 2); state != "serving" {
		t.Errorf("relay status: generation 2 is %s (%v), want serving", state, took)
	}
	if !processGone(hello) && !isZombie(hello) {
		t.Errorf("hello (pid %d) is still running after the restart", hello)
	}

	// The port's listeners: relay's socket of generation 2 (held by relay
	// and, at fd 3, by uringbind), and uringbind's own, which relay does
	// not hold.
	socks := portOwners(t, port)
	relays, urings := socketInodes(t, r.pid()), socketInodes(t, uring)
	t.Logf("listeners on port %d (/proc/net/tcp): %v; relay's sockets %v, uringbind's %v", port, socks, relays, urings)
	var own, relaysInode string
	for _, s := range socks {
		switch {
		case relays[s.inode] == nil && urings[s.inode] != nil:
			own = s.inode
		case relays[s.inode] != nil:
			relaysInode = s.inode
		default:
			t.Errorf("listener %v on port %d is neither relay's nor uringbind's", s, port)
		}
	}
	if len(socks) != 2 || own == "" || relaysInode == "" {
		t.Fatalf("listeners on port %d: %v; want 2: relay's and one of uringbind's own (held by pid %d, not by relay)", port, socks, uring)
	}
	ssRan := ssCheck(t, port, func(lines []ssLine) {
		n := 0
		for _, l := range lines {
			if slices.Contains(l.pids, uring) && !slices.Contains(l.pids, r.pid()) {
				n++
			}
		}
		if n != 1 {
			t.Errorf("ss: %d listeners on port %d held by uringbind (pid %d) and not by relay (pid %d), want 1", n, port, uring, r.pid())
		}
	})

	// Who serves: every connection lands on uringbind's own socket (it
	// accepts on nothing else), none on relay's, whose accept queue
	// stays as it was.
	queued := func() int {
		for _, s := range listening(t, port) {
			if s.inode == relaysInode {
				return s.queued
			}
		}
		t.Fatalf("relay's socket %s no longer listens on port %d", relaysInode, port)
		return 0
	}
	before := queued()
	client := newConnClient()
	for range 20 {
		if got, err := get(client, httpURL(addr)); err != nil || got != uring {
			t.Errorf("GET %s: answered by %d, %v; want uringbind (pid %d) on its own socket", addr, got, err, uring)
		}
	}
	if after := queued(); after != before {
		t.Errorf("relay's socket's accept queue went from %d to %d: a connection went to relay's socket", before, after)
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
	ssSkip(t, ssRan)
}

// portOwners lists the TCP sockets in LISTEN on port, IPv4 and IPv6, from
// /proc/net/tcp and /proc/net/tcp6: each one's local address and inode.
func portOwners(t *testing.T, port int) []listenSock {
	t.Helper()
	var out []listenSock
	for _, file := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
			f := strings.Fields(line)
			if len(f) < 10 || f[3] != "0A" { // TCP_LISTEN
				continue
			}
			_, hexPort, _ := strings.Cut(f[1], ":")
			if p, err := strconv.ParseUint(hexPort, 16, 16); err != nil || int(p) != port {
				continue
			}
			out = append(out, listenSock{local: f[1], inode: f[9]})
		}
	}
	return out
}

// ssLine is a line of ss -Hltnp: a listener, and the pids that hold it.
type ssLine struct {
	text string
	pids []int
}

var ssPid = regexp.MustCompile(`pid=(\d+),`)

// ssCheck runs ss -Hltnp 'sport = :PORT', logs its output and hands its
// lines to check. Without ss (iproute2) it reports false, and the test
// skips at its end (ssSkip), once everything else was checked.
func ssCheck(t *testing.T, port int, check func([]ssLine)) bool {
	t.Helper()
	ss, err := exec.LookPath("ss")
	if err != nil {
		t.Logf("no ss (iproute2): %v", err)
		return false
	}
	out, err := exec.Command(ss, "-Hltnp", fmt.Sprintf("sport = :%d", port)).CombinedOutput()
	if err != nil {
		t.Fatalf("ss: %v\n%s", err, out)
	}
	t.Logf("ss -Hltnp 'sport = :%d':\n%s", port, out)
	var lines []ssLine
	for _, text := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if text == "" {
			continue
		}
		l := ssLine{text: text}
		for _, m := range ssPid.FindAllStringSubmatch(text, -1) {
			pid, _ := strconv.Atoi(m[1])
			l.pids = append(l.pids, pid)
		}
		lines = append(lines, l)
	}
	if len(lines) == 0 {
		t.Errorf("ss lists no listener on port %d", port)
	}
	check(lines)
	return true
}

// ssSkip skips the test (at its end) unless ss ran.
func ssSkip(t *testing.T, ran bool) {
	t.Helper()
	requireOrSkip(t, ran, "no ss (iproute2) to list the port's listeners with; everything else was checked")
}
