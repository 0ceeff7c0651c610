package supervisor

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The confirmation window (confirm.go), on the harness: which generation
// serves, which is warm, who gets a stop signal and when, what the callers
// following the restart hear, and what is counted.
//
// The steering program's switches are not seen here: Config.Sockets is a
// *sockets.Set, empty in the harness, whose Switch does nothing, and no
// fake of it records the calls. Which generation new connections go to is
// asserted as the state the supervisor keeps: the Serving one.

// testConfirm is the test's --confirm, distinct from the other timers; its
// probes on trial time out after minTrialTimeout, not testTrial;
// probes on trial come every testTrial, a tenth of it, which is shorter
// than testLivenessInterval.
const (
	testConfirm = 15 * time.Second
	testTrial   = testConfirm / 10
)

func withConfirm(c *Config) { c.Confirm = testConfirm }

func withConfirmAndLiveness(c *Config) {
	withConfirm(c)
	withLiveness(c)
}

// confirming makes a first generation serve, then restarts it with req
// into the confirmation window, and returns both generations and the
// restart's events so far and to come.
func (h *harness) confirming(req RestartRequest) (old, p *fakeProc, seen []Event, events <-chan Event) {
	h.t.Helper()
	old = h.serving()
	events, p, c := h.starting(req, 2)
	c.pass()
	return old, p, until(h.t, events, PhaseConfirming), events
}

// notify sends msg to generation gen's notify socket, as the child's
// sd_notify does.
func (h *harness) notify(gen int, msg string) {
	h.t.Helper()
	path := filepath.Join(h.sup.cfg.RuntimeDir, fmt.Sprintf("gen-%d.notify", gen))
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		h.t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(msg)); err != nil {
		h.t.Fatal(err)
	}
}

// trialProbe waits for the next liveness probe of a generation on trial,
// which must come testTrial after the last one (or after the switch), not
// a moment before, and checks that it is of generation gen.
func (h *harness) trialProbe(gen int) *fakeCheck {
	h.t.Helper()
	h.clock.waitTimer(h.t, testTrial)
	if h.clock.pending(testLivenessInterval) {
		h.t.Errorf("a probe after --liveness-interval is pending for the generation on trial")
	}
	h.clock.advance(testTrial - 1)
	if !h.clock.pending(testTrial) {
		h.t.Fatalf("the probe on trial came before %s", testTrial)
	}
	h.clock.advance(1)
	c := recv(h.t, h.probeC, "a liveness probe on trial")
	if c.gen != gen {
		h.t.Fatalf("liveness probe of generation %d, want %d", c.gen, gen)
	}
	return c
}

// wantCounts checks the restart counts: ok and rolled back, and of those
// rolled back, those after their switch by cause.
func (h *harness) wantCounts(ok, rolledBack int, afterSwitch map[RollbackCause]int) Status {
	h.t.Helper()
	st, err := h.sup.Status()
	if err != nil {
		h.t.Fatal(err)
	}
	r := st.Restarts
	if r.OK != ok || r.RolledBack != rolledBack || !maps.Equal(r.AfterSwitch, afterSwitch) {
		h.t.Errorf("restart counts %+v, want %d ok, %d rolled back, after their switch %v", r, ok, rolledBack, afterSwitch)
	}
	return st
}

// wantNothingWarm checks that Rollback fails with ErrNothingWarm and says
// why (want), and that it changed nothing: the generations are still gens.
func (h *harness) wantNothingWarm(want, gens string) {
	h.t.Helper()
	rolled, err := h.sup.Rollback()
	if !errors.Is(err, ErrNothingWarm) || !strings.Contains(err.Error(), want) || rolled != (Rolled{}) {
		h.t.Errorf("Rollback = %+v, %v; want ErrNothingWarm saying %q", rolled, err, want)
	}
	h.wantGens(gens)
}

// noWindow checks that no confirmation window is open: none in the
// status, and no window's end pending.
func (h *harness) noWindow() {
	h.t.Helper()
	st, err := h.sup.Status()
	if err != nil {
		h.t.Fatal(err)
	}
	if st.Confirm != nil {
		h.t.Errorf("status has a confirmation window %+v, want none", *st.Confirm)
	}
	if h.clock.pending(testConfirm) {
		h.t.Errorf("the end of a confirmation window is pending")
	}
}

// drainToDone lets the drain of generation p, the old one of the restart
// that events follow, run its --drain: p gets its stop signal at its end,
// not a moment before. It returns the restart's events up to its done.
func (h *harness) drainToDone(p *fakeProc, events <-chan Event) []Event {
	h.t.Helper()
	h.clock.waitTimer(h.t, testDrain)
	h.clock.advance(testDrain - 1)
	p.untouched(h.t, fmt.Sprintf("generation pid %d just before its drain's end", p.id))
	h.clock.advance(1)
	p.waitSignals(h.t, "TERM")
	return until(h.t, events, PhaseDone)
}

