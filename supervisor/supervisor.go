// Package supervisor runs the generations of one command on relay's shared
// sockets and owns the restart state machine.
//
// One goroutine, Run's, owns all state. Other goroutines talk to it by
// sending requests (with a reply channel where they want an answer) and
// events (a child exited, a check finished, a timer fired), so no lock
// guards the generations.
package supervisor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/reaper"
	"github.com/relaysh/relay/signals"
	"github.com/relaysh/relay/socketpass"
)

// stableAfter is how long a generation must have served for its crash to
// count as a fresh failure rather than one more in a crash loop.
const stableAfter = 30 * time.Second

// ErrStopping is returned for requests made while relay stops.
var ErrStopping = errors.New("relay is stopping")

// Supervisor runs the generations of one command.
type Supervisor struct {
	cfg     Config
	checker *health.Checker

	reqC   chan any
	eventC chan any
	doneC  chan struct{}

	// Shared with helper goroutines.
	takeoverWarned atomic.Bool // the "takeover unavailable" line was logged
	// speaksNotify: a generation sent an sd_notify message, so the
	// default check waits for READY=1 from every later one (health.Auto).
	// It is kept for relay's life, across binaries: a new version of a
	// server that spoke sd_notify must not be cut over at its first
	// accept, and one that stopped speaking it fails its restart with
	// that reason, leaving the old one serving.
	speaksNotify atomic.Bool

	// The state below is owned by Run's goroutine.
	nextGen      int
	command      Command
	serving      *generation
	starting     *generation
	old          []*generation // draining or stopping; main process alive
	lingering    []*generation // main process gone; its group is not
	restart      *restartRun   // the restart under way, if any
	queued       []*restartRun // requests made during it, coalesced by what they ask
	everReady    bool
	crashes      int
	replaceTimer *time.Timer
	replaceSeq   int
	stopping     bool
	exitGen      *generation // serving when the stop began
	lastExit     *generation
	fatal        error
	stats        Stats
	last         *LastRestart
	statusLine   string // the last one the Observer heard
}

// Stats counts restarts.
type Stats struct {
	RestartsOK         int
	RestartsRolledBack int
	Refused            int
	Replacements       int
}

// Outcome is how Run ended.
type Outcome struct {
	// Child is the exit status of the generation that was serving when
	// the stop began (or of the last one to exit). Nil if none ran.
	Child *reaper.Status
}

// New returns a Supervisor for cfg. Call Run to start it.
func New(cfg Config) (*Supervisor, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, fmt.Errorf("configuring supervisor: %w", err)
	}
	return &Supervisor{
		cfg:     cfg,
		checker: health.NewChecker(cfg.Health, cfg.Reaper, socketpass.ChildEnv(cfg.Env, nil)),
		reqC:    make(chan any),
		eventC:  make(chan any, 16),
		doneC:   make(chan struct{}),
		command: cfg.Command,
	}, nil
}

type (
	restartReq struct {
		RestartRequest
		w *waiter // nil for fire and forget
	}
	stopReq    struct{ now bool }
	forwardReq struct{ sig syscall.Signal }

	exitEvent struct {
		g      *generation
		status reaper.Status
	}
	checkEvent struct {
		g   *generation
		err error
	}
	drainEvent     struct{ run *restartRun }
	preflightEvent struct {
		run *restartRun
		err error
	}
	killEvent    struct{ g *generation }
	replaceEvent struct{ seq int }
)

// restartRun is one restart, from request to outcome.
type restartRun struct {
	reason     string
	cmd        *Command // nil: the current command
	check      []string // pre-flight command; nil for none
	waiters    []*waiter
	cancelPre  context.CancelFunc // set while the pre-flight check runs
	begun      time.Time
	gen        *generation // the new generation, once started
	prev       *generation // the generation it replaces, in its drain window
	watch      *generation // the old generation whose exit callers hear of
	drainTimer *time.Timer
	waitLogged bool
}

// post delivers an event from a helper goroutine, unless Run has returned.
func (s *Supervisor) post(ev any) {
	select {
	case s.eventC <- ev:
	case <-s.doneC:
	}
}

func (s *Supervisor) request(r any) error {
	select {
	case s.reqC <- r:
		return nil
	case <-s.doneC:
		return ErrStopping
	}
}

