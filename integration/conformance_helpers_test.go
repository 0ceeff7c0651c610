package integration

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/relaysh/relay/internal/procfs"
)

// The conformance suite runs real servers from Debian's packages under relay
// and restarts each with a slow request in flight and new connections
// arriving throughout; see conformance_test.go for the servers.

// conformanceFill is what every slow answer begins with: 64 KiB of a fixed
// pattern (the apps in testdata/conformance and the backend that nginx
// proxies to, conformanceBackend), so that a cut answer is told from a
// whole one.
func conformanceFill() []byte { return bytes.Repeat([]byte("0123456789abcdef"), 4096) }

// conformanceCase is one server in one mode.
type conformanceCase struct {
	// name is the subtest's name: server-mode.
	name string
	// takes is how each generation must get relay's socket, as relay's
	// "generation ready" line says: "fd" (inherited) or "bind" (its own
	// bind, taken over).
	takes string
	// setup finds the server (skipping or failing the test if it is
	// missing) and returns relay's flags besides --listen, and the
	// command, for the port, with files in dir.
	setup func(t *testing.T, port int, dir string, cfg conformanceConfig) (relayArgs, command []string)
	// childWorkers is true where the worker that receives the slow request
	// must be a child of the generation's master (the pid relay started),
	// and where the answer's X-Pid must name that worker: nginx, whose
	// worker is the one that proxies the slow request to the backend.
	childWorkers bool
}

// conformanceConfig is what the environment sets.
type conformanceConfig struct {
	restarts int           // RELAY_CONFORMANCE_RESTARTS
	slow     time.Duration // RELAY_CONFORMANCE_SLOW
}

func conformanceSettings(t *testing.T) conformanceConfig {
	t.Helper()
	cfg := conformanceConfig{restarts: 3, slow: 1500 * time.Millisecond}
	if s := os.Getenv("RELAY_CONFORMANCE_RESTARTS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 1000 {
			t.Fatalf("RELAY_CONFORMANCE_RESTARTS=%q: want a number from 1 to 1000", s)
		}
		cfg.restarts = n
	}
	if s := os.Getenv("RELAY_CONFORMANCE_SLOW"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 || d > 5*time.Minute {
			t.Fatalf("RELAY_CONFORMANCE_SLOW=%q: want a duration from 0 to 5m", s)
		}
		cfg.slow = d
	}
	return cfg
}

// slowTimeout is the slow request's timeout, which only bounds a failure.
func (cfg conformanceConfig) slowTimeout() time.Duration { return cfg.slow + 2*time.Minute }

// conformanceProgram finds a server program: $RELAY_<NAME> if set, else
// name on PATH. A missing one skips the test, or fails it where
// RELAY_REQUIRE_CONFORMANCE=1 (.ci/run installs them all and sets it).
func conformanceProgram(t *testing.T, name string) string {
	t.Helper()
	env := "RELAY_" + strings.ToUpper(name)
	if p := os.Getenv(env); p != "" {
		return p
	}
	p, err := exec.LookPath(name)
	if err != nil {
		conformanceMissing(t, fmt.Sprintf("%s not found (.ci/run installs it; or set %s): %v", name, env, err))
	}
	return p
}

// conformanceMissing skips the test with why, or fails it where
// RELAY_REQUIRE_CONFORMANCE=1.
func conformanceMissing(t *testing.T, why string) {
	t.Helper()
	if os.Getenv("RELAY_REQUIRE_CONFORMANCE") == "1" {
		t.Fatal(why + " (RELAY_REQUIRE_CONFORMANCE=1: no server may be skipped)")
	}
	t.Skip(why)
}

// conformanceApp is the absolute path of a file of testdata/conformance.
func conformanceApp(t *testing.T, name string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("testdata", "conformance", name))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatal(err)
	}
	return p
}

// conformanceSlowResult is how a slow request ended.
type conformanceSlowResult struct {
	status int
	header http.Header
	body   []byte
	err    error
}

// conformanceSlow is a slow request in flight: done receives its end.
type conformanceSlow struct {
	id   int
	done chan conformanceSlowResult
}