// Config.trialInterval is a tenth of the window, at least minTrialInterval
// and at most --liveness-interval.
func TestConfirmTrialInterval(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		confirm, interval, want time.Duration
	}{
		{testConfirm, testLivenessInterval, testTrial},
		{500 * time.Millisecond, testLivenessInterval, minTrialInterval},
		{10 * time.Minute, testLivenessInterval, testLivenessInterval},
	} {
		cfg := Config{Confirm: c.confirm, LivenessInterval: c.interval}
		if got := cfg.trialInterval(); got != c.want {
			t.Errorf("trialInterval for --confirm %s, --liveness-interval %s: %s, want %s", c.confirm, c.interval, got, c.want)
		}
	}
}

// A window that passes quietly confirms the new generation: only then does
// the warm one drain, and only after its drain does it get its stop
// signal.
func TestConfirmQuietWindowEndDrainsThenStopsTheWarm(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withConfirm)
	old, p, evs, events := h.confirming(RestartRequest{})
	if ev := eventOf(t, evs, PhaseConfirming); ev.Generation != 1 || ev.Pid != old.id || ev.Duration != testConfirm {
		t.Errorf("confirming event %+v, want generation 1 (pid %d) warm for %s", ev, old.id, testConfirm)
	}
	h.wantGens("1:warm 2:serving")
	// The reload a service manager follows ends at the switch (Observer).
	if got, want := h.obs.milestones(), []string{"ready", "reloading", "ready"}; !slices.Equal(got, want) {
		t.Errorf("in the window the Observer heard %q, want %q", got, want)
	}
	h.clock.waitTimer(t, testConfirm)
	h.clock.advance(testConfirm - 1)
	h.wantGens("1:warm 2:serving")
	old.untouched(t, "the warm generation just before the window's end")
	// The drain has not begun: relay rollback would still find it warm.
	if h.clock.pending(testDrain) {
		t.Errorf("the drain timer runs during the window")
	}
	h.clock.advance(1)
	evs = append(evs, until(t, events, PhaseDraining)...)
	if ev := eventOf(t, evs, PhaseConfirmed); ev.Generation != 2 || ev.Pid != p.id || ev.Cause != string(ConfirmedQuiet) || ev.Duration != testConfirm {
		t.Errorf("confirmed event %+v, want generation 2 confirmed by the window's end after %s", ev, testConfirm)
	}
	if ev := eventOf(t, evs, PhaseDraining); ev.Generation != 1 || ev.Pid != old.id || ev.Duration != testDrain || ev.Until != DrainFixed {
		t.Errorf("draining event %+v, want generation 1 draining for %s", ev, testDrain)
	}
	h.wantGens("1:draining 2:serving")
	old.untouched(t, "the confirmed generation's predecessor in its drain")
	h.noWindow()
	h.wantNothingWarm("generation 2 was confirmed, and generation 1 drains and stops", "1:draining 2:serving")
	evs = append(evs, h.drainToDone(old, events)...)
	if ev := eventOf(t, evs, PhaseStopping); ev.Generation != 1 || ev.Ended != EndedFixed || ev.Duration != testDrain {
		t.Errorf("stopping event %+v, want generation 1 stopped after its %s drain", ev, testDrain)
	}
	if res := result(t, evs); res.Outcome != RestartOK || res.Generation != 2 || res.Pid != p.id || res.Reason != "" {
		t.Errorf("result %+v, want generation 2 (pid %d) ok", res, p.id)
	}
	old.exit(exited(0), false)
	evs = append(evs, all(t, events)...)
	checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseReady, PhaseConfirming, PhaseConfirmed, PhaseDraining, PhaseStopping, PhaseDone, PhaseOldExit)
	h.waitLine("gen 2 pid 1002 serving")
	h.wantCounts(1, 0, nil)
	h.wantNothingWarm("the last restart (generation 2) was confirmed", "2:serving")
	p.untouched(t, "the confirmed generation")
	// Ready again as the restart ends.
	if got, want := h.obs.milestones(), []string{"ready", "reloading", "ready", "ready"}; !slices.Equal(got, want) {
		t.Errorf("the Observer heard %q, want %q", got, want)
	}
}

