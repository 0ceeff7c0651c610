package supervisor

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"time"

	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/reaper"
	"github.com/relaysh/relay/signals"
	"github.com/relaysh/relay/socketpass"
)

// Reasons of the restarts relay begins by itself.
const (
	reasonStart   = "start"
	reasonReplace = "replace crashed child"
)

// requested reports whether someone asked for run (a signal or a control
// request), as opposed to relay's own first start and crash replacements.
func (run *restartRun) requested() bool {
	return run.reason != reasonStart && run.reason != reasonReplace
}

func (s *Supervisor) beginRestart(run *restartRun) {
	run.begun = time.Now()
	s.restart = run
	if run.reason != reasonStart {
		s.cfg.Log.Info("restart begun", "reason", run.reason)
	}
	if run.requested() {
		s.cfg.Observer.Reloading()
	}
	if len(run.check) > 0 {
		s.preflight(run)
		return
	}
	s.advance()
}

// preflight runs the restart's check before any new child starts; its
// outcome comes back as a preflightEvent.
func (s *Supervisor) preflight(run *restartRun) {
	check := strings.Join(run.check, " ")
	s.cfg.Log.Info("running pre-flight check", "check", check)
	run.emit(Event{Phase: PhaseChecking, Check: check})
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.HealthTimeout)
	run.cancelPre = cancel // also marks the check as running: advance waits
	env := socketpass.ChildEnv(s.cfg.Env, nil)
	go func() {
		err := health.RunCommand(ctx, s.cfg.Reaper, run.check, env)
		cancel()
		s.post(preflightEvent{run: run, err: err})
	}()
}

func (s *Supervisor) onPreflight(run *restartRun, err error) {
	if run != s.restart {
		return // the stop answered it already
	}
	run.cancelPre = nil
	if err != nil {
		s.cfg.Log.Error("pre-flight check failed; restart refused, nothing changed", "check", strings.Join(run.check, " "), "err", err)
		s.finishRestart(Result{Refused: true, Reason: "pre-flight check failed: " + err.Error()})
		return
	}
	s.cfg.Log.Info("pre-flight check passed", "check", strings.Join(run.check, " "))
	run.emit(Event{Phase: PhaseChecked, Check: strings.Join(run.check, " ")})
	s.advance()
}

// advance starts the restart's new generation once the bound on old
// generations allows it.
func (s *Supervisor) advance() {
	run := s.restart
	if run == nil || run.gen != nil || run.cancelPre != nil || s.stopping {
		return // nothing to start, already started, or the check still runs
	}
	// The new generation will push the serving one into the old ones.
	if s.serving != nil && len(s.old) >= s.cfg.MaxDraining {
		if !run.waitLogged {
			run.waitLogged = true
			run.emit(Event{Phase: PhaseWaitOld, Generation: s.old[0].n, Pid: s.old[0].pid()})
			s.cfg.Log.Info("waiting for an old generation to exit before starting a new one",
				"old_generations", len(s.old), "max_draining", s.cfg.MaxDraining)
		}
		return
	}
	cmd := s.command
	if run.cmd != nil {
		cmd = *run.cmd
	}
	s.nextGen++
	g, err := s.spawn(s.nextGen, cmd)
	if err != nil {
		s.cfg.Log.Error("starting new generation", "gen", s.nextGen, "err", err)
		if !s.everReady {
			s.fatal = fmt.Errorf("starting generation %d: %w", s.nextGen, err)
		}
		s.finishRestart(Result{Generation: s.nextGen, Reason: err.Error()})
		return
	}
	run.gen = g
	s.starting = g
	g.log.Info("generation starting", "cmd", cmd.Args, "check", s.cfg.Health.String(), "health_addr", g.healthAddr)
	run.emit(Event{Phase: PhaseStarting, Generation: g.n, Pid: g.pid()})
	run.emit(Event{Phase: PhaseWaiting, Generation: g.n, Pid: g.pid(), Check: s.cfg.Health.String()})
	s.startCheck(g)
}

