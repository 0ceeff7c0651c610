package supervisor

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/relaysh/relay/internal/sockets/steer"
	"github.com/relaysh/relay/signals"
	"github.com/relaysh/relay/socketpass"
)

// Reasons of the restarts relay begins by itself.
const (
	reasonStart    = "start"
	reasonReplace  = "replace crashed child"
	reasonLiveness = "liveness failed"
)

// maxQueued bounds the distinct restarts waiting behind the one under way.
const maxQueued = 16

// restartRun is one restart, from request to outcome.
type restartRun struct {
	reason    string
	cmd       *Command // nil: the current command
	check     []string // pre-flight command; nil for none
	waiters   []*waiter
	cancelPre context.CancelFunc // cancels the pre-flight check while it runs
	begun     time.Time
	gen       *generation // the new generation, once started
	prev      *generation // the generation it replaces, from its drain window on
	watch     *generation // the old generation whose exit callers hear of
	drain     drainWindow
	confirm   confirmWindow
	// back is why the restart was rolled back after its switch, and
	// failed the new generation it took traffic from (confirm.go): then
	// gen is the one that serves again, and prev the failed one while it
	// drains.
	back   *rollback
	failed *generation
	// phase is where the restart is: the last phase its callers were
	// told of (emit sets it); "" before the first.
	phase Phase
	// roll is the rolling restart's state (rolling.go); nil for a
	// restart that starts every copy at once.
	roll *rolling
}

// drainWindow is the time between the switch to a restart's new
// generation and the old one's stop signal.
type drainWindow struct {
	began  time.Time
	timer  timer              // --drain: the end at the latest
	cancel context.CancelFunc // ends the watch of the old sockets; nil if none
}

// end stops whatever would end the window: the timer and the watch.
func (d *drainWindow) end() {
	if d.timer != nil {
		d.timer.Stop()
	}
	if d.cancel != nil {
		d.cancel()
	}
}

// DrainEnd is how a drain window ended, in the log and on the
// PhaseStopping Event.Ended.
type DrainEnd string

// How a drain ended.
const (
	// EndedEmpty: nothing more could reach the old generation's
	// steered sockets.
	EndedEmpty DrainEnd = "empty"
	// EndedMax: --drain passed before they emptied.
	EndedMax DrainEnd = "max"
	// EndedFixed: --drain passed; their emptying could not be seen.
	EndedFixed DrainEnd = "fixed"
	// EndedHandedOver: the old generation failed its liveness check and
	// accepted nothing queued on its steered sockets for stallQuiet, so
	// what was queued there was moved to the new generation's
	// (env.handOver).
	EndedHandedOver DrainEnd = "handed_over"
)

// DrainMode is how a drain window is to end, in the log and on the
// PhaseDraining Event.Until.
type DrainMode string

// How a drain is to end.
const (
	// DrainAdaptive: when the old sockets are empty, within --drain.
	DrainAdaptive DrainMode = "adaptive"
	// DrainFixed: when --drain passes; their emptying cannot be seen.
	DrainFixed DrainMode = "fixed"
)

// requested reports whether someone asked for run (a signal or a control
// request), as opposed to relay's own first start, crash replacements and
// liveness replacements.
func (run *restartRun) requested() bool {
	return run.reason != reasonStart && run.reason != reasonReplace && run.reason != reasonLiveness
}

func (s *Supervisor) onRestartRequest(r restartReq) {
	run := &restartRun{reason: r.Reason, cmd: r.Command, check: r.Check}
	if run.check == nil {
		run.check = s.cfg.Check
	}
	if r.w != nil {
		run.waiters = append(run.waiters, r.w)
	}
	if s.stop.begun || s.delaying() {
		s.refuse(run, ErrStopping.Error())
		return
	}
	if win := s.inWindow(); win != nil {
		win.gen.log.Info("restart requested during the confirmation window: the new generation is confirmed first", "reason", r.Reason)
		s.confirm(win, ConfirmedByRestart)
	}
	if s.restarts.current == nil {
		s.cancelReplace()
		s.beginRestart(run)
		return
	}
	// Coalesce: every request made during this restart is answered by a
	// restart that begins after it, so nobody is told "done" for a restart
	// that began before it asked. Requests for the same command and check
	// share one; different ones run in the order they came.
	run.emit(Event{Phase: PhaseQueued})
	for _, q := range s.restarts.queued {
		if sameRequest(q, run) {
			q.waiters = append(q.waiters, run.waiters...)
			s.cfg.Log.Info("restart requested during a restart; coalesced with a queued one", "reason", r.Reason)
			return
		}
	}
	if len(s.restarts.queued) >= maxQueued {
		s.refuse(run, fmt.Sprintf("%d different restarts are queued already; try again later", maxQueued))
		return
	}
	s.restarts.queued = append(s.restarts.queued, run)
	s.cfg.Log.Info("restart requested during a restart; queued", "reason", r.Reason, "queued", len(s.restarts.queued))
}

