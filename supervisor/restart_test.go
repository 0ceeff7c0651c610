package supervisor

import (
	"context"
	"errors"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A new generation that passes its check serves at once; the old one
// drains for --drain, then gets its stop signal, and the caller hears of
// every step and of the old one's exit.
func TestRestartReadyDrainsThenStopsTheOld(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	old, p, evs, events := h.draining(RestartRequest{})
	h.wantGens("1:draining 2:serving")
	if got := old.got(); len(got) != 0 {
		t.Errorf("the old generation got %q during its drain, want nothing", got)
	}
	h.clock.waitTimer(t, testDrain)
	h.clock.advance(testDrain)
	old.waitSignals(t, "TERM")
	evs = append(evs, until(t, events, PhaseDone)...)
	if res := result(t, evs); res.Outcome != RestartOK || res.Generation != 2 || res.Pid != p.id || !slices.Equal(res.Command, testCommand.Args) {
		t.Errorf("result %+v, want generation 2 (pid %d) running %q", res, p.id, testCommand.Args)
	}
	old.exit(exited(0), false)
	evs = append(evs, all(t, events)...)
	checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseReady, PhaseDraining, PhaseStopping, PhaseDone, PhaseOldExit)
	if last := evs[len(evs)-1]; last.Generation != 1 || last.Pid != old.id || last.Status != "exit status 0" {
		t.Errorf("old exit event %+v, want generation 1 pid %d exit status 0", last, old.id)
	}
	h.waitLine("gen 2 pid 1002 serving")
	st := h.wantGens("2:serving")
	if st.Restarts.OK != 1 || st.Restarts.RolledBack != 0 || st.Restarts.InProgress {
		t.Errorf("restart counts %+v, want one ok and none in progress", st.Restarts)
	}
	if got := p.got(); len(got) != 0 {
		t.Errorf("the new generation got %q", got)
	}
}

// rolledBack checks a restart whose new generation failed: the caller is
// told why, and the old generation was never touched and still serves.
func rolledBack(t *testing.T, h *harness, evs []Event, old *fakeProc, reason string) Result {
	t.Helper()
	checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseDone)
	res := result(t, evs)
	if res.Outcome != RestartRolledBack || res.Generation != 2 || !strings.Contains(res.Reason, reason) {
		t.Errorf("result %+v, want generation 2 rolled back because %q", res, reason)
	}
	if got := old.got(); len(got) != 0 {
		t.Errorf("the old generation got %q, want nothing", got)
	}
	st := h.wantGens("1:serving")
	if st.Restarts.RolledBack != 1 || st.LastRestart == nil || st.LastRestart.Reason != res.Reason {
		t.Errorf("status %+v, want one restart rolled back, the last one", st.Restarts)
	}
	return res
}

// A new generation that fails its check is killed and rolled back.
func TestFailedCheckRollsBack(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	old := h.serving()
	events, p, c := h.starting(RestartRequest{}, 2)
	c.fail(errors.New("GET /healthz: 503 Service Unavailable"))
	p.waitSignals(t, "group KILL")
	p.exit(killed(syscall.SIGKILL), false)
	rolledBack(t, h, all(t, events), old, "503 Service Unavailable")
}

// A new generation not ready within --health-timeout is killed and rolled
// back, and the reason says so.
func TestHealthTimeoutRollsBack(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	old := h.serving()
	events, p, _ := h.starting(RestartRequest{}, 2) // its check never answers
	h.clock.waitTimer(t, testHealthTimeout)
	h.clock.advance(testHealthTimeout)
	p.waitSignals(t, "group KILL")
	p.exit(killed(syscall.SIGKILL), false)
	res := rolledBack(t, h, all(t, events), old, "not ready within --health-timeout 1m0s")
	if !strings.Contains(res.Reason, context.DeadlineExceeded.Error()) {
		t.Errorf("reason %q does not say the check's deadline passed", res.Reason)
	}
}

