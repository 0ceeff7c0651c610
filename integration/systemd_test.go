package integration

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
	"github.com/relaysh/relay/internal/sockets"
	"github.com/relaysh/relay/socketpass"
)

// The tests of relay under systemd need no running systemd: a test notify
// socket stands in for the service manager, and systemd-socket-activate
// (Debian's systemd package) for a .socket unit.

// requireTool finds a program the systemd tests need. .ci/run installs
// them and sets RELAY_REQUIRE_SYSTEMD=1, so there a missing tool fails the
// test; elsewhere it skips it, saying what to install.
func requireTool(t *testing.T, env, name string) string {
	t.Helper()
	if p := os.Getenv(env); p != "" {
		return p
	}
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	msg := fmt.Sprintf("%s not found (install Debian's systemd package, or set %s)", name, env)
	if os.Getenv("RELAY_REQUIRE_SYSTEMD") == "1" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// notifyMsg is one datagram relay sent to the test's notify socket.
type notifyMsg struct {
	at    time.Time
	raw   string
	vars  map[string]string
	files []*os.File // passed with SCM_RIGHTS
}

// notifyRecorder is a notify socket that records every message, as
// systemd's would receive them.
type notifyRecorder struct {
	t       *testing.T
	path    string
	conn    *net.UnixConn
	mu      sync.Mutex
	msgs    []notifyMsg
	changed chan struct{}
	done    chan struct{}
}

func newNotifyRecorder(t *testing.T) *notifyRecorder {
	t.Helper()
	// A short directory: a unix socket path has room for 107 bytes.
	dir, err := os.MkdirTemp("", "relay-sd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	rec := &notifyRecorder{t: t, path: path, conn: conn, changed: make(chan struct{}), done: make(chan struct{})}
	go rec.read()
	t.Cleanup(func() {
		conn.Close()
		<-rec.done
		rec.mu.Lock()
		defer rec.mu.Unlock()
		for _, m := range rec.msgs {
			for _, f := range m.files {
				f.Close()
			}
		}
	})
	return rec
}

func (rec *notifyRecorder) read() {
	defer close(rec.done)
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(16*4))
	for {
		n, oobn, _, _, err := rec.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		m := notifyMsg{at: time.Now(), raw: string(buf[:n]), vars: map[string]string{}}
		for _, line := range strings.Split(strings.TrimRight(m.raw, "\n"), "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				m.vars[k] = v
			}
		}
		if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, c := range cmsgs {
				fds, err := unix.ParseUnixRights(&c)
				if err != nil {
					continue
				}
				for _, fd := range fds {
					m.files = append(m.files, os.NewFile(uintptr(fd), "stored"))
				}
			}
		}
		rec.mu.Lock()
		rec.msgs = append(rec.msgs, m)
		close(rec.changed)
		rec.changed = make(chan struct{})
		rec.mu.Unlock()
	}
}

// sync waits until the recorder has read every message sent to it so far:
// it sends one of its own and waits for it (datagrams arrive in order).
func (rec *notifyRecorder) sync() {
	rec.t.Helper()
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: rec.path, Net: "unixgram"})
	if err != nil {
		rec.t.Fatal(err)
	}
	defer c.Close()
	mark := "TEST_SYNC=" + strconv.FormatInt(time.Now().UnixNano(), 10)
	if _, err := c.Write([]byte(mark)); err != nil {
		rec.t.Fatal(err)
	}
	rec.waitCount(1, mark, func(m notifyMsg) bool { return m.raw == mark })
}

func (rec *notifyRecorder) all() []notifyMsg {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return slices.Clone(rec.msgs)
}

// waitCount waits until n messages satisfy pred.
func (rec *notifyRecorder) waitCount(n int, what string, pred func(notifyMsg) bool) []notifyMsg {
	rec.t.Helper()
	deadline := time.NewTimer(30 * time.Second)
	defer deadline.Stop()
	for {
		rec.mu.Lock()
		var got []notifyMsg
		for _, m := range rec.msgs {
			if pred(m) {
				got = append(got, m)
			}
		}
		changed := rec.changed
		rec.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-changed:
		case <-deadline.C:
			rec.t.Fatalf("timed out waiting for %d notify messages with %s; got %d of %d: %q", n, what, len(got), len(rec.all()), raws(rec.all()))
		}
	}
}

