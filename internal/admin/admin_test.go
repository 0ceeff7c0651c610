package admin

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"github.com/prometheus/common/expfmt"

	"github.com/relaysh/relay/supervisor"
)

// fakeSource is a StatusSource whose answer a test sets; with hold set,
// Status waits until the test ends.
type fakeSource struct {
	mu   sync.Mutex
	st   supervisor.Status
	err  error
	hold chan struct{}
}

func (f *fakeSource) Status() (supervisor.Status, error) {
	f.mu.Lock()
	st, err, hold := f.st, f.err, f.hold
	f.mu.Unlock()
	if hold != nil {
		<-hold
	}
	return st, err
}

func (f *fakeSource) set(st supervisor.Status, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.st, f.err = st, err
}

// wedge makes Status hang until the test ends.
func (f *fakeSource) wedge(t *testing.T) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hold = make(chan struct{})
	t.Cleanup(func() { close(f.hold) })
}

var testBuild = BuildInfo{Version: "v1.2.3", GoVersion: "go1.26.8"}

// serving is a status with generation 3 exited with processes left, 4
// draining and 5 serving, after restarts of every outcome.
func serving() supervisor.Status {
	return supervisor.Status{
		Generations: []supervisor.GenerationStatus{
			{Generation: 3, Pid: 90, State: supervisor.Exited, Processes: 2},
			{Generation: 4, Pid: 100, State: supervisor.Draining},
			{Generation: 5, Pid: 101, State: supervisor.Serving, Copies: []supervisor.CopyStatus{
				{Worker: 0, Pid: 101, State: "ready"}, {Worker: 1, Pid: 107, State: "starting", Replaced: 2}}},
		},
		Restarts: supervisor.RestartCounts{OK: 3, RolledBack: 2, Refused: 1, Replacements: 4, LivenessReplacements: 1, CopyReplacements: 2,
			AfterSwitch: map[supervisor.RollbackCause]int{supervisor.RollbackExited: 1, supervisor.RollbackLiveness: 1}},
		Confirm: &supervisor.ConfirmStatus{Generation: 5, Pid: 101, Warm: 4, WarmPid: 100, Until: time.Unix(1700000100, 250e6)},
		LastRestart: &supervisor.LastRestart{
			Result:   supervisor.Result{Outcome: supervisor.RestartOK, Generation: 5},
			Finished: time.Unix(1700000000, 500e6),
		},
	}
}

