package integration

import (
	"strings"
	"testing"
	"time"
)

// These tests show what only real processes show of the supervisor's state
// machine, whose transitions package supervisor tests on fakes.

// A child that exits while its check is passing is never promoted, even
// when the report of its exit waits for a process that keeps its stderr
// open: here a sleep in a session of its own, which holds the stderr pipe
// for longer than the check takes.
func TestExitedChildIsNeverPromoted(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--health", "delay:200ms",
		"--", "/bin/sh", "-c", "setsid sleep 2 & exit 0")
	if code := r.wait(30 * time.Second); code != 1 {
		t.Fatalf("relay exited %d, want 1:\n%s", code, r.output())
	}
	if out := r.output(); !strings.Contains(out, "exited before it was ready") {
		t.Errorf("relay's last words do not say the first generation exited before it was ready:\n%s", out)
	}
	if n := r.count("generation ready"); n != 0 {
		t.Errorf("%d generations were made ready", n)
	}
}

// A first generation whose real exec check never passes makes relay fail
// with the reason.
func TestFirstGenerationFailureEndsRun(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--health", "exec:false", "--health-timeout", "50ms",
		"--", "/bin/sleep", "1000")
	if code := r.wait(30 * time.Second); code != 1 {
		t.Fatalf("relay exited %d, want 1:\n%s", code, r.output())
	}
	if out := r.output(); !strings.Contains(out, "never became ready") || !strings.Contains(out, "not ready within") {
		t.Errorf("relay's last words do not say the first generation was never ready within --health-timeout:\n%s", out)
	}
}
