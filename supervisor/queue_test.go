package supervisor

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

func noDrain(c *Config) { c.Drain = 0 }

// Restart requests made during a restart are coalesced into one more
// restart, and each caller gets the outcome of a restart that began after
// it asked.
func TestRestartsDuringARestartAreCoalesced(t *testing.T) {
	t.Parallel()
	h := newHarness(t, noDrain)
	h.run()
	first := h.started()
	const callers = 5
	var followers []<-chan Event
	for range callers {
		events := h.restart(RestartRequest{})
		until(t, events, PhaseQueued)
		followers = append(followers, events)
	}
	if st := h.wantGens("1:starting"); st.Restarts.QueuedRestarts != 1 || !st.Restarts.Queued || !st.Restarts.InProgress {
		t.Errorf("restart counts %+v, want the first start in progress and one restart queued", st.Restarts)
	}
	h.check(1).pass()
	second := h.started()
	h.check(2).pass()
	first.waitSignals(t, "TERM")
	first.exit(killed(syscall.SIGTERM), false)
	for i, events := range followers {
		evs := all(t, events)
		checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseReady, PhaseStopping, PhaseDone, PhaseOldExit)
		if res := result(t, evs); res.Outcome != RestartOK || res.Generation != 2 || res.Pid != second.id {
			t.Errorf("caller %d got %+v, want generation 2 ready", i, res)
		}
	}
	h.noStart()
	if st := h.wantGens("2:serving"); st.Restarts.OK != 1 {
		t.Errorf("restart counts %+v, want the one restart counted once", st.Restarts)
	}
}

// Requests for different commands are not merged: each runs, in order, and
// each caller is told what ran.
func TestDifferentRestartsAreQueuedInOrder(t *testing.T) {
	t.Parallel()
	h := newHarness(t, noDrain)
	h.run()
	p1 := h.started()
	other := &Command{Path: "/srv/server", Args: []string{"server", "-version", "2"}}
	plain1 := h.restart(RestartRequest{Reason: "plain-1"})
	until(t, plain1, PhaseQueued)
	otherEv := h.restart(RestartRequest{Reason: "other", Command: other})
	until(t, otherEv, PhaseQueued)
	plain2 := h.restart(RestartRequest{Reason: "plain-2"})
	until(t, plain2, PhaseQueued)
	if st := h.wantGens("1:starting"); st.Restarts.QueuedRestarts != 2 {
		t.Errorf("%d restarts queued, want 2", st.Restarts.QueuedRestarts)
	}
	h.check(1).pass()
	p2 := h.started()
	h.check(2).pass()
	p1.waitSignals(t, "TERM")
	p1.exit(exited(0), false)
	p3 := h.started()
	if got := strings.Join(p3.argv, " "); !strings.HasSuffix(got, " /srv/server server -version 2") {
		t.Errorf("generation 3 ran %q, want the other command", got)
	}
	h.check(3).pass()
	p2.waitSignals(t, "TERM")
	p2.exit(exited(0), false)
	for name, c := range map[string]struct {
		events <-chan Event
		gen    int
		cmd    string
	}{"plain-1": {plain1, 2, "server -version 1"}, "plain-2": {plain2, 2, "server -version 1"}, "other": {otherEv, 3, "server -version 2"}} {
		r := result(t, all(t, c.events))
		if r.Outcome != RestartOK || r.Generation != c.gen || strings.Join(r.Command, " ") != c.cmd {
			t.Errorf("%s: %+v, want generation %d running %q", name, r, c.gen, c.cmd)
		}
	}
	st := h.wantGens("3:serving")
	if !slices.Equal(st.Command, other.Args) || st.Restarts.OK != 2 {
		t.Errorf("status %+v, want the other command serving after two restarts", st)
	}
}

// At most maxQueued different restarts wait; one more is refused, and one
// that asks what a queued one asks still joins it.
func TestTooManyQueuedRestartsAreRefused(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	h.run()
	h.started()
	numbered := func(i int) RestartRequest {
		return RestartRequest{Command: &Command{Path: "/srv/server", Args: []string{"server", "-n", strconv.Itoa(i)}}}
	}
	for i := range maxQueued {
		until(t, h.restart(numbered(i)), PhaseQueued)
	}
	evs := all(t, h.restart(numbered(maxQueued)))
	checkPhases(t, evs, PhaseQueued, PhaseDone)
	want := fmt.Sprintf("%d different restarts are queued already; try again later", maxQueued)
	if res := result(t, evs); res.Outcome != RestartRefused || res.Reason != want {
		t.Errorf("result %+v, want refused because %q", res, want)
	}
	same := h.restart(numbered(0))
	until(t, same, PhaseQueued)
	if st := h.wantGens("1:starting"); st.Restarts.QueuedRestarts != maxQueued {
		t.Errorf("%d restarts queued, want %d", st.Restarts.QueuedRestarts, maxQueued)
	}
	select {
	case ev := <-same:
		t.Errorf("a request like a queued one got %+v, want it to wait with it", ev)
	default:
	}
}

