package supervisor

import (
	"slices"
	"syscall"
	"testing"
	"time"
)

// testShutdownDelay is distinct from the other test timers.
const testShutdownDelay = 3 * time.Second

// wantDelay checks that Status reports the shutdown delay as pending
// until at, the graceful stop not begun.
func (h *harness) wantDelay(at time.Time) Status {
	h.t.Helper()
	st, err := h.sup.Status()
	if err != nil {
		h.t.Fatal(err)
	}
	if st.Stopping || !st.ShutdownAt.Equal(at) {
		h.t.Errorf("status Stopping=%v ShutdownAt=%v, want the delay pending until %v", st.Stopping, st.ShutdownAt, at)
	}
	return st
}

// During the shutdown delay everything serves on, untouched, restarts are
// refused and Status says when the stop begins; then the graceful stop
// begins as Stop's would, and Run returns the serving child's status.
func TestShutdownDelayServesOnThenStops(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	at := h.clock.Now().Add(testShutdownDelay)
	h.sup.StopAfter(testShutdownDelay)
	h.waitLog("shutdown delay: serving on until " + at.Format(time.RFC3339Nano))
	h.wantDelay(at)
	h.wantGens("1:serving")
	h.waitLine("shutdown delay: stopping at 03:04:08; gen 1 pid 1001 serving")
	evs := all(t, h.restart(RestartRequest{}))
	if res := result(t, evs); res.Outcome != RestartRefused || res.Reason != ErrStopping.Error() {
		t.Errorf("a restart asked for during the delay: %+v, want refused: relay is stopping", res)
	}
	h.noStart()
	h.sup.StopAfter(time.Hour) // a second one changes nothing
	h.wantDelay(at)
	h.clock.waitTimer(t, testShutdownDelay)
	h.clock.advance(testShutdownDelay - time.Millisecond)
	h.wantDelay(at)
	if got := p1.got(); len(got) != 0 {
		t.Errorf("during the delay the serving child got %q", got)
	}
	h.clock.advance(time.Millisecond)
	p1.waitSignals(t, "TERM")
	st := h.wantGens("1:stopping")
	if !st.Stopping || !st.ShutdownAt.IsZero() || st.Restarts.Refused != 1 {
		t.Errorf("after the delay: Stopping=%v ShutdownAt=%v refused=%d, want stopping, no ShutdownAt, 1 refused",
			st.Stopping, st.ShutdownAt, st.Restarts.Refused)
	}
	p1.exit(exited(7), false)
	if out, err := h.wait(); err != nil || out.Child.ExitCode() != 7 {
		t.Errorf("Run = %+v, %v; want generation 1's exit status 7", out, err)
	}
	if got := h.obs.milestones(); !slices.Equal(got, []string{"ready", "stopping"}) {
		t.Errorf("the Observer heard %q, want one stopping, at the delay's start", got)
	}
}

// A serving generation that crashes during the delay is still replaced:
// the delay is for serving.
func TestShutdownDelayReplacesACrash(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	at := h.clock.Now().Add(testShutdownDelay)
	h.sup.StopAfter(testShutdownDelay)
	h.wantDelay(at)
	p1.exit(exited(2), false)
	h.clock.waitTimer(t, testRestartBackoff)
	h.clock.advance(testRestartBackoff)
	p2 := h.started()
	h.check(2).pass()
	h.waitLine("shutdown delay: stopping at 03:04:08; gen 2 pid 1002 serving")
	if st := h.wantDelay(at); st.Restarts.Replacements != 1 {
		t.Errorf("restart counts %+v, want 1 replacement", st.Restarts)
	}
	h.clock.advance(at.Sub(h.clock.Now()))
	p2.waitSignals(t, "TERM")
	p2.exit(exited(0), false)
	if out, err := h.wait(); err != nil || out.Child.ExitCode() != 0 {
		t.Errorf("Run = %+v, %v; want generation 2's exit status 0", out, err)
	}
}

// Stop during the delay ends it: the graceful stop begins at once, and a
// Stop(now) after it kills, as without a delay. StopAfter(0) is Stop.
func TestStopEndsTheShutdownDelay(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	h.sup.StopAfter(testShutdownDelay)
	h.clock.waitTimer(t, testShutdownDelay)
	h.sup.Stop(false)
	p1.waitSignals(t, "TERM")
	if h.clock.pending(testShutdownDelay) {
		t.Error("the delay's timer is still pending after Stop")
	}
	if st := h.wantGens("1:stopping"); !st.Stopping || !st.ShutdownAt.IsZero() {
		t.Errorf("Stopping=%v ShutdownAt=%v, want the stop begun and no delay", st.Stopping, st.ShutdownAt)
	}
	h.sup.Stop(true)
	p1.waitSignals(t, "TERM", "group KILL")
	p1.exit(killed(syscall.SIGKILL), false)
	h.wait()
	if got := h.obs.milestones(); !slices.Equal(got, []string{"ready", "stopping"}) {
		t.Errorf("the Observer heard %q, want one stopping", got)
	}

	h = newHarness(t, nil)
	p1 = h.serving()
	h.sup.StopAfter(0)
	p1.waitSignals(t, "TERM")
	if st := h.wantGens("1:stopping"); !st.ShutdownAt.IsZero() {
		t.Errorf("StopAfter(0): ShutdownAt=%v, want none", st.ShutdownAt)
	}
}

// The delay refuses the queued restarts at once; the one under way goes
// on, and its new generation serves until the stop.
func TestShutdownDelayRefusesQueuedRestarts(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	events, p2, c := h.starting(RestartRequest{}, 2)
	queued := h.restart(RestartRequest{Reason: "second"})
	until(t, queued, PhaseQueued)
	h.sup.StopAfter(testShutdownDelay)
	if res := result(t, all(t, queued)); res.Outcome != RestartRefused || res.Reason != ErrStopping.Error() {
		t.Errorf("the queued restart: %+v, want refused: relay is stopping", res)
	}
	c.pass()
	until(t, events, PhaseDraining)
	h.clock.advance(testDrain)
	p1.waitSignals(t, "TERM")
	if res := result(t, until(t, events, PhaseDone)); res.Outcome != RestartOK || res.Generation != 2 {
		t.Errorf("the restart under way: %+v, want generation 2 ready", res)
	}
	p1.exit(exited(0), false)
	h.waitLine("shutdown delay: stopping at 03:04:08; gen 2 pid 1002 serving")
	h.clock.advance(testShutdownDelay - testDrain)
	p2.waitSignals(t, "TERM")
	p2.exit(exited(0), false)
	h.wait()
	if got := h.obs.milestones(); !slices.Equal(got, []string{"ready", "reloading", "stopping"}) {
		t.Errorf("the Observer heard %q, want no ready after the stopping", got)
	}
}