// refuse answers a restart that never began as refused, and counts it
// with the refused restarts that relay status shows.
func (s *Supervisor) refuse(run *restartRun, reason string) {
	if run.requested() {
		s.counts.Refused++
	}
	s.cfg.Log.Warn("restart refused", "reason", run.reason, "why", reason)
	s.answer(run, Result{Outcome: RestartRefused, Reason: reason})
}

// sameRequest reports whether two restarts ask for the same thing.
func sameRequest(a, b *restartRun) bool {
	if (a.cmd == nil) != (b.cmd == nil) || !slices.Equal(a.check, b.check) {
		return false
	}
	return a.cmd == nil || (a.cmd.Path == b.cmd.Path && slices.Equal(a.cmd.Args, b.cmd.Args))
}

func (s *Supervisor) beginRestart(run *restartRun) {
	run.begun = s.env.now()
	s.restarts.current = run
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
	ctx, cancel := s.env.withTimeout(context.Background(), s.cfg.HealthTimeout)
	run.cancelPre = cancel
	childEnv := socketpass.ChildEnv(s.cfg.Env, nil)
	go func() {
		err := s.env.preflight(ctx, run.check, childEnv)
		cancel()
		s.post(preflightEvent{run: run, err: err})
	}()
}

func (s *Supervisor) onPreflight(run *restartRun, err error) {
	if run != s.restarts.current {
		return // the stop answered it already
	}
	run.cancelPre = nil
	if err != nil {
		s.cfg.Log.Error("pre-flight check failed; restart refused, nothing changed", "check", strings.Join(run.check, " "), "err", err)
		s.finishRestart(Result{Outcome: RestartRefused, Reason: "pre-flight check failed: " + err.Error()})
		return
	}
	s.cfg.Log.Info("pre-flight check passed", "check", strings.Join(run.check, " "))
	run.emit(Event{Phase: PhaseChecked, Check: strings.Join(run.check, " ")})
	s.advance()
}

// advance starts the restart's new generation once the bound on old
// generations allows it.
func (s *Supervisor) advance() {
	run, gs := s.restarts.current, &s.gens
	if run == nil || run.gen != nil || run.phase == PhaseChecking || s.stop.begun {
		return // nothing to start, already started, or the check still runs
	}
	// The new generation will push the serving one into the old ones.
	if old := gs.retired(); gs.serving != nil && len(old) >= s.cfg.MaxDraining {
		if run.phase != PhaseWaitOld {
			run.emit(Event{Phase: PhaseWaitOld, Generation: old[0].n, Pid: old[0].pid()})
			s.cfg.Log.Info("waiting for an old generation to be gone before starting a new one",
				"old_generations", len(old), "max_draining", s.cfg.MaxDraining, "oldest_gen", old[0].n, "oldest_pid", old[0].pid())
		}
		return
	}
	cmd := gs.command
	if run.cmd != nil {
		cmd = *run.cmd
	}
	gs.next++
	count := s.cfg.Workers
	if s.rolls(run) {
		count = s.cfg.Rolling
		run.roll = &rolling{k: count}
	}
	g, err := s.spawn(gs.next, cmd, count)
	if err != nil {
		s.cfg.Log.Error("starting new generation", "gen", gs.next, "err", err)
		if !gs.everReady {
			s.stop.fatal = fmt.Errorf("starting generation %d: %w", gs.next, err)
		}
		s.finishRestart(Result{Outcome: RestartRolledBack, Generation: gs.next, Reason: err.Error()})
		return
	}
	run.gen = g
	if run.roll != nil {
		run.roll.batch = slices.Clone(g.copies)
	}
	gs.move(g, Starting)
	attrs := []any{"cmd", cmd.Args, "check", s.cfg.Health.String(), "health_addr", g.first().healthAddr}
	if s.cfg.Workers > 1 {
		attrs = append(attrs, "workers", s.cfg.Workers, "pids", g.pids())
	}
	if run.roll != nil {
		attrs = append(attrs, "rolling", run.roll.k)
	}
	g.log.Info("generation starting", attrs...)
	run.emit(Event{Phase: PhaseStarting, Generation: g.n, Pid: g.pid()})
	run.emit(Event{Phase: PhaseWaiting, Generation: g.n, Pid: g.pid(), Check: s.cfg.Health.String()})
	if g.failure == nil {
		s.startCheck(g)
	}
}