func has(key, value string) func(notifyMsg) bool {
	return func(m notifyMsg) bool { v, ok := m.vars[key]; return ok && (value == "" || v == value) }
}

func raws(ms []notifyMsg) []string {
	var out []string
	for _, m := range ms {
		out = append(out, m.raw)
	}
	return out
}

// milestones keeps the messages that mark the service's state, without
// STATUS lines and watchdog pings: READY=1, RELOADING=1, STOPPING=1.
func milestones(ms []notifyMsg) []string {
	var out []string
	for _, m := range ms {
		for _, k := range []string{"READY", "RELOADING", "STOPPING"} {
			if m.vars[k] == "1" {
				out = append(out, k+"=1")
			}
		}
	}
	return out
}

func monotonicUsec(t *testing.T) int64 {
	t.Helper()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return ts.Nano() / 1000
}

// Test 2: relay tells the service manager, in order, that it is ready,
// that each restart begins (with the monotonic time systemd matches to its
// reload) and ends, whether it succeeded or was rolled back, what serves,
// and that it stops; and it pings the watchdog at half its interval.
func TestNotifyProtocolForTheServiceManager(t *testing.T) {
	rec := newNotifyRecorder(t)
	modeFile := filepath.Join(t.TempDir(), "mode")
	if err := os.WriteFile(modeFile, []byte("serve"), 0o600); err != nil {
		t.Fatal(err)
	}
	const watchdog = 200 * time.Millisecond
	r := startRelay(t, []string{"NOTIFY_SOCKET=" + rec.path, "WATCHDOG_USEC=" + strconv.Itoa(int(watchdog.Microseconds()))},
		"--listen", "127.0.0.1:0", "--", built.testchild, "-mode-file", modeFile)
	start := time.Now()
	wd, _ := r.waitMsg(0, "watchdog: pinging while the supervisor answers", 0)
	if got := time.Duration(wd.num("ping_every")); got != watchdog/2 {
		t.Errorf("pings every %s, want half of WATCHDOG_USEC (%s)", got, watchdog/2)
	}
	_, from := r.waitMsg(0, "generation ready", 1)
	rec.waitCount(1, "READY=1", has("READY", "1"))

	// A restart that succeeds.
	before := monotonicUsec(t)
	r.signal(syscall.SIGHUP)
	_, from = r.waitMsg(from, "generation ready", 2)
	rec.waitCount(2, "READY=1", has("READY", "1"))

	// A restart that is rolled back.
	if err := os.WriteFile(modeFile, []byte("exit"), 0o600); err != nil {
		t.Fatal(err)
	}
	r.signal(syscall.SIGHUP)
	r.waitMsg(from, "new generation failed; rolled back", 3)
	rec.waitCount(3, "READY=1", has("READY", "1"))
	rec.waitCount(1, "a STATUS= naming the rollback", func(m notifyMsg) bool {
		return strings.Contains(m.vars["STATUS"], "last restart rolled back")
	})
	if err := os.WriteFile(modeFile, []byte("serve"), 0o600); err != nil {
		t.Fatal(err)
	}
	rec.waitCount(3, "WATCHDOG=1", has("WATCHDOG", "1"))

	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
	elapsed := time.Since(start)
	after := monotonicUsec(t)
	rec.sync()
	msgs := rec.all()

	want := []string{"READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1", "STOPPING=1"}
	if got := milestones(msgs); !slices.Equal(got, want) {
		t.Errorf("milestones %q, want %q; all messages: %q", got, want, raws(msgs))
	}
	var last int64
	for _, m := range msgs {
		if m.vars["RELOADING"] != "1" {
			continue
		}
		usec, err := strconv.ParseInt(m.vars["MONOTONIC_USEC"], 10, 64)
		if err != nil {
			t.Errorf("RELOADING=1 without a valid MONOTONIC_USEC: %q", m.raw)
			continue
		}
		if usec < before || usec > after || usec <= last {
			t.Errorf("MONOTONIC_USEC=%d outside [%d, %d] or not after the previous %d", usec, before, after, last)
		}
		last = usec
	}
	var statuses []string
	for _, m := range msgs {
		if s, ok := m.vars["STATUS"]; ok {
			statuses = append(statuses, s)
		}
	}
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`^gen 1 pid \d+ serving$`),
		regexp.MustCompile(`gen 1 pid \d+ serving; gen 2 pid \d+ starting`),
		regexp.MustCompile(`^gen 2 pid \d+ serving; last restart rolled back: exited before it was ready: exit status 3$`),
		regexp.MustCompile(`^stopping`),
	} {
		if !slices.ContainsFunc(statuses, want.MatchString) {
			t.Errorf("no STATUS= matches %s; got %q", want, statuses)
		}
	}
	// Pings come at most every 100 ms (a busy machine sends fewer).
	var pings []time.Time
	for _, m := range msgs {
		if m.vars["WATCHDOG"] == "1" {
			pings = append(pings, m.at)
		}
	}
	if most := int(elapsed/(watchdog/2)) + 2; len(pings) > most {
		t.Errorf("%d watchdog pings in %s, want at most %d (one per 100ms)", len(pings), elapsed, most)
	}
	if len(pings) > 1 {
		t.Logf("%d watchdog pings, mean interval %s", len(pings), pings[len(pings)-1].Sub(pings[0])/time.Duration(len(pings)-1))
	}
}

