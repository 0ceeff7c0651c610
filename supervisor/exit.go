package supervisor

import (
	"fmt"
	"slices"
	"time"

	"github.com/relaysh/relay/internal/reaper"
)

// onCopyExit handles the exit of copy c's main process: the generation's
// exit once it was the last copy (onExit), and otherwise what one copy's
// exit means for its generation (copyExited).
func (s *Supervisor) onCopyExit(c *copyProc, st reaper.Status) {
	g := c.g
	c.exited, c.status = true, st
	if c.cancelCheck != nil {
		c.cancelCheck()
	}
	if err := c.notify.Close(); err != nil {
		c.log.Debug("closing notify socket", "err", err)
	}
	if g.culprit == nil && g.state == Starting && g.failure == nil {
		g.culprit = c // the first copy that failed the start
	}
	if run := s.restarts.current; g.allExited() && run != nil && run.roll != nil && run.gen == g && g.state == Starting && g.failure == nil {
		// The last copy of a rolling restart's new generation: its
		// socket may be in the spread; the old copies take it back.
		s.fallBack(run, c, fmt.Errorf("copy %d (pid %d) exited: %s", c.worker, c.pid(), c.status))
	}
	if !g.allExited() {
		s.copyExited(c)
		s.refill()
		return
	}
	switch {
	case g.culprit != nil:
		st = g.culprit.status
	default:
		for _, x := range g.copies {
			if x.status.ExitCode() != 0 {
				st = x.status
				break
			}
		}
	}
	s.onExit(g, st)
	s.refill()
}

// onExit handles the exit of g's main process (of every copy's): its
// status is that of the copy that failed its start, or of the first copy
// that failed, or else of the last.
func (s *Supervisor) onExit(g *generation, st reaper.Status) {
	gs := &s.gens
	prev := g.state
	g.status = st
	gs.lastExit = g
	if g.contain.alive() {
		// Processes of it outlived its main process (workers still
		// finishing, a daemon it started): the generation lives on
		// until they are gone, and counts against --max-draining.
		// Stopping, they have had the stop signal (or the main process
		// was to pass it on), and get SIGKILL at the stop timeout;
		// otherwise nothing is left to pass it on: they get it now.
		// Killed, they get SIGKILL again: what was adopted since the
		// kill was not in it.
		gs.move(g, Exited) // lingering
		switch {
		case g.killed:
			g.contain.kill()
		case prev != Stopping:
			s.sendStop(g)
		}
		s.armKill(g)
		g.contain.watch(s.doneC, func() { s.post(emptiedEvent{}) })
		g.log.Info("main process exited; the generation's other processes live on", "status", st.String(),
			"processes", g.contain.count(), "killed_after", s.cfg.StopTimeout)
	} else {
		s.gone(g) // Exited, in no slot
	}

	// Its sockets go back to the steering groups before anything below
	// can start a new generation, which may then reuse them. One that
	// new connections still go to stays in place until a switch.
	s.releaseSockets(g)
	// What it was before its exit decides the rest: the new generation
	// of the restart under way, not yet ready (the stop may have made it
	// Stopping); the serving one (or the one that served when the stop
	// began); or an old one.
	run := s.restarts.current
	switch {
	case run != nil && run.gen == g && (run.phase == PhaseStarting || run.phase == PhaseWaiting):
		s.rollback(g)
	case prev == Serving && s.failDuringDrain(g):
	case prev == Serving || g == s.stop.exitGen:
		if gs.starting != nil && !s.stop.begun {
			// New connections wait for the starting generation
			// rather than in the socket of one that is gone.
			if err := s.steerTo(gs.starting); err != nil {
				g.log.Error("steering new connections to the starting generation", "err", err)
			}
		}
		if s.stop.begun {
			g.log.Info("generation exited", "status", st.String())
			break
		}
		if run := s.restarts.current; run != nil && run.roll != nil && run.gen == gs.starting {
			// Its copies that had not left yet died in the middle
			// of a rolling restart.
			s.rollRest(run)
		}
		g.log.Error("serving child exited on its own", "status", st.String(), "stderr_tail", g.stderrTail())
		if s.env.now().Sub(g.readyAt) >= stableAfter {
			s.crash.crashes = 0
		}
		if run := s.restarts.current; run != nil && run.back != nil && run.gen == g && run.phase == PhaseDraining {
			// It served again after a rollback in its confirmation
			// window, while the failed one drains: that one stops
			// now, and the restart ends, so that the replacement
			// need not wait for the drain.
			run.drain.end()
			s.retire(run, "")
		}
		// A restart waiting for an old generation to be gone need not
		// wait any more: nothing serves.
		s.advance()
		s.scheduleReplace()
	case prev == Warm:
		g.log.Warn("the warm generation exited in the confirmation window: nothing is left to go back to", "status", st.String(),
			"stderr_tail", g.stderrTail())
		if run := s.inWindow(); run != nil && run.prev == g {
			s.confirm(run, ConfirmedWarmExited)
		}
		s.advance()
	default:
		g.log.Info("old generation exited", "status", st.String())
		s.advance()
	}
}

