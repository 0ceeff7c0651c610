package integration

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/procfs"
)

// Bind takeover: servers that know nothing of relay bind their own port,
// and relay hands each generation its own socket in their place. These
// tests run real servers (a Go server from the Kubernetes guide, Python's
// http.server, nginx) under relay with no --health flag, restart them
// under load, and look at the sockets: the kernel's list of listeners on
// the port (sock_diag, as ss reads it) against the fds of relay and of
// the child in /proc.

// takeoverRestarts is the number of restarts under load of each server.
const takeoverRestarts = 10

// realServer is a server that binds its own port, for restartRealServer.
type realServer struct {
	// command is the server's argv, for its port.
	command func(port int) []string
	// asks is the address it binds, with %d for the port.
	asks string
	// relayArgs are relay's flags besides --listen.
	relayArgs []string
	// path is what the load asks for, and ident tells who answered.
	path  string
	ident ident
	// members returns who answers for a generation, once relay has
	// logged it ready: its pid unless set.
	members func(t *testing.T, ready logLine) []int
	// start starts relay with args; startRelay unless set.
	start func(t *testing.T, args ...string) *relayProc
	// onReady, if set, checks each generation once it is ready.
	onReady func(t *testing.T, r *relayProc, ready logLine)
	// exitCode is relay's exit code after SIGTERM; -1 for any.
	exitCode int
}

// restartRealServer runs srv under `relay run --listen 127.0.0.1:PORT`
// with relay's defaults (readiness auto, steering, 1s drain), restarts it
// takeoverRestarts times under load that opens a new connection per
// request, and checks that no request failed, that every generation
// answered, that each got its socket from relay by bind takeover, and,
// after each restart, that the port's listening sockets are one per live
// generation and all relay's.
func restartRealServer(t *testing.T, srv realServer) {
	t.Helper()
	if srv.members == nil {
		srv.members = func(_ *testing.T, ready logLine) []int { return []int{ready.num("pid")} }
	}
	if srv.start == nil {
		srv.start = func(t *testing.T, args ...string) *relayProc { return startRelay(t, nil, args...) }
	}
	port := freeLoopbackPort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	args := append(append([]string{"--listen", addr}, srv.relayArgs...), "--")
	r := srv.start(t, append(args, srv.command(port)...)...)
	listener := r.listenAddrs(1)[0]
	if listener.str("drain") != "steered" {
		t.Fatalf("listener not steered: %v", listener)
	}
	name := listener.str("name")

	// gens maps who answered to their generation.
	gens := map[int]int{}
	ready, from := r.waitMsg(0, "generation ready", 1)
	asked := fmt.Sprintf(srv.asks, port)
	own := checkTakenOver(t, r, ready, name, port, asked)
	if socks := checkListeners(t, r, port, 1, "generation 1"); len(socks) == 1 && socks[0].inode != own {
		t.Errorf("generation 1 holds socket %s, but the one listening is %s", own, socks[0].inode)
	}
	if srv.onReady != nil {
		srv.onReady(t, r, ready)
	}
	serving := srv.members(t, ready)
	for _, id := range serving {
		gens[id] = 1
	}
	load := startLoadIdent(httpURL(addr)+strings.TrimPrefix(srv.path, "/"), 8, 3*time.Minute, srv.ident)
	answered := func(ids []int) func() bool {
		return func() bool {
			for _, id := range ids {
				if n, _ := load.served(id); n > 0 {
					return true
				}
			}
			return false
		}
	}
	oldPid := ready.num("pid")
	overlaps := 0 // restarts whose two live generations were looked at
	for gen := 2; gen <= takeoverRestarts+1; gen++ {
		waitUntil(t, 30*time.Second, fmt.Sprintf("generation %d to answer", gen-1), answered(serving))
		r.signal(syscall.SIGHUP)
		ready, from = r.waitMsg(from, "generation ready", gen)
		if ready.num("pid") == oldPid {
			t.Fatalf("generation %d has the pid of the one it replaced", gen)
		}
		own := checkTakenOver(t, r, ready, name, port, asked)
		// Until the old generation has exited, and relay has taken its
		// socket out of the group, the port has two. A process still
		// there after both looks (the port's sockets, then relay's) was
		// there during them: relay releases its socket only once it has
		// reaped it, and /proc lists it until then.
		socks := listening(t, port)
		relays := socketInodes(t, r.pid())
		if !processGone(oldPid) {
			overlaps++
			checkSockets(t, socks, relays, port, 2, fmt.Sprintf("restart %d, both generations alive", gen-1))
		}
		if srv.onReady != nil {
			srv.onReady(t, r, ready)
		}
		serving = srv.members(t, ready)
		for _, id := range serving {
			gens[id] = gen
		}
		_, from = r.waitMsg(from, "old generation exited", gen-1)
		if socks := checkListeners(t, r, port, 1, fmt.Sprintf("restart %d, after the old generation exited", gen-1)); len(socks) == 1 && socks[0].inode != own {
			t.Errorf("restart %d: generation %d holds socket %s, but the one listening is %s", gen-1, gen, own, socks[0].inode)
		}
		oldPid = ready.num("pid")
	}
	waitUntil(t, 30*time.Second, "the last generation to answer", answered(serving))
	load.stop()
	// relay status says how the serving generation took its socket.
	last := ready.num("gen")
	if state, took := r.genStatus(t, last); state != "serving" || took[name] != "bind" {
		t.Errorf("relay status: generation %d is %s and took %s by %q, want serving, by bind", last, state, name, took[name])
	}

	if overlaps == 0 {
		t.Errorf("in no restart was the old generation still there to count the sockets of both")
	}
	requests, failures := load.summary()
	t.Logf("%d restarts: %d requests, %d failed, answered by %v; both generations' sockets counted in %d restarts",
		takeoverRestarts, requests, len(failures), load.answered(), overlaps)
	noFailures(t, failures, requests)
	byGen := map[int]int{}
	for _, id := range load.answered() {
		gen, ok := gens[id]
		if !ok {
			t.Errorf("%d answered, which is no generation's", id)
		}
		byGen[gen]++
	}
	for gen := 1; gen <= takeoverRestarts+1; gen++ {
		if byGen[gen] == 0 {
			t.Errorf("generation %d never answered", gen)
		}
	}
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); srv.exitCode >= 0 && code != srv.exitCode {
		t.Errorf("relay exit code %d, want %d", code, srv.exitCode)
	}
}

