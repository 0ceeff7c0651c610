package supervisor

import (
	"slices"
	"syscall"
	"testing"
	"time"
)

// A serving generation that exits on its own is replaced after a backoff
// that doubles with each failure in a row, up to MaxBackoff, and starts
// again from RestartBackoff once a generation has served stableAfter.
// Replacements are counted apart and are not reloads.
func TestCrashIsReplacedWithBackoff(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p := h.serving()
	p.exit(exited(2), false)
	h.waitLine("no generation serving; replacement pending")
	if !h.clock.pending(testRestartBackoff) {
		t.Fatalf("no replacement after %s pending", testRestartBackoff)
	}
	// Each replacement fails before it is ready: the backoff doubles.
	delay := testRestartBackoff
	for i, next := range []time.Duration{200 * time.Millisecond, 400 * time.Millisecond, testMaxBackoff, testMaxBackoff} {
		h.clock.advance(delay - time.Millisecond)
		h.noStart() // not before its time
		h.clock.advance(time.Millisecond)
		p = h.started()
		h.check(2 + i)
		p.exit(exited(1), false)
		h.clock.waitTimer(t, next)
		delay = next
	}
	h.clock.advance(delay)
	p = h.started()
	h.check(6).pass()
	h.waitLine("gen 6 pid 1006 serving")
	// Still a failure in a row: it served for less than stableAfter.
	p.exit(exited(2), false)
	h.clock.waitTimer(t, testMaxBackoff)
	h.clock.advance(testMaxBackoff)
	p = h.started()
	h.check(7).pass()
	h.waitLine("gen 7 pid 1007 serving")
	h.clock.advance(stableAfter)
	p.exit(exited(2), false)
	h.clock.waitTimer(t, testRestartBackoff)
	st := h.wantGens("")
	if st.Restarts.Replacements != 6 || st.Restarts.OK != 0 || st.Restarts.RolledBack != 0 {
		t.Errorf("restart counts %+v, want 6 replacements and no requested restart", st.Restarts)
	}
	if got := h.obs.milestones(); !slices.Equal(got, []string{"ready"}) {
		t.Errorf("the Observer heard %q, want only the first ready", got)
	}
}

// A serving generation that exits during a restart needs no replacement:
// the restart's new generation serves when ready.
func TestCrashDuringARestartIsNotReplaced(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	events, _, c := h.starting(RestartRequest{}, 2)
	p1.exit(exited(2), false)
	h.waitLine("no generation serving; gen 2 pid 1002 starting")
	if h.clock.pending(testRestartBackoff) {
		t.Errorf("a replacement is pending while a restart is under way")
	}
	c.pass()
	evs := all(t, events)
	checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseReady, PhaseDone)
	if res := result(t, evs); res.Outcome != RestartOK || res.Generation != 2 {
		t.Errorf("result %+v, want generation 2 ready", res)
	}
	st := h.wantGens("2:serving")
	if st.Restarts.Replacements != 0 || st.Restarts.OK != 1 {
		t.Errorf("restart counts %+v, want one restart and no replacement", st.Restarts)
	}
}

// A requested restart while a replacement waits for its backoff takes its
// place.
func TestRestartReplacesThePendingReplacement(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	p1.exit(exited(2), false)
	h.waitLine("no generation serving; replacement pending")
	events, _, c := h.starting(RestartRequest{}, 2)
	c.pass()
	if res := result(t, all(t, events)); res.Outcome != RestartOK {
		t.Errorf("result %+v, want ok", res)
	}
	if h.clock.pending(testRestartBackoff) {
		t.Errorf("the replacement is still pending")
	}
	if st := h.wantGens("2:serving"); st.Restarts.Replacements != 0 || st.Restarts.OK != 1 {
		t.Errorf("restart counts %+v, want the restart counted, no replacement", st.Restarts)
	}
}

// The processes a generation leaves in its group are stopped too: its
// group gets the stop signal when its main process exits on its own, and
// SIGKILL after the stop timeout; relay waits for the group to empty. A
// generation told to stop whose main process exits before its workers
// (--kill-mode mixed) leaves them alone until the stop timeout.
func TestLingeringGroupIsStoppedAndAwaited(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	p1.exit(exited(1), true)
	p1.waitSignals(t, "group TERM")
	h.clock.waitTimer(t, testRestartBackoff)
	h.clock.advance(testRestartBackoff)
	p2 := h.started()
	h.check(2).pass()
	h.waitLine("gen 1 pid 1001 exited, processes left; gen 2 pid 1002 serving")
	h.clock.advance(testStopTimeout)
	p1.waitSignals(t, "group TERM", "group KILL")
	h.sup.Stop(false)
	p2.waitSignals(t, "TERM")
	p2.exit(exited(0), true) // its group lingers as well
	h.waitLine("stopping; gen 1 pid 1001 exited, processes left; gen 2 pid 1002 exited, processes left")
	p1.groupGone()
	h.orphaned()
	h.clock.advance(testStopTimeout)
	p2.waitSignals(t, "TERM", "group KILL")
	select {
	case <-h.sup.Done():
		t.Fatalf("Run returned while a group still had processes")
	default:
	}
	p2.groupGone()
	h.orphaned()
	if _, err := h.wait(); err != nil {
		t.Fatal(err)
	}
	if got := p2.got(); !slices.Equal(got, []string{"TERM", "group KILL"}) {
		t.Errorf("generation 2 got %q, want TERM to its main process alone, then SIGKILL to its group after the stop timeout", got)
	}
}

// Forward sends a signal to the serving generation's main process alone.
func TestForwardSignalsTheServingChild(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p := h.serving()
	h.sup.Forward(syscall.SIGUSR1)
	h.wantGens("1:serving") // answered after the forward
	if got := p.got(); !slices.Equal(got, []string{"USR1"}) {
		t.Errorf("the serving child got %q, want USR1 alone", got)
	}
}
