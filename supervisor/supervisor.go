package supervisor

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/relaysh/relay/internal/reaper"
)

// stableAfter is how long a generation must have served for its crash to
// count as a fresh failure rather than one more in a crash loop.
const stableAfter = 30 * time.Second

// ErrStopping is returned for requests made while relay stops.
var ErrStopping = errors.New("relay is stopping")

// Supervisor runs the generations of one command.
type Supervisor struct {
	cfg Config
	env env

	reqC   chan request
	eventC chan event
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

	// The state below is owned by Run's goroutine, by concern; doc.go
	// says how each event changes it.
	gens       generations
	restarts   restartQueue
	crash      crashReplacement
	live       livenessState
	stop       stopState
	counts     RestartCounts // OK, RolledBack, Refused, Replacements, LivenessReplacements; status adds the rest
	last       *LastRestart
	statusLine string // the last one the Observer heard
}

// generations are the live generations, by role, and what the next runs.
type generations struct {
	next      int     // the number of the last generation started
	command   Command // what a new generation runs unless its restart says
	serving   *generation
	starting  *generation
	old       []*generation // draining or stopping; main process alive
	lingering []*generation // main process gone; its group (or cgroup) is not
	everReady bool          // a generation has been ready once
	lastExit  *generation
}

// restartQueue is the restart under way and those asked for during it.
type restartQueue struct {
	current *restartRun
	queued  []*restartRun // coalesced by what they ask, in order
}

// crashReplacement is the replacement of a serving generation that exited
// on its own.
type crashReplacement struct {
	crashes int   // failures in a row, for the backoff
	timer   timer // the pending replacement; nil for none
	seq     int   // names the timer's event: one that fires after Stop is ignored
}

// stopState is relay's stop.
type stopState struct {
	begun   bool
	exitGen *generation // serving when the stop began: its status is relay's
	fatal   error       // why Run fails: the first generation never became ready
	// delayUntil is when the graceful stop begins, while a shutdown
	// delay (StopAfter) runs; zero otherwise. delayTimer ends it.
	delayUntil time.Time
	delayTimer timer
}

// Outcome is how Run ended.
type Outcome struct {
	// Child is the exit status of the generation that was serving when
	// the stop began (or of the last one to exit). Nil if none ran.
	Child *reaper.Status
}

// New returns a Supervisor for cfg. Call Run to start it.
func New(cfg Config) (*Supervisor, error) {
	return newSupervisor(cfg, func(cfg Config) (env, error) {
		if cfg.Reaper == nil {
			return env{}, errors.New("no reaper")
		}
		return reaperEnv(cfg.Reaper, cfg.Health, cfg.Liveness, cfg.Env, cfg.Cgroups, cfg.Sockets), nil
	})
}

// newSupervisor returns a Supervisor for cfg that reaches the world
// through the env that wire makes of cfg with its defaults.
func newSupervisor(cfg Config, wire func(Config) (env, error)) (*Supervisor, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, fmt.Errorf("configuring supervisor: %w", err)
	}
	e, err := wire(cfg)
	if err != nil {
		return nil, fmt.Errorf("configuring supervisor: %w", err)
	}
	return &Supervisor{
		cfg:    cfg,
		env:    e,
		reqC:   make(chan request),
		eventC: make(chan event, 16),
		doneC:  make(chan struct{}),
		gens:   generations{command: cfg.Command},
	}, nil
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

// Stop stops every generation: gracefully, or at once with SIGKILL. A
// shutdown delay under way (StopAfter) ends.
func (s *Supervisor) Stop(now bool) { s.request(stopReq{now: now}) }

// StopAfter begins a shutdown delay: everything keeps serving for d,
// crashed generations are still replaced, restarts asked for meanwhile
// are refused (ErrStopping), and Status.ShutdownAt says when the graceful
// stop (as Stop(false)) begins. Stop ends the delay early. StopAfter
// during a delay or a stop changes nothing; d <= 0 is Stop(false).
func (s *Supervisor) StopAfter(d time.Duration) { s.request(stopAfterReq{d: d}) }

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
			r.handleRequest(s)
		case ev := <-s.eventC:
			ev.handleEvent(s)
		case <-s.env.orphans:
			s.checkLingering()
		}
		s.syncLiveness()
		s.publishStatus()
	}
	var out Outcome
	switch {
	case s.stop.exitGen != nil:
		out.Child = &s.stop.exitGen.status
	case s.gens.lastExit != nil:
		out.Child = &s.gens.lastExit.status
	}
	return out, s.stop.fatal
}

func (s *Supervisor) finished() bool {
	gs := &s.gens
	return s.stop.begun && gs.serving == nil && gs.starting == nil && len(gs.old) == 0 && len(gs.lingering) == 0
}

// alive lists the generations whose main process is alive: the serving
// one, the starting one, then the old ones.
func (s *Supervisor) alive() []*generation {
	var gs []*generation
	for _, g := range []*generation{s.gens.serving, s.gens.starting} {
		if g != nil {
			gs = append(gs, g)
		}
	}
	return append(gs, s.gens.old...)
}

// retired lists the generations that count against --max-draining, oldest
// first: the old ones, whose main process is alive, and the lingering ones,
// whose main process has exited but not every other process of theirs.
func (s *Supervisor) retired() []*generation {
	gs := append(slices.Clone(s.gens.old), s.gens.lingering...)
	slices.SortFunc(gs, func(a, b *generation) int { return a.n - b.n })
	return gs
}

func logLevel(ok bool) slog.Level {
	if ok {
		return slog.LevelInfo
	}
	return slog.LevelError
}