// failDuringDrain handles a new generation that exits in its confirmation
// window (a rollback: confirm.go) or its drain window. If the generation it
// replaced is still draining, that one was never told to stop and goes
// back to serving; if it has exited too, nothing serves and a replacement
// follows. Either way the restart failed. It reports whether it applied.
func (s *Supervisor) failDuringDrain(g *generation) bool {
	run, gs := s.restarts.current, &s.gens
	if s.stop.begun || run == nil || run.gen != g || run.back != nil {
		return false
	}
	if run.phase == PhaseConfirming {
		s.rollBack(run, RollbackExited, fmt.Sprintf("exited in the confirmation window: %s", g.status))
		return true
	}
	if run.phase != PhaseDraining {
		return false
	}
	prev := run.prev
	run.drain.end()
	gs.command = prev.cmd
	reason := fmt.Sprintf("exited during the drain window: %s", g.status)
	attrs := []any{"reason", reason, "stderr_tail", g.stderrTail()}
	if prev.state == Draining {
		// Should a listener refuse, those switched already go back
		// to g, as steerTo would have had them while g served.
		if err := s.cfg.Sockets.Switch(prev.n, g.n); err != nil {
			prev.log.Error("steering new connections back to the old generation", "err", err)
		}
		gs.move(prev, Serving)
		attrs = append(attrs, "still_serving_gen", prev.n, "still_serving_pid", prev.pid())
	}
	g.log.Error("new generation failed; rolled back", attrs...)
	s.finishRestart(s.resultFor(g, RestartRolledBack, reason))
	return true
}

// rollback reports a new generation that failed; whatever served before
// it was never touched.
func (s *Supervisor) rollback(g *generation) {
	reason := g.failure
	if reason == nil {
		reason = fmt.Errorf("exited before it was ready: %s", g.status)
	}
	if s.stop.begun {
		g.log.Info("new generation exited during stop", "status", g.status.String())
		s.finishRestart(s.resultFor(g, RestartRolledBack, ErrStopping.Error()))
		return
	}
	tail := g.stderrTail()
	attrs := []any{"reason", reason.Error(), "stderr_tail", tail}
	if sv := s.gens.serving; sv != nil {
		attrs = append(attrs, "still_serving_gen", sv.n, "still_serving_pid", sv.pid())
	}
	g.log.Error("new generation failed; rolled back", attrs...)
	if !s.gens.everReady {
		s.stop.fatal = fmt.Errorf("generation %d (pid %d) never became ready: %w", g.n, g.pid(), reason)
		if tail != "" {
			s.stop.fatal = fmt.Errorf("%w; its stderr ended with: %s", s.stop.fatal, tail)
		}
	}
	s.finishRestart(s.resultFor(g, RestartRolledBack, reason.Error()))
}

// scheduleReplace starts a replacement for a crashed child after an
// exponential backoff. The sockets stay open meanwhile, so clients wait in
// the kernel's backlog instead of being refused.
func (s *Supervisor) scheduleReplace() {
	c := &s.crash
	if c.timer != nil || s.restarts.current != nil || s.stop.begun {
		return
	}
	delay := s.cfg.backoff(c.crashes)
	c.crashes++
	s.cfg.Log.Warn("no generation is serving; starting a replacement", "after", delay, "failures_in_a_row", c.crashes)
	c.seq++
	seq := c.seq
	c.timer = s.env.afterFunc(delay, func() { s.post(replaceEvent{seq: seq}) })
}

// backoff is the wait before a replacement after failures in a row:
// RestartBackoff, doubled for each, up to MaxBackoff. Crash and liveness
// replacements count their failures apart.
func (c *Config) backoff(failures int) time.Duration {
	delay := c.RestartBackoff
	for i := 0; i < failures && delay < c.MaxBackoff; i++ {
		delay *= 2
	}
	return min(delay, c.MaxBackoff)
}

// cancelReplace stops a pending replacement: a restart or the stop takes
// its place.
func (s *Supervisor) cancelReplace() {
	if s.crash.timer != nil {
		s.crash.timer.Stop()
		s.crash.timer = nil
	}
}

func (s *Supervisor) onReplaceDue(seq int) {
	if seq != s.crash.seq || s.crash.timer == nil {
		return // a timer that was stopped after it fired
	}
	s.crash.timer = nil
	if s.gens.serving == nil && s.restarts.current == nil && !s.stop.begun {
		s.counts.Replacements++
		s.beginRestart(&restartRun{reason: reasonReplace})
	}
}

// checkLingering forgets the generations whose last process has gone. A
// restart waiting for --max-draining may start its generation then.
func (s *Supervisor) checkLingering() {
	forgot := false
	for _, g := range slices.Clone(s.gens.lingering) {
		if g.contain.alive() {
			if g.killed {
				// Adopted since the kill (its parent lived
				// until then): it was not in it.
				g.contain.killAdopted()
			}
			continue
		}
		g.contain.logGone()
		s.gone(g)
		forgot = true
	}
	if forgot {
		s.advance()
	}
}

// gone ends what relay keeps of g once no process of it is left: its slot,
// its kill timer, its cgroup, and the callers of the restart that retired
// it, who hear now that it exited.
func (s *Supervisor) gone(g *generation) {
	g.gone = true
	s.gens.move(g, Exited) // in no slot
	if g.killTimer != nil {
		g.killTimer.Stop()
	}
	g.contain.remove()
	for _, w := range g.exitWatchers {
		w.send(Event{Phase: PhaseOldExit, Generation: g.n, Pid: g.pid(), Status: g.status.String()})
		w.close()
	}
	g.exitWatchers = nil
}