// onCheck ends the readiness check of copy c: of a starting generation,
// which is ready once every copy is; or of a copy's replacement in the
// serving generation (workers.go).
func (s *Supervisor) onCheck(c *copyProc, err error) {
	g := c.g
	if c.exited || c.worker >= len(g.copies) || g.copies[c.worker] != c {
		return // it exited, or was replaced
	}
	select {
	case <-c.proc.Done():
		// It passed its check but has exited since; the exit event,
		// which waits for the last of its stderr, handles it.
		return
	default:
	}
	if run := s.restarts.current; run != nil && run.roll != nil && run.gen == g && g.state == Starting && !s.stop.begun {
		s.onRollCheck(run, c, err)
		return
	}
	if g == s.gens.serving && g.state == Serving && !s.stop.begun {
		s.onReplacementCheck(c, err)
		return
	}
	if g != s.gens.starting || g.state != Starting || g.failure != nil {
		return // the generation already exited, failed, or the stop took it
	}
	if err != nil {
		g.failure, g.culprit = err, c
		msg := "new generation failed its readiness check; killing it"
		if c.takeover != nil && c.takeover.failedErr() != nil {
			msg = "new generation cannot serve its listeners; killing it"
		}
		if len(g.copies) > 1 {
			err = fmt.Errorf("copy %d (pid %d): %w", c.worker, c.pid(), err)
			g.failure = err
		}
		c.log.Warn(msg, "err", err)
		g.contain.kill()
		return // the rollback completes when it has exited
	}
	c.ready = true
	if !s.allReady(g) {
		c.log.Debug("copy ready; waiting for the others")
		return
	}
	// The switch: from here on, steered listeners give their new
	// connections to g alone.
	s.readyToServe(g)
}

// promote makes a ready generation the serving one and sends the one it
// replaces into its drain window.
func (s *Supervisor) promote(g *generation) {
	run, gs := s.restarts.current, &s.gens
	g.readyAt = s.env.now()
	for _, c := range g.copies {
		c.cancelCheck()
	}
	gs.everReady = true
	gs.command = g.cmd
	attrs := []any{"ready_after", g.readyAt.Sub(g.started).Round(time.Microsecond),
		"since_request", g.readyAt.Sub(run.begun).Round(time.Microsecond), "sockets", s.socketsTaken(g.first())}
	if len(g.copies) > 1 {
		attrs = append(attrs, "workers", len(g.copies), "pids", g.pids())
	}
	g.log.Info("generation ready", attrs...)
	run.emit(Event{Phase: PhaseReady, Generation: g.n, Pid: g.pid(), Duration: g.readyAt.Sub(g.started)})
	s.cfg.Recorder.GenerationReady(g.n, g.readyAt.Sub(g.started))
	prev := gs.serving
	if prev != nil {
		gs.move(prev, Draining)
	}
	gs.move(g, Serving)
	if run.reason == reasonStart {
		s.cfg.Observer.Ready()
	}
	if prev == nil {
		s.finishRestart(s.resultFor(g, RestartOK, ""))
		return
	}
	run.prev = prev
	if s.windowed(run) {
		s.beginConfirm(run)
		return
	}
	if s.cfg.Drain <= 0 {
		s.retire(run, "")
		return
	}
	s.beginDrain(run, prev)
}