// Test 3: what a child sends to its own notify socket stays with relay:
// its STOPPING=1 and MAINPID= never reach the service manager, and relay
// stays the main process.
func TestChildNotifyMessagesStayPrivate(t *testing.T) {
	rec := newNotifyRecorder(t)
	r := startRelay(t, []string{"NOTIFY_SOCKET=" + rec.path},
		"--listen", "127.0.0.1:0", "--", built.testchild, "-notify-extra", "STOPPING=1,MAINPID=1,STATUS=child says hello")
	l, _ := r.waitFor(0, 30*time.Second, "the child's MAINPID= and STOPPING=1 to reach relay", func(l logLine) bool {
		return l.str("msg") == "child notify message not passed on to the service manager" && l.num("gen") == 1
	})
	if got := fmt.Sprint(l["fields"]); got != "[MAINPID STOPPING]" {
		t.Errorf("relay kept fields %s, want [MAINPID STOPPING]", got)
	}
	r.waitMsg(0, "generation ready", 1)
	rec.waitCount(1, "READY=1", has("READY", "1"))
	check := func(when string) {
		for _, m := range rec.all() {
			if _, ok := m.vars["MAINPID"]; ok || strings.Contains(m.raw, "child says hello") {
				t.Errorf("%s: the child's message reached the service manager: %q", when, m.raw)
			}
		}
	}
	check("while serving")
	if got := rec.all(); slices.ContainsFunc(got, has("STOPPING", "1")) {
		t.Errorf("STOPPING=1 reached the service manager while relay serves: %q", raws(got))
	}
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
	rec.sync()
	check("after the stop")
	if n := len(rec.waitCount(1, "STOPPING=1", has("STOPPING", "1"))); n != 1 {
		t.Errorf("%d STOPPING=1 messages, want relay's one", n)
	}
}

// freeTCPPort finds a free loopback port for a program that cannot bind
// port 0 and say which port it got (systemd-socket-activate).
func freeTCPPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	return port
}

