package integration

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/relaysh/relay/internal/procfs"
)

// Control test 1: relay restart returns 0 and the answering pid changes;
// with --no-wait it returns before the new generation is ready.
func TestRestartCommand(t *testing.T) {
	gate := filepath.Join(t.TempDir(), "gate")
	writeMode(t, gate, "2")
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--", built.testchild, "-ready-gate", gate)
	addr := r.listenAddrs(1)[0].str("addr")
	first, from := r.waitMsg(0, "generation ready", 1)

	out, errOut, code := r.client("restart")
	if code != 0 {
		t.Fatalf("relay restart exited %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	for _, want := range []string{"generation 2 (pid ", "starting", "waiting for readiness (auto)", "ready after",
		"restart done: generation 2", "old generation 1 (pid " + strconv.Itoa(first.num("pid")) + ") exited (exit status 0)"} {
		if !strings.Contains(out, want) {
			t.Errorf("relay restart output lacks %q:\n%s", want, out)
		}
	}
	second, from := r.waitMsg(from, "generation ready", 2)
	if pid, err := get(newConnClient(), httpURL(addr)); err != nil || pid != second.num("pid") {
		t.Errorf("after relay restart: pid %d, %v; want %d", pid, err, second.num("pid"))
	}

	// Generation 3 cannot be ready until the gate says 3.
	out, errOut, code = r.client("restart", "--no-wait")
	if code != 0 || !strings.Contains(out, "restart accepted") {
		t.Fatalf("relay restart --no-wait: exit %d\n%s%s", code, out, errOut)
	}
	r.waitMsg(from, "generation starting", 3)
	if n := r.count("generation ready"); n != 2 {
		t.Errorf("generation 3 was ready before its gate opened (%d ready lines)", n)
	}
	writeMode(t, gate, "3")
	r.waitMsg(from, "generation ready", 3)
	// A restart refused at once is an error even with --no-wait.
	if out, errOut, code := r.client("restart", "--no-wait", "--", filepath.Join(t.TempDir(), "missing")); code != 3 {
		t.Errorf("relay restart --no-wait of a missing binary: exit %d, want 3\n%s%s", code, out, errOut)
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// Control test 2: a new command that fails to start or never gets ready
// makes relay restart exit with the rollback code and show the stderr
// tail; the old generation serves on, and no request fails.
func TestRestartCommandRollsBack(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--health-timeout", "2s", "--", built.testchild)
	addr := r.listenAddrs(1)[0].str("addr")
	first, _ := r.waitMsg(0, "generation ready", 1)
	ld := startLoad(httpURL(addr), 4, 2*time.Minute)
	for _, c := range []struct{ mode, want string }{
		{"exit", "cannot open database"},
		{"never-ready", "not ready within --health-timeout 2s"},
	} {
		out, errOut, code := r.client("restart", "--", built.testchild, "-mode", c.mode)
		if code != 3 {
			t.Errorf("%s: relay restart exited %d, want 3\n%s%s", c.mode, code, out, errOut)
		}
		if !strings.Contains(out, "restart rolled back") || !strings.Contains(out+errOut, c.want) {
			t.Errorf("%s: output lacks the reason %q:\n%s%s", c.mode, c.want, out, errOut)
		}
		if n, _ := ld.served(first.num("pid")); n == 0 {
			t.Errorf("%s: the old child answered nothing", c.mode)
		}
	}
	n, _ := ld.served(first.num("pid"))
	waitUntil(t, 10*time.Second, "the old child to answer after the rollbacks", func() bool { m, _ := ld.served(first.num("pid")); return m > n })
	ld.stop()
	requests, failures := ld.summary()
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed; first: %v", len(failures), requests, failures[0])
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// Control test 3: a binary swap serves the new version; a failed swap keeps
// the old command for later restarts.
func TestBinarySwap(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--", built.testchild, "-version", "v1")
	addr := r.listenAddrs(1)[0].str("addr")
	r.waitMsg(0, "generation ready", 1)
	version := func() string {
		t.Helper()
		resp, err := newConnClient().Get(httpURL(addr))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.Header.Get("X-Version")
	}
	restart := func(wantCode int, args ...string) {
		t.Helper()
		out, errOut, code := r.client("restart", args...)
		if code != wantCode {
			t.Fatalf("relay restart %v: exit %d, want %d\n%s%s", args, code, wantCode, out, errOut)
		}
	}
	if v := version(); v != "v1" {
		t.Fatalf("version %q before any swap, want v1", v)
	}
	restart(3, "--", built.testchild, "-version", "v2", "-mode", "exit")
	restart(0)
	if v := version(); v != "v1" {
		t.Errorf("after a failed swap and a plain restart: version %q, want v1", v)
	}
	restart(0, "--", built.testchild, "-version", "v2")
	if v := version(); v != "v2" {
		t.Errorf("after the swap: version %q, want v2", v)
	}
	restart(0)
	if v := version(); v != "v2" {
		t.Errorf("after the swap and a plain restart: version %q, want v2", v)
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// Control test 4: a failing --check refuses the restart and starts no
// child, whether given to relay restart or to relay run.
func TestFailingCheckRefusesTheRestart(t *testing.T) {
	gate := filepath.Join(t.TempDir(), "check-passes")
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--check", "test -e "+gate, "--", built.testchild)
	r.listenAddrs(1)
	_, from := r.waitMsg(0, "generation ready", 1)

	out, errOut, code := r.client("restart", "--check", "false")
	if code != 3 || !strings.Contains(out+errOut, "pre-flight check failed") {
		t.Errorf("relay restart --check false: exit %d\n%s%s", code, out, errOut)
	}
	out, errOut, code = r.client("restart") // relay run's --check, failing
	if code != 3 || !strings.Contains(out+errOut, "pre-flight check failed: /usr/bin/test -e "+gate) {
		t.Errorf("relay restart with a failing run --check: exit %d\n%s%s", code, out, errOut)
	}
	r.signal(syscall.SIGHUP) // the signal path runs the same check
	l, _ := r.waitFor(from, 30*time.Second, "the HUP restart's outcome", func(l logLine) bool {
		return l.str("msg") == "restart finished" && l.str("reason") == "signal HUP"
	})
	if l.str("ok") != "false" {
		t.Errorf("the HUP restart passed a failing check: %v", l)
	}
	if n := r.count("generation starting"); n != 1 {
		t.Errorf("%d generations started, want only the first", n)
	}
	writeMode(t, gate, "")
	if out, errOut, code := r.client("restart"); code != 0 {
		t.Errorf("relay restart with a passing check: exit %d\n%s%s", code, out, errOut)
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// Control test 5: 50 concurrent relay restart calls all return with a
// result; no more than --max-draining+2 generations are alive, and no
// request fails.
func TestConcurrentRestarts(t *testing.T) {
	const callers = 50
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--max-draining", "1", "--", built.hello, "-lame-duck", "100ms")
	addr := r.listenAddrs(1)[0].str("addr")
	r.waitMsg(0, "generation ready", 1)
	stopMonitor := monitorChildren(r.pid())
	ld := startLoad(httpURL(addr), 8, 5*time.Minute)

	codes := make([]int, callers)
	outs := make([]string, callers)
	var wg sync.WaitGroup
	for i := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, errOut, code := r.client("restart")
			codes[i], outs[i] = code, out+errOut
		}()
	}
	wg.Wait()
	ld.stop()
	alive := stopMonitor()
	for i, code := range codes {
		if code != 0 || !strings.Contains(outs[i], "restart done") {
			t.Errorf("caller %d: exit %d\n%s", i, code, outs[i])
		}
	}
	if alive > 1+2 {
		t.Errorf("%d generations alive at once, want at most --max-draining+2 = 3", alive)
	}
	requests, failures := ld.summary()
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed; first: %v", len(failures), requests, failures[0])
	}
	t.Logf("callers=%d restarts_run=%d max_alive=%d requests=%d failures=%d",
		callers, r.count("generation ready")-1, alive, requests, len(failures))
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// generationsOf lists the children of relay pid that are generations: all
// but its cgroup guard.
func generationsOf(pid int) []int {
	var gens []int
	for _, c := range procfs.Children(pid) {
		cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(c) + "/cmdline")
		if !strings.Contains(string(cmdline), "__relay_cgroup_guard") {
			gens = append(gens, c)
		}
	}
	return gens
}

// monitorChildren samples the number of pid's generations (children but the guard), since no event
// announces them, until the returned stop function is called; it returns
// the most seen at once.
func monitorChildren(pid int) (stop func() int) {
	most := 0
	stopC := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			most = max(most, len(generationsOf(pid)))
			select {
			case <-stopC:
				return
			case <-tick.C:
			}
		}
	}()
	return func() int {
		close(stopC)
		<-done
		return most
	}
}

// Control test 6: the socket is private; a client of another uid is
// refused by its credentials; malformed and oversized requests get an
// error and relay keeps serving.
func TestControlSocketSecurity(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--", built.testchild)
	addr := r.listenAddrs(1)[0].str("addr")
	r.waitMsg(0, "generation ready", 1)
	for path, want := range map[string]os.FileMode{filepath.Dir(r.control): 0o700, r.control: 0o600} {
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := st.Mode().Perm(); got != want {
			t.Errorf("%s has mode %#o, want %#o", path, got, want)
		}
	}

	// A client that connects and says nothing blocks nobody.
	idle, err := net.Dial("unix", r.control)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	if out, errOut, code := r.client("status"); code != 0 {
		t.Errorf("relay status beside an idle client: exit %d\n%s%s", code, out, errOut)
	}

	// Malformed, oversized and unknown requests.
	for name, req := range map[string]string{
		"malformed":     "{not json\n",
		"oversized":     strings.Repeat("x", 1<<20) + "\n",
		"wrong version": `{"v":99,"op":"status"}` + "\n",
		"unknown op":    `{"v":1,"op":"explode"}` + "\n",
	} {
		resp := rawRequest(t, r.control, req)
		if resp["type"] != "error" || resp["error"] == "" {
			t.Errorf("%s request: response %v, want an error", name, resp)
		}
	}
	if out, errOut, code := r.client("status"); code != 0 {
		t.Errorf("relay status after bad requests: exit %d\n%s%s", code, out, errOut)
	}
	if _, err := get(newConnClient(), httpURL(addr)); err != nil {
		t.Errorf("serving after bad requests: %v", err)
	}

	if os.Getuid() != 0 {
		t.Skip("refusing another uid needs root to run a client as that uid")
	}
	// Open the path, the directory and the socket to everyone, so that
	// only the peer credential check stands between another user and
	// relay.
	for dir := filepath.Dir(r.control); dir != os.TempDir() && dir != "/"; dir = filepath.Dir(dir) {
		if err := os.Chmod(dir, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(r.control, 0o666); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(built.relay, "status", "--control", r.control)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, _ := cmd.CombinedOutput()
	if code := cmd.ProcessState.ExitCode(); code != 4 || !strings.Contains(string(out), "permission denied: uid 65534") {
		t.Errorf("relay status as uid 65534: exit %d, %s; want 4 and a refusal", code, out)
	}
	r.waitMsg(0, "control connection refused: wrong user", 0)
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// rawRequest writes req to the control socket and returns the first
// response line.
func rawRequest(t *testing.T, path, req string) map[string]any {
	t.Helper()
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	go conn.Write([]byte(req)) // the server may answer before reading it all
	line, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	var resp map[string]any
	if err := json.Unmarshal(line, &resp); err != nil {
		t.Fatalf("response %q: %v", line, err)
	}
	return resp
}

// Control test 7: relay status --json reports the generations and the
// counters before, during and after a restart.
func TestStatusJSON(t *testing.T) {
	gate := filepath.Join(t.TempDir(), "gate")
	writeMode(t, gate, "1")
	r := startRelay(t, nil, "--listen", "web=127.0.0.1:0", "--", built.testchild, "-ready-gate", gate)
	addr := r.listenAddrs(1)[0].str("addr")
	first, from := r.waitMsg(0, "generation ready", 1)

	type doc struct {
		Version   int `json:"version"`
		Pid       int `json:"pid"`
		Listeners []struct {
			FD      int    `json:"fd"`
			Name    string `json:"name"`
			Address string `json:"address"`
		} `json:"listeners"`
		Generations []struct {
			Generation int    `json:"generation"`
			Pid        int    `json:"pid"`
			State      string `json:"state"`
		} `json:"generations"`
		Restarts struct {
			OK         int  `json:"ok"`
			RolledBack int  `json:"rolled_back"`
			InProgress bool `json:"in_progress"`
		} `json:"restarts"`
		LastRestart *struct {
			OK         bool `json:"ok"`
			Generation int  `json:"generation"`
		} `json:"last_restart"`
	}
	status := func() doc {
		t.Helper()
		out, errOut, code := r.client("status", "--json")
		if code != 0 {
			t.Fatalf("relay status --json: exit %d\n%s%s", code, out, errOut)
		}
		var d doc
		if err := json.Unmarshal([]byte(out), &d); err != nil {
			t.Fatalf("status is not JSON: %v\n%s", err, out)
		}
		return d
	}
	gens := func(d doc) string {
		var s []string
		for _, g := range d.Generations {
			s = append(s, strconv.Itoa(g.Generation)+":"+strconv.Itoa(g.Pid)+":"+g.State)
		}
		return strings.Join(s, " ")
	}

	before := status()
	if before.Version != 1 || before.Pid != r.pid() || len(before.Listeners) != 1 ||
		before.Listeners[0].Name != "web" || before.Listeners[0].Address != addr || before.Listeners[0].FD != 3 {
		t.Errorf("status before: %+v", before)
	}
	if got, want := gens(before), "1:"+strconv.Itoa(first.num("pid"))+":serving"; got != want {
		t.Errorf("generations before: %s, want %s", got, want)
	}
	if before.Restarts.OK != 0 || before.Restarts.InProgress || before.LastRestart != nil {
		t.Errorf("counters before: %+v %+v", before.Restarts, before.LastRestart)
	}

	r.signal(syscall.SIGHUP)
	starting, _ := r.waitMsg(from, "generation starting", 2)
	during := status()
	want := "1:" + strconv.Itoa(first.num("pid")) + ":serving 2:" + strconv.Itoa(starting.num("pid")) + ":starting"
	if got := gens(during); got != want || !during.Restarts.InProgress {
		t.Errorf("during: generations %s (want %s), in progress %v", got, want, during.Restarts.InProgress)
	}

	writeMode(t, gate, "2")
	r.waitMsg(from, "old generation exited", 1)
	after := status()
	if got, want := gens(after), "2:"+strconv.Itoa(starting.num("pid"))+":serving"; got != want {
		t.Errorf("generations after: %s, want %s", got, want)
	}
	if after.Restarts.OK != 1 || after.Restarts.InProgress || after.LastRestart == nil ||
		!after.LastRestart.OK || after.LastRestart.Generation != 2 {
		t.Errorf("counters after: %+v %+v", after.Restarts, after.LastRestart)
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// relay stop stops relay gracefully and returns once it has exited.
func TestStopCommand(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--", built.testchild, "-exit-on-term", "0")
	r.listenAddrs(1)
	r.waitMsg(0, "generation ready", 1)
	out, errOut, code := r.client("stop")
	if code != 0 || !strings.Contains(out, "relay stopped") {
		t.Errorf("relay stop: exit %d\n%s%s", code, out, errOut)
	}
	if !processGone(r.pid()) && !isZombie(r.pid()) {
		t.Errorf("relay stop returned while relay still runs")
	}
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
	if _, _, code := r.client("status"); code != 4 {
		t.Errorf("relay status after stop: exit %d, want 4 (unreachable)", code)
	}
}

// A second relay run with the same control socket fails clearly and leaves
// the first one alone.
func TestSecondRelayWithTheSameNameFails(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--", built.testchild)
	r.listenAddrs(1)
	r.waitMsg(0, "generation ready", 1)
	cmd := exec.Command(built.relay, "run", "--control", r.control, "--listen", "127.0.0.1:0", "--", built.testchild)
	out, _ := cmd.CombinedOutput()
	if code := cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(string(out), "another relay is running with it") {
		t.Errorf("second relay: exit %d, %s", code, out)
	}
	if _, _, code := r.client("status"); code != 0 {
		t.Errorf("the first relay's control socket stopped answering: exit %d", code)
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// BenchmarkRestartCommand measures `relay restart` end to end with
// examples/hello (sd_notify readiness, 100 ms lame duck): from starting the
// command to its "restart done" line (the new generation serves, the old
// one was told to stop), and to its exit, which also waits for the old
// generation to exit. relay is built without -race. It reports figures and
// asserts nothing.
func BenchmarkRestartCommand(b *testing.B) {
	bin := relayNoRace(b)
	r := startRelayBin(b, bin, nil, nil, "--listen", "127.0.0.1:0", "--", built.hello, "-lame-duck", "100ms")
	r.listenAddrs(1)
	r.waitMsg(0, "generation ready", 1)
	var toDone, toExit []time.Duration
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		cmd := exec.Command(bin, "restart", "--control", r.control)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			b.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "restart done") {
				toDone = append(toDone, time.Since(start))
			}
		}
		if err := cmd.Wait(); err != nil {
			b.Fatalf("relay restart: %v", err)
		}
		toExit = append(toExit, time.Since(start))
	}
	b.StopTimer()
	b.ReportMetric(ms(median(toDone)), "ms-to-done(p50)")
	b.ReportMetric(ms(slices.Max(toDone)), "ms-to-done(max)")
	b.ReportMetric(ms(median(toExit)), "ms-to-exit(p50)")
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// A control socket left by a relay that died is replaced by the next one.
func TestStaleControlSocketIsReplaced(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--", built.testchild)
	r.listenAddrs(1)
	first, _ := r.waitMsg(0, "generation ready", 1)
	r.cmd.Process.Signal(syscall.SIGKILL)
	r.wait(30 * time.Second)
	syscall.Kill(-first.num("pid"), syscall.SIGKILL)
	if _, err := os.Stat(r.control); err != nil {
		t.Fatalf("the killed relay left no socket to test with: %v", err)
	}
	cmd := exec.Command(built.relay, "run", "--control", r.control, "--listen", "127.0.0.1:0", "--", built.testchild)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}()
	sc := bufio.NewScanner(stderr)
	for sc.Scan() {
		if strings.Contains(sc.Text(), "generation ready") {
			break
		}
	}
	go io.Copy(io.Discard, stderr)
	if out, errOut, code := r.client("status"); code != 0 || !strings.Contains(out, "pid "+strconv.Itoa(cmd.Process.Pid)) {
		t.Errorf("relay status against the new relay: exit %d\n%s%s", code, out, errOut)
	}
}

// An old generation that exits while the next restart's pre-flight check
// runs must not let that restart start its child before the check is done.
func TestNoChildStartsDuringThePreflightCheck(t *testing.T) {
	dir := t.TempDir()
	gate := filepath.Join(dir, "gate")
	check := filepath.Join(dir, "check.sh")
	script := "#!/bin/sh\nwhile [ ! -e " + gate + " ]; do sleep 0.01; done\nexit 1\n"
	if err := os.WriteFile(check, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	// Old generations ignore TERM, so each lingers until --stop-timeout.
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--stop-timeout", "1s", "--max-draining", "2",
		"--", built.testchild, "-ignore-term")
	r.listenAddrs(1)
	_, from := r.waitMsg(0, "generation ready", 1)
	if out, errOut, code := r.client("restart", "--no-wait"); code != 0 {
		t.Fatalf("first restart: exit %d\n%s%s", code, out, errOut)
	}
	_, from = r.waitMsg(from, "generation ready", 2)

	type result struct {
		out  string
		code int
	}
	done := make(chan result, 1)
	go func() {
		out, errOut, code := r.client("restart", "--check", check)
		done <- result{out + errOut, code}
	}()
	r.waitMsg(from, "running pre-flight check", 0)
	r.waitMsg(from, "old generation exited", 1) // during the check
	writeMode(t, gate, "")
	res := <-done
	if res.code != 3 || !strings.Contains(res.out, "pre-flight check failed") {
		t.Errorf("restart with a failing check: exit %d\n%s", res.code, res.out)
	}
	if n := r.count("generation starting"); n != 2 {
		t.Errorf("%d generations started, want 2: none may start while its check runs", n)
	}
	if out, errOut, code := r.client("status"); code != 0 {
		t.Errorf("relay status afterwards: exit %d\n%s%s", code, out, errOut)
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}