// startConformanceSlow sends GET url on a connection of its own and reads the answer
// in full, in the background.
func startConformanceSlow(id int, url string, timeout time.Duration) *conformanceSlow {
	s := &conformanceSlow{id: id, done: make(chan conformanceSlowResult, 1)}
	go func() {
		client := &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
		resp, err := client.Get(url)
		if err != nil {
			s.done <- conformanceSlowResult{err: err}
			return
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			err = fmt.Errorf("reading the body after %d bytes: %w", len(body), err)
		}
		s.done <- conformanceSlowResult{status: resp.StatusCode, header: resp.Header, body: body, err: err}
	}()
	return s
}

// describe says how a slow request failed, or "" if it was answered 200
// with want, in full.
func (res conformanceSlowResult) describe(want []byte) string {
	switch {
	case res.err != nil:
		return res.err.Error()
	case res.status != http.StatusOK:
		return fmt.Sprintf("status %d: %.200q", res.status, res.body)
	case res.header.Get("Content-Length") != strconv.Itoa(len(want)):
		return fmt.Sprintf("Content-Length %q, want %d", res.header.Get("Content-Length"), len(want))
	case !bytes.Equal(res.body, want):
		return fmt.Sprintf("a body of %d bytes ending %q, want %d bytes ending %q",
			len(res.body), conformanceTail(res.body, 40), len(want), conformanceTail(want, 40))
	}
	return ""
}

func conformanceTail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// conformanceMarker waits until the app has written dir/ID.pid, the sign that a
// worker has received slow request id, and returns that worker's pid.
func conformanceMarker(t *testing.T, dir string, s *conformanceSlow) int {
	t.Helper()
	path := filepath.Join(dir, strconv.Itoa(s.id)+".pid")
	var pid int
	var early *conformanceSlowResult
	waitUntil(t, 60*time.Second, fmt.Sprintf("the server to receive slow request %d (%s)", s.id, path), func() bool {
		select {
		case res := <-s.done:
			early = &res // the failure below
			return true
		default:
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return false
		}
		pid, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err == nil
	})
	if early != nil {
		t.Fatalf("slow request %d ended before the server said it had received it: %s", s.id, early.describe(nil))
	}
	return pid
}

// conformanceRestart is what `relay restart` printed and its exit code.
type conformanceRestart struct {
	stdout, stderr string
	code           int
	err            error
}

// startConformanceRestart runs `relay restart` against r in the background: it waits
// for the old generation, which the test holds on its slow request.
func startConformanceRestart(r *relayProc) <-chan conformanceRestart {
	out := make(chan conformanceRestart, 1)
	go func() {
		var o conformanceRestart
		o.stdout, o.stderr, o.code, o.err = relayCommand(r.control, "restart")
		out <- o
	}()
	return out
}

