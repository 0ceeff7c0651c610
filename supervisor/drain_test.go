package supervisor

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// watch waits for the watch of generation gen's sockets draining.
func (h *harness) watch(gen int) *fakeCheck {
	h.t.Helper()
	c := recv(h.t, h.drainC, fmt.Sprintf("the drain watch of generation %d", gen))
	if c.gen != gen {
		h.t.Fatalf("drain watch of generation %d, want %d", c.gen, gen)
	}
	return c
}

func newAdaptive(t *testing.T) *harness {
	return newHarnessWith(t, nil, harnessOpts{adaptive: true})
}

// eventOf returns the first event of phase in evs.
func eventOf(t *testing.T, evs []Event, phase Phase) Event {
	t.Helper()
	for _, ev := range evs {
		if ev.Phase == phase {
			return ev
		}
	}
	t.Fatalf("no %s event in %v", phase, phases(evs))
	return Event{}
}

// ended checks the watch was told to stop: its context ended.
func ended(t *testing.T, c *fakeCheck) {
	t.Helper()
	recv(t, c.ctx.Done(), "the drain watch to be cancelled")
}

// The old generation gets its stop signal as soon as its sockets are
// empty, long before --drain.
func TestAdaptiveDrainStopsTheOldOnceItsSocketsAreEmpty(t *testing.T) {
	t.Parallel()
	h := newAdaptive(t)
	old, _, evs, events := h.draining(RestartRequest{})
	if ev := eventOf(t, evs, PhaseDraining); ev.Until != DrainAdaptive || ev.Duration != testDrain || ev.Generation != 1 {
		t.Errorf("draining event %+v, want generation 1 adaptive within %s", ev, testDrain)
	}
	w := h.watch(1)
	h.wantGens("1:draining 2:serving")
	if got := old.got(); len(got) != 0 {
		t.Errorf("the old generation got %q before its sockets were empty", got)
	}
	h.clock.advance(testDrain / 4)
	w.pass()
	old.waitSignals(t, "TERM")
	evs = until(t, events, PhaseDone)
	if ev := eventOf(t, evs, PhaseStopping); ev.Ended != EndedEmpty || ev.Duration != testDrain/4 {
		t.Errorf("stopping event %+v, want drained empty after %s", ev, testDrain/4)
	}
	if h.clock.pending(testDrain) {
		t.Error("the --drain timer is still pending after the drain ended")
	}
	if log := h.logs.String(); !strings.Contains(log, `msg="old generation drained" gen=1 pid=1001 drain=500ms ended=empty`) {
		t.Errorf("no drained line with the drain it took in the log:\n%s", log)
	}
	if res := result(t, evs); res.Outcome != RestartOK || res.Generation != 2 {
		t.Errorf("result %+v, want generation 2 serving", res)
	}
}

// Sockets that never empty (an old child that stopped accepting) hold the
// old generation for --drain at most.
func TestAdaptiveDrainEndsAtItsMaximum(t *testing.T) {
	t.Parallel()
	h := newAdaptive(t)
	old, _, _, events := h.draining(RestartRequest{})
	w := h.watch(1)
	stoppedAt(t, h, old, events, EndedMax)
	ended(t, w)
}

// stoppedAt lets --drain pass, and checks that the old generation got its
// stop signal then, and that the stopping event says how the drain ended.
func stoppedAt(t *testing.T, h *harness, old *fakeProc, events <-chan Event, ended DrainEnd) {
	t.Helper()
	h.clock.waitTimer(t, testDrain)
	h.clock.advance(testDrain)
	old.waitSignals(t, "TERM")
	if ev := eventOf(t, until(t, events, PhaseDone), PhaseStopping); ev.Ended != ended || ev.Duration != testDrain {
		t.Errorf("stopping event %+v, want drain %s after %s", ev, ended, testDrain)
	}
}

// A watch that fails leaves the drain to --drain: never a stop signal
// before the sockets were seen empty.
func TestFailedDrainWatchWaitsForTheMaximum(t *testing.T) {
	t.Parallel()
	h := newAdaptive(t)
	old, _, _, events := h.draining(RestartRequest{})
	h.watch(1).fail(errors.New("netlink: no buffer space"))
	h.waitLog("cannot see the old generation's sockets empty")
	if got := old.got(); len(got) != 0 {
		t.Errorf("the old generation got %q after the watch failed", got)
	}
	stoppedAt(t, h, old, events, EndedMax)
}

// relay's stop during the drain ends the watch.
func TestStopDuringAdaptiveDrainEndsTheWatch(t *testing.T) {
	t.Parallel()
	h := newAdaptive(t)
	old, p, _, _ := h.draining(RestartRequest{})
	w := h.watch(1)
	h.sup.Stop(false)
	ended(t, w)
	old.waitSignals(t, "TERM")
	p.waitSignals(t, "TERM")
}

// A new generation that fails in its drain window gives the old one back
// and ends the watch.
func TestExitDuringAdaptiveDrainEndsTheWatch(t *testing.T) {
	t.Parallel()
	h := newAdaptive(t)
	old, p, _, events := h.draining(RestartRequest{})
	w := h.watch(1)
	p.exit(exited(3), false)
	ended(t, w)
	if res := result(t, until(t, events, PhaseDone)); res.Outcome == RestartOK {
		t.Errorf("result %+v, want rolled back", res)
	}
	h.wantGens("1:serving")
	if got := old.got(); len(got) != 0 {
		t.Errorf("the old generation got %q", got)
	}
}

// Without a watch, the drain is the fixed --drain, and says so.
func TestFixedDrainSaysSo(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	old, _, evs, events := h.draining(RestartRequest{})
	if ev := eventOf(t, evs, PhaseDraining); ev.Until != DrainFixed {
		t.Errorf("draining event %+v, want fixed", ev)
	}
	stoppedAt(t, h, old, events, EndedFixed)
}
