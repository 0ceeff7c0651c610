package supervisor

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// A stop during a restart's pre-flight check refuses the restart, cancels
// the check and starts nothing.
func TestStopDuringPreflight(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	events := h.restart(RestartRequest{Check: []string{"make", "test"}})
	c := recv(t, h.preflightC, "the pre-flight check")
	h.sup.Stop(false)
	evs := all(t, events)
	checkPhases(t, evs, PhaseChecking, PhaseDone)
	if res := result(t, evs); res.Outcome != RestartRefused || res.Reason != ErrStopping.Error() {
		t.Errorf("result %+v, want refused: relay is stopping", res)
	}
	if !errors.Is(c.ctx.Err(), context.Canceled) {
		t.Errorf("the pre-flight check's context: %v, want it cancelled", c.ctx.Err())
	}
	p1.waitSignals(t, "TERM")
	h.noStart()
	p1.exit(exited(0), false)
	if out, err := h.wait(); err != nil || out.Child == nil || out.Child.ExitCode() != 0 {
		t.Errorf("Run = %+v, %v; want generation 1's exit status 0", out, err)
	}
}

// A stop while a new generation starts cancels its check and stops both;
// the restart fails because relay stops.
func TestStopDuringStart(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	events, p2, c := h.starting(RestartRequest{}, 2)
	h.sup.Stop(false)
	p1.waitSignals(t, "TERM")
	p2.waitSignals(t, "TERM")
	recv(t, c.ctx.Done(), "the new generation's check to be cancelled")
	p2.exit(killed(syscall.SIGTERM), false)
	evs := all(t, events)
	checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseDone)
	if res := result(t, evs); res.Outcome == RestartOK || res.Reason != ErrStopping.Error() {
		t.Errorf("result %+v, want failed: relay is stopping", res)
	}
	p1.exit(exited(0), false)
	if out, err := h.wait(); err != nil || out.Child.ExitCode() != 0 {
		t.Errorf("Run = %+v, %v; want generation 1's exit status 0", out, err)
	}
}

// A stop in the drain window ends the restart as done, stops both
// generations, and relay's exit status is the new one's, which served.
func TestStopDuringDrain(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1, p2, _, events := h.draining(RestartRequest{})
	h.sup.Stop(false)
	evs := all(t, events)
	if res := result(t, evs); res.Outcome != RestartOK || res.Generation != 2 {
		t.Errorf("result %+v, want generation 2 ready", res)
	}
	p1.waitSignals(t, "TERM")
	p2.waitSignals(t, "TERM")
	if h.clock.pending(testDrain) {
		t.Errorf("the drain timer is still pending")
	}
	p1.exit(exited(0), false)
	p2.exit(exited(4), false)
	if out, err := h.wait(); err != nil || out.Child.ExitCode() != 4 {
		t.Errorf("Run = %+v, %v; want generation 2's exit status 4", out, err)
	}
}

// Restarts queued when the stop begins are refused.
func TestStopRefusesQueuedRestarts(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	h.run()
	p1 := h.started()
	queued := h.restart(RestartRequest{})
	until(t, queued, PhaseQueued)
	h.sup.Stop(false)
	if res := result(t, all(t, queued)); res.Outcome != RestartRefused || res.Reason != ErrStopping.Error() {
		t.Errorf("result %+v, want refused: relay is stopping", res)
	}
	if res := result(t, all(t, h.restart(RestartRequest{}))); res.Outcome != RestartRefused || res.Reason != ErrStopping.Error() {
		t.Errorf("a restart asked for during the stop: %+v, want refused", res)
	}
	if st, err := h.sup.Status(); err != nil || st.Restarts.Refused != 2 {
		t.Errorf("status %+v (%v): want both refusals counted", st.Restarts, err)
	}
	p1.waitSignals(t, "TERM")
	p1.exit(exited(0), false)
	h.wait()
}

// A second stop changes nothing; a stop "now" kills every group.
func TestSecondStopAndStopNow(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	h.sup.Stop(false)
	p1.waitSignals(t, "TERM")
	h.sup.Stop(false)
	h.wantGens("1:stopping") // answered after the second stop
	if got := p1.got(); !slices.Equal(got, []string{"TERM"}) {
		t.Errorf("after a second stop the child got %q, want one TERM", got)
	}
	h.sup.Stop(true)
	p1.waitSignals(t, "TERM", "group KILL")
	p1.exit(killed(syscall.SIGKILL), false)
	if out, err := h.wait(); err != nil || out.Child.ExitCode() != 128+int(syscall.SIGKILL) {
		t.Errorf("Run = %+v, %v; want the child's SIGKILL", out, err)
	}
	if got := h.obs.milestones(); !slices.Equal(got, []string{"ready", "stopping"}) {
		t.Errorf("the Observer heard %q, want one stopping", got)
	}
}