// runConformance runs c under relay, restarts it cfg.restarts times with a
// slow request in flight at each restart and a load of new connections
// throughout, relay upgrading itself in place before each restart, and
// checks that no request failed and that every slow request was answered
// 200, in full, by the generation it was sent to.
func runConformance(t *testing.T, c conformanceCase, cfg conformanceConfig) {
	port := freeLoopbackPort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	dir := t.TempDir()
	relayArgs, command := c.setup(t, port, dir, cfg)
	args := append(append(append([]string{"--listen", addr}, relayArgs...), "--"), command...)
	r := startRelay(t, []string{"CONFORMANCE_DIR=" + dir}, args...)
	name := r.listenAddrs(1)[0].str("name")
	ready, from := r.waitMsg(0, "generation ready", 1)
	checkTakes := func(ready logLine) {
		t.Helper()
		if got, want := ready.str("sockets"), name+"="+c.takes; got != want {
			t.Errorf("generation %d ready with sockets=%q, want %q", ready.num("gen"), got, want)
		}
	}
	checkTakes(ready)

	ld := startLoadIdent(httpURL(addr), 4, 10*time.Minute, pidHeader)
	loadStopped := false
	defer func() {
		if !loadStopped { // a failure ended the test early
			ld.stop()
		}
	}()
	// answeredSince waits until the load has had n more answers than
	// before, failed requests aside.
	answeredSince := func(what string, n int) {
		t.Helper()
		requests, failures := ld.summary()
		before := requests - len(failures)
		waitUntil(t, 60*time.Second, fmt.Sprintf("%d answers to the load %s", n, what), func() bool {
			requests, failures := ld.summary()
			return requests-len(failures) >= before+n
		})
	}
	answeredSince("from generation 1", 20)

	// The slow request's timeout only bounds a failure.
	slowTimeout := cfg.slowTimeout()
	var slowFailed []string
	slowOK := 0
	for old := 1; old <= cfg.restarts; old++ {
		oldPid := ready.num("pid")
		slow := startConformanceSlow(old, fmt.Sprintf("http://%s/slow?id=%d&ms=%d", addr, old, cfg.slow.Milliseconds()), slowTimeout)
		// Who received it: the worker's pid, and for nginx that it is a
		// worker of the old generation's master. The worker holds it
		// until the gate below opens, so it is in flight at the stop.
		worker := conformanceMarker(t, dir, slow)
		if c.childWorkers {
			if ppid := procStatus(t, worker, "PPid"); ppid != strconv.Itoa(oldPid) {
				t.Errorf("slow request %d: received by pid %d, whose parent is %s, not generation %d's %d", old, worker, ppid, old, oldPid)
			}
		}

		// relay upgrades itself in place with the slow request in
		// flight: the server sees nothing, and the restart below is the
		// new relay's.
		if stdout, stderr, code, err := relayCommand(r.control, "upgrade"); err != nil || code != 0 {
			t.Fatalf("relay upgrade before restart %d: exit %d, %v: %s%s", old, code, err, stdout, stderr)
		}
		_, from = r.waitFor(from, 60*time.Second, "relay upgraded in place", func(l logLine) bool { return l.str("msg") == "relay upgraded in place" })
		restart := startConformanceRestart(r)
		ready, from = r.waitMsg(from, "generation ready", old+1)
		checkTakes(ready)
		r.waitFor(from, 60*time.Second, fmt.Sprintf("relay to stop generation %d", old), func(l logLine) bool {
			return l.str("msg") == "stopping generation" && l.num("gen") == old
		})
		// relay has sent generation old its stop signal: the slow request
		// must still be in flight (it is, until the gate opens).
		var res conformanceSlowResult
		ended := false
		select {
		case res = <-slow.done:
			ended = true
			if res.err == nil && res.status == http.StatusOK {
				t.Errorf("slow request %d was answered before relay stopped generation %d: it was not in flight at the stop", old, old)
			}
		default:
		}
		writeMode(t, filepath.Join(dir, strconv.Itoa(old)+".go"), "go")
		if !ended {
			select {
			case res = <-slow.done:
			case <-time.After(slowTimeout + 10*time.Second):
				t.Fatalf("slow request %d: no end within %s", old, slowTimeout+10*time.Second)
			}
		}
		want := append(conformanceFill(), fmt.Sprintf("id=%d pid=%d gen=%d\n", old, worker, old)...)
		why := res.describe(want)
		if why == "" && c.childWorkers && res.header.Get("X-Pid") != strconv.Itoa(worker) {
			why = fmt.Sprintf("answered with X-Pid %q, not by worker %d, which received it", res.header.Get("X-Pid"), worker)
		}
		if why != "" {
			slowFailed = append(slowFailed, fmt.Sprintf("slow request %d, in flight in generation %d (pid %d, worker %d) at restart %d: %s", old, old, oldPid, worker, old, why))
		} else {
			slowOK++
		}

		var outcome conformanceRestart
		select {
		case outcome = <-restart:
		case <-time.After(3*time.Minute + 10*time.Second):
			t.Fatalf("relay restart %d did not return", old)
		}
		if outcome.err != nil || outcome.code != 0 {
			t.Errorf("relay restart %d: exit %d, %v\n%s%s", old, outcome.code, outcome.err, outcome.stdout, outcome.stderr)
		}
		_, from = r.waitMsg(from, "old generation exited", old)
		answeredSince(fmt.Sprintf("after restart %d", old), 20)
	}

	ld.stop()
	loadStopped = true
	requests, failures := ld.summary()
	t.Logf("%d restarts, slow requests of %s: load %d requests, %d failed; slow requests %d answered in full by their generation, %d failed",
		cfg.restarts, cfg.slow, requests, len(failures), slowOK, len(slowFailed))
	noFailures(t, failures, requests)
	for _, f := range slowFailed {
		t.Error(f)
	}
	r.signal(syscall.SIGTERM)
	r.wait(2 * time.Minute)
}