func (s *Supervisor) onCheck(g *generation, err error) {
	if g != s.starting || g.state != Starting {
		return // the generation already exited or the stop took it
	}
	select {
	case <-g.proc.Done():
		// It passed its check but has exited since; the exit event,
		// which waits for the last of its stderr, rolls it back.
		return
	default:
	}
	if err != nil {
		g.failure = err
		msg := "new generation failed its readiness check; killing it"
		if g.takeover != nil && g.takeover.failedErr() != nil {
			msg = "new generation cannot serve its listeners; killing it"
		}
		g.log.Warn(msg, "err", err)
		signalGroup(g, syscall.SIGKILL)
		return // the rollback completes when it has exited
	}
	// The switch: from here on, steered listeners give their new
	// connections to g alone.
	if err := s.steerTo(g); err != nil {
		g.failure = err
		g.log.Error("cannot send new connections to the new generation; killing it", "err", err)
		signalGroup(g, syscall.SIGKILL)
		return
	}
	s.promote(g)
}

// promote makes a ready generation the serving one and sends the one it
// replaces into its drain window.
func (s *Supervisor) promote(g *generation) {
	run := s.restart
	g.state = Serving
	g.readyAt = time.Now()
	g.cancelCheck()
	s.everReady = true
	s.starting = nil
	s.command = g.cmd
	g.log.Info("generation ready", "ready_after", g.readyAt.Sub(g.started).Round(time.Microsecond),
		"since_request", g.readyAt.Sub(run.begun).Round(time.Microsecond), "sockets", s.socketsTaken(g))
	run.emit(Event{Phase: PhaseReady, Generation: g.n, Pid: g.pid(), DurationMs: ms(g.readyAt.Sub(g.started))})
	prev := s.serving
	s.serving = g
	if run.reason == reasonStart {
		s.cfg.Observer.Ready()
	}
	if prev == nil {
		s.finishRestart(s.resultFor(g, true, ""))
		return
	}
	prev.state = Draining
	s.old = append(s.old, prev)
	run.prev = prev
	if s.cfg.Drain <= 0 {
		s.retire(run)
		return
	}
	prev.log.Info("old generation draining", "drain", s.cfg.Drain)
	run.emit(Event{Phase: PhaseDraining, Generation: prev.n, Pid: prev.pid(), DurationMs: ms(s.cfg.Drain)})
	run.drainTimer = time.AfterFunc(s.cfg.Drain, func() { s.post(drainEvent{run: run}) })
}

func (s *Supervisor) onDrainEnd(run *restartRun) {
	if run != s.restart {
		return
	}
	s.retire(run)
}

// retire ends a successful restart: the old generation gets its stop
// signal, and the callers following the restart are told when it exits.
func (s *Supervisor) retire(run *restartRun) {
	prev := run.prev
	if prev.state == Draining {
		s.stopGen(prev)
		run.emit(Event{Phase: PhaseStopping, Generation: prev.n, Pid: prev.pid(), Signal: signals.Name(s.cfg.StopSignal)})
	}
	run.watch = prev
	s.finishRestart(s.resultFor(run.gen, true, ""))
}

// stopGen sends g its stop signal, and SIGKILL to its group after the stop
// timeout.
func (s *Supervisor) stopGen(g *generation) {
	g.state = Stopping
	g.log.Info("stopping generation", "signal", signals.Name(s.cfg.StopSignal), "stop_timeout", s.cfg.StopTimeout)
	signalGroup(g, s.cfg.StopSignal)
	s.armKill(g)
}

func (s *Supervisor) armKill(g *generation) {
	if g.killTimer == nil {
		g.killTimer = time.AfterFunc(s.cfg.StopTimeout, func() { s.post(killEvent{g: g}) })
	}
}

func (s *Supervisor) onKillTimeout(g *generation) {
	if g.state == Exited && !g.proc.GroupAlive() {
		return
	}
	g.log.Warn("did not stop within the stop timeout; killing its process group",
		"stop_timeout", s.cfg.StopTimeout, "signal", "KILL")
	signalGroup(g, syscall.SIGKILL)
}