// checkTakenOver checks that the generation of a ready line bound its port
// once, to the address asked, and got relay's socket for it: relay logged
// the takeover of that bind for the listener, with the generation's own
// steered socket, and the
// fd it names in the child is a socket relay holds too, listening on port
// with relay's backlog, which the child's listen() left alone. It returns
// that socket's inode.
func checkTakenOver(t *testing.T, r *relayProc, ready logLine, listener string, port int, asked string) string {
	t.Helper()
	gen, pid := ready.num("gen"), ready.num("pid")
	if got, want := ready.str("sockets"), listener+"=bind"; got != want {
		t.Errorf("generation %d ready with sockets=%q, want %q", gen, got, want)
	}
	taken := r.lines(msgTakenOver, gen)
	if len(taken) != 1 {
		t.Fatalf("generation %d: %d %q lines, want 1: %v", gen, len(taken), msgTakenOver, taken)
	}
	// The servers here bind in their main process (nginx in its master,
	// before it forks its workers).
	l := taken[0]
	if l.num("bind_pid") != pid || l.str("listener") != listener || l.str("socket") != "own" ||
		l.str("addr") != asked || l.num("fd") < 3 {
		t.Errorf("generation %d (pid %d): %v, want bind_pid %d, listener %s, socket own, addr %s and an fd above 2",
			gen, pid, l, pid, listener, asked)
	}
	inode := fdInode(t, pid, l.num("fd"))
	if socketInodes(t, r.pid())[inode] == nil {
		t.Errorf("generation %d has fd %d = socket %s, which relay does not hold", gen, l.num("fd"), inode)
	}
	socks := listening(t, port)
	i := slices.IndexFunc(socks, func(s listenSock) bool { return s.inode == inode })
	if i < 0 {
		t.Errorf("generation %d's fd %d (socket %s) is not listening on port %d: %v", gen, l.num("fd"), inode, port, socks)
	} else if socks[i].backlog != somaxconn(t) {
		t.Errorf("generation %d's socket has a backlog of %d, want relay's %d: the child's listen() changed it", gen, socks[i].backlog, somaxconn(t))
	}
	return inode
}

