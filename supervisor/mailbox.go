package supervisor

import (
	"syscall"
	"time"

	"github.com/relaysh/relay/internal/reaper"
	"github.com/relaysh/relay/signals"
)

// request is what a caller of the API sends Run's goroutine, which calls
// handleRequest.
type request interface{ handleRequest(s *Supervisor) }

// event is what a helper goroutine or a timer posts to Run's goroutine, which
// calls handleEvent: a child exited, a check finished, a timer fired.
type event interface{ handleEvent(s *Supervisor) }

// The requests.
type (
	restartReq struct {
		RestartRequest
		w *waiter // nil for fire and forget
	}
	stopReq      struct{ now bool }
	stopAfterReq struct{ d time.Duration }
	forwardReq   struct{ sig syscall.Signal }
	statusReq    struct{ reply chan Status }
	rollbackReq  struct{ reply chan rollbackReply }
)

type rollbackReply struct {
	rolled Rolled
	err    error
}

func (r rollbackReq) handleRequest(s *Supervisor) {
	rolled, err := s.onRollbackRequest()
	r.reply <- rollbackReply{rolled: rolled, err: err}
}

func (r restartReq) handleRequest(s *Supervisor)   { s.onRestartRequest(r) }
func (r stopReq) handleRequest(s *Supervisor)      { s.beginStop(r.now) }
func (r stopAfterReq) handleRequest(s *Supervisor) { s.delayStop(r.d) }
func (r statusReq) handleRequest(s *Supervisor)    { r.reply <- s.status() }

func (r forwardReq) handleRequest(s *Supervisor) {
	g := s.gens.serving
	if s.stop.begun && s.stop.exitGen != nil && s.stop.exitGen.state != Exited {
		g = s.stop.exitGen // it served when the stop began, and stops now
	}
	if g == nil {
		s.cfg.Log.Warn("no serving child to forward the signal to", "signal", signals.Name(r.sig))
		return
	}
	// Each copy's main process gets it; one that has exited is passed
	// over.
	for _, c := range g.copies {
		if c.exited {
			continue
		}
		if err := c.proc.Signal(r.sig); err != nil {
			c.log.Warn("forwarding signal", "signal", signals.Name(r.sig), "err", err)
			continue
		}
		c.log.Info("forwarded signal", "signal", signals.Name(r.sig))
	}
}

// The events, every one of them: of the generations and the restarts, then
// of the liveness watch (liveness.go). Run hears one more, the orphans
// reaped, from env.orphans, and has checkLingering handle it as it does
// emptiedEvent.
type (
	// exitEvent: copy c's main process exited, and the last of its
	// stderr was read (or stderrGrace passed).
	exitEvent struct {
		c      *copyProc
		status reaper.Status
	}
	// checkEvent: copy c's readiness check ended, ready (nil) or not.
	checkEvent struct {
		c   *copyProc
		err error
	}
	// copyReplaceDue: the backoff before replacing copy c, which exited
	// while its generation served, passed.
	copyReplaceDue struct{ c *copyProc }
	// copyDrainedEvent: leaving copy c's socket drained (err nil), the
	// watch failed (err), or --drain passed (atMax).
	copyDrainedEvent struct {
		c     *copyProc
		atMax bool
		err   error
	}
	// copyKillEvent: leaving copy c's stop timeout passed.
	copyKillEvent struct{ c *copyProc }
	// fallBackDrainedEvent: the new generation of run, a rolling restart
	// that fell back, drained (or --drain passed).
	fallBackDrainedEvent struct{ run *restartRun }
	// preflightEvent: run's pre-flight command ended.
	preflightEvent struct {
		run *restartRun
		err error
	}
	// drainEvent: run's drain window ended (err nil), how is in ended,
	// or the watch of its old sockets failed (err).
	drainEvent struct {
		run   *restartRun
		ended DrainEnd
		err   error
	}
	// stallEvent: the old generation of run, which failed its liveness
	// check, has accepted nothing queued on its sockets for stallQuiet.
	stallEvent struct{ run *restartRun }
	// confirmEvent: run's confirmation window passed.
	confirmEvent struct{ run *restartRun }
	// stoppingNotice: g's child sent STOPPING=1 or ERRNO= (what).
	stoppingNotice struct {
		g    *generation
		what string
	}
	// killEvent: g's stop timeout passed.
	killEvent struct{ g *generation }
	// replaceEvent: the backoff before replacement number seq passed.
	replaceEvent struct{ seq int }
	// emptiedEvent: a lingering generation's cgroup has no process left.
	emptiedEvent struct{}
	// delayEvent: the shutdown delay passed.
	delayEvent struct{}

	// watchdogPing: copy c's child sent WATCHDOG=1.
	watchdogPing struct{ c *copyProc }
	// probeDue: the interval before the next probe of watch seq passed.
	probeDue struct{ seq int }
	// probeDone: a probe of watch seq ended, passed (nil) or not.
	probeDone struct {
		seq int
		c   *copyProc // the copy probed, with --workers; nil for the one copy
		err error
	}
	// watchdogDue: the child's watchdog of watch seq may have expired.
	watchdogDue struct{ seq int }
	// livenessReplaceDue: the backoff before replacing g passed.
	livenessReplaceDue struct{ g *generation }
)