// beginDrain opens prev's drain window. Where the sockets can be watched
// (env.drained), it ends as soon as nothing more can reach prev's steered
// sockets, --drain at the latest; elsewhere it lasts --drain.
func (s *Supervisor) beginDrain(run *restartRun, prev *generation) {
	run.drain.began = s.env.now()
	mode := s.watchDrain(run, prev, s.cfg.Drain)
	prev.log.Info("old generation draining", "until", mode, "drain", s.cfg.Drain)
	run.emit(Event{Phase: PhaseDraining, Generation: prev.n, Pid: prev.pid(), Duration: s.cfg.Drain, Until: mode})
}

// watchDrain arms what ends run's drain window: the watches of prev's
// sockets, and the end at the latest, after limit. It returns how the
// window ends.
func (s *Supervisor) watchDrain(run *restartRun, prev *generation, limit time.Duration) DrainMode {
	d := &run.drain
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel = cancel // ends the watches below
	failedLiveness := run.reason == reasonLiveness || run.back != nil && run.back.cause == RollbackLiveness
	if failedLiveness && s.env.stalled != nil && s.env.handOver != nil {
		go func() {
			err := s.env.stalled(ctx, prev.n, stallQuiet)
			if ctx.Err() == nil && err == nil {
				s.post(stallEvent{run: run})
			}
		}()
	}
	mode, atMax := DrainFixed, EndedFixed
	if s.env.drained != nil {
		mode, atMax = DrainAdaptive, EndedMax
		waiting := func(b steer.Backlog) {
			prev.log.Debug("connections still on their way to the old generation; its drain waits for them",
				"queued", b.Queued, "handshakes", b.Handshakes, "unread", b.Unread, "quic_handshakes", b.QUIC)
		}
		go func() {
			err := s.env.drained(ctx, prev.n, waiting)
			if ctx.Err() == nil {
				s.post(drainEvent{run: run, ended: EndedEmpty, err: err})
			}
		}()
	}
	// The window's end is armed before the callers hear it began: what
	// they do next may rely on it (a test's clock, a stop).
	d.timer = s.env.afterFunc(limit, func() { s.post(drainEvent{run: run, ended: atMax}) })
	return mode
}

// stallQuiet is how long the old generation of a liveness replacement may
// leave connections queued on its sockets without accepting any before they
// are handed over to the new one. A server that accepts at all takes one
// within milliseconds; one that takes none for this long is hung, and only
// the hand-over gets what waits there served.
const stallQuiet = 100 * time.Millisecond

// onStall hands over the sockets of run's old generation, which failed its
// liveness check and has accepted nothing queued on them for stallQuiet: a
// generation that stopped accepting (hung, or stopped with SIGSTOP) would
// hold them until --drain, and then they would be reset. Its sockets leave
// their groups, and the kernel moves what was queued on them, and the
// handshakes on their way, to the new generation's sockets; it gets its
// stop signal at once. If they cannot leave, it drains on as usual. A
// generation that still accepts is never handed over: its listener
// vanishing under it could make it drop what it serves.
func (s *Supervisor) onStall(run *restartRun) {
	if run != s.restarts.current || run.phase != PhaseDraining || run.prev.state != Draining {
		return // the drain ended already
	}
	prev := run.prev
	queued, err := s.env.handOver(prev.n)
	if err != nil {
		prev.log.Warn("cannot move the connections queued on the failed generation's sockets; it drains on", "err", err)
		return
	}
	run.drain.end()
	prev.log.Info("old generation failed its liveness check and accepts nothing: its queued connections moved to the new generation",
		"queued", queued, "accepted_none_for", stallQuiet, "after_switch", s.env.now().Sub(run.drain.began).Round(time.Microsecond),
		"new_gen", run.gen.n, "new_pid", run.gen.pid())
	s.retire(run, EndedHandedOver)
}