// requireProgram finds a server program a test runs. .ci/run installs them
// and sets RELAY_REQUIRE_<NAME>=1, so there a missing one fails the test;
// elsewhere it skips it. RELAY_<NAME> may give its path.
func requireProgram(t *testing.T, name string, fallback ...string) string {
	t.Helper()
	env := "RELAY_" + strings.ToUpper(name)
	if p := os.Getenv(env); p != "" {
		return p
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, p := range fallback {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	msg := fmt.Sprintf("%s not found (install Debian's %s package, or set %s)", name, name, env)
	if os.Getenv("RELAY_REQUIRE_"+strings.ToUpper(name)) == "1" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// onSeccomp checks that a generation runs under a seccomp filter, the one
// relay's exec shim installed to take its binds over.
func onSeccomp(t *testing.T, _ *relayProc, ready logLine) {
	t.Helper()
	if got := procStatus(t, ready.num("pid"), "Seccomp"); got != "2" {
		t.Errorf("generation %d: Seccomp %s in its status, want 2 (a filter)", ready.num("gen"), got)
	}
}

// (a) and (e): the Go server from the Kubernetes guide binds ":PORT" (one
// dual-stack IPv6 socket) and gets relay's IPv4 listener; as root, and with
// relay and the server unprivileged, where relay must set no_new_privs to
// install its filter.
func TestTakeoverGoServer(t *testing.T) {
	t.Parallel()
	command := func(port int) []string { return []string{built.plainserver, "-port", strconv.Itoa(port)} }
	t.Run("root", func(t *testing.T) {
		requireOrSkip(t, os.Getuid() == 0, "runs as root")
		restartRealServer(t, realServer{command: command, asks: "[::]:%d", ident: pidHeader, onReady: onSeccomp, exitCode: 0})
	})
	t.Run("unprivileged", func(t *testing.T) {
		requireOrSkip(t, os.Getuid() == 0, "needs root to start relay as another user")
		const nobody = 65534
		restartRealServer(t, realServer{
			command: command, asks: "[::]:%d", ident: pidHeader, exitCode: 0,
			start: func(t *testing.T, args ...string) *relayProc { return startRelayAs(t, nobody, nobody, args...) },
			onReady: func(t *testing.T, r *relayProc, ready logLine) {
				onSeccomp(t, r, ready)
				for who, pid := range map[string]int{"relay": r.pid(), "the child": ready.num("pid")} {
					if uid := strings.Fields(procStatus(t, pid, "Uid")); uid[0] != "65534" || uid[1] != "65534" {
						t.Errorf("%s runs with uids %v, want 65534", who, uid)
					}
					if caps := procStatus(t, pid, "CapEff"); caps != "0000000000000000" {
						t.Errorf("%s has capabilities %s, want none", who, caps)
					}
				}
				if nnp := procStatus(t, ready.num("pid"), "NoNewPrivs"); nnp != "1" {
					t.Errorf("the child has NoNewPrivs %s, want 1: an unprivileged filter needs it", nnp)
				}
			},
		})
	})
}

// (b) Python's http.server, bound to 127.0.0.1:PORT. It says nothing of
// its pid, so each generation serves a directory of its own (relay puts
// {generation} into the arguments), whose file "gen" holds its number.
func TestTakeoverPythonHTTPServer(t *testing.T) {
	t.Parallel()
	python := requireProgram(t, "python3", "/usr/bin/python3")
	if out, err := exec.Command(python, "-c", "import http.server").CombinedOutput(); err != nil {
		t.Fatalf("%s has no http.server: %v %s", python, err, out)
	}
	root := t.TempDir()
	for gen := 1; gen <= takeoverRestarts+1; gen++ {
		dir := filepath.Join(root, strconv.Itoa(gen))
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		writeMode(t, filepath.Join(dir, "gen"), strconv.Itoa(gen)+"\n")
	}
	restartRealServer(t, realServer{
		command: func(port int) []string {
			return []string{python, "-m", "http.server", "--bind", "127.0.0.1",
				"--directory", filepath.Join(root, "{generation}"), strconv.Itoa(port)}
		},
		asks:     "127.0.0.1:%d",
		path:     "/gen",
		ident:    bodyNumber,
		members:  func(_ *testing.T, ready logLine) []int { return []int{ready.num("gen")} },
		exitCode: -1, // SIGTERM ends Python without a handler
		onReady: func(t *testing.T, r *relayProc, ready logLine) {
			onSeccomp(t, r, ready)
			// The serving pid is this generation's Python, serving its
			// own directory.
			cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", ready.num("pid")))
			if want := filepath.Join(root, ready.str("gen")); err != nil || !slices.Contains(strings.Split(string(cmdline), "\x00"), want) {
				t.Errorf("generation %s's pid %d runs %q (%v), want it serving %s", ready.str("gen"), ready.num("pid"), cmdline, err, want)
			}
		},
	})
}

// (c) nginx with a stock `listen 127.0.0.1:PORT;`, a master and two
// workers, stopped with QUIT. The master binds; the workers answer with
// their pid, and belong to the generation whose master forked them.
func TestTakeoverNginx(t *testing.T) {
	t.Parallel()
	nginx := requireProgram(t, "nginx", "/usr/sbin/nginx")
	prefix := t.TempDir()
	const workers = 2
	restartRealServer(t, realServer{
		command: func(port int) []string {
			conf := filepath.Join(prefix, "nginx.conf")
			writeMode(t, conf, nginxConf(prefix, workers, port, ""))
			return []string{nginx, "-p", prefix, "-c", conf, "-e", "stderr",
				"-g", "daemon off; master_process on; pid " + filepath.Join(prefix, "nginx-{generation}.pid") + ";"}
		},
		asks:      "127.0.0.1:%d",
		relayArgs: []string{"--stop-signal", "QUIT"},
		ident:     pidHeader,
		exitCode:  0,
		onReady:   onSeccomp,
		members: func(t *testing.T, ready logLine) []int {
			var pids []int
			waitUntil(t, 30*time.Second, "nginx's workers", func() bool {
				pids = procfs.Children(ready.num("pid"))
				return len(pids) == workers
			})
			return pids
		},
	})
}

// nginxConf is a stock configuration, with every path in prefix, whose
// server on port answers / with its worker's pid; locations, if any, are
// added to that server before it.
func nginxConf(prefix string, workers, port int, locations string) string {
	return fmt.Sprintf(`worker_processes %d;
error_log stderr;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path %[2]s/body;
    proxy_temp_path %[2]s/proxy;
    fastcgi_temp_path %[2]s/fastcgi;
    uwsgi_temp_path %[2]s/uwsgi;
    scgi_temp_path %[2]s/scgi;
    server {
        listen 127.0.0.1:%[3]d;
%[4]s        location / {
            add_header X-Pid $pid;
            return 200 "$pid\n";
        }
    }
}
`, workers, prefix, port, locations)
}

// (g) Binds that no --listen covers pass untouched: a server's second port
// and its port 0 are its own sockets, not relay's. A covered bind that
// relay cannot complete safely (an IPv4 socket binding 0.0.0.0:PORT when
// the listener is [::1]:PORT, IPv6) is refused: that generation fails its
// start, relay restart says why, and the old generation serves on with no
// failed request. A later restart with a right command works.
func TestTakeoverPassesOtherBindsAndRefusesUnsafeOnes(t *testing.T) {
	t.Parallel()
	if l, err := net.Listen("tcp", "[::1]:0"); err != nil {
		requireOrSkip(t, false, fmt.Sprintf("no IPv6 loopback here: %v", err))
	} else {
		l.Close()
	}
	port := guardIPv4Wildcard(t)
	p := strconv.Itoa(port)
	other := freeLoopbackPort(t)
	portsFile := filepath.Join(t.TempDir(), "ports.json")
	r := startRelay(t, nil, "--listen", "[::1]:"+p,
		"--", built.plainserver, "-port", p, "-also", "127.0.0.1:"+strconv.Itoa(other), "-also", "127.0.0.1:0", "-ports-file", portsFile)
	listener := r.listenAddrs(1)[0]
	addr, name := listener.str("addr"), listener.str("name")
	first, from := r.waitMsg(0, "generation ready", 1)
	pid1 := first.num("pid")
	// ":PORT" is an IPv6 socket on all addresses: covered, and given the
	// [::1] listener.
	checkTakenOver(t, r, first, name, port, "[::]:"+p)
	checkListeners(t, r, port, 1, "generation 1")

	var extra []string
	b, err := os.ReadFile(portsFile)
	if err != nil || json.Unmarshal(b, &extra) != nil || len(extra) != 2 {
		t.Fatalf("ports file: %q, %v", b, err)
	}
	if extra[0] != "127.0.0.1:"+strconv.Itoa(other) || strings.HasSuffix(extra[1], ":0") {
		t.Fatalf("the server's other listeners are %v, want 127.0.0.1:%d and a port the kernel chose", extra, other)
	}
	relays, childs := socketInodes(t, r.pid()), socketInodes(t, pid1)
	for _, a := range extra {
		if got, err := get(newConnClient(), httpURL(a)); err != nil || got != pid1 {
			t.Errorf("on its own port %s: pid %d, %v; want %d", a, got, err, pid1)
		}
		_, ps, _ := net.SplitHostPort(a)
		n, _ := strconv.Atoi(ps)
		socks := listening(t, n)
		if len(socks) != 1 || relays[socks[0].inode] != nil || childs[socks[0].inode] == nil {
			t.Errorf("port %d: listening %v; want one socket, the child's own (its sockets %v), not relay's (%v)", n, socks, childs, relays)
		}
	}
	for _, l := range r.lines(msgTakenOver, 0) {
		if !strings.HasSuffix(l.str("addr"), ":"+p) {
			t.Errorf("relay took over a bind that no --listen covers: %v", l)
		}
	}

	ld := startLoad(httpURL(addr), 4, 2*time.Minute)
	waitUntil(t, 30*time.Second, "generation 1 to answer", func() bool { n, _ := ld.served(pid1); return n > 0 })
	out, errOut, code := r.client("restart", "--", built.plainserver, "-port", p, "-family", "4")
	if code != 3 {
		t.Errorf("relay restart into a server binding 0.0.0.0:%s: exit %d, want 3\n%s%s", p, code, out, errOut)
	}
	refused, _ := r.waitMsg(from, msgRefused, 2)
	if refused.str("listener") != name || refused.str("addr") != "0.0.0.0:"+p || refused.str("reason") == "" || refused.str("level") != "ERROR" {
		t.Errorf("refusal: %v; want an ERROR for listener %s, addr 0.0.0.0:%s, with a reason", refused, name, p)
	}
	if !strings.Contains(refused.str("reason"), "--listen") {
		t.Errorf("the refusal does not say which --listen to use: %v", refused)
	}
	rolled, from := r.waitMsg(from, "new generation failed; rolled back", 2)
	if rolled.num("still_serving_pid") != pid1 {
		t.Errorf("rollback: %v; want generation 1 (pid %d) still serving", rolled, pid1)
	}
	if !strings.Contains(out+errOut, "0.0.0.0:"+p) {
		t.Errorf("relay restart does not say which bind failed:\n%s%s", out, errOut)
	}
	t.Logf("relay restart into the refused bind, exit %d:\n%s%s", code, out, errOut)
	checkListeners(t, r, port, 1, "after the refused generation")
	n, _ := ld.served(pid1)
	waitUntil(t, 30*time.Second, "generation 1 to answer after the rollback", func() bool { m, _ := ld.served(pid1); return m > n })

	out, errOut, code = r.client("restart", "--", built.plainserver, "-port", p)
	if code != 0 {
		t.Fatalf("relay restart into a right command: exit %d\n%s%s", code, out, errOut)
	}
	third, _ := r.waitMsg(from, "generation ready", 3)
	checkTakenOver(t, r, third, name, port, "[::]:"+p)
	waitUntil(t, 30*time.Second, "generation 3 to answer", func() bool { n, _ := ld.served(third.num("pid")); return n > 0 })
	ld.stop()
	requests, failures := ld.summary()
	t.Logf("one refused and one good restart: %d requests, %d failed, answered by %v", requests, len(failures), ld.answered())
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed; first: %v", len(failures), requests, failures[0])
	}
	for _, pid := range ld.answered() {
		if pid != pid1 && pid != third.num("pid") {
			t.Errorf("pid %d answered; only generations 1 (%d) and 3 (%d) serve", pid, pid1, third.num("pid"))
		}
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// guardIPv4Wildcard binds an IPv4 socket to 0.0.0.0 and a port the kernel
// chooses, and never listens on it, so it takes no connection: it only
// holds the port, so that no test server can ever listen on 0.0.0.0 on
// it, even if relay failed to refuse the bind. It returns the port, which
// is free on [::1].
func guardIPv4Wildcard(t *testing.T) int {
	t.Helper()
	for range 10 {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{}); err != nil {
			unix.Close(fd)
			t.Fatal(err)
		}
		sa, err := unix.Getsockname(fd)
		if err != nil {
			unix.Close(fd)
			t.Fatal(err)
		}
		port := sa.(*unix.SockaddrInet4).Port
		if l, err := net.Listen("tcp6", fmt.Sprintf("[::1]:%d", port)); err == nil {
			l.Close()
			t.Cleanup(func() { unix.Close(fd) })
			return port
		}
		unix.Close(fd)
	}
	t.Fatal("no port free on both 0.0.0.0 and [::1] in 10 tries")
	return 0
}

// (h) --takeover off: relay installs no filter, says so once, and a child
// on its inherited fd 3 serves across restarts; a server that binds its own
// port then fails, as it would without relay's help.
func TestTakeoverOff(t *testing.T) {
	t.Parallel()
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--takeover", "off", "--", built.testchild)
	listener := r.listenAddrs(1)[0]
	addr := listener.str("addr")
	if got := listener.str("takeover"); got != "off" {
		t.Errorf("the listening line says takeover=%q, want off: %v", got, listener)
	}
	ready, from := r.waitMsg(0, "generation ready", 1)
	for gen := 1; gen <= 3; gen++ {
		if gen > 1 {
			r.signal(syscall.SIGHUP)
			ready, from = r.waitMsg(from, "generation ready", gen)
		}
		if pid, err := get(newConnClient(), httpURL(addr)); err != nil || pid != ready.num("pid") {
			t.Errorf("generation %d: pid %d, %v; want %d", gen, pid, err, ready.num("pid"))
		}
		if got := procStatus(t, ready.num("pid"), "Seccomp"); got != "0" {
			t.Errorf("generation %d runs under seccomp mode %s with --takeover off, want 0", gen, got)
		}
		if got := ready.str("sockets"); !strings.HasSuffix(got, "=fd") {
			t.Errorf("generation %d ready with sockets=%q, want NAME=fd", gen, got)
		}
	}
	if n := len(r.lines(msgTakenOver, 0)); n != 0 {
		t.Errorf("%d binds taken over with --takeover off", n)
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)

	port := strconv.Itoa(freeLoopbackPort(t))
	r = startRelay(t, nil, "--listen", "127.0.0.1:"+port, "--takeover", "off", "--", built.plainserver, "-port", port)
	if code := r.wait(60 * time.Second); code == 0 {
		t.Errorf("relay exited 0 with a first generation that cannot bind")
	}
	if out := r.output(); !strings.Contains(out, "address already in use") {
		t.Errorf("the server's own bind did not fail as without relay:\n%s", out)
	}
}

// (h) Where seccomp refuses relay's filter (seccompdeny makes seccomp(2)
// fail, as an old kernel or a container's policy would), relay logs it
// once and serves on inherited sockets across restarts; with
// --takeover on it refuses to start.
func TestTakeoverUnavailable(t *testing.T) {
	t.Parallel()
	for _, errno := range []string{"ENOSYS", "EINVAL"} {
		t.Run("auto/"+errno, func(t *testing.T) {
			wrap := []string{built.seccompdeny, "-errno", errno, "--"}
			r := startRelayWrapped(t, wrap, built.relay, nil, nil, "--listen", "127.0.0.1:0", "--", built.testchild)
			addr := r.listenAddrs(1)[0].str("addr")
			ready, from := r.waitMsg(0, "generation ready", 1)
			for gen := 1; gen <= 4; gen++ {
				if gen > 1 {
					r.signal(syscall.SIGHUP)
					ready, from = r.waitMsg(from, "generation ready", gen)
				}
				if pid, err := get(newConnClient(), httpURL(addr)); err != nil || pid != ready.num("pid") {
					t.Errorf("generation %d: pid %d, %v; want %d", gen, pid, err, ready.num("pid"))
				}
				if got := ready.str("sockets"); !strings.HasSuffix(got, "=fd") {
					t.Errorf("generation %d ready with sockets=%q, want NAME=fd", gen, got)
				}
			}
			warnings := r.unavailable()
			if len(warnings) != 1 {
				t.Errorf("%d %q lines over 4 generations, want 1: %v", len(warnings), msgUnavailable, warnings)
			} else if w := warnings[0]; w.str("level") != "WARN" || !strings.Contains(w.str("reason"), "seccomp") {
				t.Errorf("the warning is %v; want a WARN whose reason names seccomp", w)
			}
			if n := len(r.lines(msgTakenOver, 0)); n != 0 {
				t.Errorf("%d binds taken over without a filter", n)
			}
			r.signal(syscall.SIGTERM)
			r.wait(30 * time.Second)
		})
	}
	t.Run("on", func(t *testing.T) {
		wrap := []string{built.seccompdeny, "--"}
		r := startRelayWrapped(t, wrap, built.relay, nil, nil, "--listen", "127.0.0.1:0", "--takeover", "on", "--", built.testchild)
		// Exit 1 with a line that says why, as for any first
		// generation that never becomes ready.
		if code := r.wait(30 * time.Second); code != 1 {
			t.Fatalf("relay --takeover on where seccomp refuses its filter exited %d, want 1:\n%s", code, r.output())
		}
		if out := r.output(); !strings.Contains(out, "never became ready") || !strings.Contains(out, "--takeover on requires it") {
			t.Errorf("relay's last words do not say the generation never became ready because --takeover on requires the filter:\n%s", out)
		}
		if n := r.count("generation ready"); n != 0 {
			t.Errorf("%d generations were made ready:\n%s", n, r.output())
		}
		// One error says what is missing and that --takeover on wants
		// it; the lines that follow are the generation's failure.
		errs := r.unavailable()
		if len(errs) != 1 || errs[0].str("level") != "ERROR" || !strings.Contains(errs[0].str("msg"), "--takeover on") ||
			!strings.Contains(errs[0].str("reason"), "seccomp") {
			t.Errorf("want one ERROR naming --takeover on, with a reason naming seccomp; got %v", errs)
		}
	})
}

// (i) Across 200 restarts of a server whose binds relay takes over, the
// port keeps one listening socket once each old generation has exited,
// and relay's fd count ends where it started: the filters' notification
// fds and the sockets go with their generations.
func TestTakeoverDoesNotGrow(t *testing.T) {
	t.Parallel()
	const restarts = 200
	port := freeLoopbackPort(t)
	p := strconv.Itoa(port)
	r := startRelay(t, nil, "--listen", "127.0.0.1:"+p, "--drain", "0", "--", built.plainserver, "-port", p)
	name := r.listenAddrs(1)[0].str("name")
	_, from := r.waitMsg(0, "generation ready", 1)
	checkListeners(t, r, port, 1, "at the start")
	fdsBefore := countFDs(t, r.pid())
	for gen := 2; gen <= restarts+1; gen++ {
		r.signal(syscall.SIGHUP)
		_, from = r.waitMsg(from, "generation ready", gen)
		_, from = r.waitMsg(from, "old generation exited", gen-1)
		if socks := checkListeners(t, r, port, 1, fmt.Sprintf("restart %d", gen-1)); len(socks) != 1 {
			t.FailNow()
		}
	}
	if fdsAfter := countFDs(t, r.pid()); fdsAfter != fdsBefore {
		t.Errorf("relay had %d fds after the first generation was ready and %d after %d restarts", fdsBefore, fdsAfter, restarts)
	}
	taken := r.lines(msgTakenOver, 0)
	if len(taken) != restarts+1 {
		t.Errorf("%d binds taken over in %d generations, want one each", len(taken), restarts+1)
	}
	for _, l := range taken {
		if l.str("listener") != name || l.str("socket") != "own" || l.str("addr") != "[::]:"+p {
			t.Errorf("%v: want listener %s, socket own, addr [::]:%s", l, name, p)
			break
		}
	}
	t.Logf("%d restarts: relay fds %d before and after, one listening socket after each", restarts, fdsBefore)
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// (j) A probe of the public address never reaches the old generation while
// the new one has not bound yet: relay's socket for the new generation
// listens before the child starts, and the probe waits in its queue. The
// child binds only when the test opens its gate; until then generation 2 is
// not ready and generation 1 answers no probe.
func TestTakeoverProbeWaitsForTheBind(t *testing.T) {
	t.Parallel()
	// With an http check of the public address, and with the default
	// check and a child that never speaks sd_notify, whose readiness is
	// its accept of relay's probe.
	for _, c := range []struct {
		name  string
		check []string
		child []string
	}{
		{"http", []string{"--health", "http://{addr}/healthz"}, []string{"-health-gate", "{gate}"}},
		{"auto", nil, []string{"-silent"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			probeWaitsForTheBind(t, c.check, c.child)
		})
	}
}

func probeWaitsForTheBind(t *testing.T, check, childArgs []string) {
	port := freeLoopbackPort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	gate := filepath.Join(t.TempDir(), "gate")
	writeMode(t, gate, "1")
	subst := strings.NewReplacer("{addr}", addr, "{gate}", gate)
	args := []string{"--listen", addr}
	for _, a := range check {
		args = append(args, subst.Replace(a))
	}
	args = append(args, "--", built.testchild, "-bind", addr, "-bind-gate", gate)
	for _, a := range childArgs {
		args = append(args, subst.Replace(a))
	}
	httpCheck := len(check) > 0
	r := startRelay(t, nil, args...)
	name := r.listenAddrs(1)[0].str("name")
	first, from := r.waitMsg(0, "generation ready", 1)
	own1 := checkTakenOver(t, r, first, name, port, addr)
	if httpCheck {
		waitUntil(t, 10*time.Second, "generation 1's probe line", func() bool { return probes(r.output())["gen1/200"] >= 1 })
	}

	r.signal(syscall.SIGHUP)
	_, from = r.waitMsg(from, "generation starting", 2)
	// A probe connection waits on the socket that is not generation 1's.
	var queuedOn string
	waitUntil(t, 30*time.Second, "a probe queued on generation 2's socket", func() bool {
		for _, s := range listening(t, port) {
			if s.inode != own1 && s.queued > 0 {
				queuedOn = s.inode
				return true
			}
		}
		return false
	})
	if relay := socketInodes(t, r.pid()); relay[queuedOn] == nil {
		t.Errorf("the probe waits on socket %s, which is not relay's", queuedOn)
	}
	for _, s := range listening(t, port) {
		if s.inode == own1 && s.queued != 0 {
			t.Errorf("generation 1's socket has %d connections queued while nothing but probes arrive", s.queued)
		}
	}
	if n := len(r.lines(msgTakenOver, 2)); n != 0 {
		t.Fatalf("generation 2 bound with its gate shut")
	}
	if pid, err := get(newConnClient(), httpURL(addr)); err != nil || pid != first.num("pid") {
		t.Errorf("public request while generation 2 starts: pid %d, %v; want generation 1's %d", pid, err, first.num("pid"))
	}
	if n := r.count("generation ready"); n != 1 {
		t.Fatalf("generation 2 was made ready before it bound its port")
	}
	writeMode(t, gate, "2")
	second, _ := r.waitMsg(from, "generation ready", 2)
	if own2 := checkTakenOver(t, r, second, name, port, addr); own2 != queuedOn {
		t.Errorf("generation 2 got socket %s, but the probe waited on %s", own2, queuedOn)
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
	if !httpCheck {
		return
	}
	p := probes(r.output())
	if p["gen1/200"] != 1 || p["gen2/200"] < 1 || p["gen1/503"]+p["gen2/503"] != 0 {
		t.Errorf("probes answered %v; want generation 1 exactly its own one, generation 2 at least one, none 503", p)
	}
}

var acceptedLine = regexp.MustCompile(`testchild: accepted gen=(\d+) `)

// (f) A server that speaks sd_notify and accepts before its READY=1 is not
// made ready before READY=1: neither one that says STATUS= first, nor one
// that says nothing before READY=1 but whose earlier generations spoke
// sd_notify. Public connections stay with the old generation until then.
func TestTakeoverNotifyServerIsReadyAtReadyOnly(t *testing.T) {
	t.Parallel()
	port := freeLoopbackPort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	gate := filepath.Join(t.TempDir(), "gate")
	writeMode(t, gate, "1")
	child := []string{built.testchild, "-bind", addr, "-ready-gate-notify", gate, "-log-accepts"}
	r := startRelay(t, nil, append([]string{"--listen", addr, "--"}, append(child, "-notify-extra", "STATUS=starting")...)...)
	name := r.listenAddrs(1)[0].str("name")
	ready, from := r.waitMsg(0, "generation ready", 1)
	checkTakenOver(t, r, ready, name, port, addr)
	r.waitMsg(0, "child sent READY=1", 1)
	ld := startLoad(httpURL(addr), 4, 2*time.Minute)
	pids := []int{ready.num("pid")}
	for gen := 2; gen <= 3; gen++ {
		waitUntil(t, 30*time.Second, "the serving generation to answer", func() bool { n, _ := ld.served(pids[len(pids)-1]); return n > 0 })
		if gen == 2 {
			r.signal(syscall.SIGHUP) // the same command: STATUS=, then READY=1
		} else if out, errOut, code := r.client("restart", append([]string{"--no-wait", "--"}, child...)...); code != 0 {
			// Nothing before READY=1, after generations that spoke.
			t.Fatalf("relay restart --no-wait: exit %d\n%s%s", code, out, errOut)
		}
		starting, _ := r.waitMsg(from, "generation starting", gen)
		r.waitMsg(from, msgTakenOver, gen)
		r.waitRaw(fmt.Sprintf("testchild: accepting gen=%d ", gen))
		// Generation gen accepts now. Give relay a fair chance to take it
		// for ready: generation gen-1 answers 50 more requests, and relay
		// answers a status request with gen still starting.
		n, _ := ld.served(pids[len(pids)-1])
		waitUntil(t, 30*time.Second, "50 more answers from the serving generation", func() bool {
			m, _ := ld.served(pids[len(pids)-1])
			return m >= n+50 || r.count("generation ready") >= gen // the failure below
		})
		if state := r.genState(t, gen); state != "starting" {
			t.Errorf("relay status while generation %d waits for READY=1: it is %s, want starting", gen, state)
		}
		if got := r.count("generation ready"); got != gen-1 {
			t.Fatalf("generation %d was made ready before READY=1 (%d ready lines)", gen, got)
		}
		if got, _ := ld.served(starting.num("pid")); got != 0 {
			t.Errorf("generation %d answered %d public requests before READY=1", gen, got)
		}
		t.Logf("generation %d accepted %d connections before READY=1", gen, acceptedBefore(r.output(), gen))
		writeMode(t, gate, strconv.Itoa(gen))
		ready, from = r.waitMsg(from, "generation ready", gen)
		own := checkTakenOver(t, r, ready, name, port, addr)
		pids = append(pids, ready.num("pid"))
		_, from = r.waitMsg(from, "old generation exited", gen-1)
		if socks := checkListeners(t, r, port, 1, fmt.Sprintf("restart %d", gen-1)); len(socks) == 1 && socks[0].inode != own {
			t.Errorf("generation %d holds socket %s, but the one listening is %s", gen, own, socks[0].inode)
		}
	}
	waitUntil(t, 30*time.Second, "the last generation to answer", func() bool { n, _ := ld.served(pids[len(pids)-1]); return n > 0 })
	ld.stop()
	requests, failures := ld.summary()
	t.Logf("2 restarts: %d requests, %d failed, answered by %v", requests, len(failures), ld.answered())
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed; first: %v", len(failures), requests, failures[0])
	}
	for _, pid := range pids {
		if n, _ := ld.served(pid); n == 0 {
			t.Errorf("pid %d never answered", pid)
		}
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// acceptedBefore counts the connections generation gen accepted before it
// sent READY=1.
func acceptedBefore(out string, gen int) int {
	n := 0
	for _, m := range acceptedLine.FindAllStringSubmatch(out, -1) {
		if m[1] == strconv.Itoa(gen) {
			n++
		}
	}
	return n
}

// A Go server on a unix socket it binds itself removes the path when it
// closes its listener; relay keeps the path, so that every later
// generation, and every client, still finds relay's socket there. (No load
// runs: on a shared socket a plain Shutdown drops what it accepted last,
// which is the server's business; see TestSteeredDrainWithPlainShutdown.)
func TestTakeoverGoUnixServerKeepsThePath(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "app.sock")
	r := startRelay(t, nil, "--listen", "unix:"+path, "--", built.plainserver, "-unix", path)
	ready, from := r.waitMsg(0, "generation ready", 1)
	client := unixClient(path)
	const restarts = 3
	for gen := 1; gen <= restarts+1; gen++ {
		if gen > 1 {
			r.signal(syscall.SIGHUP)
			ready, from = r.waitMsg(from, "generation ready", gen)
			// The old generation has closed its listener, which
			// unlinks the path, by the time it exits.
			_, from = r.waitMsg(from, "old generation exited", gen-1)
		}
		if pid, err := get(client, "http://relay/"); err != nil || pid != ready.num("pid") {
			t.Fatalf("generation %d on %s: pid %d, %v; want %d", gen, path, pid, err, ready.num("pid"))
		}
	}
	if n := r.count("kept relay's unix socket path: the child's unlink of it was answered without removing it"); n < restarts {
		t.Errorf("%d unlinks of the path kept, want one per old generation (%d)", n, restarts)
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFSOCK {
		t.Errorf("relay's socket path after the restarts: %v (mode %o)", err, st.Mode)
	}
	taken := r.lines(msgTakenOver, 0)
	if len(taken) != restarts+1 {
		t.Errorf("%d binds taken over, want one per generation (%d)", len(taken), restarts+1)
	}
	for _, l := range taken {
		if l.str("socket") != "shared" {
			t.Errorf("a unix bind took socket %q, want the shared one", l.str("socket"))
		}
	}
}
