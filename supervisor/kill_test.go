package supervisor

import (
	"errors"
	"slices"
	"testing"
)

// Who gets which signal when a generation stops (--kill-mode), what is
// left of a generation after its main process exited, and the hand-over of
// a hung generation's queue.

// retiring brings h to the stop signal of generation 1, replaced by a
// restart with no drain, and returns the two generations.
func retiring(h *harness) (old, p *fakeProc) {
	h.t.Helper()
	old = h.serving()
	events, p, c := h.starting(RestartRequest{}, 2)
	c.pass()
	until(h.t, events, PhaseDone)
	return old, p
}

// Under the default, mixed, the stop signal reaches the generation's main
// process alone, SIGCONT every process of it (its cgroup), and SIGKILL all
// of its cgroup after the stop timeout: a prefork master passes the stop
// on to its workers itself.
func TestKillModeMixedSignalsTheMainProcessAlone(t *testing.T) {
	t.Parallel()
	h := newHarnessContained(t, noDrain, true)
	old, _ := retiring(h)
	cg := h.cgroup(1)
	cg.setOthers(2) // its workers
	old.waitSeq(t, "TERM")
	h.waitLine("gen 1 pid 1001 stopping; gen 2 pid 1002 serving")
	if got := cg.got(); !slices.Equal(got, []string{"CONT"}) {
		t.Fatalf("the generation's cgroup got %q, want only the SIGCONT after the stop signal", got)
	}
	h.clock.waitTimer(t, testStopTimeout)
	h.clock.advance(testStopTimeout)
	h.waitLine("gen 2 pid 1002 serving")
	if got := cg.got(); !slices.Equal(got, []string{"CONT", "kill"}) {
		t.Errorf("the generation's cgroup got %q, want SIGCONT, then the kill of all of it at the stop timeout", got)
	}
	if got := old.got(); !slices.Equal(got, []string{"TERM"}) {
		t.Errorf("the main process got %q, want TERM alone (the kill is the cgroup's)", got)
	}
}

// Without cgroups, mixed is the same with the process group: the stop
// signal to the main process, SIGCONT to its group, SIGKILL to its group
// after the stop timeout.
func TestKillModeMixedWithoutCgroups(t *testing.T) {
	t.Parallel()
	h := newHarness(t, noDrain)
	old, _ := retiring(h)
	old.waitSeq(t, "TERM", "group CONT")
	h.clock.waitTimer(t, testStopTimeout)
	h.clock.advance(testStopTimeout)
	old.waitSeq(t, "TERM", "group CONT", "group KILL")
	if got := h.orphanSignals(); len(got) != 0 {
		t.Errorf("orphans got %q before any was adopted", got)
	}
}

// Under control-group, the stop signal and SIGCONT reach every process of
// the generation at once: its cgroup, or its process group and the
// orphans of it that left the group.
func TestKillModeControlGroupSignalsEveryProcess(t *testing.T) {
	t.Parallel()
	controlGroup := func(c *Config) { c.Drain, c.KillMode = 0, KillControlGroup }
	t.Run("cgroup", func(t *testing.T) {
		t.Parallel()
		h := newHarnessContained(t, controlGroup, true)
		old, _ := retiring(h)
		cg := h.cgroup(1)
		h.waitLine("gen 1 pid 1001 stopping; gen 2 pid 1002 serving")
		if got := cg.got(); !slices.Equal(got, []string{"TERM", "CONT"}) {
			t.Fatalf("the generation's cgroup got %q, want TERM then CONT", got)
		}
		if got := old.got(); len(got) != 0 {
			t.Errorf("the main process got %q on its own, want its cgroup's signals only", got)
		}
		h.clock.waitTimer(t, testStopTimeout)
		h.clock.advance(testStopTimeout)
		h.waitLine("gen 2 pid 1002 serving")
		if got := cg.got(); !slices.Equal(got, []string{"TERM", "CONT", "kill"}) {
			t.Errorf("the generation's cgroup got %q, want TERM, CONT, then the kill", got)
		}
	})
	t.Run("process group", func(t *testing.T) {
		t.Parallel()
		h := newHarness(t, controlGroup)
		h.adopt(1, 4242) // a daemon that left the group
		old, _ := retiring(h)
		old.waitSeq(t, "group TERM", "group CONT")
		h.clock.waitTimer(t, testStopTimeout)
		h.clock.advance(testStopTimeout)
		old.waitSeq(t, "group TERM", "group CONT", "group KILL")
		h.wantGens("1:stopping 2:serving") // a round trip: the kill event was handled
		if got, want := h.orphanSignals(), []string{"4242 TERM", "4242 CONT", "4242 KILL"}; !slices.Equal(got, want) {
			t.Errorf("the orphan got %q, want %q", got, want)
		}
		h.adopt(1) // killed and reaped
		h.orphaned()
	})
}

// --kill-mode takes systemd's names; the modes that would leave processes
// of a stopped generation running are refused with the reason.
func TestParseKillMode(t *testing.T) {
	t.Parallel()
	for _, v := range []string{"mixed", "control-group"} {
		if m, err := ParseKillMode(v); err != nil || string(m) != v {
			t.Errorf("ParseKillMode(%q) = %q, %v", v, m, err)
		}
	}
	for _, v := range []string{"process", "none", "", "Mixed", "cgroup"} {
		if _, err := ParseKillMode(v); err == nil {
			t.Errorf("ParseKillMode(%q) accepted it", v)
		}
	}
}