// A new generation that exits in its window rolls its restart back at once:
// the warm one serves again, untouched, with its command, and nothing
// drains.
func TestConfirmNewExitsRollsBack(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withConfirm)
	h.holdStderr = true
	next := &Command{Path: "/srv/server2", Args: []string{"server", "-version", "2"}}
	old, p, evs, events := h.confirming(RestartRequest{Command: next})
	if st := h.wantGens("1:warm 2:serving"); !slices.Equal(st.Command, next.Args) {
		t.Errorf("command %q in the window, want the new one's %q", st.Command, next.Args)
	}
	h.clock.advance(testConfirm / 3)
	p.writeStderr(t, "serving\npanic: assignment to entry in nil map\n")
	p.closeStderr()
	p.exit(exited(2), false)
	evs = append(evs, all(t, events)...)
	checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseReady, PhaseConfirming, PhaseRollingBack, PhaseDone)
	const reason = "exited in the confirmation window: exit status 2"
	if ev := eventOf(t, evs, PhaseRollingBack); ev.Generation != 1 || ev.Pid != old.id || ev.Cause != string(RollbackExited) ||
		ev.Reason != reason || ev.Duration != testConfirm/3 {
		t.Errorf("rolling back event %+v, want generation 1 serving again after %s because %q", ev, testConfirm/3, reason)
	}
	res := result(t, evs)
	if res.Outcome != RestartRolledBack || res.Generation != 2 || res.Pid != p.id || res.Reason != reason ||
		res.StderrTail != "serving\npanic: assignment to entry in nil map" || !slices.Equal(res.Command, next.Args) {
		t.Errorf("result %+v, want generation 2 (pid %d) rolled back because %q, with its stderr", res, p.id, reason)
	}
	st := h.wantCounts(0, 1, map[RollbackCause]int{RollbackExited: 1})
	if gens(st) != "1:serving" || !slices.Equal(st.Command, testCommand.Args) {
		t.Errorf("after the rollback: generations %q, command %q; want 1:serving running %q", gens(st), st.Command, testCommand.Args)
	}
	if st.LastRestart == nil || st.LastRestart.Reason != reason {
		t.Errorf("last restart %+v, want the rollback", st.LastRestart)
	}
	h.noWindow()
	// Nothing is left of the window or of a drain: the old one is never
	// stopped, and nothing replaces it.
	h.clock.advance(testConfirm + testDrain + testStopTimeout)
	h.wantGens("1:serving")
	old.untouched(t, "the generation serving again")
	h.noStart()
	if h.clock.pending(testRestartBackoff) {
		t.Errorf("a replacement is pending while the warm generation serves again")
	}
	h.wantNothingWarm("no confirmation window is open", "1:serving")
}

// A new generation that fails its liveness check on trial, probed every
// tenth of the window rather than every --liveness-interval, is rolled
// back at once, with no replacement's backoff: the warm one serves again,
// and the failed one drains and stops.
func TestConfirmLivenessOnTrialRollsBack(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withConfirmAndLiveness)
	old, p, evs, events := h.confirming(RestartRequest{})
	for i := range testLivenessFailures {
		h.trialProbe(2).fail(fmt.Errorf("connected, but the server has not accepted it (%d)", i+1))
	}
	evs = append(evs, until(t, events, PhaseDraining)...)
	ev := eventOf(t, evs, PhaseRollingBack)
	if ev.Generation != 1 || ev.Pid != old.id || ev.Cause != string(RollbackLiveness) || ev.Duration != testLivenessFailures*testTrial ||
		!strings.Contains(ev.Reason, "3 liveness checks failed in a row (--liveness accept), the last: connected, but the server has not accepted it (3)") {
		t.Errorf("rolling back event %+v, want generation 1 serving again after %s, the liveness failures the reason",
			ev, testLivenessFailures*testTrial)
	}
	if d := eventOf(t, evs, PhaseDraining); d.Generation != 2 || d.Pid != p.id {
		t.Errorf("draining event %+v, want the failed generation 2 draining", d)
	}
	h.wantGens("1:serving 2:draining")
	h.noWindow()
	if h.clock.pending(testTrial) || h.clock.pending(testLivenessInterval) || h.clock.pending(testRestartBackoff) {
		t.Errorf("a probe or a liveness replacement is pending during the rollback's drain")
	}
	p.untouched(t, "the failed generation in its drain")
	evs = append(evs, h.drainToDone(p, events)...)
	h.wantGens("1:serving 2:stopping")
	st := h.wantCounts(0, 1, map[RollbackCause]int{RollbackLiveness: 1})
	if st.Restarts.LivenessReplacements != 0 {
		t.Errorf("%d liveness replacements, want the rollback alone", st.Restarts.LivenessReplacements)
	}
	if res := result(t, evs); res.Outcome != RestartRolledBack || res.Generation != 2 || res.Pid != p.id || res.Reason != ev.Reason {
		t.Errorf("result %+v, want generation 2 rolled back because %q", res, ev.Reason)
	}
	checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseReady, PhaseConfirming, PhaseRollingBack, PhaseDraining, PhaseStopping, PhaseDone)
	old.untouched(t, "the warm generation serving again")
	// The generation serving again is watched as before, every
	// --liveness-interval.
	h.probe(1).pass()
}

