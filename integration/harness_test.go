// Package integration runs the real relay binary with real children on
// loopback. The binaries are built once, with -race, in TestMain.
package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/relaysh/relay/internal/procfs"
)

// bins holds the paths of the binaries built for this run.
type bins struct {
	relay, hello, testchild, plainserver, seccompdeny string
	// uringbind binds its port through io_uring (takeover_uring_test.go).
	uringbind string
	// quicserver serves HTTP/3 over UDP (quic_test.go).
	quicserver string
	// udpecho answers each UDP datagram (udp_test.go).
	udpecho string
}

// built is set once by TestMain, before any test runs, and only read after.
var built bins

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "relay-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// Other users run these binaries in the control socket's tests.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	built = bins{
		relay:     filepath.Join(dir, "relay"),
		hello:     filepath.Join(dir, "hello"),
		testchild: filepath.Join(dir, "testchild"),
		// The takeover tests' server that binds its own port, and a
		// launcher whose seccomp policy refuses filters.
		plainserver: filepath.Join(dir, "plainserver"),
		seccompdeny: filepath.Join(dir, "seccompdeny"),
		uringbind:   filepath.Join(dir, "uringbind"),
		quicserver:  filepath.Join(dir, "quicserver"),
		udpecho:     filepath.Join(dir, "udpecho"),
	}
	for _, b := range []struct {
		out, pkg string
		race     bool
	}{
		{built.relay, "./cmd/relay", true},
		{built.hello, "./examples/hello", false},
		{built.testchild, "./integration/testchild", false},
		{built.plainserver, "./integration/plainserver", false},
		{built.seccompdeny, "./integration/seccompdeny", false},
		{built.uringbind, "./integration/uringbind", false},
		{built.quicserver, "./integration/quicserver", false},
		{built.udpecho, "./integration/udpecho", false},
	} {
		args := []string{"build", "-o", b.out}
		if b.race {
			// relay with its test switches (cmd/relay/testswitch.go).
			args = append(args, "-race", "-tags", "relaytest")
		}
		cmd := exec.Command("go", append(args, b.pkg)...)
		cmd.Dir = ".."
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "building %s: %v\n", b.pkg, err)
			return 1
		}
	}
	return m.Run()
}

// relayNoRace builds relay without -race, as the README builds it, for
// benchmarks, once.
func relayNoRace(tb testing.TB) string {
	tb.Helper()
	return noRace.build(tb, "relay-norace", []string{"-tags", "nethttpomithttp2,urfave_cli_no_docs"})
}

// noRace is the relay binary built without -race, on first use.
var noRace lazyBuild

// lazyBuild is a relay binary built on first use, once.
type lazyBuild struct {
	once sync.Once
	path string
	err  error
}

// build builds relay with CGO_ENABLED=0 and flags as name, beside
// built.relay, once; env is added to the build's environment.
func (b *lazyBuild) build(tb testing.TB, name string, flags []string, env ...string) string {
	tb.Helper()
	b.once.Do(func() {
		b.path = filepath.Join(filepath.Dir(built.relay), name)
		cmd := exec.Command("go", append(append([]string{"build"}, flags...), "-o", b.path, "./cmd/relay")...)
		cmd.Env = append(append(os.Environ(), "CGO_ENABLED=0"), env...)
		cmd.Dir = ".."
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("building relay: %v: %s", err, out)
		}
	})
	if b.err != nil {
		tb.Fatal(b.err)
	}
	return b.path
}

// logLine is one JSON log line of relay's.
type logLine map[string]any

func (l logLine) str(k string) string {
	switch v := l[k].(type) {
	case string:
		return v
	case float64:
		return strconv.FormatFloat(v, 'f', -1, 64)
	case nil:
		return ""
	default:
		return fmt.Sprint(v)
	}
}

func (l logLine) num(k string) int {
	n, _ := strconv.Atoi(l.str(k))
	return n
}

// relayProc is a running relay under test.
type relayProc struct {
	t       testing.TB
	cmd     *exec.Cmd
	control string // the control socket's path
	mu      sync.Mutex
	logs    []logLine
	raw     bytes.Buffer // every stderr line, relay's and the children's
	// changed is closed and replaced whenever a line arrives.
	changed chan struct{}
	exited  chan struct{}
	waitErr error
	// nsPids: relay runs in a PID namespace of its own, so the pids it
	// logs are not the host's, and the cleanup must not kill them.
	nsPids bool
}