// A new generation that exits before it is ready is rolled back with its
// status and the end of its stderr.
func TestExitBeforeReadyRollsBack(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	h.holdStderr = true
	old := h.serving()
	events, p, _ := h.starting(RestartRequest{}, 2)
	p.writeStderr(t, "starting\nopening database: permission denied\n")
	p.closeStderr()
	p.exit(exited(3), false)
	res := rolledBack(t, h, all(t, events), old, "exited before it was ready: exit status 3")
	if res.StderrTail != "starting\nopening database: permission denied" {
		t.Errorf("stderr tail %q, want the child's last lines", res.StderrTail)
	}
	if got := p.got(); len(got) != 0 {
		t.Errorf("the exited generation got %q, want nothing", got)
	}
}

// A child that exits while its check is passing is never promoted, even
// when the report of its exit waits for a process that keeps its stderr
// open: the exit rolls it back once stderrGrace has passed.
func TestExitedChildIsNeverPromoted(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	h.holdStderr = true // as a grandchild in a session of its own would
	h.begin()
	p := h.started()
	c := h.check(1)
	p.exit(exited(0), false)
	c.pass()
	h.step(checkEvent{}) // the check's outcome arrives first
	if g := h.sup.gens.serving; g != nil {
		t.Fatalf("generation %d was promoted after its child exited", g.n)
	}
	h.clock.waitTimer(t, stderrGrace)
	h.clock.advance(stderrGrace)
	h.step(exitEvent{})
	if err := h.sup.stop.fatal; err == nil || !strings.Contains(err.Error(), "exited before it was ready") {
		t.Fatalf("Run would end with %v, want the first generation rolled back as exited", err)
	}
	if !h.sup.finished() {
		t.Errorf("the supervisor goes on after its first generation failed")
	}
}

// A new generation that exits in its drain window while the old one still
// drains fails the restart, and the old one serves again, untouched, with
// its command.
func TestExitDuringDrainGivesBackToTheOld(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	next := &Command{Path: "/srv/server2", Args: []string{"server", "-version", "2"}}
	old, p, _, events := h.draining(RestartRequest{Command: next})
	p.exit(exited(1), false)
	res := result(t, all(t, events))
	if res.Outcome == RestartOK || res.Reason != "exited during the drain window: exit status 1" {
		t.Errorf("result %+v, want the restart rolled back as exited during the drain", res)
	}
	st := h.wantGens("1:serving")
	if !slices.Equal(st.Command, testCommand.Args) {
		t.Errorf("command %q after the rollback, want the old one's %q", st.Command, testCommand.Args)
	}
	h.clock.advance(testDrain) // the drain timer was stopped
	if got := old.got(); len(got) != 0 {
		t.Errorf("the old generation got %q, want nothing", got)
	}
	if h.clock.pending(testRestartBackoff) {
		t.Errorf("a replacement is pending while the old generation serves")
	}
}

// A new generation that exits in its drain window after the old one has
// gone leaves nothing serving: the restart failed and a replacement
// follows after the backoff.
func TestExitDuringDrainAfterTheOldLeftIsReplaced(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	old, p, _, events := h.draining(RestartRequest{})
	old.exit(exited(0), false) // it finished before its drain ended
	h.waitLine("gen 2 pid 1002 serving")
	p.exit(exited(1), false)
	res := result(t, all(t, events))
	if res.Outcome == RestartOK || res.Reason != "exited during the drain window: exit status 1" {
		t.Errorf("result %+v, want the restart rolled back as exited during the drain", res)
	}
	h.waitLine("no generation serving; replacement pending; last restart rolled back: exited during the drain window: exit status 1")
	h.clock.advance(testRestartBackoff)
	h.started()
	h.check(3).pass()
	h.waitLine("gen 3 pid 1003 serving; last restart rolled back: exited during the drain window: exit status 1")
	st := h.wantGens("3:serving")
	if st.Restarts.Replacements != 1 || st.Restarts.RolledBack != 1 {
		t.Errorf("restart counts %+v, want one rolled back and one replacement", st.Restarts)
	}
	if got := old.got(); len(got) != 0 {
		t.Errorf("the old generation got %q, want nothing", got)
	}
}