// A new generation that pinged its watchdog and then stays silent for
// --child-watchdog in its window is rolled back as one that failed its
// liveness check.
func TestConfirmWatchdogOnTrialRollsBack(t *testing.T) {
	t.Parallel()
	h := newHarness(t, func(c *Config) { withConfirm(c); withWatchdog(c) })
	old, p, _, events := h.confirming(RestartRequest{})
	h.ping(2)
	h.clock.waitTimer(t, testChildWatchdog)
	h.clock.advance(testChildWatchdog - 1)
	h.wantGens("1:warm 2:serving")
	h.clock.advance(1)
	evs := until(t, events, PhaseDraining)
	if ev := eventOf(t, evs, PhaseRollingBack); ev.Cause != string(RollbackLiveness) || !strings.Contains(ev.Reason, "no WATCHDOG=1 for 11s (--child-watchdog 11s)") {
		t.Errorf("rolling back event %+v, want the watchdog's silence", ev)
	}
	h.wantGens("1:serving 2:draining")
	if res := result(t, h.drainToDone(p, events)); res.Outcome != RestartRolledBack || res.Generation != 2 {
		t.Errorf("result %+v, want generation 2 rolled back", res)
	}
	h.wantCounts(0, 1, map[RollbackCause]int{RollbackLiveness: 1})
	old.untouched(t, "the warm generation serving again")
}

// A new generation that sends STOPPING=1 or ERRNO= in its window, nobody
// having asked it to stop, is rolled back.
func TestConfirmNotifyRollsBack(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ msg, reason string }{
		{"STOPPING=1", "it sent STOPPING=1 while serving"},
		{"STATUS=giving up\nERRNO=98", "it sent ERRNO=98 while serving"},
	} {
		t.Run(c.msg, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, withConfirm)
			old, p, evs, events := h.confirming(RestartRequest{})
			h.notify(2, c.msg)
			evs = append(evs, until(t, events, PhaseDraining)...)
			ev := eventOf(t, evs, PhaseRollingBack)
			if ev.Generation != 1 || ev.Cause != string(RollbackNotify) || ev.Reason != c.reason {
				t.Errorf("rolling back event %+v, want generation 1 serving again because %q", ev, c.reason)
			}
			if d := eventOf(t, evs, PhaseDraining); d.Generation != 2 {
				t.Errorf("draining event %+v, want generation 2", d)
			}
			h.wantGens("1:serving 2:draining")
			evs = append(evs, h.drainToDone(p, events)...)
			if res := result(t, evs); res.Outcome != RestartRolledBack || res.Generation != 2 || res.Reason != c.reason {
				t.Errorf("result %+v, want generation 2 rolled back because %q", res, c.reason)
			}
			p.exit(exited(0), false)
			evs = append(evs, all(t, events)...)
			checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseReady, PhaseConfirming, PhaseRollingBack,
				PhaseDraining, PhaseStopping, PhaseDone, PhaseOldExit)
			if last := evs[len(evs)-1]; last.Generation != 2 || last.Pid != p.id {
				t.Errorf("old exit event %+v, want the failed generation 2's", last)
			}
			h.waitLine("gen 1 pid 1001 serving; last restart rolled back: " + c.reason)
			h.wantCounts(0, 1, map[RollbackCause]int{RollbackNotify: 1})
			old.untouched(t, "the warm generation serving again")
		})
	}
}

