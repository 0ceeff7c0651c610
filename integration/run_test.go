package integration

import (
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
	const restarts = 20
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--health", "notify",
		"--", built.hello, "-lame-duck", "100ms")
	addr := r.listenAddrs(1)[0].str("addr")
	ready, from := r.waitMsg(0, "generation ready", 1)
	pids := []int{ready.num("pid")}

	// Watch how many generations are alive: sampled, since no event says.
	maxAlive := 0
	monitorStop := make(chan struct{})
	monitorDone := make(chan struct{})
	go func() {
		defer close(monitorDone)
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			if n := len(children(r.pid())); n > maxAlive {
				maxAlive = n
			}
			select {
			case <-monitorStop:
				return
			case <-tick.C:
			}
		}
	}()

	cpuBefore := cpuTime(r.pid())
	ld := startLoad(httpURL(addr), 8, 5*time.Minute)
	var sinceHUP, toFirstResponse []time.Duration
	for i := 0; i < restarts; i++ {
		gen := i + 2
		old := pids[len(pids)-1]
		// Let the serving generation answer before it is replaced.
		waitUntil(t, 10*time.Second, "the serving pid to answer", func() bool { n, _ := ld.served(old); return n > 0 })
		hup := time.Now()
		r.signal(syscall.SIGHUP)
		var l logLine
		l, from = r.waitMsg(from, "generation ready", gen)
		pid := l.num("pid")
		pids = append(pids, pid)
		sinceHUP = append(sinceHUP, time.Since(hup))
		waitUntil(t, 10*time.Second, "the new pid to answer", func() bool { n, _ := ld.served(pid); return n > 0 })
		_, first := ld.served(pid)
		toFirstResponse = append(toFirstResponse, first.Sub(hup))
		r.waitMsg(from, "old generation exited", gen-1)
	}
	ld.stop()
	cpu := cpuTime(r.pid()) - cpuBefore
	close(monitorStop)
	<-monitorDone

	requests, failures := ld.summary()
	for _, pid := range pids {
		if n, _ := ld.served(pid); n == 0 {
			t.Errorf("pid %d never answered", pid)
		}
	}
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed; first: %v", len(failures), requests, failures[0])
	}
	if maxAlive > 2 {
		t.Errorf("%d generations were alive at once, want at most 2", maxAlive)
	}
	slices.Sort(toFirstResponse)
	slices.Sort(sinceHUP)
	t.Logf("restarts=%d requests=%d failures=%d max_alive=%d relay_cpu=%s (race build)",
		restarts, requests, len(failures), maxAlive, cpu)
	t.Logf("HUP to 'generation ready' (relay log seen by test): median %s, max %s",
		sinceHUP[len(sinceHUP)/2], sinceHUP[len(sinceHUP)-1])
	t.Logf("HUP to first response from the new pid: median %s, max %s",
		toFirstResponse[len(toFirstResponse)/2], toFirstResponse[len(toFirstResponse)-1])
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
}

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
