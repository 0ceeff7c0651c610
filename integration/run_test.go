package integration

import (
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Test 1: the child sees LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID equal to
// its own pid, finds its sockets at 3.., and has nothing else open.
func TestChildGetsSocketActivationEnvironment(t *testing.T) {
	dir := t.TempDir()
	report := filepath.Join(dir, "report.json")
	// Inherited values that relay must strip, not pass on.
	env := []string{"LISTEN_PID=1", "LISTEN_FDS=9", "LISTEN_FDNAMES=stale", "NOTIFY_SOCKET=/nonexistent/notify"}
	// An fd relay inherits without close-on-exec must not reach the child.
	leak, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer leak.Close()
	r := startRelayExtra(t, env, []*os.File{leak},
		"--listen", "web=127.0.0.1:0", "--listen", "127.0.0.1:0",
		"--", built.testchild, "-report", report)
	addrs := r.listenAddrs(2)
	ready, _ := r.waitMsg(0, "generation ready", 1)

	rep := readReport(t, report)
	if rep.Pid != ready.num("pid") {
		t.Errorf("report from pid %d, relay says the child is pid %d", rep.Pid, ready.num("pid"))
	}
	if got, want := rep.Env["LISTEN_PID"], strconv.Itoa(rep.Pid); got != want {
		t.Errorf("LISTEN_PID = %q, want the child's own pid %s", got, want)
	}
	if got := rep.Env["LISTEN_FDS"]; got != "2" {
		t.Errorf("LISTEN_FDS = %q, want 2", got)
	}
	wantNames := "web:" + addrs[1].str("name")
	if got := rep.Env["LISTEN_FDNAMES"]; got != wantNames {
		t.Errorf("LISTEN_FDNAMES = %q, want %q", got, wantNames)
	}
	if !strings.HasPrefix(addrs[1].str("name"), "tcp-") {
		t.Errorf("default name %q, want tcp-PORT", addrs[1].str("name"))
	}
	if got := rep.Env["RELAY_GENERATION"]; got != "1" {
		t.Errorf("RELAY_GENERATION = %q, want 1", got)
	}
	if ns := rep.Env["NOTIFY_SOCKET"]; ns == "" || ns == "/nonexistent/notify" {
		t.Errorf("NOTIFY_SOCKET = %q, want relay's private socket", ns)
	}
	fds := rep.Inherited
	slices.Sort(fds)
	if !slices.Equal(fds, []int{0, 1, 2, 3, 4}) {
		t.Errorf("fds that crossed exec: %v (all open: %v), want exactly 0 1 2 3 4", fds, rep.FDs)
	}
	for i, fd := range []string{"3", "4"} {
		if got, want := rep.SocketAddrs[fd], addrs[i].str("addr"); got != want {
			t.Errorf("fd %s is bound to %q, want %q", fd, got, want)
		}
	}
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
}

// Test 2: restarts under load that opens a new connection per request lose
// no request, with a backend that shuts down well.
func TestRestartsUnderLoadLoseNoRequest(t *testing.T) {
	res := restartUnderLoad(t, built.relay, 20)
	for _, pid := range res.pids {
		if res.served[pid] == 0 {
			t.Errorf("pid %d never answered", pid)
		}
	}
	if len(res.failures) > 0 {
		t.Errorf("%d of %d requests failed; first: %v", len(res.failures), res.requests, res.failures[0])
	}
	if res.maxAlive > 2 {
		t.Errorf("%d generations were alive at once, want at most 2", res.maxAlive)
	}
	t.Logf("restarts=%d requests=%d failures=%d max_alive=%d", res.restarts, res.requests, len(res.failures), res.maxAlive)
}

// BenchmarkRestartUnderLoad measures one restart of examples/hello under
// load with a relay built without -race: run with -benchtime=20x for 20
// restarts. It reports figures and asserts nothing about them.
func BenchmarkRestartUnderLoad(b *testing.B) {
	res := restartUnderLoad(b, relayNoRace(b), b.N)
	b.ReportMetric(float64(res.requests), "requests")
	b.ReportMetric(float64(len(res.failures)), "failed")
	b.ReportMetric(float64(res.maxAlive), "max-alive")
	b.ReportMetric(ms(median(res.hupToReady)), "ms-HUP-to-ready(p50)")
	b.ReportMetric(ms(slices.Max(res.hupToReady)), "ms-HUP-to-ready(max)")
	b.ReportMetric(ms(median(res.hupToFirstResponse)), "ms-HUP-to-new-pid-response(p50)")
	b.ReportMetric(ms(median(res.relayReadyAfter)), "ms-child-start-to-READY(p50)")
	b.ReportMetric(ms(res.relayCPU), "ms-relay-CPU")
	b.ReportMetric(res.elapsed.Seconds(), "s-elapsed")
}

type restartStats struct {
	restarts           int
	requests           int
	failures           []error
	pids               []int
	served             map[int]int
	maxAlive           int
	hupToReady         []time.Duration // HUP sent to relay's "generation ready" line read
	hupToFirstResponse []time.Duration // HUP sent to the new pid's first response
	relayReadyAfter    []time.Duration // relay's own measure: child start to ready
	relayCPU           time.Duration
	elapsed            time.Duration
}

// restartUnderLoad runs examples/hello under relayBin, keeps 8 clients
// opening a new connection per request, and restarts it n times, each
// after the previous old generation has exited.
func restartUnderLoad(tb testing.TB, relayBin string, n int) restartStats {
	r := startRelayBin(tb, relayBin, nil, nil, "--listen", "127.0.0.1:0", "--health", "notify",
		"--", built.hello, "-lame-duck", "100ms")
	addr := r.listenAddrs(1)[0].str("addr")
	ready, from := r.waitMsg(0, "generation ready", 1)
	res := restartStats{restarts: n, pids: []int{ready.num("pid")}}

	stopMonitor := monitorChildren(r.pid())
	start := time.Now()
	cpuBefore := cpuTime(r.pid())
	ld := startLoad(httpURL(addr), 8, 10*time.Minute)
	for i := 0; i < n; i++ {
		gen := i + 2
		old := res.pids[len(res.pids)-1]
		// Let the serving generation answer before it is replaced.
		waitUntil(tb, 10*time.Second, "the serving pid to answer", func() bool { c, _ := ld.served(old); return c > 0 })
		hup := time.Now()
		r.signal(syscall.SIGHUP)
		var l logLine
		l, from = r.waitMsg(from, "generation ready", gen)
		res.hupToReady = append(res.hupToReady, time.Since(hup))
		res.relayReadyAfter = append(res.relayReadyAfter, time.Duration(l.num("ready_after")))
		pid := l.num("pid")
		res.pids = append(res.pids, pid)
		waitUntil(tb, 10*time.Second, "the new pid to answer", func() bool { c, _ := ld.served(pid); return c > 0 })
		_, first := ld.served(pid)
		res.hupToFirstResponse = append(res.hupToFirstResponse, first.Sub(hup))
		r.waitMsg(from, "old generation exited", gen-1)
	}
	ld.stop()
	res.relayCPU = cpuTime(r.pid()) - cpuBefore
	res.elapsed = time.Since(start)
	res.maxAlive = stopMonitor()
	res.requests, res.failures = ld.summary()
	ld.mu.Lock()
	res.served = maps.Clone(ld.pids)
	ld.mu.Unlock()
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		tb.Errorf("relay exit code %d, want 0", code)
	}
	return res
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// Test 3: starting a generation never changes the shared sockets' file
// status flags, O_NONBLOCK above all.
func TestStartingAGenerationKeepsSocketFlags(t *testing.T) {
	// Generation 1 sets O_NONBLOCK, as every Go server does; generation 2
	// leaves the flags alone, so any change relay makes would show.
	r := startRelay(t, nil, "--listen", "127.0.0.1:0",
		"--", built.testchild, "-set-nonblock-gen", "1")
	r.listenAddrs(1)
	l1, from := r.waitMsg(0, "generation ready", 1)
	fd := relaySocketFD(t, r.pid(), l1.num("pid"))
	before := fdFlags(t, r.pid(), fd)
	if before&syscall.O_NONBLOCK == 0 {
		t.Fatalf("flags %#o before the restart lack O_NONBLOCK; the test child should have set it", before)
	}
	r.signal(syscall.SIGHUP)
	r.waitMsg(from, "generation ready", 2)
	if after := fdFlags(t, r.pid(), fd); after != before {
		t.Errorf("socket flags changed across a restart: %#o before, %#o after", before, after)
	}
	// relay holds the socket but must never wake on its traffic: the
	// socket is in none of relay's epoll sets.
	for epfd, watched := range epollTargets(t, r.pid()) {
		if slices.Contains(watched, fd) {
			t.Errorf("relay's epoll fd %s watches the shared socket (fd %s)", epfd, fd)
		}
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// relaySocketFD finds relay's fd for the socket the child has at fd 3.
func relaySocketFD(t *testing.T, relayPid, childPid int) string {
	t.Helper()
	want, err := os.Readlink(filepath.Join("/proc", strconv.Itoa(childPid), "fd", "3"))
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join("/proc", strconv.Itoa(relayPid), "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if got, _ := os.Readlink(filepath.Join(dir, e.Name())); got == want {
			return e.Name()
		}
	}
	t.Fatalf("relay holds no fd for %s", want)
	return ""
}

func fdFlags(t *testing.T, pid int, fd string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "fdinfo", fd))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "flags:"); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 8, 64)
			if err != nil {
				t.Fatal(err)
			}
			return int(n)
		}
	}
	t.Fatalf("no flags in fdinfo: %s", b)
	return 0
}