// relay rollback in the window sends new connections back to the warm
// generation and drains and stops the new one; a second one, during that
// drain, finds nothing warm.
func TestConfirmManualRollback(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withConfirm)
	next := &Command{Path: "/srv/server2", Args: []string{"server", "-version", "2"}}
	old, p, evs, events := h.confirming(RestartRequest{Command: next})
	h.clock.advance(3 * time.Second)
	rolled, err := h.sup.Rollback()
	if want := (Rolled{Serving: 1, ServingPid: old.id, Failed: 2, FailedPid: p.id}); err != nil || rolled != want {
		t.Fatalf("Rollback = %+v, %v; want %+v", rolled, err, want)
	}
	// Rollback answers once it has switched back.
	if st := h.wantGens("1:serving 2:draining"); !slices.Equal(st.Command, testCommand.Args) || st.Confirm != nil {
		t.Errorf("after the rollback: command %q, window %+v; want the warm one's command %q and no window", st.Command, st.Confirm, testCommand.Args)
	}
	h.wantNothingWarm("the restart under way was rolled back already", "1:serving 2:draining")
	evs = append(evs, until(t, events, PhaseDraining)...)
	if ev := eventOf(t, evs, PhaseRollingBack); ev.Generation != 1 || ev.Pid != old.id || ev.Cause != string(RollbackManual) ||
		ev.Reason != "relay rollback" || ev.Duration != 3*time.Second {
		t.Errorf("rolling back event %+v, want generation 1 serving again by relay rollback after 3s", ev)
	}
	evs = append(evs, h.drainToDone(p, events)...)
	h.wantGens("1:serving 2:stopping")
	p.exit(exited(0), false)
	evs = append(evs, all(t, events)...)
	checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseReady, PhaseConfirming, PhaseRollingBack,
		PhaseDraining, PhaseStopping, PhaseDone, PhaseOldExit)
	if ev := eventOf(t, evs, PhaseStopping); ev.Generation != 2 || ev.Pid != p.id || ev.Signal != "TERM" {
		t.Errorf("stopping event %+v, want generation 2 told to stop", ev)
	}
	if res := result(t, evs); res.Outcome != RestartRolledBack || res.Generation != 2 || res.Pid != p.id || res.Reason != "relay rollback" ||
		!slices.Equal(res.Command, next.Args) {
		t.Errorf("result %+v, want generation 2 rolled back by relay rollback", res)
	}
	h.waitLine("gen 1 pid 1001 serving; last restart rolled back: relay rollback")
	h.wantCounts(0, 1, map[RollbackCause]int{RollbackManual: 1})
	old.untouched(t, "the warm generation serving again")
	h.wantNothingWarm("no confirmation window is open", "1:serving")
	// Ready at the switch, and again as the restart ends, rolled back.
	if got, want := h.obs.milestones(), []string{"ready", "reloading", "ready", "ready"}; !slices.Equal(got, want) {
		t.Errorf("the Observer heard %q, want %q", got, want)
	}
}

// Outside a window, and without --confirm, relay rollback fails with
// ErrNothingWarm and changes nothing.
func TestConfirmRollbackRefusedOutsideTheWindow(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withConfirm)
	old := h.serving()
	h.wantNothingWarm("no confirmation window is open", "1:serving")
	_, p, c := h.starting(RestartRequest{}, 2)
	h.wantNothingWarm("no confirmation window is open", "1:serving 2:starting")
	c.fail(errors.New("GET /healthz: 503 Service Unavailable"))
	p.waitSignals(t, "group KILL")
	p.exit(killed(syscall.SIGKILL), false)
	h.waitLine("gen 1 pid 1001 serving; last restart rolled back: GET /healthz: 503 Service Unavailable")
	h.wantNothingWarm("no confirmation window is open", "1:serving")
	h.wantCounts(0, 1, nil)
	old.untouched(t, "the serving generation")

	off := newHarness(t, nil)
	old, _, _, _ = off.draining(RestartRequest{})
	off.wantNothingWarm("relay runs without --confirm", "1:draining 2:serving")
	old.untouched(t, "the old generation in its drain")
	if off.clock.pending(testConfirm) {
		t.Errorf("a confirmation window's end is pending without --confirm")
	}
	off.wantCounts(0, 0, nil)
}

// A restart asked for in the window confirms the new generation first:
// the warm one drains and stops as after any switch, and then the second
// restart runs, and opens a window of its own.
func TestConfirmRestartDuringTheWindowConfirmsFirst(t *testing.T) {
	t.Parallel()
	h := newHarness(t, func(c *Config) { withConfirm(c); c.MaxDraining = 2 })
	old, p2, evs, first := h.confirming(RestartRequest{})
	h.clock.advance(time.Second)
	second := h.restart(RestartRequest{Reason: "second"})
	sevs := until(t, second, PhaseQueued)
	evs = append(evs, until(t, first, PhaseDraining)...)
	if ev := eventOf(t, evs, PhaseConfirmed); ev.Generation != 2 || ev.Pid != p2.id || ev.Cause != string(ConfirmedByRestart) || ev.Duration != time.Second {
		t.Errorf("confirmed event %+v, want generation 2 confirmed by the restart after 1s", ev)
	}
	h.wantGens("1:draining 2:serving")
	h.noWindow()
	old.untouched(t, "the confirmed generation's predecessor in its drain")
	h.noStart() // the second restart waits for the first
	h.clock.waitTimer(t, testDrain)
	h.clock.advance(testDrain)
	old.waitSignals(t, "TERM")
	evs = append(evs, until(t, first, PhaseDone)...)
	if res := result(t, evs); res.Outcome != RestartOK || res.Generation != 2 {
		t.Errorf("first restart's result %+v, want generation 2 ok", res)
	}
	p3 := h.started()
	h.check(3).pass()
	sevs = append(sevs, until(t, second, PhaseConfirming)...)
	checkPhases(t, sevs, PhaseQueued, PhaseStarting, PhaseWaiting, PhaseReady, PhaseConfirming)
	if ev := eventOf(t, sevs, PhaseConfirming); ev.Generation != 2 || ev.Pid != p2.id {
		t.Errorf("the second restart's confirming event %+v, want generation 2 warm", ev)
	}
	h.waitLine("gen 1 pid 1001 stopping; gen 2 pid 1002 warm; gen 3 pid 1003 serving; gen 3 on trial until 03:04:23")
	h.wantCounts(1, 0, nil)
	old.exit(exited(0), false)
	evs = append(evs, all(t, first)...)
	checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseReady, PhaseConfirming, PhaseConfirmed, PhaseDraining, PhaseStopping, PhaseDone, PhaseOldExit)
	h.wantGens("2:warm 3:serving")
	p2.untouched(t, "generation 2, warm in the second window")
	p3.untouched(t, "generation 3")
}