// startRelay starts relay with args (JSON logs are added) and waits until
// it has bound its sockets.
func startRelay(t testing.TB, env []string, args ...string) *relayProc {
	t.Helper()
	return startRelayExtra(t, env, nil, args...)
}

// startRelayExtra is startRelay with extra inherited files at fds 3...
func startRelayExtra(t testing.TB, env []string, extra []*os.File, args ...string) *relayProc {
	t.Helper()
	return startRelayBin(t, built.relay, env, extra, args...)
}

// startRelayBin starts the relay binary bin.
func startRelayBin(tb testing.TB, bin string, env []string, extra []*os.File, args ...string) *relayProc {
	tb.Helper()
	return startRelayWrapped(tb, nil, bin, env, extra, args...)
}

// startRelayWrapped starts relay through the command wrap (a launcher
// that execs relay in its own process, such as systemd-socket-activate),
// or directly if wrap is empty.
func startRelayWrapped(tb testing.TB, wrap []string, bin string, env []string, extra []*os.File, args ...string) *relayProc {
	tb.Helper()
	// A control socket of its own: tests never meet another relay's.
	ctl := filepath.Join(tb.TempDir(), "ctl", "relay.sock")
	full := append([]string{"run", "--log-format", "json", "--log-level", "debug", "--control", ctl}, args...)
	argv := append(append(append([]string(nil), wrap...), bin), full...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.ExtraFiles = extra
	stderr, err := cmd.StderrPipe()
	if err != nil {
		tb.Fatal(err)
	}
	cmd.Stdout = nil // /dev/null: no pipe a leftover child could hold open
	cmd.WaitDelay = 10 * time.Second
	r := &relayProc{t: tb, cmd: cmd, control: ctl, changed: make(chan struct{}), exited: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	scanDone := make(chan struct{})
	go func() {
		defer close(scanDone)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			r.mu.Lock()
			r.raw.Write(line)
			r.raw.WriteByte('\n')
			var l logLine
			if json.Unmarshal(line, &l) == nil && l["msg"] != nil {
				r.logs = append(r.logs, l)
			}
			close(r.changed)
			r.changed = make(chan struct{})
			r.mu.Unlock()
		}
	}()
	go func() {
		<-scanDone
		r.waitErr = cmd.Wait()
		close(r.exited)
		r.mu.Lock()
		close(r.changed)
		r.changed = make(chan struct{})
		r.mu.Unlock()
	}()
	tb.Cleanup(func() {
		select {
		case <-r.exited:
		default:
			cmd.Process.Signal(syscall.SIGKILL)
			<-r.exited
		}
		// A relay killed like that leaves its children behind: end
		// their process groups too.
		r.mu.Lock()
		for _, l := range r.logs {
			if l.str("msg") == "generation starting" && !r.nsPids {
				syscall.Kill(-l.num("pid"), syscall.SIGKILL)
			}
		}
		r.mu.Unlock()
		if tb.Failed() {
			tb.Logf("relay stderr:\n%s", r.output())
		}
	})
	return r
}

func (r *relayProc) output() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.raw.String()
}

func (r *relayProc) pid() int { return r.cmd.Process.Pid }

// waitFor waits until pred holds for some log line at index >= from and
// returns that line and the index after it.
func (r *relayProc) waitFor(from int, timeout time.Duration, what string, pred func(logLine) bool) (logLine, int) {
	r.t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		for i := from; i < len(r.logs); i++ {
			if pred(r.logs[i]) {
				l := r.logs[i]
				r.mu.Unlock()
				return l, i + 1
			}
		}
		from = len(r.logs)
		changed := r.changed
		r.mu.Unlock()
		select {
		case <-changed:
		case <-r.exited:
			// One more pass over what arrived, then give up.
			r.mu.Lock()
			n := len(r.logs)
			r.mu.Unlock()
			if from >= n {
				r.t.Fatalf("relay exited (%v) while waiting for %s", r.waitErr, what)
			}
		case <-deadline.C:
			r.t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
	}
}