// epollTargets lists, for each epoll fd of pid, the fds it watches.
func epollTargets(t *testing.T, pid int) map[string][]string {
	t.Helper()
	dir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	for _, e := range ents {
		if target, _ := os.Readlink(filepath.Join(dir, e.Name())); target != "anon_inode:[eventpoll]" {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "fdinfo", e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = []string{}
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "tfd:" {
				out[e.Name()] = append(out[e.Name()], f[1])
			}
		}
	}
	if len(out) == 0 {
		t.Fatalf("relay has no epoll fd; the check would prove nothing")
	}
	return out
}

// BenchmarkRelayCPUUnderSteadyLoad measures relay's own CPU time while
// examples/hello serves a steady stream of new connections and nothing
// restarts: each iteration is one second of load. relay holds the sockets
// but never wakes on their traffic, so the figure should stay near zero.
func BenchmarkRelayCPUUnderSteadyLoad(b *testing.B) {
	r := startRelayBin(b, relayNoRace(b), nil, nil, "--listen", "127.0.0.1:0", "--", built.hello)
	addr := r.listenAddrs(1)[0].str("addr")
	r.waitMsg(0, "generation ready", 1)
	b.ResetTimer()
	cpuBefore := cpuTime(r.pid())
	ld := startLoad(httpURL(addr), 8, time.Duration(b.N)*time.Second)
	ld.wg.Wait()
	cpu := cpuTime(r.pid()) - cpuBefore
	requests, failures := ld.summary()
	b.ReportMetric(float64(requests)/float64(b.N), "requests/s")
	b.ReportMetric(float64(len(failures)), "failed")
	b.ReportMetric(ms(cpu)/float64(b.N), "ms-relay-CPU/s")
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}