// With --max-draining 1, a restart asked for in the window is queued
// behind the first, and then waits for the old generation, confirmed,
// drained and told to stop, to be gone (doc.go: queued, then
// waiting_for_old).
func TestConfirmMaxDrainingWaitsForTheWarmToBeGone(t *testing.T) {
	t.Parallel()
	h := newHarness(t, func(c *Config) { withConfirm(c); c.MaxDraining = 1 })
	old, _, _, first := h.confirming(RestartRequest{})
	second := h.restart(RestartRequest{Reason: "second"})
	sevs := until(t, second, PhaseQueued)
	until(t, first, PhaseDraining)
	h.clock.waitTimer(t, testDrain)
	h.clock.advance(testDrain)
	old.waitSignals(t, "TERM")
	until(t, first, PhaseDone)
	sevs = append(sevs, until(t, second, PhaseWaitOld)...)
	if ev := eventOf(t, sevs, PhaseWaitOld); ev.Generation != 1 || ev.Pid != old.id {
		t.Errorf("waiting for %+v, want generation 1", ev)
	}
	h.waitLine("gen 1 pid 1001 stopping; gen 2 pid 1002 serving; restart waiting for an old generation to be gone")
	h.noStart()
	old.exit(exited(0), false)
	all(t, first)
	h.started()
	h.check(3).pass()
	sevs = append(sevs, until(t, second, PhaseConfirming)...)
	checkPhases(t, sevs, PhaseQueued, PhaseWaitOld, PhaseStarting, PhaseWaiting, PhaseReady, PhaseConfirming)
	h.wantGens("2:warm 3:serving")
}

// The warm generation exiting ends the window: there is nothing left to go
// back to, the new one is confirmed, and the restart is done.
func TestConfirmWarmExitEndsTheWindow(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withConfirm)
	old, p, evs, events := h.confirming(RestartRequest{})
	h.clock.advance(time.Second)
	old.exit(killed(syscall.SIGSEGV), false)
	evs = append(evs, all(t, events)...)
	checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseReady, PhaseConfirming, PhaseConfirmed, PhaseDone)
	if ev := eventOf(t, evs, PhaseConfirmed); ev.Generation != 2 || ev.Cause != string(ConfirmedWarmExited) || ev.Duration != time.Second {
		t.Errorf("confirmed event %+v, want generation 2 confirmed by the warm one's exit after 1s", ev)
	}
	if res := result(t, evs); res.Outcome != RestartOK || res.Generation != 2 || res.Pid != p.id {
		t.Errorf("result %+v, want generation 2 ok", res)
	}
	h.waitLine("gen 2 pid 1002 serving")
	h.wantCounts(1, 0, nil)
	h.noWindow()
	h.wantNothingWarm("the last restart (generation 2) was confirmed", "2:serving")
	// Nothing drains or is replaced.
	if h.clock.pending(testDrain) || h.clock.pending(testRestartBackoff) {
		t.Errorf("a drain or a replacement is pending after the warm generation exited")
	}
	h.noStart()
	p.untouched(t, "the confirmed generation")
}

