package supervisor

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// The confirmation window (Config.Confirm): after the switch of a requested
// restart, the generation it replaced stays warm, Warm, for Confirm. It gets
// no new connections (they all go to the new one) and finishes what it has,
// but it is not told to stop: its processes, caches and sockets stay ready.
// Meanwhile relay watches the new generation, and any of these rolls the
// restart back:
//
//   - the new generation exits (RollbackExited);
//   - it fails its liveness check, probed every trialInterval, or its child
//     watchdog (RollbackLiveness);
//   - it sends STOPPING=1 or ERRNO= while nobody asked it to stop
//     (RollbackNotify);
//   - relay rollback (RollbackManual).
//
// A rollback is one switch of the steering program back to the warm
// generation's sockets, which never left their groups: it serves again at
// once. The new one then drains and stops as an old generation does after
// any switch (or, if it has exited, what was queued on its sockets moves to
// the warm one's as its sockets leave their groups). When the window ends
// quietly, the new generation is confirmed, and the warm one drains and
// stops as it would have without a window. A restart asked for during the
// window confirms the new generation first (one queued before the switch
// keeps the window from opening); the stop ends the window as it
// ends a drain; the warm generation exiting ends it too, there being nothing
// left to go back to.
//
// The window applies to requested restarts only. A crash replacement and
// the first start replace nothing, and the generation a liveness
// replacement replaces has just failed its check: there is nothing worth
// going back to.

// confirmWindow is a restart's confirmation window.
type confirmWindow struct {
	began time.Time
	until time.Time
	timer timer // its end
}

// RollbackCause says in a word what rolled a restart back after its
// switch; the words are the reason label of relay's metrics too.
type RollbackCause string

// What can roll a restart back in its confirmation window.
const (
	// RollbackExited: the new generation exited.
	RollbackExited RollbackCause = "exited"
	// RollbackLiveness: it failed its liveness check, or its child
	// watchdog.
	RollbackLiveness RollbackCause = "liveness"
	// RollbackNotify: it sent STOPPING=1 or ERRNO= unasked.
	RollbackNotify RollbackCause = "notify"
	// RollbackManual: relay rollback.
	RollbackManual RollbackCause = "manual"
)

// RollbackCauses lists every RollbackCause, for metrics that show each.
func RollbackCauses() []RollbackCause {
	return []RollbackCause{RollbackExited, RollbackLiveness, RollbackNotify, RollbackManual}
}

// ConfirmEnd says how a confirmation window ended with the new generation
// kept, on the PhaseConfirmed Event.Cause.
type ConfirmEnd string

// How a window can end with the new generation kept.
const (
	// ConfirmedQuiet: the window passed and nothing failed.
	ConfirmedQuiet ConfirmEnd = "window"
	// ConfirmedByRestart: a restart was asked for during the window.
	ConfirmedByRestart ConfirmEnd = "restart"
	// ConfirmedWarmExited: the warm generation exited: there is nothing
	// to go back to.
	ConfirmedWarmExited ConfirmEnd = "warm_exited"
	// ConfirmedNoWayBack: a rollback was due, but the steering program
	// would not go back to the warm generation.
	ConfirmedNoWayBack ConfirmEnd = "no_way_back"
)

// rollback is why a restart was rolled back after its switch.
type rollback struct {
	cause  RollbackCause
	reason string
}

// ErrNothingWarm is Rollback's error outside a confirmation window.
var ErrNothingWarm = errors.New("nothing warm to go back to")

// Rolled is what Rollback did: the generation that serves again, and the
// one it took traffic from, which now drains and stops.
type Rolled struct {
	Serving, ServingPid int
	Failed, FailedPid   int
}

// ConfirmStatus is the confirmation window open now.
type ConfirmStatus struct {
	// Generation and Pid are the new generation, on trial; Warm and
	// WarmPid, the one kept warm to go back to.
	Generation, Pid int
	Warm, WarmPid   int
	// Began is the switch; Until, the window's end.
	Began, Until time.Time
}

// Rollback sends new connections back to the generation kept warm in the
// confirmation window, and drains and stops the new one. Outside a window
// it returns an error wrapping ErrNothingWarm that says why.
func (s *Supervisor) Rollback() (Rolled, error) {
	reply := make(chan rollbackReply, 1)
	if err := s.request(rollbackReq{reply: reply}); err != nil {
		return Rolled{}, err
	}
	r := <-reply
	return r.rolled, r.err
}