// RestartRequest asks for a restart.
type RestartRequest struct {
	// Reason is logged: "signal HUP", "control", ...
	Reason string
	// Command, if not nil, is what the new generation runs. It becomes
	// the command of later generations once that generation is ready.
	Command *Command
	// Check is a pre-flight command run before any new child starts; if
	// it fails, the restart is refused and nothing changes. Nil means
	// Config.Check.
	Check []string
}

// RequestRestart asks for a restart and returns at once, as SIGHUP does.
// A request made during a restart is coalesced into one more restart.
func (s *Supervisor) RequestRestart(reason string) error {
	return s.request(restartReq{RestartRequest: RestartRequest{Reason: reason}})
}

// Restart asks for a restart and returns the channel that follows it: the
// phases, then PhaseDone with the Result, then PhaseOldExit if an old
// generation was told to stop. The channel is closed after the last event.
func (s *Supervisor) Restart(req RestartRequest) (<-chan Event, error) {
	w := newWaiter()
	if err := s.request(restartReq{RestartRequest: req, w: w}); err != nil {
		return nil, err
	}
	return w.c, nil
}

// RestartAndWait is Restart that returns the Result alone.
func (s *Supervisor) RestartAndWait(req RestartRequest) (Result, error) {
	events, err := s.Restart(req)
	if err != nil {
		return Result{}, err
	}
	var res *Result
	for ev := range events {
		if ev.Result != nil {
			res = ev.Result
		}
	}
	if res == nil {
		return Result{}, ErrStopping
	}
	return *res, nil
}

// Stop stops every generation: gracefully, or at once with SIGKILL.
func (s *Supervisor) Stop(now bool) { s.request(stopReq{now: now}) }

// Forward sends sig to the serving child's main process.
func (s *Supervisor) Forward(sig syscall.Signal) { s.request(forwardReq{sig: sig}) }

// Done is closed when Run has returned.
func (s *Supervisor) Done() <-chan struct{} { return s.doneC }

// Run starts the first generation and supervises until stopped. It
// returns an error if the first generation never becomes ready.
func (s *Supervisor) Run() (Outcome, error) {
	defer close(s.doneC)
	s.beginRestart(&restartRun{reason: reasonStart})
	s.publishStatus()
	for !s.finished() {
		select {
		case r := <-s.reqC:
			s.handleRequest(r)
		case ev := <-s.eventC:
			s.handleEvent(ev)
		case <-s.cfg.Reaper.Orphans():
			s.checkLingering()
		}
		s.publishStatus()
	}
	var out Outcome
	switch {
	case s.exitGen != nil:
		out.Child = &s.exitGen.status
	case s.lastExit != nil:
		out.Child = &s.lastExit.status
	}
	return out, s.fatal
}

func (s *Supervisor) finished() bool {
	return s.stopping && s.serving == nil && s.starting == nil && len(s.old) == 0 && len(s.lingering) == 0
}

func (s *Supervisor) handleRequest(r any) {
	switch r := r.(type) {
	case restartReq:
		s.onRestartRequest(r)
	case stopReq:
		s.beginStop(r.now)
	case statusReq:
		r.reply <- s.status()
	case forwardReq:
		if s.serving == nil {
			s.cfg.Log.Warn("no serving child to forward the signal to", "signal", signals.Name(r.sig))
			return
		}
		if err := s.serving.proc.Signal(r.sig); err != nil {
			s.serving.log.Warn("forwarding signal", "signal", signals.Name(r.sig), "err", err)
			return
		}
		s.serving.log.Info("forwarded signal", "signal", signals.Name(r.sig))
	}
}

func (s *Supervisor) handleEvent(ev any) {
	switch ev := ev.(type) {
	case exitEvent:
		s.onExit(ev.g, ev.status)
	case checkEvent:
		s.onCheck(ev.g, ev.err)
	case drainEvent:
		s.onDrainEnd(ev.run)
	case preflightEvent:
		s.onPreflight(ev.run, ev.err)
	case killEvent:
		s.onKillTimeout(ev.g)
	case replaceEvent:
		if ev.seq != s.replaceSeq || s.replaceTimer == nil {
			return // a timer that was stopped after it fired
		}
		s.replaceTimer = nil
		if s.serving == nil && s.restart == nil && !s.stopping {
			s.stats.Replacements++
			s.beginRestart(&restartRun{reason: reasonReplace})
		}
	}
}