// The stop ends the window: the restart is done, the new generation
// having served, and every generation gets the stop signal.
func TestConfirmStopDuringTheWindow(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withConfirm)
	old, p, evs, events := h.confirming(RestartRequest{})
	h.sup.Stop(false)
	evs = append(evs, all(t, events)...)
	checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseReady, PhaseConfirming, PhaseDone)
	if res := result(t, evs); res.Outcome != RestartOK || res.Generation != 2 {
		t.Errorf("result %+v, want generation 2 ok", res)
	}
	old.waitSignals(t, "TERM")
	p.waitSignals(t, "TERM")
	h.wantGens("1:stopping 2:stopping")
	h.noWindow()
	h.wantCounts(1, 0, nil)
	if rolled, err := h.sup.Rollback(); !errors.Is(err, ErrStopping) {
		t.Errorf("Rollback during the stop = %+v, %v; want ErrStopping", rolled, err)
	}
	old.exit(exited(0), false)
	p.exit(exited(4), false)
	if out, err := h.wait(); err != nil || out.Child.ExitCode() != 4 {
		t.Errorf("Run = %+v, %v; want generation 2's exit status 4", out, err)
	}
}

// The window opens for requested restarts alone: not for the first start,
// a crash replacement or a liveness replacement.
func TestConfirmOnlyForRequestedRestarts(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withConfirm)
	p := h.serving()
	h.noWindow()
	p.exit(exited(1), false)
	h.waitLine("no generation serving; replacement pending")
	h.replacedAfterBackoff(2)
	h.noWindow()

	live := newHarness(t, withConfirmAndLiveness)
	old := live.serving()
	live.failProbes(1, testLivenessFailures) // every --liveness-interval: not on trial
	live.clock.waitTimer(t, testRestartBackoff)
	live.clock.advance(testRestartBackoff)
	live.started()
	live.check(2).pass()
	live.waitLine("gen 1 pid 1001 draining; gen 2 pid 1002 serving")
	live.noWindow()
	live.wantReplaced("1:draining 2:serving", 1)
	old.untouched(t, "the failed generation in its drain")

	// A request (SIGHUP) that follows opens one.
	hup := newHarness(t, withConfirm)
	hup.serving()
	if err := hup.sup.RequestRestart("signal HUP"); err != nil {
		t.Fatal(err)
	}
	hup.started()
	hup.check(2).pass()
	hup.waitLine("gen 1 pid 1001 warm; gen 2 pid 1002 serving; gen 2 on trial until 03:04:20")
}

// Status shows the open window: the generation on trial, the warm one, and
// when it began and ends; none once it has ended.
func TestConfirmStatusDuringTheWindow(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withConfirm)
	old := h.serving()
	h.clock.advance(time.Minute)
	events, p, c := h.starting(RestartRequest{}, 2)
	if st := h.wantGens("1:serving 2:starting"); st.Confirm != nil {
		t.Errorf("window %+v while generation 2 starts, want none", *st.Confirm)
	}
	switched := h.clock.Now()
	c.pass()
	until(t, events, PhaseConfirming)
	h.clock.advance(5 * time.Second)
	st := h.wantGens("1:warm 2:serving")
	want := ConfirmStatus{Generation: 2, Pid: p.id, Warm: 1, WarmPid: old.id, Began: switched, Until: switched.Add(testConfirm)}
	if st.Confirm == nil || *st.Confirm != want {
		t.Errorf("window %+v, want %+v", st.Confirm, want)
	}
	if st.At.Sub(switched) != 5*time.Second {
		t.Errorf("status at %s, want 5s after the switch", st.At)
	}
	h.waitLine("gen 1 pid 1001 warm; gen 2 pid 1002 serving; gen 2 on trial until 03:05:20")
	h.clock.advance(testConfirm - 5*time.Second)
	until(t, events, PhaseDraining)
	h.wantGens("1:draining 2:serving")
	h.noWindow()
}

// Without a drain, the warm generation gets its stop signal as the window
// ends, and the failed one as it is rolled back.
func TestConfirmWithoutDrain(t *testing.T) {
	t.Parallel()
	h := newHarness(t, func(c *Config) { withConfirm(c); noDrain(c) })
	old, _, evs, events := h.confirming(RestartRequest{})
	h.clock.advance(testConfirm - 1)
	old.untouched(t, "the warm generation before the window's end")
	h.clock.advance(1)
	old.waitSignals(t, "TERM")
	evs = append(evs, until(t, events, PhaseDone)...)
	checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseReady, PhaseConfirming, PhaseConfirmed, PhaseStopping, PhaseDone)
	if ev := eventOf(t, evs, PhaseStopping); ev.Generation != 1 || ev.Ended != "" {
		t.Errorf("stopping event %+v, want generation 1 with no drain", ev)
	}
	h.wantGens("1:stopping 2:serving")

	back := newHarness(t, func(c *Config) { withConfirm(c); noDrain(c) })
	old, p, evs, events := back.confirming(RestartRequest{})
	if _, err := back.sup.Rollback(); err != nil {
		t.Fatal(err)
	}
	p.waitSignals(t, "TERM")
	evs = append(evs, until(t, events, PhaseDone)...)
	checkPhases(t, evs, PhaseStarting, PhaseWaiting, PhaseReady, PhaseConfirming, PhaseRollingBack, PhaseStopping, PhaseDone)
	if res := result(t, evs); res.Outcome != RestartRolledBack || res.Generation != 2 {
		t.Errorf("result %+v, want generation 2 rolled back", res)
	}
	back.wantGens("1:serving 2:stopping")
	back.wantCounts(0, 1, map[RollbackCause]int{RollbackManual: 1})
	old.untouched(t, "the warm generation serving again")
}