// windowed reports whether run's switch opens a confirmation window. A
// restart queued behind run would confirm it at once, as one asked for
// during the window does: then none opens. Nor does one for a generation
// that failed its liveness check (a requested restart can come during the
// backoff of its replacement): it is nothing worth going back to.
func (s *Supervisor) windowed(run *restartRun) bool {
	return s.cfg.Confirm > 0 && run.requested() && run.prev != nil && len(s.restarts.queued) == 0 && !run.prev.failedLiveness
}

// inWindow returns the restart whose confirmation window is open, or nil.
func (s *Supervisor) inWindow() *restartRun {
	if run := s.restarts.current; run != nil && run.phase == PhaseConfirming {
		return run
	}
	return nil
}

// beginConfirm opens run's window: its old generation stays warm.
func (s *Supervisor) beginConfirm(run *restartRun) {
	prev, w := run.prev, &run.confirm
	s.gens.move(prev, Warm)
	w.began = s.env.now()
	w.until = w.began.Add(s.cfg.Confirm)
	w.timer = s.env.afterFunc(s.cfg.Confirm, func() { s.post(confirmEvent{run: run}) })
	prev.log.Info("old generation kept warm: no new connections and no stop signal until the new one is confirmed",
		"confirm", s.cfg.Confirm, "until", w.until.Format(time.RFC3339Nano), "new_gen", run.gen.n, "new_pid", run.gen.pid())
	run.emit(Event{Phase: PhaseConfirming, Generation: prev.n, Pid: prev.pid(), Duration: s.cfg.Confirm})
	// The reload a service manager follows ends at the switch: it could
	// not hear of a rollback later anyway, and should not wait, and time
	// out, through the window.
	if !s.delaying() {
		s.cfg.Observer.Ready()
	}
}

// onConfirmDue ends run's window quietly, unless it ended already.
func (s *Supervisor) onConfirmDue(run *restartRun) {
	if s.inWindow() == run {
		s.confirm(run, ConfirmedQuiet)
	}
}

// confirm ends run's window keeping the new generation: the warm one
// drains and stops as after any switch.
func (s *Supervisor) confirm(run *restartRun, how ConfirmEnd) {
	run.confirm.timer.Stop()
	prev, g := run.prev, run.gen
	took := s.env.now().Sub(run.confirm.began)
	lvl := logLevel(how == ConfirmedQuiet || how == ConfirmedByRestart)
	g.log.Log(context.Background(), lvl, "new generation confirmed", "ended", how, "after", took.Round(time.Microsecond),
		"warm_gen", prev.n, "warm_pid", prev.pid())
	run.emit(Event{Phase: PhaseConfirmed, Generation: g.n, Pid: g.pid(), Duration: took, Cause: string(how)})
	if prev.state != Warm {
		s.retire(run, "") // it exited: nothing to drain or stop
		return
	}
	s.gens.move(prev, Draining)
	if s.cfg.Drain <= 0 {
		s.retire(run, "")
		return
	}
	s.beginDrain(run, prev)
}

// rollBack ends run's window sending new connections back to the warm
// generation, which serves again; the new one, unless it has exited,
// drains and stops as an old one does. Should the switch back fail while the
// new generation serves, it is kept (ConfirmedNoWayBack), and the switch's
// error returned.
func (s *Supervisor) rollBack(run *restartRun, cause RollbackCause, reason string) error {
	g, prev, gs := run.gen, run.prev, &s.gens
	run.confirm.timer.Stop()
	// Should a listener refuse, those switched already go back to g,
	// which serves them meanwhile. One that has exited serves nothing:
	// then the warm generation serves whatever the switch did.
	if err := s.cfg.Sockets.Switch(prev.n, g.n); err != nil && g.state == Serving {
		g.log.Error("a rollback is due, but new connections cannot go back to the warm generation; keeping the new one",
			"cause", cause, "reason", reason, "err", err)
		s.confirm(run, ConfirmedNoWayBack)
		return err
	} else if err != nil {
		prev.log.Error("steering new connections back to the warm generation", "err", err)
	}
	took := s.env.now().Sub(run.confirm.began)
	if g.state == Serving {
		gs.move(g, Draining)
	}
	gs.move(prev, Serving)
	gs.command = prev.cmd
	s.counts.AfterSwitch[cause]++
	run.back = &rollback{cause: cause, reason: reason}
	run.failed = g
	g.log.Error("new generation rolled back after the switch: new connections go to the warm generation again",
		"cause", cause, "reason", reason, "after_switch", took.Round(time.Microsecond),
		"serving_gen", prev.n, "serving_pid", prev.pid(), "stderr_tail", g.stderrTail())
	run.emit(Event{Phase: PhaseRollingBack, Generation: prev.n, Pid: prev.pid(), Duration: took, Cause: string(cause), Reason: reason})
	if g.state != Draining {
		// It exited: nothing to drain or stop. Its sockets left their
		// groups at the switch back, and what was queued on them
		// moved to the warm generation's (see sockets.Set.Migrates).
		s.finishRestart(s.resultFor(g, RestartRolledBack, reason))
		return nil
	}
	// From here on the restart drains g: the serving one is run.gen,
	// the one leaving run.prev, as after any switch.
	run.gen, run.prev = prev, g
	if s.cfg.Drain <= 0 {
		s.retire(run, "")
		return nil
	}
	s.beginDrain(run, g)
	return nil
}