func (s *Supervisor) onExit(g *generation, st reaper.Status) {
	prev := g.state
	g.state, g.status = Exited, st
	s.lastExit = g
	if g.cancelCheck != nil {
		g.cancelCheck()
	}
	if err := g.notify.Close(); err != nil {
		g.log.Debug("closing notify socket", "err", err)
	}
	for _, w := range g.exitWatchers {
		w.send(Event{Phase: PhaseOldExit, Generation: g.n, Pid: g.pid(), Status: st.String()})
		w.close()
	}
	g.exitWatchers = nil
	if g.proc.GroupAlive() {
		// Processes of its group outlived it: stop them too.
		if prev != Stopping {
			signalGroup(g, s.cfg.StopSignal)
		}
		s.armKill(g)
		s.lingering = append(s.lingering, g)
	} else if g.killTimer != nil {
		g.killTimer.Stop()
	}

	// Its sockets go back to the steering groups before anything below
	// can start a new generation, which may then reuse them. One that
	// new connections still go to stays in place until a switch.
	s.releaseSockets(g)
	switch {
	case g == s.starting:
		s.starting = nil
		s.rollback(g)
	case g == s.serving && s.failDuringDrain(g):
	case g == s.serving:
		s.serving = nil
		if s.starting != nil && !s.stopping {
			// New connections wait for the starting generation
			// rather than in the socket of one that is gone.
			if err := s.steerTo(s.starting); err != nil {
				g.log.Error("steering new connections to the starting generation", "err", err)
			}
		}
		if s.stopping {
			g.log.Info("generation exited", "status", st.String())
			break
		}
		g.log.Error("serving child exited on its own", "status", st.String(), "stderr_tail", g.stderr.Lines(stderrTailLines))
		if time.Since(g.readyAt) >= stableAfter {
			s.crashes = 0
		}
		// A restart waiting for an old generation to exit need not
		// wait any more: nothing serves.
		s.advance()
		s.scheduleReplace()
	default:
		s.old = remove(s.old, g)
		g.log.Info("old generation exited", "status", st.String())
		s.advance()
	}
}

// failDuringDrain handles a new generation that exits in its drain window.
// If the generation it replaced is still draining, that one was never told
// to stop and goes back to serving; if it has exited too, nothing serves
// and a replacement follows. Either way the restart failed. It reports
// whether it applied.
func (s *Supervisor) failDuringDrain(g *generation) bool {
	run := s.restart
	if s.stopping || run == nil || run.gen != g || run.prev == nil {
		return false
	}
	prev := run.prev
	run.drainTimer.Stop()
	s.command = prev.cmd
	reason := fmt.Sprintf("exited during the drain window: %s", g.status)
	attrs := []any{"reason", reason, "stderr_tail", g.stderr.Lines(stderrTailLines)}
	if prev.state == Draining {
		if err := s.steerTo(prev); err != nil {
			prev.log.Error("steering new connections back to the old generation", "err", err)
		}
		s.old = remove(s.old, prev)
		prev.state = Serving
		s.serving = prev
		attrs = append(attrs, "still_serving_gen", prev.n, "still_serving_pid", prev.pid())
	} else {
		s.serving = nil
	}
	g.log.Error("new generation failed; rolled back", attrs...)
	s.finishRestart(s.resultFor(g, false, reason))
	return true
}

// rollback reports a new generation that failed; whatever served before
// it was never touched.
func (s *Supervisor) rollback(g *generation) {
	reason := g.failure
	if reason == nil {
		reason = fmt.Errorf("exited before it was ready: %s", g.status)
	}
	if s.stopping {
		g.log.Info("new generation exited during stop", "status", g.status.String())
		s.finishRestart(s.resultFor(g, false, ErrStopping.Error()))
		return
	}
	tail := g.stderr.Lines(stderrTailLines)
	attrs := []any{"reason", reason.Error(), "stderr_tail", tail}
	if s.serving != nil {
		attrs = append(attrs, "still_serving_gen", s.serving.n, "still_serving_pid", s.serving.pid())
	}
	g.log.Error("new generation failed; rolled back", attrs...)
	if !s.everReady {
		s.fatal = fmt.Errorf("generation %d (pid %d) never became ready: %w", g.n, g.pid(), reason)
		if tail != "" {
			s.fatal = fmt.Errorf("%w; its stderr ended with: %s", s.fatal, tail)
		}
	}
	s.finishRestart(s.resultFor(g, false, reason.Error()))
}