// The counters and gauges are those of the status, every state and outcome
// present; the histograms hold what the Recorder heard; and the whole
// registry passes the library's lint.
func TestMetricsFromStatus(t *testing.T) {
	src := &fakeSource{}
	src.set(serving(), nil)
	rec := NewRecorder()
	rec.GenerationReady(5, 30*time.Millisecond)
	rec.RestartFinished(supervisor.Result{Outcome: supervisor.RestartOK, Duration: 700 * time.Millisecond})
	rec.RestartFinished(supervisor.Result{Outcome: supervisor.RestartRefused, Duration: 20 * time.Millisecond})
	rec.RestartFinished(supervisor.Result{Outcome: supervisor.RestartRolledBack, Duration: 3 * time.Second})
	reg := newRegistry(src.Status, Options{Recorder: rec, Build: testBuild, Log: slog.New(slog.DiscardHandler)})

	want := `
# HELP relay_restarts_total Requested restarts (signal or relay restart) that ended, by outcome: ok, rolled_back (the new generation failed; the old one serves on) or refused (nothing was started).
# TYPE relay_restarts_total counter
relay_restarts_total{outcome="ok"} 3
relay_restarts_total{outcome="refused"} 1
relay_restarts_total{outcome="rolled_back"} 2
# HELP relay_rollbacks_after_switch_total Requested restarts rolled back in their confirmation window (relay run --confirm), after the switch, by what failed: exited, liveness, notify (STOPPING=1 or ERRNO= unasked) or manual (relay rollback). They count in relay_restarts_total{outcome="rolled_back"} too.
# TYPE relay_rollbacks_after_switch_total counter
relay_rollbacks_after_switch_total{reason="exited"} 1
relay_rollbacks_after_switch_total{reason="liveness"} 1
relay_rollbacks_after_switch_total{reason="manual"} 0
relay_rollbacks_after_switch_total{reason="notify"} 0
# HELP relay_confirm_window_end_timestamp_seconds When the open confirmation window ends and its new generation is confirmed, in seconds since the Unix epoch; absent while none is open.
# TYPE relay_confirm_window_end_timestamp_seconds gauge
relay_confirm_window_end_timestamp_seconds 1.70000010025e+09
# HELP relay_crash_replacements_total Restarts relay began by itself to replace a serving generation that exited.
# TYPE relay_crash_replacements_total counter
relay_crash_replacements_total 4
# HELP relay_liveness_replacements_total Restarts relay began by itself to replace a serving generation that failed its liveness check or its watchdog.
# TYPE relay_liveness_replacements_total counter
relay_liveness_replacements_total 1
# HELP relay_copy_replacements_total Copies (relay run --workers) started in place of one that exited or failed while its generation served.
# TYPE relay_copy_replacements_total counter
relay_copy_replacements_total 2
# HELP relay_copy Always 1, for each copy of each live generation (relay run --workers; one per generation without it); its labels say which, its pid, and its state: starting (not yet ready), ready, or exited (a replacement may be pending).
# TYPE relay_copy gauge
relay_copy{generation="5",pid="101",state="ready",worker="0"} 1
relay_copy{generation="5",pid="107",state="starting",worker="1"} 1
# HELP relay_copy_replaced Replacements of each copy of each live generation before the one running now (relay run --workers): a copy that exits, or fails its liveness check or watchdog, while its generation serves is replaced alone.
# TYPE relay_copy_replaced gauge
relay_copy_replaced{generation="5",worker="0"} 0
relay_copy_replaced{generation="5",worker="1"} 2
# HELP relay_serving_generation Number of the generation that serves new connections; 0 while none does.
# TYPE relay_serving_generation gauge
relay_serving_generation 5
# HELP relay_generations Generations of which a process is alive, by state; exited: its main process exited, other processes of it have not yet.
# TYPE relay_generations gauge
relay_generations{state="draining"} 1
relay_generations{state="exited"} 1
relay_generations{state="serving"} 1
relay_generations{state="starting"} 0
relay_generations{state="stopping"} 0
relay_generations{state="warm"} 0
# HELP relay_last_restart_timestamp_seconds When the last requested restart ended, in seconds since the Unix epoch; absent before the first.
# TYPE relay_last_restart_timestamp_seconds gauge
relay_last_restart_timestamp_seconds 1.7000000005e+09
# HELP relay_last_restart_success 1 if the last requested restart succeeded, 0 if it was rolled back or refused; absent before the first.
# TYPE relay_last_restart_success gauge
relay_last_restart_success 1
# HELP relay_build_info Always 1; its labels name the relay binary.
# TYPE relay_build_info gauge
relay_build_info{goversion="go1.26.8",version="v1.2.3"} 1
`
	names := []string{"relay_restarts_total", "relay_crash_replacements_total", "relay_liveness_replacements_total",
		"relay_copy_replacements_total", "relay_copy", "relay_copy_replaced",
		"relay_serving_generation", "relay_generations", "relay_last_restart_timestamp_seconds", "relay_last_restart_success", "relay_build_info"}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), names...); err != nil {
		t.Error(err)
	}
	for _, c := range []struct {
		name   string
		labels string
		count  int
		sum    float64
	}{
		{"relay_readiness_seconds", "", 1, 0.03},
		{"relay_restart_duration_seconds", `outcome="ok"`, 1, 0.7},
		{"relay_restart_duration_seconds", `outcome="refused"`, 1, 0.02},
		{"relay_restart_duration_seconds", `outcome="rolled_back"`, 1, 3},
	} {
		text := gathered(t, reg, c.name)
		sel := c.name
		if c.labels != "" {
			sel += "{" + c.labels + "}"
		}
		for _, line := range []string{fmt.Sprintf("%s_count%s %d", c.name, braces(c.labels), c.count), fmt.Sprintf("%s_sum%s %g", c.name, braces(c.labels), c.sum)} {
			if !strings.Contains(text, line+"\n") {
				t.Errorf("%s: no line %q in\n%s", sel, line, text)
			}
		}
	}
	lint(t, reg)
	if n, err := testutil.GatherAndCount(reg, "go_goroutines", "process_resident_memory_bytes"); err != nil || n != 2 {
		t.Errorf("the Go and process collectors gave %d of go_goroutines and process_resident_memory_bytes (%v), want both", n, err)
	}
}