// A failing pre-flight check refuses the restart: nothing starts and the
// serving generation is untouched.
func TestFailedPreflightRefuses(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	old := h.serving()
	events := h.restart(RestartRequest{Check: []string{"make", "test"}})
	c := recv(t, h.preflightC, "the pre-flight check")
	if !slices.Equal(c.argv, []string{"make", "test"}) {
		t.Errorf("pre-flight command %q, want make test", c.argv)
	}
	c.fail(errors.New("make test: exit status 2: FAIL"))
	evs := all(t, events)
	checkPhases(t, evs, PhaseChecking, PhaseDone)
	if res := result(t, evs); res.Outcome != RestartRefused || res.Reason != "pre-flight check failed: make test: exit status 2: FAIL" {
		t.Errorf("result %+v, want refused by the pre-flight check", res)
	}
	h.noStart()
	st := h.wantGens("1:serving")
	if st.Restarts.Refused != 1 {
		t.Errorf("restart counts %+v, want one refused", st.Restarts)
	}
	if got := old.got(); len(got) != 0 {
		t.Errorf("the serving generation got %q, want nothing", got)
	}
	if got, want := h.obs.milestones(), []string{"ready", "reloading", "ready"}; !slices.Equal(got, want) {
		t.Errorf("the Observer heard %q, want %q", got, want)
	}
}

// A passing pre-flight check (Config.Check, for a request that names none)
// lets the restart go on.
func TestPassedPreflightStarts(t *testing.T) {
	t.Parallel()
	h := newHarness(t, func(c *Config) { c.Check = []string{"make", "check"} })
	h.serving()
	if err := h.sup.RequestRestart("signal HUP"); err != nil {
		t.Fatal(err)
	}
	c := recv(t, h.preflightC, "the pre-flight check")
	if !slices.Equal(c.argv, []string{"make", "check"}) {
		t.Errorf("pre-flight command %q, want Config.Check", c.argv)
	}
	h.noStart()
	c.pass()
	h.started()
	h.check(2).pass()
	h.waitLine("gen 1 pid 1001 draining; gen 2 pid 1002 serving")
}

// The Observer hears each milestone and status line, in order.
func TestObserverHearsMilestonesInOrder(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	old, p, _, events := h.draining(RestartRequest{})
	h.clock.waitTimer(t, testDrain)
	h.clock.advance(testDrain)
	old.waitSignals(t, "TERM")
	until(t, events, PhaseDone)
	old.exit(exited(0), false)
	all(t, events)
	h.sup.Stop(false)
	p.waitSignals(t, "TERM")
	p.exit(exited(0), false)
	h.wait()
	want := []string{
		"status: gen 1 pid 1001 starting",
		"ready",
		"status: gen 1 pid 1001 serving",
		"reloading",
		"status: gen 1 pid 1001 serving; gen 2 pid 1002 starting",
		"status: gen 1 pid 1001 draining; gen 2 pid 1002 serving",
		"ready",
		"status: gen 1 pid 1001 stopping; gen 2 pid 1002 serving",
		"status: gen 2 pid 1002 serving",
		"stopping",
		"status: stopping; gen 2 pid 1002 stopping",
		"status: stopping",
	}
	if got := h.obs.history(); !slices.Equal(got, want) {
		t.Errorf("the Observer heard\n%q\nwant\n%q", got, want)
	}
}

// Status reports each live generation with its age and readiness on the
// supervisor's clock.
func TestStatusReportsTheGenerations(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	h.run()
	h.started()
	c := h.check(1)
	h.clock.advance(1500 * time.Millisecond)
	c.pass()
	h.waitLine("gen 1 pid 1001 serving")
	h.clock.advance(5 * time.Second)
	h.starting(RestartRequest{}, 2)
	st := h.wantGens("1:serving 2:starting")
	g := st.Generations[0]
	if g.Pid != 1001 || g.ReadyAfter != 1500*time.Millisecond || st.At.Sub(g.Started) != 6500*time.Millisecond || !slices.Equal(g.Command, testCommand.Args) {
		t.Errorf("serving generation %+v, want pid 1001 ready after 1500ms, 6.5s old", g)
	}
	if n := st.Generations[1]; n.Pid != 1002 || n.ReadyAfter != 0 || st.At.Sub(n.Started) != 0 {
		t.Errorf("starting generation %+v, want pid 1002, not ready, just started", n)
	}
	if !st.Restarts.InProgress || st.Stopping {
		t.Errorf("status %+v, want a restart in progress", st)
	}
}