// Test 1: relay started by a socket-activating launcher takes the passed
// sockets, hands them to each child with their names and the child's own
// LISTEN_PID, after them the --listen ones, and restarts under load fail
// no request.
func TestSocketActivatedRelay(t *testing.T) {
	activate := requireTool(t, "RELAY_SYSTEMD_SOCKET_ACTIVATE", "systemd-socket-activate")
	dir, err := os.MkdirTemp("", "relay-sa-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sockPath := filepath.Join(dir, "admin.sock")
	report := filepath.Join(dir, "report.json")
	port := freeTCPPort(t)
	web := "127.0.0.1:" + port
	wrap := []string{activate, "-l", web, "-l", sockPath, "--fdname=web:admin"}
	r := startRelayWrapped(t, wrap, built.relay, nil, nil,
		"--listen", "extra=127.0.0.1:0", "--", built.testchild, "-report", report)

	// systemd-socket-activate starts relay on the first connection, which
	// waits in the socket's queue until the first child answers it.
	r.waitRaw("Listening on " + sockPath)
	client := newConnClient()
	pid, err := get(client, httpURL(web))
	if err != nil {
		t.Fatalf("first request, which starts relay: %v", err)
	}
	addrs := r.listenAddrs(3)
	ready, from := r.waitMsg(0, "generation ready", 1)
	if pid != ready.num("pid") {
		t.Errorf("answered by pid %d, relay's child is %d", pid, ready.num("pid"))
	}
	for i, want := range [][3]string{{"web", web, "activated"}, {"admin", sockPath, "activated"}, {"extra", "", "bound"}} {
		if addrs[i].str("name") != want[0] || (want[1] != "" && addrs[i].str("addr") != want[1]) || addrs[i].str("origin") != want[2] {
			t.Errorf("socket %d: %v, want name %s addr %s origin %s", i, addrs[i], want[0], want[1], want[2])
		}
	}
	rep := readReport(t, report)
	if got, want := rep.Env["LISTEN_PID"], strconv.Itoa(rep.Pid); got != want {
		t.Errorf("LISTEN_PID = %q, want the child's own pid %s", got, want)
	}
	if got := rep.Env["LISTEN_FDNAMES"]; got != "web:admin:extra" {
		t.Errorf("LISTEN_FDNAMES = %q, want web:admin:extra", got)
	}
	if got := rep.Env["LISTEN_FDS"]; got != "3" {
		t.Errorf("LISTEN_FDS = %q, want 3", got)
	}
	for fd, want := range map[string]string{"3": web, "4": sockPath, "5": addrs[2].str("addr")} {
		if got := rep.SocketAddrs[fd]; got != want {
			t.Errorf("the child's fd %s is bound to %q, want %q", fd, got, want)
		}
	}
	// relay holds the passed sockets outside Go's poller, as its own.
	fd := relaySocketFD(t, r.pid(), rep.Pid)
	for epfd, watched := range epollTargets(t, r.pid()) {
		if slices.Contains(watched, fd) {
			t.Errorf("relay's epoll fd %s watches the passed socket (fd %s)", epfd, fd)
		}
	}

	// Swap in examples/hello, which shuts down well, then restart under load.
	if out, errOut, code := r.client("restart", "--", built.hello, "-lame-duck", "100ms"); code != 0 {
		t.Fatalf("relay restart into hello: exit %d\n%s%s", code, out, errOut)
	}
	_, from = r.waitMsg(from, "old generation exited", 1)
	ld := startLoad(httpURL(web), 8, 5*time.Minute)
	const restarts = 10
	for gen := 3; gen < 3+restarts; gen++ {
		var l logLine
		r.signal(syscall.SIGHUP)
		l, from = r.waitMsg(from, "generation ready", gen)
		newPid := l.num("pid")
		waitUntil(t, 10*time.Second, "the new pid to answer", func() bool { c, _ := ld.served(newPid); return c > 0 })
		_, from = r.waitMsg(from, "old generation exited", gen-1)
	}
	ld.stop()
	requests, failures := ld.summary()
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed across %d restarts; first: %v", len(failures), requests, restarts, failures[0])
	}
	t.Logf("socket-activated relay: restarts=%d requests=%d failures=%d", restarts, requests, len(failures))
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
}