// waitRaw waits for a line of stderr, relay's or another program's, that
// contains sub.
func (r *relayProc) waitRaw(sub string) {
	r.t.Helper()
	deadline := time.NewTimer(30 * time.Second)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		found := strings.Contains(r.raw.String(), sub)
		changed := r.changed
		r.mu.Unlock()
		if found {
			return
		}
		select {
		case <-changed:
		case <-r.exited:
			if !strings.Contains(r.output(), sub) {
				r.t.Fatalf("exited (%v) before %q appeared on stderr", r.waitErr, sub)
			}
		case <-deadline.C:
			r.t.Fatalf("timed out waiting for %q on stderr", sub)
		}
	}
}

// waitMsg waits for a log line with msg (and gen, if gen > 0).
func (r *relayProc) waitMsg(from int, msg string, gen int) (logLine, int) {
	r.t.Helper()
	return r.waitFor(from, 30*time.Second, fmt.Sprintf("%q gen %d", msg, gen), func(l logLine) bool {
		return l.str("msg") == msg && (gen == 0 || l.num("gen") == gen)
	})
}

// count counts the log lines with msg.
func (r *relayProc) count(msg string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, l := range r.logs {
		if l.str("msg") == msg {
			n++
		}
	}
	return n
}

// listenAddrs waits for the "listening" lines and returns the bound
// addresses by name, in order.
func (r *relayProc) listenAddrs(n int) []logLine {
	r.t.Helper()
	var out []logLine
	from := 0
	for len(out) < n {
		var l logLine
		l, from = r.waitMsg(from, "listening", 0)
		out = append(out, l)
	}
	return out
}

// wait waits for relay to exit and returns its exit code.
func (r *relayProc) wait(timeout time.Duration) int {
	r.t.Helper()
	select {
	case <-r.exited:
	case <-time.After(timeout):
		r.t.Fatalf("relay did not exit within %s", timeout)
	}
	if r.cmd.ProcessState == nil {
		r.t.Fatalf("relay: %v", r.waitErr)
	}
	return r.cmd.ProcessState.ExitCode()
}

func (r *relayProc) signal(sig syscall.Signal) {
	r.t.Helper()
	if err := r.cmd.Process.Signal(sig); err != nil {
		r.t.Fatalf("signalling relay: %v", err)
	}
}

// get does one request on a new connection and returns the answering pid.
func get(client *http.Client, url string) (int, error) {
	return getIdent(client, url, pidHeader)
}

// noFailures fails the test if any request failed, showing the first few.
func noFailures(t testing.TB, failures []error, requests int) {
	t.Helper()
	for i, err := range failures {
		if i == 5 {
			break
		}
		t.Errorf("failed request: %v", err)
	}
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed", len(failures), requests)
	}
}

func newConnClient() *http.Client {
	return &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil},
	}
}

// load runs workers that each send requests on a new connection per request
// until stop is closed or limit passes.
type load struct {
	mu       sync.Mutex
	requests int
	failures []error
	failSent []time.Time // when each of failures was sent
	pids     map[int]int // pid -> responses
	firstAt  map[int]time.Time
	// lastStart is when the last request that pid answered was sent.
	lastStart map[int]time.Time
	// answers are when each response of pid came, in order.
	answers map[int][]time.Time
	stopC   chan struct{}
	wg      sync.WaitGroup
}

func startLoad(url string, workers int, limit time.Duration) *load {
	return startLoadWith(newConnClient(), url, workers, limit)
}

// unixClient opens a new connection to the unix socket path per request.
func unixClient(path string) *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			Proxy:             nil,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			},
		},
	}
}

func startLoadWith(client *http.Client, url string, workers int, limit time.Duration) *load {
	return startLoadBy(client, url, workers, limit, pidHeader)
}