// relay cannot hand over during the window, nor while a rollback drains
// the failed generation.
func TestConfirmHandoffBusy(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withConfirm)
	h.serving()
	if err := h.sup.RequestRestart("signal HUP"); err != nil { // nobody follows it
		t.Fatal(err)
	}
	h.started()
	h.check(2).pass()
	h.waitLine("gen 1 pid 1001 warm; gen 2 pid 1002 serving; gen 2 on trial until 03:04:20")
	refused := func(when, why string) {
		t.Helper()
		err := h.sup.Handoff(func(Saved) error { t.Errorf("%s: exec called", when); return nil })
		if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), why) {
			t.Errorf("%s: Handoff = %v, want ErrBusy saying %q", when, err, why)
		}
	}
	refused("in the window", "generation 2 is on trial in its confirmation window")
	if _, err := h.sup.Rollback(); err != nil {
		t.Fatal(err)
	}
	refused("while the rollback drains", "a restart rolled back after its switch is draining its new generation")
}

// The generation that serves again after a rollback exits while the failed
// one drains: the restart ends there, the failed one gets its stop signal
// at once, and the replacement is scheduled without waiting for the drain.
func TestConfirmServingAgainExitsDuringTheRollbacksDrain(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withConfirm)
	old, p, _, events := h.confirming(RestartRequest{})
	if _, err := h.sup.Rollback(); err != nil {
		t.Fatal(err)
	}
	h.wantGens("1:serving 2:draining")
	old.exit(exited(1), false)
	p.waitSignals(t, "TERM")
	if res := result(t, until(t, events, PhaseDone)); res.Outcome != RestartRolledBack || res.Generation != 2 {
		t.Errorf("result %+v, want generation 2 rolled back", res)
	}
	h.clock.waitTimer(t, testRestartBackoff)
	if h.clock.pending(testDrain) {
		t.Errorf("the drain's end is still pending; the restart should have ended with the exit")
	}
}

// A restart queued before the switch would confirm the window at once:
// none opens, and the old generation drains as without --confirm.
func TestConfirmNoWindowWithARestartQueued(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withConfirm)
	h.serving()
	events, _, c := h.starting(RestartRequest{}, 2)
	queued, err := h.sup.Restart(RestartRequest{Command: &Command{Path: "/srv/server2", Args: []string{"server", "-version", "2"}}})
	if err != nil {
		t.Fatal(err)
	}
	until(t, queued, PhaseQueued)
	c.pass()
	evs := until(t, events, PhaseDraining)
	if slices.ContainsFunc(evs, func(ev Event) bool { return ev.Phase == PhaseConfirming }) {
		t.Errorf("a window opened with a restart queued: %v", evs)
	}
	h.noWindow()
	h.wantGens("1:draining 2:serving")
}

// A generation rolled back for its liveness check that accepts nothing has
// what is queued on its sockets handed over, as the old generation of a
// liveness replacement has.
func TestConfirmLivenessRollbackHandsOverAStall(t *testing.T) {
	t.Parallel()
	h := newHarnessWith(t, withConfirmAndLiveness, harnessOpts{handOver: true})
	h.confirming(RestartRequest{})
	for range testLivenessFailures {
		h.trialProbe(2).fail(errors.New("connected, but the server has not accepted it"))
	}
	recv(t, h.stallC, "the stall watch of the rolled-back generation")
}

// No window keeps warm a generation that failed its liveness check: a
// restart asked for during the backoff of its replacement drains it.
func TestConfirmNoWindowForAFailedGeneration(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withConfirmAndLiveness)
	h.serving()
	h.failProbes(1, testLivenessFailures)
	h.waitLine("gen 1 pid 1001 serving; liveness replacement pending")
	events, _, c := h.starting(RestartRequest{}, 2)
	c.pass()
	evs := until(t, events, PhaseDraining)
	if slices.ContainsFunc(evs, func(ev Event) bool { return ev.Phase == PhaseConfirming }) {
		t.Errorf("a window kept the generation that failed its liveness check: %v", evs)
	}
	h.wantGens("1:draining 2:serving")
}