// A socket passed in non-blocking mode, as .socket units pass them, is
// held by relay outside Go's poller like the sockets relay binds, and the
// child still gets it with its name and its own LISTEN_PID.
func TestPassedNonBlockingSocket(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 128); err != nil {
		t.Fatal(err)
	}
	sock := os.NewFile(uintptr(fd), "web")
	defer sock.Close()
	addr := sockAddr(t, sock)
	report := filepath.Join(t.TempDir(), "report.json")
	shim := socketpass.ShimLauncher(built.relay, built.relay)
	r := startRelayWrapped(t, shim, "relay", []string{"LISTEN_FDS=1", "LISTEN_FDNAMES=web"}, []*os.File{sock},
		"--", built.testchild, "-report", report)
	l := r.listenAddrs(1)[0]
	if l.str("name") != "web" || l.str("addr") != addr || l.str("origin") != "activated" {
		t.Errorf("relay took %v, want web on %s, activated", l, addr)
	}
	ready, _ := r.waitMsg(0, "generation ready", 1)
	if pid, err := get(newConnClient(), httpURL(addr)); err != nil || pid != ready.num("pid") {
		t.Errorf("request: pid %d, %v; want an answer from pid %d", pid, err, ready.num("pid"))
	}
	rep := readReport(t, report)
	if rep.Env["LISTEN_PID"] != strconv.Itoa(rep.Pid) || rep.Env["LISTEN_FDNAMES"] != "web" {
		t.Errorf("the child got LISTEN_PID=%s (its pid %d) LISTEN_FDNAMES=%s", rep.Env["LISTEN_PID"], rep.Pid, rep.Env["LISTEN_FDNAMES"])
	}
	rfd := relaySocketFD(t, r.pid(), rep.Pid)
	for epfd, watched := range epollTargets(t, r.pid()) {
		if slices.Contains(watched, rfd) {
			t.Errorf("relay's epoll fd %s watches the passed socket (fd %s)", epfd, rfd)
		}
	}
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
}