// startLoadBy runs workers that send requests through client until stopped
// or limit passes, and counts the answers by who answered, as id tells.
func startLoadBy(client *http.Client, url string, workers int, limit time.Duration, id ident) *load {
	ld := &load{pids: map[int]int{}, firstAt: map[int]time.Time{}, lastStart: map[int]time.Time{}, answers: map[int][]time.Time{},
		stopC: make(chan struct{})}
	deadline := time.Now().Add(limit)
	for range workers {
		ld.wg.Add(1)
		go func() {
			defer ld.wg.Done()
			for time.Now().Before(deadline) {
				select {
				case <-ld.stopC:
					return
				default:
				}
				start := time.Now()
				who, err := getIdent(client, url, id)
				now := time.Now()
				ld.mu.Lock()
				ld.requests++
				if err != nil {
					ld.failures = append(ld.failures, err)
					ld.failSent = append(ld.failSent, start)
				} else {
					if ld.pids[who] == 0 {
						ld.firstAt[who] = now
					}
					if start.After(ld.lastStart[who]) {
						ld.lastStart[who] = start
					}
					ld.pids[who]++
					ld.answers[who] = append(ld.answers[who], now)
				}
				ld.mu.Unlock()
			}
		}()
	}
	return ld
}

// failuresSent splits the failed requests into those sent before at and
// those sent at or after it.
func (ld *load) failuresSent(at time.Time) (before, after []error) {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	for i, err := range ld.failures {
		if ld.failSent[i].Before(at) {
			before = append(before, err)
		} else {
			after = append(after, err)
		}
	}
	return before, after
}

func (ld *load) stop() {
	close(ld.stopC)
	ld.wg.Wait()
}

// served reports how many responses pid gave so far.
func (ld *load) served(pid int) (int, time.Time) {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	return ld.pids[pid], ld.firstAt[pid]
}

// lastSent reports when the last request that pid answered was sent.
func (ld *load) lastSent(pid int) time.Time {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	return ld.lastStart[pid]
}

// answeredAfter reports when pid's first response after t came.
func (ld *load) answeredAfter(pid int, t time.Time) (time.Time, bool) {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	for _, at := range ld.answers[pid] {
		if at.After(t) {
			return at, true
		}
	}
	return time.Time{}, false
}

func (ld *load) summary() (requests int, failures []error) {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	return ld.requests, append([]error(nil), ld.failures...)
}

// waitUntil polls cond, for conditions that no event announces (a process
// gone from /proc). Bounded by timeout.
func waitUntil(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// processGone reports whether pid has exited and been reaped: a zombie
// still counts as present.
func processGone(pid int) bool {
	_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
	return err != nil
}

func isZombie(pid int) bool {
	st, err := procfs.ReadStat(pid)
	return err == nil && st.State == 'Z'
}

// cpuTime returns a process's user+system CPU time.
func cpuTime(pid int) time.Duration {
	st, err := procfs.ReadStat(pid)
	if err != nil {
		return 0
	}
	return st.CPU()
}

func httpURL(addr string) string { return "http://" + addr + "/" }

func mustFreeTCPAddr(t testing.TB) (net.Listener, string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return l, l.Addr().String()
}

// client runs a relay client command (restart, status, stop) against r's
// control socket and returns its stdout, stderr and exit code.
func (r *relayProc) client(sub string, args ...string) (string, string, int) {
	r.t.Helper()
	stdout, stderr, code, err := relayCommand(r.control, sub, args...)
	if err != nil {
		r.t.Fatalf("relay %s: %v", sub, err)
	}
	return stdout, stderr, code
}

// relayCommand runs relay SUB (restart, status, stop) against the control
// socket ctl, and returns its stdout, stderr and exit code; err only if it
// could not run. It never fails the test, so a goroutine other than the
// test's may run it. It returns as soon as the client has its answer: a
// program built with -race sleeps 1 s before it exits (GORACE's
// atexit_sleep_ms), which would hide what relay did in that second (a
// helper killed at a 1 s stop timeout); here it sleeps none.
func relayCommand(ctl, sub string, args ...string) (stdout, stderr string, code int, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, built.relay, append([]string{sub, "--control", ctl}, args...)...)
	gorace := "atexit_sleep_ms=0"
	if v := os.Getenv("GORACE"); v != "" {
		gorace = v + " " + gorace
	}
	cmd.Env = append(os.Environ(), "GORACE="+gorace)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	if cmd.ProcessState == nil {
		return o.String(), e.String(), -1, err
	}
	return o.String(), e.String(), cmd.ProcessState.ExitCode(), nil
}