func (ev exitEvent) handleEvent(s *Supervisor)      { s.onCopyExit(ev.c, ev.status) }
func (ev checkEvent) handleEvent(s *Supervisor)     { s.onCheck(ev.c, ev.err) }
func (ev copyReplaceDue) handleEvent(s *Supervisor) { s.onCopyReplaceDue(ev.c) }
func (ev copyDrainedEvent) handleEvent(s *Supervisor) {
	s.onCopyDrained(ev.c, ev.atMax, ev.err)
}
func (ev copyKillEvent) handleEvent(s *Supervisor)        { s.onCopyKillTimeout(ev.c) }
func (ev fallBackDrainedEvent) handleEvent(s *Supervisor) { s.onFallBackDrained(ev.run) }
func (ev preflightEvent) handleEvent(s *Supervisor)       { s.onPreflight(ev.run, ev.err) }
func (ev drainEvent) handleEvent(s *Supervisor)           { s.onDrainEnd(ev.run, ev.ended, ev.err) }
func (ev stallEvent) handleEvent(s *Supervisor)           { s.onStall(ev.run) }
func (ev confirmEvent) handleEvent(s *Supervisor)         { s.onConfirmDue(ev.run) }
func (ev stoppingNotice) handleEvent(s *Supervisor)       { s.onChildStopping(ev.g, ev.what) }
func (ev killEvent) handleEvent(s *Supervisor)            { s.onKillTimeout(ev.g) }
func (ev replaceEvent) handleEvent(s *Supervisor)         { s.onReplaceDue(ev.seq) }
func (emptiedEvent) handleEvent(s *Supervisor)            { s.checkLingering() }
func (delayEvent) handleEvent(s *Supervisor)              { s.onDelayEnd() }

func (ev watchdogPing) handleEvent(s *Supervisor)       { s.onWatchdogPing(ev.c) }
func (ev probeDue) handleEvent(s *Supervisor)           { s.onProbeDue(ev.seq) }
func (ev probeDone) handleEvent(s *Supervisor)          { s.onProbeDone(ev.seq, ev.c, ev.err) }
func (ev watchdogDue) handleEvent(s *Supervisor)        { s.onWatchdogDue(ev.seq) }
func (ev livenessReplaceDue) handleEvent(s *Supervisor) { s.onLivenessReplaceDue(ev.g) }

// post delivers an event from a helper goroutine, unless Run has returned.
func (s *Supervisor) post(ev event) {
	select {
	case s.eventC <- ev:
	case <-s.doneC:
	}
}

func (s *Supervisor) request(r request) error {
	select {
	case s.reqC <- r:
		return nil
	case <-s.doneC:
		return ErrStopping
	}
}
