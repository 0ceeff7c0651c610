package supervisor

import (
	"time"

	"github.com/relaysh/relay/signals"
)

// beginStop stops every generation: with the stop signal, or with SIGKILL
// to its group if now. Called again (a second signal), it changes nothing
// unless now: then every group, lingering ones too, gets SIGKILL.
func (s *Supervisor) beginStop(now bool) {
	if !s.stop.begun {
		delayed := s.delaying()
		s.endDelay()
		s.stop.begun = true
		if !delayed {
			s.cfg.Observer.Stopping()
		}
		s.stop.exitGen = s.gens.serving
		s.cfg.Log.Info("stopping", "signal", signals.Name(s.cfg.StopSignal), "stop_timeout", s.cfg.StopTimeout)
		s.cancelReplace()
		s.refuseQueued()
		switch run := s.restarts.current; {
		case run == nil:
		case run.phase == PhaseDraining:
			// The new generation already serves; the stop ends the drain.
			run.drain.end()
			s.finishRestart(s.outcome(run))
		case run.phase == PhaseConfirming:
			// It serves on trial; the stop ends the window, and stops
			// the warm generation with the rest.
			run.confirm.timer.Stop()
			s.finishRestart(s.outcome(run))
		case run.phase == PhaseChecking || run.phase == PhaseWaitOld:
			// It was in its pre-flight check, or waiting for an old
			// generation to exit.
			if run.cancelPre != nil {
				run.cancelPre()
			}
			s.finishRestart(Result{Outcome: RestartRefused, Reason: ErrStopping.Error()})
		}
	}
	for _, g := range s.gens.alive() {
		for _, c := range g.copies {
			if c.cancelCheck != nil {
				c.cancelCheck()
			}
		}
		s.cancelCopyReplaces(g)
		switch {
		case now:
			g.log.Warn("killing generation now", "signal", "KILL")
			g.contain.kill()
		case g.state != Stopping:
			s.stopGen(g)
		}
	}
	if now {
		for _, g := range s.gens.lingering {
			g.contain.kill()
		}
	}
}

// refuseQueued answers the restarts waiting behind the one under way as
// refused: relay is stopping.
func (s *Supervisor) refuseQueued() {
	for _, q := range s.restarts.queued {
		s.refuse(q, ErrStopping.Error())
	}
	s.restarts.queued = nil
}

// delayStop begins the shutdown delay: the graceful stop begins after d,
// or at once if d <= 0. Meanwhile everything serves as before, crashed
// generations are replaced, and restarts are refused: the queued ones now,
// the ones asked for later on arrival. A restart under way goes on; if it
// is still under way when the delay ends, the stop ends it as usual.
func (s *Supervisor) delayStop(d time.Duration) {
	switch {
	case s.stop.begun || s.delaying():
		return
	case d <= 0:
		s.beginStop(false)
		return
	}
	s.stop.delayUntil = s.env.now().Add(d)
	s.stop.delayTimer = s.env.afterFunc(d, func() { s.post(delayEvent{}) })
	s.cfg.Observer.Stopping()
	s.cfg.Log.Info("shutdown delay: serving on until "+s.stop.delayUntil.Format(time.RFC3339Nano),
		"shutdown_delay", d, "then", "stopping with "+signals.Name(s.cfg.StopSignal))
	s.refuseQueued()
}

// delaying reports whether a shutdown delay runs.
func (s *Supervisor) delaying() bool { return !s.stop.delayUntil.IsZero() }

// endDelay stops the shutdown delay's timer, if one runs.
func (s *Supervisor) endDelay() {
	if s.stop.delayTimer != nil {
		s.stop.delayTimer.Stop()
		s.stop.delayTimer = nil
	}
	s.stop.delayUntil = time.Time{}
}

// onDelayEnd begins the graceful stop once the shutdown delay has passed,
// unless a Stop began it already.
func (s *Supervisor) onDelayEnd() {
	if !s.delaying() || s.stop.begun {
		return
	}
	s.cfg.Log.Info("shutdown delay over")
	s.beginStop(false)
}

// stopGen sends g its stop signal (sendStop), and SIGKILL to all of it
// after the stop timeout.
//
// A generation that does not serve is retired on the steered UDP listeners
// first (sockets.Set.Retire), where its drain did not do it already: a
// stopping server stops reading, so its datagrams other than those of its
// QUIC connections go to the serving generation.
func (s *Supervisor) stopGen(g *generation) {
	if g != s.gens.serving {
		if err := s.cfg.Sockets.Retire(g.n); err != nil {
			g.log.Warn("cannot send the old generation's UDP flows to the serving generation; they reach it until it exits", "err", err)
		}
	}
	s.gens.move(g, Stopping)
	g.log.Info("stopping generation", "signal", signals.Name(s.cfg.StopSignal), "kill_mode", s.cfg.KillMode, "stop_timeout", s.cfg.StopTimeout)
	s.sendStop(g)
	s.armKill(g)
}

func (s *Supervisor) armKill(g *generation) {
	s.armKillIn(g, s.cfg.StopTimeout)
}

// armKillIn sends g SIGKILL after d, unless a kill is armed already.
func (s *Supervisor) armKillIn(g *generation, d time.Duration) {
	if g.killTimer == nil {
		g.killAt = s.env.now().Add(d)
		g.killTimer = s.env.afterFunc(d, func() { s.post(killEvent{g: g}) })
	}
}

func (s *Supervisor) onKillTimeout(g *generation) {
	if g.state == Exited && !g.contain.alive() {
		return
	}
	g.killed = true
	g.contain.logKill(s.cfg.StopTimeout)
	g.contain.kill()
}
