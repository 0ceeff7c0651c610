package supervisor

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/reaper"
	"github.com/relaysh/relay/socketpass"
)

// TestMain lets this test binary act as relay's exec shim: relay starts
// children through /proc/self/exe, which here is the test binary.
func TestMain(m *testing.M) {
	if socketpass.IsShim(os.Args) {
		err := socketpass.RunShim(os.Args)
		fmt.Fprintln(os.Stderr, "exec shim:", err)
		os.Exit(127)
	}
	os.Exit(m.Run())
}

// logRecorder collects log output and lets a test wait for a line.
type logRecorder struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	changed chan struct{}
}

func newLogRecorder() *logRecorder { return &logRecorder{changed: make(chan struct{})} }

func (l *logRecorder) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	close(l.changed)
	l.changed = make(chan struct{})
	return len(p), nil
}

// waitCount waits until substr appears n times.
func (l *logRecorder) waitCount(t *testing.T, substr string, n int) {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		l.mu.Lock()
		got := strings.Count(l.buf.String(), substr)
		changed := l.changed
		l.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("timed out waiting for %d × %q; log:\n%s", n, substr, l.buf.String())
		}
	}
}

func newTestSupervisor(t *testing.T, check string, logs *logRecorder) *Supervisor {
	t.Helper()
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	rp, err := reaper.New(log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rp.Close)
	spec, err := health.Parse(check)
	if err != nil {
		t.Fatal(err)
	}
	sup, err := New(Config{
		Command:     Command{Path: "/bin/sleep", Args: []string{"sleep", "1000"}},
		Env:         os.Environ(),
		Health:      spec,
		StopTimeout: 10 * time.Second,
		RuntimeDir:  t.TempDir(),
		Reaper:      rp,
		Log:         log,
	})
	if err != nil {
		t.Fatal(err)
	}
	return sup
}

// Restart requests made during a restart are coalesced into one more
// restart, and each caller gets the outcome of a restart that began after
// it asked.
func TestRestartsDuringARestartAreCoalesced(t *testing.T) {
	gate := filepath.Join(t.TempDir(), "ready")
	logs := newLogRecorder()
	sup := newTestSupervisor(t, "exec:test -e "+gate, logs)
	runDone := make(chan error, 1)
	go func() { _, err := sup.Run(); runDone <- err }()

	// Generation 1 cannot become ready until the gate file exists, so
	// every request below arrives during the first start.
	const callers = 5
	results := make(chan Result, callers)
	for range callers {
		go func() {
			r, err := sup.RestartAndWait(RestartRequest{Reason: "test"})
			if err != nil {
				t.Error(err)
			}
			results <- r
		}()
	}
	logs.waitCount(t, "restart requested during a restart", callers)
	if err := os.WriteFile(gate, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for range callers {
		r := <-results
		if !r.OK || r.Generation != 2 {
			t.Errorf("caller got %+v, want generation 2 ready", r)
		}
	}
	sup.Stop(false)
	if err := <-runDone; err != nil {
		t.Fatal(err)
	}
	if sup.nextGen != 2 {
		t.Errorf("%d generations started, want 2", sup.nextGen)
	}
}

// A first generation that never becomes ready makes Run fail with the
// reason and the child's stderr.
func TestFirstGenerationFailureEndsRun(t *testing.T) {
	logs := newLogRecorder()
	sup := newTestSupervisor(t, "exec:false", logs)
	sup.cfg.HealthTimeout = 50 * time.Millisecond
	err := runWithin(t, sup, 30*time.Second)
	if err == nil || !strings.Contains(err.Error(), "never became ready") || !strings.Contains(err.Error(), "not ready within") {
		t.Fatalf("Run = %v, want a never-ready error", err)
	}
}

// A child that exits while its check is passing is never promoted, even
// when the exit report waits for a process that keeps its stderr open.
func TestExitedChildIsNeverPromoted(t *testing.T) {
	logs := newLogRecorder()
	sup := newTestSupervisor(t, "delay:200ms", logs)
	// The background sleep, in a session of its own, holds the stderr
	// pipe for longer than the check takes.
	sup.command = Command{Path: "/bin/sh", Args: []string{"sh", "-c", "setsid sleep 2 & exit 0"}}
	err := runWithin(t, sup, 30*time.Second)
	if err == nil || !strings.Contains(err.Error(), "exited before it was ready") {
		t.Fatalf("Run = %v, want the first generation rolled back as exited", err)
	}
}

// A first generation that cannot even be started ends Run with the reason.
func TestFirstSpawnFailureEndsRun(t *testing.T) {
	logs := newLogRecorder()
	sup := newTestSupervisor(t, "notify", logs)
	sup.cfg.RuntimeDir = filepath.Join(t.TempDir(), "missing")
	err := runWithin(t, sup, 30*time.Second)
	if err == nil || !strings.Contains(err.Error(), "starting generation 1") {
		t.Fatalf("Run = %v, want a start failure", err)
	}
}

// runWithin runs sup, which is expected to end on its own, and fails the
// test if it has not after timeout.
func runWithin(t *testing.T, sup *Supervisor, timeout time.Duration) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { _, err := sup.Run(); done <- err }()
	select {
	case err := <-done:
		return err
	case <-time.After(timeout):
		sup.Stop(true)
		<-done
		t.Fatalf("Run did not end within %s", timeout)
		return nil
	}
}