// startConformanceBackend runs, in the test process on an ephemeral port of
// 127.0.0.1, the backend that nginx proxies GET /slow?id=N&ms=M to, and
// returns its address. It keeps the apps' protocol (testdata/conformance/
// app.py), with the nginx worker in the app's place: nginx names the worker
// that proxies the request in the request header X-Worker-Pid ($pid), and
// the backend writes dir/N.pid holding that pid (the test's sign that a
// worker has received the request), holds the request until the test
// creates dir/N.go, with no time bound (until nginx drops the request or the
// test ends), takes M ms more, and answers 200 with 64 KiB of
// conformanceFill() then "id=N pid=WORKER gen=GEN\n". GEN is the generation
// of the worker's master as the master itself wrote it at receipt: relay
// runs each nginx with its pid file at dir/nginx-{generation}.pid.
func startConformanceBackend(t *testing.T, dir string) string {
	t.Helper()
	quit := make(chan struct{})
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		id, ms := q.Get("id"), q.Get("ms")
		_, idErr := strconv.ParseUint(id, 10, 31)
		msN, msErr := strconv.ParseUint(ms, 10, 31)
		worker, pidErr := strconv.Atoi(r.Header.Get("X-Worker-Pid"))
		if r.URL.Path != "/slow" || idErr != nil || msErr != nil || pidErr != nil {
			http.Error(w, "want GET /slow?id=N&ms=M with X-Worker-Pid", http.StatusBadRequest)
			return
		}
		gen := conformanceNginxGeneration(dir, worker)
		tmp := filepath.Join(dir, id+".backend.tmp")
		if err := os.WriteFile(tmp, []byte(strconv.Itoa(worker)+"\n"), 0o600); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		if err := os.Rename(tmp, filepath.Join(dir, id+".pid")); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		// The gate. Giving up here (nginx dropped the request, or the
		// test ended) answers nothing: the test's own checks tell why.
		gate := filepath.Join(dir, id+".go")
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			if _, err := os.Stat(gate); err == nil {
				break
			}
			select {
			case <-tick.C:
			case <-r.Context().Done():
				return
			case <-quit:
				return
			}
		}
		select {
		case <-time.After(time.Duration(msN) * time.Millisecond):
		case <-r.Context().Done():
			return
		case <-quit:
			return
		}
		body := append(conformanceFill(), fmt.Sprintf("id=%s pid=%d gen=%s\n", id, worker, gen)...)
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body)
	}))
	srv.Start()
	// Cleanups run last first: the held requests are let go, then Close
	// waits for them.
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(quit) })
	return srv.Listener.Addr().String()
}

// conformanceNginxGeneration is the generation whose nginx master is the
// parent of worker, by the masters' pid files dir/nginx-GEN.pid; or why
// not, which no answer expects.
func conformanceNginxGeneration(dir string, worker int) string {
	st, err := procfs.ReadStatus(worker)
	if err != nil {
		return fmt.Sprintf("unknown(worker %d: %v)", worker, err)
	}
	ppid := st["PPid"]
	files, _ := filepath.Glob(filepath.Join(dir, "nginx-*.pid"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err == nil && strings.TrimSpace(string(b)) == ppid {
			return strings.TrimSuffix(strings.TrimPrefix(filepath.Base(f), "nginx-"), ".pid")
		}
	}
	return fmt.Sprintf("unknown(no nginx-GEN.pid holds %s, the parent of worker %d)", ppid, worker)
}