// onRollbackRequest is relay rollback.
func (s *Supervisor) onRollbackRequest() (Rolled, error) {
	run := s.inWindow()
	switch {
	case run != nil:
		g, prev := run.gen, run.prev
		if err := s.rollBack(run, RollbackManual, "relay rollback"); err != nil {
			return Rolled{}, fmt.Errorf("new connections cannot go back to generation %d, so generation %d was kept and generation %d drains and stops: %w", prev.n, g.n, prev.n, err)
		}
		return Rolled{Serving: prev.n, ServingPid: prev.pid(), Failed: g.n, FailedPid: g.pid()}, nil
	case s.stop.begun:
		return Rolled{}, ErrStopping
	case s.cfg.Confirm <= 0:
		return Rolled{}, fmt.Errorf("%w: relay runs without --confirm, so every old generation stops once drained", ErrNothingWarm)
	case s.restarts.current != nil && s.restarts.current.back != nil:
		return Rolled{}, fmt.Errorf("%w: the restart under way was rolled back already", ErrNothingWarm)
	case s.restarts.current != nil && s.restarts.current.phase == PhaseDraining && s.restarts.current.prev != nil:
		run := s.restarts.current
		return Rolled{}, fmt.Errorf("%w: generation %d was confirmed, and generation %d drains and stops", ErrNothingWarm, run.gen.n, run.prev.n)
	case s.last != nil && s.last.Outcome == RestartOK:
		return Rolled{}, fmt.Errorf("%w: the last restart (generation %d) was confirmed at %s, and the generation before it stopped",
			ErrNothingWarm, s.last.Generation, s.last.Finished.Format(time.RFC3339))
	}
	return Rolled{}, fmt.Errorf("%w: no confirmation window is open (one opens at the switch of a restart, for --confirm %s)", ErrNothingWarm, s.cfg.Confirm)
}

// onChildStopping is the new generation saying it fails or stops
// (STOPPING=1, ERRNO=) while nobody asked it to: in its window, a rollback.
func (s *Supervisor) onChildStopping(g *generation, what string) {
	if run := s.inWindow(); run != nil && run.gen == g && g.state == Serving {
		s.rollBack(run, RollbackNotify, "it sent "+what+" while serving")
	}
}

// adviseConfirm warns when the confirmation window is too short for
// --liveness to catch a hung generation in it: each of the failures in a
// row that it takes comes only at a probe's timeout.
func (s *Supervisor) adviseConfirm() {
	c := &s.cfg
	if c.Confirm <= 0 || c.Liveness.Kind == "" {
		return
	}
	if need := time.Duration(c.LivenessFailures) * (c.trialInterval() + c.trialTimeout()); need > c.Confirm {
		c.Log.Warn("the confirmation window is too short to see a hung generation fail its liveness check: a longer --confirm, or fewer --liveness-failures",
			"confirm", c.Confirm, "needed", need, "liveness_failures", c.LivenessFailures)
	}
}

// trialInterval is the time between two liveness probes of a generation in
// its confirmation window: a tenth of the window, so that enough probes
// fit to see a failure, but not more often than every 100 ms and never
// less often than --liveness-interval.
func (c *Config) trialInterval() time.Duration {
	return min(max(c.Confirm/10, minTrialInterval), c.LivenessInterval)
}

// trialTimeout bounds one liveness probe on trial: half the trial
// interval, at least minTrialTimeout and at most maxLivenessTimeout. A hung
// generation fails each probe only at its timeout, and --liveness-failures
// of them must fit in the window.
func (c *Config) trialTimeout() time.Duration {
	return min(max(c.trialInterval()/2, minTrialTimeout), maxLivenessTimeout)
}

// minTrialInterval bounds how often a generation on trial is probed.
const minTrialInterval = 100 * time.Millisecond

// minTrialTimeout is the least time a probe on trial may take: a loaded
// machine must not fail a healthy generation.
const minTrialTimeout = time.Second
