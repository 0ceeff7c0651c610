package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Test 4: a new child that exits at start, one that never becomes ready and
// one that hangs are each killed and rolled back; the old child keeps
// serving and no request fails.
func TestFailedNewChildLeavesOldServing(t *testing.T) {
	dir := t.TempDir()
	mode := filepath.Join(dir, "mode")
	writeMode(t, mode, "serve")
	r := startRelay(t, nil, "--listen", "127.0.0.1:0",
		"--health", "http://{health_addr}/healthz", "--health-timeout", "2s", "--stop-timeout", "2s",
		"--", built.testchild, "-mode-file", mode)
	addr := r.listenAddrs(1)[0].str("addr")
	first, from := r.waitMsg(0, "generation ready", 1)
	oldPid := first.num("pid")
	ld := startLoad(httpURL(addr), 4, 2*time.Minute)
	waitUntil(t, 10*time.Second, "the first child to answer", func() bool { n, _ := ld.served(oldPid); return n > 0 })

	for _, c := range []struct{ mode, reason, stderr string }{
		{"exit", "exited before it was ready: exit status 3", "cannot open database"},
		{"never-ready", "not ready within --health-timeout 2s", "503 Service Unavailable"},
		{"hang", "not ready within --health-timeout 2s", "hanging on purpose"},
	} {
		writeMode(t, mode, c.mode)
		r.signal(syscall.SIGHUP)
		var l logLine
		l, from = r.waitMsg(from, "new generation failed; rolled back", 0)
		if got := l.str("reason") + " " + l.str("stderr_tail"); !strings.Contains(got, c.reason) {
			t.Errorf("%s: rollback reason %q, want it to contain %q", c.mode, got, c.reason)
		}
		if got := l.str("reason") + " " + l.str("stderr_tail"); !strings.Contains(got, c.stderr) {
			t.Errorf("%s: rollback log %q, want it to contain %q", c.mode, got, c.stderr)
		}
		if got := l.num("still_serving_pid"); got != oldPid {
			t.Errorf("%s: still serving pid %d, want %d", c.mode, got, oldPid)
		}
		failedPid := l.num("pid")
		l, from = r.waitMsg(from, "restart finished", 0)
		if l.str("ok") != "false" {
			t.Errorf("%s: restart finished ok=%s, want false", c.mode, l.str("ok"))
		}
		waitUntil(t, 10*time.Second, "the failed child to be reaped", func() bool { return processGone(failedPid) })
		// The old child still answers after the failure.
		n, _ := ld.served(oldPid)
		waitUntil(t, 10*time.Second, "the old child to answer again", func() bool { m, _ := ld.served(oldPid); return m > n })
	}
	ld.stop()
	requests, failures := ld.summary()
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed; first: %v", len(failures), requests, failures[0])
	}
	ld.mu.Lock()
	for pid := range ld.pids {
		if pid != oldPid {
			t.Errorf("pid %d answered; only the old child %d should have", pid, oldPid)
		}
	}
	ld.mu.Unlock()
	t.Logf("requests=%d failures=%d across 3 failed restarts", requests, len(failures))
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

func writeMode(t *testing.T, path, mode string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(mode), 0o600); err != nil {
		t.Fatal(err)
	}
}

// Test 5: an old child that ignores its stop signal is killed after
// --stop-timeout, together with its own children.
func TestStopTimeoutKillsTheOldGroup(t *testing.T) {
	dir := t.TempDir()
	gcFile := filepath.Join(dir, "grandchild")
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--stop-timeout", "1s",
		"--", built.testchild, "-ignore-term", "-grandchild", "-grandchild-pid", gcFile)
	r.listenAddrs(1)
	first, from := r.waitMsg(0, "generation ready", 1)
	gc1 := readPid(t, gcFile)
	r.signal(syscall.SIGHUP)
	_, from = r.waitMsg(from, "generation ready", 2)
	gc2 := readPid(t, gcFile)
	if gc1 == gc2 {
		t.Fatalf("generation 2 reported the same grandchild %d", gc1)
	}
	// "killing its cgroup" where relay has cgroups, "killing its process
	// group" elsewhere (docs/containment.md): the containment line says
	// which.
	what := "process group"
	if r.count("containment cgroup") == 1 {
		what = "cgroup"
	} else if r.count("containment process-group") != 1 {
		t.Fatalf("relay did not say which containment is in force:\n%s", r.output())
	}
	r.waitMsg(from, "did not stop within the stop timeout; killing its "+what, 1)
	l, _ := r.waitMsg(from, "old generation exited", 1)
	if !strings.Contains(l.str("status"), "signal 9") {
		t.Errorf("old generation status %q, want killed by signal 9", l.str("status"))
	}
	waitUntil(t, 10*time.Second, "the old child's grandchild to be killed and reaped", func() bool { return processGone(gc1) })
	if !processGone(first.num("pid")) {
		t.Errorf("old child %d still exists", first.num("pid"))
	}
	// Stopping relay kills the serving group the same way.
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 128+9 {
		t.Errorf("relay exit code %d, want %d (child killed by SIGKILL)", code, 128+9)
	}
	if !processGone(gc2) {
		t.Errorf("grandchild %d of the last generation survived relay", gc2)
	}
}