// onDrainEnd ends run's drain window: its old sockets are empty, or
// --drain passed. A watch that failed leaves the window to --drain.
func (s *Supervisor) onDrainEnd(run *restartRun, ended DrainEnd, err error) {
	if run != s.restarts.current || run.phase != PhaseDraining {
		return // the stop or a rollback ended the window already
	}
	prev := run.prev
	if err != nil {
		prev.log.Warn("cannot see the old generation's sockets empty; it drains for the whole --drain", "drain", s.cfg.Drain, "err", err)
		return
	}
	run.drain.end()
	took := s.env.now().Sub(run.drain.began)
	prev.log.Info("old generation drained", "drain", took.Round(time.Microsecond), "ended", ended, "max", s.cfg.Drain)
	s.retire(run, ended)
}

// retire ends a restart whose new generation served: the old generation
// (after a rollback in the confirmation window, the failed new one) gets
// its stop signal, and the callers following the restart are told when it
// exits. ended says how its drain ended; "" for no drain.
func (s *Supervisor) retire(run *restartRun, ended DrainEnd) {
	prev := run.prev
	if prev.state == Draining {
		s.stopGen(prev)
		ev := Event{Phase: PhaseStopping, Generation: prev.n, Pid: prev.pid(), Signal: signals.Name(s.cfg.StopSignal), Ended: ended}
		if ended != "" {
			ev.Duration = s.env.now().Sub(run.drain.began)
		}
		run.emit(ev)
	}
	run.watch = prev
	s.finishRestart(s.outcome(run))
}

// outcome is the result of run, whose new generation served: ok, unless
// it was rolled back in its confirmation window.
func (s *Supervisor) outcome(run *restartRun) Result {
	if run.back != nil {
		return s.resultFor(run.failed, RestartRolledBack, run.back.reason)
	}
	return s.resultFor(run.gen, RestartOK, "")
}

func (s *Supervisor) resultFor(g *generation, outcome RestartOutcome, reason string) Result {
	r := Result{Outcome: outcome, Reason: reason}
	if g != nil {
		r.Generation, r.Pid, r.Command = g.n, g.pid(), g.cmd.Args
		if !g.readyAt.IsZero() {
			r.ReadyAfter = g.readyAt.Sub(g.started)
		}
		if outcome != RestartOK {
			r.StderrTail = g.stderrTail()
		}
	}
	return r
}

// finishRestart ends the restart under way and starts the queued one, or a
// replacement if nothing serves.
func (s *Supervisor) finishRestart(res Result) {
	run := s.restarts.current
	s.restarts.current = nil
	res.Duration = s.env.now().Sub(run.begun)
	if run.requested() {
		switch res.Outcome {
		case RestartOK:
			s.counts.OK++
		case RestartRefused:
			s.counts.Refused++
		default:
			s.counts.RolledBack++
		}
		s.last = &LastRestart{Result: res, Finished: s.env.now()}
		s.cfg.Recorder.RestartFinished(res)
	}
	ok := res.Outcome == RestartOK
	if run.reason != reasonStart || !ok {
		s.cfg.Log.Log(context.Background(), logLevel(ok), "restart finished", "ok", ok, "gen", res.Generation,
			"pid", res.Pid, "took", res.Duration.Round(time.Microsecond), "reason", run.reason)
	}
	s.answer(run, res)
	if run.requested() && !s.stop.begun && !s.delaying() {
		s.cfg.Observer.Ready() // ends the reload, whatever its outcome
	}
	if s.stop.fatal != nil && !s.stop.begun {
		// The first generation never became ready: give up.
		s.beginStop(false)
	}
	if s.stop.begun {
		return
	}
	if q := s.restarts.queued; len(q) > 0 {
		s.restarts.queued = q[1:]
		s.beginRestart(q[0])
		return
	}
	if s.gens.serving == nil {
		s.scheduleReplace()
	}
	s.refill()
}

// answer sends the outcome to every caller following run. If the restart
// told an old generation to stop, they hear once more when it exits.
func (s *Supervisor) answer(run *restartRun, res Result) {
	run.emit(Event{Phase: PhaseDone, Result: &res})
	for _, w := range run.waiters {
		if run.watch != nil && !run.watch.gone {
			run.watch.exitWatchers = append(run.watch.exitWatchers, w)
		} else {
			w.close()
		}
	}
	run.waiters = nil
}