// Requests for different commands are not merged: each runs, in order, and
// each caller is told what ran.
func TestDifferentRestartsAreQueuedInOrder(t *testing.T) {
	gate := filepath.Join(t.TempDir(), "ready")
	logs := newLogRecorder()
	sup := newTestSupervisor(t, "exec:test -e "+gate, logs)
	runDone := make(chan error, 1)
	go func() { _, err := sup.Run(); runDone <- err }()

	other := &Command{Path: "/bin/sleep", Args: []string{"sleep", "2000"}}
	type outcome struct {
		name string
		res  Result
	}
	results := make(chan outcome, 3)
	ask := func(name string, cmd *Command) {
		go func() {
			r, err := sup.RestartAndWait(RestartRequest{Reason: name, Command: cmd})
			if err != nil {
				t.Error(err)
			}
			results <- outcome{name, r}
		}()
	}
	ask("plain-1", nil)
	logs.waitCount(t, "restart requested during a restart", 1)
	ask("other", other)
	logs.waitCount(t, "restart requested during a restart", 2)
	ask("plain-2", nil)
	logs.waitCount(t, "restart requested during a restart", 3)
	if err := os.WriteFile(gate, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	got := map[string]Result{}
	for range 3 {
		o := <-results
		got[o.name] = o.res
	}
	for name, want := range map[string]struct {
		gen int
		cmd string
	}{"plain-1": {2, "sleep 1000"}, "plain-2": {2, "sleep 1000"}, "other": {3, "sleep 2000"}} {
		r := got[name]
		if !r.OK || r.Generation != want.gen || strings.Join(r.Command, " ") != want.cmd {
			t.Errorf("%s: %+v, want generation %d running %q", name, r, want.gen, want.cmd)
		}
	}
	sup.Stop(false)
	if err := <-runDone; err != nil {
		t.Fatal(err)
	}
}

// writes records each Write separately.
type writes struct{ got []string }

func (w *writes) Write(b []byte) (int, error) { w.got = append(w.got, string(b)); return len(b), nil }

// The child's stderr reaches relay's stream in whole lines, each in one
// Write, so that none can split one of relay's own log lines.
func TestChildStderrPassesWholeLines(t *testing.T) {
	out := &writes{}
	pt := &passThrough{out: out, tail: newTailBuffer(64)}
	for _, chunk := range []string{"ab", "c\nde", "f\ng\nh", "\n", "tail without newline"} {
		pt.Write([]byte(chunk))
	}
	pt.flush()
	want := []string{"abc\n", "def\ng\n", "h\n", "tail without newline"}
	if fmt.Sprint(out.got) != fmt.Sprint(want) {
		t.Errorf("writes %q, want %q", out.got, want)
	}
	if got := pt.tail.Lines(10); !strings.Contains(got, "tail without newline") {
		t.Errorf("the tail lost the output: %q", got)
	}
}