// A generation that outlives the stop timeout gets SIGKILL to its group.
func TestStopTimeoutKillsTheGroup(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	h.sup.Stop(false)
	p1.waitSignals(t, "TERM")
	h.clock.waitTimer(t, testStopTimeout)
	h.clock.advance(testStopTimeout - 1)
	h.wantGens("1:stopping")
	if got := p1.got(); len(got) != 1 {
		t.Errorf("before the stop timeout the child got %q", got)
	}
	h.clock.advance(1)
	p1.waitSignals(t, "TERM", "group KILL")
	p1.exit(killed(syscall.SIGKILL), false)
	h.wait()
}

// Relay's outcome is the exit status of the generation that served when
// the stop began, even if another exits after it.
func TestOutcomeIsTheServingGenerations(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	_, p2, _ := h.starting(RestartRequest{}, 2)
	h.sup.Stop(false)
	p1.waitSignals(t, "TERM")
	p1.exit(exited(3), false)
	p2.waitSignals(t, "TERM")
	p2.exit(exited(0), false)
	if out, err := h.wait(); err != nil || out.Child.ExitCode() != 3 {
		t.Errorf("Run = %+v, %v; want generation 1's exit status 3", out, err)
	}
}

// With nothing serving when the stop began, relay's outcome is the status
// of the last generation to exit.
func TestOutcomeWithNothingServingIsTheLastExit(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	p1.exit(exited(5), false)
	h.waitLine("no generation serving; replacement pending")
	h.sup.Stop(false)
	if out, err := h.wait(); err != nil || out.Child.ExitCode() != 5 {
		t.Errorf("Run = %+v, %v; want the crashed generation's exit status 5", out, err)
	}
	if h.clock.pending(testRestartBackoff) {
		t.Errorf("the replacement is still pending after the stop")
	}
	h.noStart()
}

// A first generation that never becomes ready makes Run fail with the
// reason and the child's stderr.
func TestFirstGenerationFailureEndsRun(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	h.holdStderr = true
	h.run()
	p := h.started()
	h.check(1)
	p.writeStderr(t, "listening on :8080\n")
	h.clock.waitTimer(t, testHealthTimeout)
	h.clock.advance(testHealthTimeout)
	p.waitSignals(t, "group KILL")
	p.closeStderr()
	p.exit(killed(syscall.SIGKILL), false)
	_, err := h.wait()
	if err == nil || !strings.Contains(err.Error(), "never became ready") || !strings.Contains(err.Error(), "not ready within") ||
		!strings.Contains(err.Error(), "its stderr ended with: listening on :8080") {
		t.Fatalf("Run = %v, want a never-ready error with the child's stderr", err)
	}
	if got := h.obs.milestones(); !slices.Equal(got, []string{"stopping"}) {
		t.Errorf("the Observer heard %q, want no ready", got)
	}
}

// A first generation that cannot even be started ends Run with the reason.
func TestFirstSpawnFailureEndsRun(t *testing.T) {
	t.Parallel()
	for name, tweak := range map[string]func(*harness){
		"no runtime directory": func(h *harness) { h.sup.cfg.RuntimeDir = filepath.Join(h.t.TempDir(), "missing") },
		"exec fails":           func(h *harness) { h.startErr = errors.New("exec format error") },
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, nil)
			tweak(h)
			h.run()
			_, err := h.wait()
			if err == nil || !strings.Contains(err.Error(), "starting generation 1") {
				t.Fatalf("Run = %v, want a start failure", err)
			}
			h.noStart()
		})
	}
}

// A later generation that cannot be started fails its restart and leaves
// the serving one alone.
func TestSpawnFailureFailsTheRestart(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	h.mu.Lock()
	h.startErr = errors.New("exec format error")
	h.mu.Unlock()
	evs := all(t, h.restart(RestartRequest{}))
	checkPhases(t, evs, PhaseDone)
	if res := result(t, evs); res.Outcome != RestartRolledBack || !strings.Contains(res.Reason, "exec format error") {
		t.Errorf("result %+v, want the start failure", res)
	}
	if got := p1.got(); len(got) != 0 {
		t.Errorf("the serving generation got %q", got)
	}
	h.wantGens("1:serving")
}