func braces(labels string) string {
	if labels == "" {
		return ""
	}
	return "{" + labels + "}"
}

// gathered is the text format of the named metric family in reg.
func gathered(t *testing.T, reg prometheus.Gatherer, name string) string {
	t.Helper()
	b, err := testutil.GatherAndFormat(reg, expfmt.TypeTextPlain, name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// lint fails the test for each problem the library's linter (promtool's)
// finds in reg's metrics.
func lint(t *testing.T, reg prometheus.Gatherer) {
	t.Helper()
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

// Before any restart and with nothing serving, the last restart's gauges
// are absent, the serving generation is 0, and the registry still lints.
func TestMetricsBeforeAnyRestart(t *testing.T) {
	src := &fakeSource{}
	src.set(supervisor.Status{Generations: []supervisor.GenerationStatus{{Generation: 1, State: supervisor.Starting}}}, nil)
	reg := newRegistry(src.Status, Options{Recorder: NewRecorder(), Build: testBuild, Log: slog.New(slog.DiscardHandler)})
	if n, err := testutil.GatherAndCount(reg, "relay_last_restart_timestamp_seconds", "relay_last_restart_success"); err != nil || n != 0 {
		t.Errorf("%d last-restart series before any restart (%v), want none", n, err)
	}
	if text := gathered(t, reg, "relay_serving_generation"); !strings.Contains(text, "relay_serving_generation 0\n") {
		t.Errorf("serving generation with none serving:\n%s", text)
	}
	if text := gathered(t, reg, "relay_generations"); !strings.Contains(text, `relay_generations{state="starting"} 1`) {
		t.Errorf("generations while the first starts:\n%s", text)
	}
	if text := gathered(t, reg, "relay_restart_duration_seconds"); !strings.Contains(text, `relay_restart_duration_seconds_count{outcome="rolled_back"} 0`) {
		t.Errorf("a restart outcome is missing before its first restart:\n%s", text)
	}
	lint(t, reg)
}

// A supervisor that does not answer leaves relay's counters out of the
// scrape, with a log line, and the rest is served.
func TestMetricsWithoutStatus(t *testing.T) {
	src := &fakeSource{}
	src.set(supervisor.Status{}, supervisor.ErrStopping)
	var logs bytes.Buffer
	reg := newRegistry(src.Status, Options{Recorder: NewRecorder(), Build: testBuild, Log: slog.New(slog.NewTextHandler(&logs, nil))})
	if n, err := testutil.GatherAndCount(reg, "relay_restarts_total", "relay_serving_generation"); err != nil || n != 0 {
		t.Errorf("%d status series without a status (%v), want none", n, err)
	}
	if n, err := testutil.GatherAndCount(reg, "relay_build_info", "relay_readiness_seconds"); err != nil || n != 2 {
		t.Errorf("%d of build info and readiness without a status (%v), want both", n, err)
	}
	if !strings.Contains(logs.String(), "relay is stopping") {
		t.Errorf("the missing status was not logged: %q", logs.String())
	}
}

// readiness follows the contract: serving, not stopping, no shutdown
// delay under way.
func TestReadiness(t *testing.T) {
	now := time.Unix(1700000000, 0)
	delayed := serving()
	delayed.ShutdownAt = now.Add(1500 * time.Millisecond)
	stopping := serving()
	stopping.Stopping = true
	for _, c := range []struct {
		name  string
		st    supervisor.Status
		ready bool
		why   string
	}{
		{"serving", serving(), true, "generation 5 is serving"},
		{"nothing serves", supervisor.Status{Generations: []supervisor.GenerationStatus{{Generation: 2, State: supervisor.Starting}}}, false, "no generation is serving"},
		{"in the shutdown delay", delayed, false, "the graceful stop begins in 1.5s"},
		{"stopping", stopping, false, "relay is stopping"},
	} {
		ready, why := readiness(c.st, now)
		if ready != c.ready || !strings.Contains(why, c.why) {
			t.Errorf("%s: ready %v (%q), want %v (%q)", c.name, ready, why, c.ready, c.why)
		}
	}
}

// startServer runs a Server on an ephemeral loopback port until the test
// ends.
func startServer(t *testing.T, src StatusSource, timeout time.Duration) string {
	t.Helper()
	s, err := Listen("127.0.0.1:0", Options{Status: src, Recorder: NewRecorder(), Build: testBuild, StatusTimeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve() }()
	t.Cleanup(func() {
		s.Close()
		s.Close() // a second Close changes nothing
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after Close")
		}
	})
	return "http://" + s.Addr().String()
}

func getCode(t *testing.T, method, url string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// /healthz and /readyz over a real socket, as the supervisor serves,
// stops and stops answering; the paths are exact and GET (or HEAD) only.
func TestProbes(t *testing.T) {
	src := &fakeSource{}
	src.set(serving(), nil)
	base := startServer(t, src, 200*time.Millisecond)
	expect := func(path string, want int, wantBody string) {
		t.Helper()
		code, body := getCode(t, "GET", base+path)
		if code != want || !strings.Contains(body, wantBody) {
			t.Errorf("GET %s: %d %q, want %d %q", path, code, body, want, wantBody)
		}
	}
	expect("/healthz", 200, "ok")
	expect("/readyz", 200, "ready")
	expect("/metrics", 200, `relay_serving_generation 5`)
	for _, path := range []string{"/", "/metrics/", "/healthz/x", "/readyzz", "/debug/pprof/"} {
		if code, _ := getCode(t, "GET", base+path); code != http.StatusNotFound {
			t.Errorf("GET %s: %d, want 404", path, code)
		}
	}
	for _, path := range []string{"/metrics", "/healthz", "/readyz"} {
		if code, _ := getCode(t, "POST", base+path); code != http.StatusMethodNotAllowed {
			t.Errorf("POST %s: %d, want 405", path, code)
		}
		if code, _ := getCode(t, "HEAD", base+path); code != 200 {
			t.Errorf("HEAD %s: %d, want 200", path, code)
		}
	}

	stopping := serving()
	stopping.Stopping = true
	src.set(stopping, nil)
	expect("/healthz", 200, "ok")
	expect("/readyz", 503, "relay is stopping")

	src.set(supervisor.Status{}, supervisor.ErrStopping)
	expect("/healthz", 503, "relay is stopping")
	expect("/readyz", 503, "relay is stopping")

	src.wedge(t)
	expect("/healthz", 503, "did not answer within 200ms")
	expect("/readyz", 503, "did not answer")
	expect("/metrics", 200, "relay_build_info")
}

// Odd requests get an HTTP error, never a panic or a hang: a garbage
// request line, an oversized header, a header that never ends.
func TestOddRequests(t *testing.T) {
	src := &fakeSource{}
	src.set(serving(), nil)
	base := startServer(t, src, time.Second)
	addr := strings.TrimPrefix(base, "http://")
	for _, c := range []struct {
		name, req string
		want      string
	}{
		{"garbage", "\x00\x01 nonsense\r\n\r\n", "400"},
		{"huge header", "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("a", 64<<10) + "\r\n\r\n", "431"},
		{"bad version", "GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", "505"},
	} {
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(conn, c.req); err != nil {
			t.Errorf("%s: writing: %v", c.name, err)
		}
		line, err := bufio.NewReader(conn).ReadString('\n')
		conn.Close()
		if err != nil || !strings.Contains(line, c.want) {
			t.Errorf("%s: answer %q (%v), want %s", c.name, line, err, c.want)
		}
	}
	// The server still answers.
	if code, _ := getCode(t, "GET", base+"/healthz"); code != 200 {
		t.Errorf("GET /healthz after odd requests: %d", code)
	}
}

// A port in use is one clear line naming the flag and the fix.
func TestListenAddressInUse(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	addr := held.Addr().String()
	_, err = Listen(addr, Options{Status: &fakeSource{}})
	want := "--metrics " + addr + ": address already in use; pick another port or stop what holds it"
	if err == nil || !strings.HasPrefix(err.Error(), want) || !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("Listen on a port in use: %v, want %q wrapping EADDRINUSE", err, want)
	}
}

// The whole /metrics body, as served, passes the linter that promtool
// check metrics runs.
func TestMetricsBodyLints(t *testing.T) {
	src := &fakeSource{}
	src.set(serving(), nil)
	base := startServer(t, src, time.Second)
	code, body := getCode(t, "GET", base+"/metrics")
	if code != 200 {
		t.Fatalf("GET /metrics: %d", code)
	}
	problems, err := promlint.New(strings.NewReader(body)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}