// What is left of an old generation after its main process exited is a
// generation still: listed by Status as exited with its processes, counted
// against --max-draining (the next restart waits for it), and the callers
// of the restart that retired it hear that it exited only once nothing of
// it is left.
func TestLingeringGenerationCountsUntilGone(t *testing.T) {
	t.Parallel()
	h := newHarnessContained(t, noDrain, true)
	p1 := h.serving()
	first, _, c := h.starting(RestartRequest{}, 2)
	c.pass()
	until(t, first, PhaseDone)
	cg := h.cgroup(1)
	cg.setOthers(1) // a daemon that ignores the stop signal
	p1.waitSignals(t, "TERM")
	p1.exit(exited(0), false)
	h.waitLine("gen 1 pid 1001 exited, processes left; gen 2 pid 1002 serving")
	select {
	case ev, ok := <-first:
		t.Fatalf("the restart's callers heard %+v (open %v) while the old generation had processes left", ev, ok)
	default:
	}
	st := h.wantGens("1:exited 2:serving")
	if g := st.Generations[0]; g.Processes != 1 || g.Pid != p1.id {
		t.Errorf("the lingering generation is listed as %+v, want pid %d with 1 process", g, p1.id)
	}

	second := h.restart(RestartRequest{})
	evs := until(t, second, PhaseWaitOld)
	if ev := evs[len(evs)-1]; ev.Generation != 1 {
		t.Errorf("the restart waits for generation %d, want 1, which has processes left", ev.Generation)
	}
	h.noStart()
	h.clock.waitTimer(t, testStopTimeout)
	h.clock.advance(testStopTimeout) // the kill empties the cgroup
	old := all(t, first)
	if len(old) != 1 || old[0].Phase != PhaseOldExit || old[0].Generation != 1 || old[0].Status != "exit status 0" {
		t.Errorf("after the old generation was gone, its restart's callers heard %+v, want its exit", old)
	}
	if !cg.wasRemoved() {
		t.Errorf("the empty cgroup was not removed")
	}
	h.started()
	h.check(3).pass()
	checkPhases(t, append(evs, until(t, second, PhaseDone)...),
		PhaseWaitOld, PhaseStarting, PhaseWaiting, PhaseReady, PhaseStopping, PhaseDone)
}

// liveReplaced brings h, with --liveness and the fake stall watch, to the
// drain of generation 1, replaced because it failed its liveness check,
// and returns it and the watch of its sockets stalling.
func liveReplaced(h *harness) (*fakeProc, *fakeCheck) {
	h.t.Helper()
	old := h.serving()
	h.failProbes(1, testLivenessFailures)
	h.clock.waitTimer(h.t, testRestartBackoff)
	h.clock.advance(testRestartBackoff)
	h.started()
	h.check(2).pass()
	stall := recv(h.t, h.stallC, "the watch of generation 1's sockets stalling")
	if stall.gen != 1 {
		h.t.Fatalf("watching generation %d's sockets stall, want 1", stall.gen)
	}
	h.waitLine("gen 1 pid 1001 draining; gen 2 pid 1002 serving")
	old.untouched(h.t, "the failed generation in its drain")
	return old, stall
}

// handedOverGens returns the generations env.handOver was called for.
func (h *harness) handedOverGens() []int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.handedOver)
}

// A generation replaced because it failed its liveness check drains as
// usual while it accepts; once connections wait on its sockets and it
// takes none (it hung), its sockets are handed over (what was queued on
// them moves to the new generation) and it gets its stop signal at once.
func TestLivenessReplacementHandsAStalledQueueOver(t *testing.T) {
	t.Parallel()
	h := newHarnessWith(t, withLiveness, harnessOpts{handOver: true})
	old, stall := liveReplaced(h)
	if got := h.handedOverGens(); len(got) != 0 {
		t.Fatalf("handed over generations %v before the old one stalled", got)
	}
	stall.pass()
	old.waitSignals(t, "TERM")
	h.waitLine("gen 1 pid 1001 stopping; gen 2 pid 1002 serving")
	if got := h.handedOverGens(); !slices.Equal(got, []int{1}) {
		t.Errorf("handed over the sockets of generations %v, want [1]", got)
	}
	if h.clock.pending(testDrain) {
		t.Errorf("the drain timer runs on after the hand-over")
	}
	h.logged("accepts nothing: its queued connections moved to the new generation")
}

// The stall watch never hands over a generation that accepts: its drain
// ends as usual and ends the watch.
func TestLivenessReplacementThatAcceptsDrains(t *testing.T) {
	t.Parallel()
	h := newHarnessWith(t, withLiveness, harnessOpts{handOver: true})
	old, stall := liveReplaced(h)
	h.clock.advance(testDrain)
	old.waitSignals(t, "TERM")
	recv(t, stall.ctx.Done(), "the end of the stall watch")
	if got := h.handedOverGens(); len(got) != 0 {
		t.Errorf("handed over generations %v, want none", got)
	}
}

// A requested restart is never handed over, and a liveness replacement
// whose hand-over failed drains on.
func TestHandOverOnlyForAStalledLivenessReplacement(t *testing.T) {
	t.Parallel()
	t.Run("requested", func(t *testing.T) {
		t.Parallel()
		h := newHarnessWith(t, nil, harnessOpts{handOver: true})
		old, _, _, _ := h.draining(RestartRequest{})
		old.untouched(t, "a generation in its drain")
		select {
		case c := <-h.stallC:
			t.Errorf("a requested restart watches generation %d's sockets stall", c.gen)
		default:
		}
	})
	t.Run("hand-over failed", func(t *testing.T) {
		t.Parallel()
		h := newHarnessWith(t, withLiveness, harnessOpts{handOver: true})
		h.handOverErr = errors.New("no migration")
		old, stall := liveReplaced(h)
		stall.pass()
		h.waitLog("it drains on")
		old.untouched(t, "a generation whose hand-over failed, in its drain")
		h.clock.advance(testDrain)
		old.waitSeq(t, "TERM", "group CONT")
	})
}
