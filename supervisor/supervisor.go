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
	// restoring are the generations Restore adopts, while it does.
	restoring []*generation
}

// generations are the live generations, each in the slot its state puts
// it in (move), and what the next runs.
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

// A generation's state puts it in one slot of generations, or in none:
//
//	state               slot
//	──────────────────  ─────────────────────────────────────────────
//	Starting            starting
//	Serving             serving
//	Warm, Draining,     old (a graceful stop makes the serving and the
//	Stopping
//	                    starting one Stopping too)
//	Exited              lingering while any process of it is left;
//	                    none once it is gone (g.gone)
//
// move is the one way a generation changes state, and so slot, from the
// Starting that spawn gives it (in no slot until advance moves it in);
// check says whether the slots agree with the states.
const (
	slotNone      = "none"
	slotStarting  = "starting"
	slotServing   = "serving"
	slotOld       = "old"
	slotLingering = "lingering"
)

// slotFor is the slot g's state puts it in.
func slotFor(g *generation) string {
	switch g.state {
	case Starting:
		return slotStarting
	case Serving:
		return slotServing
	case Warm, Draining, Stopping:
		return slotOld
	}
	if g.gone {
		return slotNone
	}
	return slotLingering
}

// holding names the slot that holds g.
func (gs *generations) holding(g *generation) string {
	switch {
	case gs.starting == g:
		return slotStarting
	case gs.serving == g:
		return slotServing
	case slices.Contains(gs.old, g):
		return slotOld
	case slices.Contains(gs.lingering, g):
		return slotLingering
	}
	return slotNone
}

// move puts g in state to, and in the slot that state puts it in (see
// slotFor): out of the one that holds it, into the new one. A generation
// whose slot does not change keeps its place in it. Serving and starting
// hold one generation: the caller moves the one there first.
func (gs *generations) move(g *generation, to State) {
	from := gs.holding(g)
	g.state = to
	slot := slotFor(g)
	if slot == from {
		return
	}
	switch from {
	case slotStarting:
		gs.starting = nil
	case slotServing:
		gs.serving = nil
	case slotOld:
		gs.old = slices.DeleteFunc(gs.old, func(x *generation) bool { return x == g })
	case slotLingering:
		gs.lingering = slices.DeleteFunc(gs.lingering, func(x *generation) bool { return x == g })
	}
	switch slot {
	case slotStarting:
		gs.starting = g
	case slotServing:
		gs.serving = g
	case slotOld:
		gs.old = append(gs.old, g)
	case slotLingering:
		gs.lingering = append(gs.lingering, g)
	}
}

// check reports the first disagreement between the slots and the states:
// a generation in a slot its state does not put it in, or in two slots,
// or, of known (generations referenced from elsewhere; nil ones are
// skipped), one in no slot whose state puts it in one.
func (gs *generations) check(known ...*generation) error {
	held := map[*generation]string{}
	hold := func(g *generation, slot string) error {
		if g == nil {
			return nil
		}
		if other, ok := held[g]; ok {
			return fmt.Errorf("generation %d is in two slots, %s and %s", g.n, other, slot)
		}
		held[g] = slot
		if want := slotFor(g); want != slot {
			return fmt.Errorf("generation %d is %s (gone: %t) in slot %s, want %s", g.n, g.state, g.gone, slot, want)
		}
		return nil
	}
	if err := hold(gs.starting, slotStarting); err != nil {
		return err
	}
	if err := hold(gs.serving, slotServing); err != nil {
		return err
	}
	for _, g := range gs.old {
		if err := hold(g, slotOld); err != nil {
			return err
		}
	}
	for _, g := range gs.lingering {
		if err := hold(g, slotLingering); err != nil {
			return err
		}
	}
	for _, g := range known {
		if _, ok := held[g]; g != nil && !ok && slotFor(g) != slotNone {
			return fmt.Errorf("generation %d is %s (gone: %t) in no slot, want %s", g.n, g.state, g.gone, slotFor(g))
		}
	}
	return nil
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
		counts: RestartCounts{AfterSwitch: map[RollbackCause]int{}},
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

// Run starts the first generation, unless Restore adopted one, and
// supervises until stopped. It returns an error if the first generation
// never becomes ready.
func (s *Supervisor) Run() (Outcome, error) {
	defer close(s.doneC)
	s.adviseConfirm()
	if s.gens.serving == nil {
		s.beginRestart(&restartRun{reason: reasonStart})
	}
	s.syncLiveness() // an adopted serving generation is watched at once
	s.publishStatus()
	if s.env.stepped != nil {
		s.env.stepped(reasonStart)
	}
	for !s.finished() {
		var handled any
		select {
		case r := <-s.reqC:
			r.handleRequest(s)
			handled = r
		case ev := <-s.eventC:
			ev.handleEvent(s)
			handled = ev
		case <-s.env.orphans:
			s.checkLingering()
			handled = "orphans reaped"
		}
		s.syncLiveness()
		s.publishStatus()
		if s.env.stepped != nil {
			s.env.stepped(handled)
		}
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
func (gs *generations) alive() []*generation {
	var alive []*generation
	for _, g := range []*generation{gs.serving, gs.starting} {
		if g != nil {
			alive = append(alive, g)
		}
	}
	return append(alive, gs.old...)
}

// retired lists the generations that count against --max-draining, oldest
// first: the old ones, whose main process is alive, and the lingering ones,
// whose main process has exited but not every other process of theirs.
func (gs *generations) retired() []*generation {
	retired := append(slices.Clone(gs.old), gs.lingering...)
	slices.SortFunc(retired, func(a, b *generation) int { return a.n - b.n })
	return retired
}

func logLevel(ok bool) slog.Level {
	if ok {
		return slog.LevelInfo
	}
	return slog.LevelError
}