func (s *Supervisor) onRestartRequest(r restartReq) {
	run := &restartRun{reason: r.Reason, cmd: r.Command, check: r.Check}
	if run.check == nil {
		run.check = s.cfg.Check
	}
	if r.w != nil {
		run.waiters = append(run.waiters, r.w)
	}
	if s.stopping {
		s.answer(run, Result{Refused: true, Reason: ErrStopping.Error()})
		return
	}
	if s.restart == nil {
		if s.replaceTimer != nil {
			s.replaceTimer.Stop()
			s.replaceTimer = nil
		}
		s.beginRestart(run)
		return
	}
	// Coalesce: every request made during this restart is answered by a
	// restart that begins after it, so nobody is told "done" for a restart
	// that began before it asked. Requests for the same command and check
	// share one; different ones run in the order they came.
	run.emit(Event{Phase: PhaseQueued})
	for _, q := range s.queued {
		if sameRequest(q, run) {
			q.waiters = append(q.waiters, run.waiters...)
			s.cfg.Log.Info("restart requested during a restart; coalesced with a queued one", "reason", r.Reason)
			return
		}
	}
	if len(s.queued) >= maxQueued {
		s.answer(run, Result{Refused: true, Reason: fmt.Sprintf("%d different restarts are queued already; try again later", maxQueued)})
		return
	}
	s.queued = append(s.queued, run)
	s.cfg.Log.Info("restart requested during a restart; queued", "reason", r.Reason, "queued", len(s.queued))
}

// maxQueued bounds the distinct restarts waiting behind the one under way.
const maxQueued = 16

// sameRequest reports whether two restarts ask for the same thing.
func sameRequest(a, b *restartRun) bool {
	if (a.cmd == nil) != (b.cmd == nil) || !slices.Equal(a.check, b.check) {
		return false
	}
	return a.cmd == nil || (a.cmd.Path == b.cmd.Path && slices.Equal(a.cmd.Args, b.cmd.Args))
}

func (s *Supervisor) beginStop(now bool) {
	if !s.stopping {
		s.stopping = true
		s.cfg.Observer.Stopping()
		s.exitGen = s.serving
		s.cfg.Log.Info("stopping", "signal", signals.Name(s.cfg.StopSignal), "stop_timeout", s.cfg.StopTimeout)
		if s.replaceTimer != nil {
			s.replaceTimer.Stop()
			s.replaceTimer = nil
		}
		for _, q := range s.queued {
			s.answer(q, Result{Refused: true, Reason: ErrStopping.Error()})
		}
		s.queued = nil
		switch run := s.restart; {
		case run == nil:
		case run.prev != nil:
			// The new generation already serves; the stop ends the drain.
			run.drainTimer.Stop()
			s.finishRestart(s.resultFor(run.gen, true, ""))
		case run.gen == nil:
			// It was in its pre-flight check, or waiting for an old
			// generation to exit.
			if run.cancelPre != nil {
				run.cancelPre()
			}
			s.finishRestart(Result{Refused: true, Reason: ErrStopping.Error()})
		}
	}
	for _, g := range s.alive() {
		if g.cancelCheck != nil {
			g.cancelCheck()
		}
		switch {
		case now:
			g.log.Warn("killing generation now", "signal", "KILL")
			signalGroup(g, syscall.SIGKILL)
		case g.state != Stopping:
			s.stopGen(g)
		}
	}
	if now {
		for _, g := range s.lingering {
			signalGroup(g, syscall.SIGKILL)
		}
	}
}

// alive lists the generations whose main process is alive.
func (s *Supervisor) alive() []*generation {
	var gs []*generation
	for _, g := range []*generation{s.serving, s.starting} {
		if g != nil {
			gs = append(gs, g)
		}
	}
	return append(gs, s.old...)
}

func signalGroup(g *generation, sig syscall.Signal) {
	if err := g.proc.SignalGroup(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		g.log.Warn("signalling process group", "signal", signals.Name(sig), "err", err)
	}
}

func logLevel(ok bool) slog.Level {
	if ok {
		return slog.LevelInfo
	}
	return slog.LevelError
}