// Test 4: relay keeps its sockets in the fd store, named; a new relay
// started with them, as systemd hands them back after `systemctl restart`
// or a crash, serves on the same sockets, and no connection is refused in
// between.
func TestFDStoreHandsSocketsToTheNextRelay(t *testing.T) {
	rec := newNotifyRecorder(t)
	dir, err := os.MkdirTemp("", "relay-fds-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sockPath := filepath.Join(dir, "app.sock")
	env := []string{"NOTIFY_SOCKET=" + rec.path, "FDSTORE=4"}
	r1 := startRelay(t, env, "--listen", "127.0.0.1:0", "--listen", "unix:"+sockPath,
		"--", built.hello, "-lame-duck", "100ms")
	addrs := r1.listenAddrs(2)
	tcpAddr := addrs[0].str("addr")
	_, port, _ := net.SplitHostPort(tcpAddr)
	r1.waitMsg(0, "generation ready", 1)
	rec.waitCount(1, "READY=1", has("READY", "1"))

	stored := rec.waitCount(2, "FDSTORE=1", has("FDSTORE", "1"))
	wantNames := []string{sockets.StoreNamePrefix + "tcp-" + port, sockets.StoreNamePrefix + "unix-app.sock"}
	var files []*os.File
	for i, m := range stored {
		if m.vars["FDNAME"] != wantNames[i] || len(m.files) != 1 {
			t.Fatalf("stored %q with %d fds, want FDNAME=%s with one fd", m.raw, len(m.files), wantNames[i])
		}
		files = append(files, m.files[0])
	}
	if got := sockAddr(t, files[0]); got != tcpAddr {
		t.Errorf("the stored TCP socket is bound to %s, want %s", got, tcpAddr)
	}

	// Load on both sockets across the hand-over from relay 1 to relay 2.
	ld := startLoad(httpURL(tcpAddr), 4, 5*time.Minute)
	unixLoad := startUnixLoad(sockPath, 2, 5*time.Minute)
	waitUntil(t, 10*time.Second, "requests to be answered", func() bool { n, _ := ld.summary(); return n > 10 })

	r1.signal(syscall.SIGTERM)
	if code := r1.wait(30 * time.Second); code != 0 {
		t.Errorf("relay 1 exit code %d, want 0", code)
	}
	if _, err := os.Lstat(sockPath); err != nil {
		t.Errorf("relay 1 removed the unix socket it kept in the fd store: %v", err)
	}
	// relay 2 gets the stored sockets as LISTEN_FDS, with its own pid in
	// LISTEN_PID: relay's exec shim sets it, as systemd would.
	shim := socketpass.ShimLauncher(built.relay, built.relay)
	env2 := append(env, "LISTEN_FDS=2", "LISTEN_FDNAMES="+strings.Join(wantNames, ":"))
	r2 := startRelayWrapped(t, shim, "relay", env2, files,
		"--listen", "127.0.0.1:"+port, "--listen", "unix:"+sockPath, "--", built.hello, "-lame-duck", "100ms")
	got := r2.listenAddrs(2)
	for i, l := range got {
		if l.str("origin") != "inherited" || l.str("addr") != addrs[i].str("addr") || l.str("name") != addrs[i].str("name") {
			t.Errorf("relay 2 socket %d: %v, want the stored %s (%s), inherited", i, l, addrs[i].str("addr"), addrs[i].str("name"))
		}
	}
	ready, _ := r2.waitMsg(0, "generation ready", 1)
	newPid := ready.num("pid")
	waitUntil(t, 10*time.Second, "relay 2's child to answer", func() bool { c, _ := ld.served(newPid); return c > 0 })
	waitUntil(t, 10*time.Second, "relay 2's child to answer on the unix socket", func() bool { return unixLoad.servedBy(newPid) > 0 })
	ld.stop()
	unixLoad.stop()
	for name, l := range map[string]*load{"tcp": ld, "unix": unixLoad.load} {
		requests, failures := l.summary()
		if len(failures) > 0 {
			t.Errorf("%s: %d of %d requests failed across the hand-over; first: %v", name, len(failures), requests, failures[0])
		}
		t.Logf("%s: %d requests across the hand-over, %d failed", name, requests, len(failures))
	}
	// relay 2 stores the sockets again (systemd keeps one copy of each).
	rec.waitCount(4, "FDSTORE=1", has("FDSTORE", "1"))
	r2.signal(syscall.SIGTERM)
	if code := r2.wait(30 * time.Second); code != 0 {
		t.Errorf("relay 2 exit code %d, want 0", code)
	}
}

// sockAddr is the local address of the socket f.
func sockAddr(t *testing.T, f *os.File) string {
	t.Helper()
	sa, err := unix.Getsockname(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	return sockaddr.String(sa)
}

// unixLoad is a load over a unix socket.
type unixLoad struct{ *load }

func startUnixLoad(path string, workers int, limit time.Duration) unixLoad {
	return unixLoad{startLoadWith(unixClient(path), "http://unix/", workers, limit)}
}

func (u unixLoad) servedBy(pid int) int { n, _ := u.served(pid); return n }

// Test 5: the example units pass systemd-analyze verify.
func TestExampleUnitsVerify(t *testing.T) {
	analyze := requireTool(t, "RELAY_SYSTEMD_ANALYZE", "systemd-analyze")
	out, err := exec.Command(analyze, "--version").Output()
	if err != nil {
		t.Fatalf("systemd-analyze --version: %v", err)
	}
	m := regexp.MustCompile(`systemd (\d+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("cannot read the version in %q", out)
	}
	if v, _ := strconv.Atoi(string(m[1])); v < 253 {
		msg := fmt.Sprintf("systemd-analyze %d predates Type=notify-reload (253); .ci/run fetches 254", v)
		if os.Getenv("RELAY_REQUIRE_SYSTEMD") == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	src := filepath.Join("..", "examples", "systemd")
	units, err := filepath.Glob(filepath.Join(src, "*.s*"))
	if err != nil || len(units) < 3 {
		t.Fatalf("example units: %v %v", units, err)
	}
	// verify checks that ExecStart='s program exists: point it at the
	// relay under test.
	dir := t.TempDir()
	for _, u := range units {
		b, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		b = bytes.ReplaceAll(b, []byte("/usr/local/bin/relay "), []byte(built.relay+" "))
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(u)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, u := range units {
		cmd := exec.Command(analyze, "verify", "--man=no", filepath.Join(dir, filepath.Base(u)))
		out, err := cmd.CombinedOutput()
		if err != nil || len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("systemd-analyze verify %s: %v\n%s", filepath.Base(u), err, out)
		}
	}
}