func readPid(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// Test 6: when the serving child crashes, connections made while it is
// down wait in the backlog and are served by its replacement.
func TestCrashedChildIsReplacedWithoutRefusals(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--", built.hello, "-lame-duck", "50ms")
	addr := r.listenAddrs(1)[0].str("addr")
	first, from := r.waitMsg(0, "generation ready", 1)
	if err := syscall.Kill(first.num("pid"), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	r.waitMsg(from, "serving child exited on its own", 1)
	// Nothing serves now; relay waits out its backoff before replacing.
	const clients = 16
	var wg sync.WaitGroup
	pids := make([]int, clients)
	errs := make([]error, clients)
	client := newConnClient()
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pids[i], errs[i] = get(client, httpURL(addr))
		}()
	}
	wg.Wait()
	second, _ := r.waitMsg(from, "generation ready", 2)
	for i := range clients {
		if errs[i] != nil {
			t.Errorf("request %d made while no child served: %v", i, errs[i])
		} else if pids[i] != second.num("pid") {
			t.Errorf("request %d answered by pid %d, want the replacement %d", i, pids[i], second.num("pid"))
		}
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// Test 7: unix, IPv6 and UDP listeners are passed correctly, and named
// listeners arrive in order.
func TestUnixIPv6AndUDPListeners(t *testing.T) {
	if l, err := net.Listen("tcp", "[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback here: %v", err)
	} else {
		l.Close()
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "app.sock")
	report := filepath.Join(dir, "report.json")
	r := startRelay(t, nil,
		"--listen", "first=unix:"+sock, "--listen", "second=[::1]:0", "--listen", "udp:127.0.0.1:0",
		"--socket-mode", "0600", "--", built.testchild, "-report", report)
	addrs := r.listenAddrs(3)
	ready, _ := r.waitMsg(0, "generation ready", 1)
	pid := ready.num("pid")

	rep := readReport(t, report)
	wantNames := "first:second:" + addrs[2].str("name")
	if got := rep.Env["LISTEN_FDNAMES"]; got != wantNames {
		t.Errorf("LISTEN_FDNAMES = %q, want %q", got, wantNames)
	}
	if !strings.HasPrefix(addrs[2].str("name"), "udp-") {
		t.Errorf("UDP default name %q, want udp-PORT", addrs[2].str("name"))
	}
	for fd, want := range map[string][2]int{"3": {syscall.AF_UNIX, syscall.SOCK_STREAM}, "4": {syscall.AF_INET6, syscall.SOCK_STREAM}, "5": {syscall.AF_INET, syscall.SOCK_DGRAM}} {
		if got := [2]int{rep.SocketFamilies[fd], rep.SocketTypes[fd]}; got != want {
			t.Errorf("fd %s is family/type %v, want %v", fd, got, want)
		}
	}
	st, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Errorf("unix socket mode %v, want a socket with 0600", st.Mode())
	}

	unixClient := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}
	if got, err := get(unixClient, "http://unix/"); err != nil || got != pid {
		t.Errorf("over the unix socket: pid %d, %v; want pid %d", got, err, pid)
	}
	if got, err := get(newConnClient(), httpURL(addrs[1].str("addr"))); err != nil || got != pid {
		t.Errorf("over IPv6: pid %d, %v; want pid %d", got, err, pid)
	}
	conn, err := net.Dial("udp", addrs[2].str("addr"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte("who")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, err := conn.Read(buf)
	if err != nil || string(buf[:n]) != fmt.Sprintf("pid=%d", pid) {
		t.Errorf("over UDP: %q, %v; want pid=%d", buf[:n], err, pid)
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("unix socket left behind after exit: %v", err)
	}
}

type report struct {
	Pid            int               `json:"pid"`
	Env            map[string]string `json:"env"`
	FDs            map[string]string `json:"fds"`
	Inherited      []int             `json:"inherited"`
	SocketAddrs    map[string]string `json:"socket_addrs"`
	SocketFamilies map[string]int    `json:"socket_families"`
	SocketTypes    map[string]int    `json:"socket_types"`
}

func readReport(t *testing.T, path string) report {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var rep report
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	return rep
}

// A new generation that dies during its drain window hands serving back to
// the old one, which was never told to stop.
func TestNewChildDyingWhileDrainingRollsBack(t *testing.T) {
	r, addr, first, starting, from := startDrainWindow(t)
	exitThrough(starting)
	l, from := r.waitMsg(from, "new generation failed; rolled back", 2)
	if !strings.Contains(l.str("reason"), "exited during the drain window: exit status 4") {
		t.Errorf("reason %q", l.str("reason"))
	}
	if got := l.num("still_serving_pid"); got != first.num("pid") {
		t.Errorf("still serving pid %d, want %d", got, first.num("pid"))
	}
	l, _ = r.waitMsg(from, "restart finished", 0)
	if l.str("ok") != "false" {
		t.Errorf("restart finished ok=%s, want false", l.str("ok"))
	}
	if n := r.count("stopping generation"); n != 0 {
		t.Errorf("%d generations were told to stop, want none", n)
	}
	if pid, err := get(newConnClient(), httpURL(addr)); err != nil || pid != first.num("pid") {
		t.Errorf("after the rollback: pid %d, %v; want the old child %d", pid, err, first.num("pid"))
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// A new generation that dies in its drain window after the old one has
// exited too leaves nothing serving: the restart fails and a replacement
// starts.
func TestNewChildDyingAfterTheOldOneExitedIsReplaced(t *testing.T) {
	r, addr, first, starting, from := startDrainWindow(t)
	syscall.Kill(first.num("pid"), syscall.SIGKILL)
	_, from = r.waitMsg(from, "old generation exited", 1)
	exitThrough(starting)
	l, from := r.waitMsg(from, "new generation failed; rolled back", 2)
	if !strings.Contains(l.str("reason"), "exited during the drain window") {
		t.Errorf("reason %q", l.str("reason"))
	}
	l, from = r.waitMsg(from, "restart finished", 0)
	if l.str("ok") != "false" {
		t.Errorf("restart finished ok=%s, want false", l.str("ok"))
	}
	third, _ := r.waitMsg(from, "generation ready", 3)
	if pid, err := get(newConnClient(), httpURL(addr)); err != nil || pid != third.num("pid") {
		t.Errorf("after the replacement: pid %d, %v; want %d", pid, err, third.num("pid"))
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// startDrainWindow runs relay with a long drain, restarts it, and returns
// once generation 2 is ready and generation 1 is in its drain window: the
// relay, its address, generation 1's ready line, generation 2's starting
// line, and the log index to read on from. A client that connected to
// generation 1 and sends nothing (its socket defers accept until data)
// is a handshake in progress towards it, which holds its drain open for
// the whole test.
func startDrainWindow(t *testing.T) (*relayProc, string, logLine, logLine, int) {
	t.Helper()
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--drain", "1m", "--", built.testchild, "-defer-accept")
	addr := r.listenAddrs(1)[0].str("addr")
	first, from := r.waitMsg(0, "generation ready", 1)
	hold, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hold.Close() })
	r.signal(syscall.SIGHUP)
	starting, _ := r.waitMsg(from, "generation starting", 2)
	_, from = r.waitMsg(from, "old generation draining", 1)
	return r, addr, first, starting, from
}

// exitThrough makes the test child of a "generation starting" line exit,
// through its private health address, which no other generation shares.
func exitThrough(starting logLine) {
	newConnClient().Get("http://" + starting.str("health_addr") + "/exit")
}