// A restart refused when it is asked for, because the queue is full or
// relay is stopping, counts with the refused ones in relay status.
func TestRefusedRestartRequestsAreCounted(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	h.run()
	p1 := h.started()
	numbered := func(i int) RestartRequest {
		return RestartRequest{Command: &Command{Path: "/srv/server", Args: []string{"server", "-n", strconv.Itoa(i)}}}
	}
	for i := range maxQueued {
		until(t, h.restart(numbered(i)), PhaseQueued)
	}
	for i := range 2 {
		if res := result(t, all(t, h.restart(numbered(maxQueued+i)))); res.Outcome != RestartRefused {
			t.Fatalf("restart %d past a full queue: %+v, want refused", i, res)
		}
	}
	if st := h.wantGens("1:starting"); st.Restarts.Refused != 2 || st.Restarts.OK != 0 || st.Restarts.RolledBack != 0 {
		t.Errorf("restart counts %+v, want the 2 refused past the full queue", st.Restarts)
	}
	h.sup.Stop(false)
	before, err := h.sup.Status()
	if err != nil {
		t.Fatal(err)
	}
	if res := result(t, all(t, h.restart(RestartRequest{}))); res.Outcome != RestartRefused || res.Reason != ErrStopping.Error() {
		t.Errorf("a restart asked for during the stop: %+v, want refused", res)
	}
	after, err := h.sup.Status()
	if err != nil {
		t.Fatal(err)
	}
	if after.Restarts.Refused != before.Restarts.Refused+1 {
		t.Errorf("refused %d before and %d after a restart refused during the stop, want one more", before.Restarts.Refused, after.Restarts.Refused)
	}
	p1.waitSignals(t, "TERM")
	p1.exit(exited(0), false)
	h.wait()
}

// waitingForOld brings h, with --max-draining 1 and no drain, to a second
// restart that waits: generation 1 got its stop signal but lives on, and
// generation 2 serves. It returns the two, the two restarts' events, and
// those of the second so far.
func waitingForOld(h *harness) (p1, p2 *fakeProc, first, second <-chan Event, evs []Event) {
	h.t.Helper()
	p1 = h.serving()
	first, p2, c := h.starting(RestartRequest{}, 2)
	c.pass()
	until(h.t, first, PhaseDone)
	p1.waitSignals(h.t, "TERM") // it takes its time to stop
	second = h.restart(RestartRequest{})
	return p1, p2, first, second, until(h.t, second, PhaseWaitOld)
}

// With --max-draining old generations still alive, a restart waits for
// one of them to exit before it starts its new generation.
func TestMaxDrainingWaitsForTheOldToExit(t *testing.T) {
	t.Parallel()
	h := newHarness(t, noDrain)
	p1, p2, first, second, evs := waitingForOld(h)
	if ev := evs[0]; ev.Generation != 1 || ev.Pid != p1.id {
		t.Errorf("waiting for %+v, want generation 1", ev)
	}
	h.noStart()
	h.waitLine("gen 1 pid 1001 stopping; gen 2 pid 1002 serving; restart waiting for an old generation to be gone")
	p1.exit(exited(0), false)
	all(t, first)
	p3 := h.started()
	h.check(3).pass()
	evs = append(evs, until(t, second, PhaseDone)...)
	checkPhases(t, evs, PhaseWaitOld, PhaseStarting, PhaseWaiting, PhaseReady, PhaseStopping, PhaseDone)
	if res := result(t, evs); res.Outcome != RestartOK || res.Pid != p3.id {
		t.Errorf("result %+v, want generation 3 ready", res)
	}
	p2.waitSignals(t, "TERM")
}

// A restart waiting for an old generation need not wait once nothing
// serves: it starts when the serving one crashes.
func TestMaxDrainingWaitEndsWhenNothingServes(t *testing.T) {
	t.Parallel()
	h := newHarness(t, noDrain)
	_, p2, _, second, _ := waitingForOld(h)
	p2.exit(exited(1), false)
	h.started()
	h.check(3).pass()
	evs := until(t, second, PhaseDone)
	checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseReady, PhaseDone)
	if res := result(t, evs); res.Outcome != RestartOK || res.Generation != 3 {
		t.Errorf("result %+v, want generation 3 ready", res)
	}
	st := h.wantGens("1:stopping 3:serving")
	if st.Restarts.Replacements != 0 {
		t.Errorf("%d crash replacements, want the restart under way to take its place", st.Restarts.Replacements)
	}
}
