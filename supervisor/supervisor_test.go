package supervisor

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/reaper"
)

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
			r, err := sup.Restart("test", nil)
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
	_, err := sup.Run()
	if err == nil || !strings.Contains(err.Error(), "never became ready") || !strings.Contains(err.Error(), "not ready within") {
		t.Fatalf("Run = %v, want a never-ready error", err)
	}
}