func (s *Supervisor) resultFor(g *generation, ok bool, reason string) Result {
	r := Result{OK: ok, Reason: reason}
	if g != nil {
		r.Generation, r.Pid, r.Command = g.n, g.pid(), g.cmd.Args
		if !g.readyAt.IsZero() {
			r.ReadyAfter = g.readyAt.Sub(g.started)
		}
		if !ok {
			r.StderrTail = g.stderr.Lines(stderrTailLines)
		}
	}
	return r
}

// finishRestart ends the restart under way and starts the queued one, or a
// replacement if nothing serves.
func (s *Supervisor) finishRestart(res Result) {
	run := s.restart
	s.restart = nil
	res.Duration = time.Since(run.begun)
	if run.requested() {
		switch {
		case res.OK:
			s.stats.RestartsOK++
		case res.Refused:
			s.stats.Refused++
		default:
			s.stats.RestartsRolledBack++
		}
		s.last = &LastRestart{Result: res, Finished: time.Now(), DurationMs: ms(res.Duration)}
	}
	if run.reason != reasonStart || !res.OK {
		s.cfg.Log.Log(context.Background(), logLevel(res.OK), "restart finished", "ok", res.OK, "gen", res.Generation,
			"pid", res.Pid, "took", res.Duration.Round(time.Microsecond), "reason", run.reason)
	}
	s.answer(run, res)
	if run.requested() && !s.stopping {
		s.cfg.Observer.Ready() // ends the reload, whatever its outcome
	}
	if s.fatal != nil && !s.stopping {
		// The first generation never became ready: give up.
		s.beginStop(false)
	}
	if s.stopping {
		return
	}
	if len(s.queued) > 0 {
		next := s.queued[0]
		s.queued = s.queued[1:]
		s.beginRestart(next)
		return
	}
	if s.serving == nil {
		s.scheduleReplace()
	}
}

// answer sends the outcome to every caller following run. If the restart
// told an old generation to stop, they hear once more when it exits.
func (s *Supervisor) answer(run *restartRun, res Result) {
	for _, w := range run.waiters {
		w.send(Event{Phase: PhaseDone, Result: &res})
		if run.watch != nil && run.watch.state != Exited {
			run.watch.exitWatchers = append(run.watch.exitWatchers, w)
		} else {
			w.close()
		}
	}
	run.waiters = nil
}

// scheduleReplace starts a replacement for a crashed child after an
// exponential backoff. The sockets stay open meanwhile, so clients wait in
// the kernel's backlog instead of being refused.
func (s *Supervisor) scheduleReplace() {
	if s.replaceTimer != nil || s.restart != nil || s.stopping {
		return
	}
	delay := s.cfg.RestartBackoff
	for i := 0; i < s.crashes && delay < s.cfg.MaxBackoff; i++ {
		delay *= 2
	}
	delay = min(delay, s.cfg.MaxBackoff)
	s.crashes++
	s.cfg.Log.Warn("no generation is serving; starting a replacement", "after", delay, "failures_in_a_row", s.crashes)
	s.replaceSeq++
	seq := s.replaceSeq
	s.replaceTimer = time.AfterFunc(delay, func() { s.post(replaceEvent{seq: seq}) })
}

// checkLingering forgets the groups whose last process has gone.
func (s *Supervisor) checkLingering() {
	kept := s.lingering[:0]
	for _, g := range s.lingering {
		if g.proc.GroupAlive() {
			kept = append(kept, g)
			continue
		}
		if g.killTimer != nil {
			g.killTimer.Stop()
		}
		g.log.Debug("process group gone")
	}
	s.lingering = kept
}

func remove(gs []*generation, g *generation) []*generation {
	for i, x := range gs {
		if x == g {
			return append(gs[:i], gs[i+1:]...)
		}
	}
	return gs
}
