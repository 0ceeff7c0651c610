package supervisor

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"syscall"
	"time"

	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/internal/cgroup"
	"github.com/relaysh/relay/internal/reaper"
	"github.com/relaysh/relay/internal/sockets"
	"github.com/relaysh/relay/socketpass"
)

// Command is what a generation runs.
type Command struct {
	// Path is the resolved executable.
	Path string
	// Args is the argv, Args[0] included. {health_addr}, {health_port}
	// and {generation} are substituted for each generation.
	Args []string
}

// Config configures a Supervisor.
type Config struct {
	Command Command
	Dir     string   // working directory of the children; "" for relay's
	Env     []string // base environment of the children
	// Sockets are relay's listeners: every generation gets them at fds
	// 3.., and a bind of their address lands on them (see Takeover).
	Sockets *sockets.Set
	// Takeover says whether a child's own bind of a listener's address is
	// taken over (package takeover).
	Takeover TakeoverMode
	// User, if not nil, is who every generation runs as (relay run
	// --user): the exec shim takes its credentials last, and its notify
	// socket is given to it. RuntimeDir must then let it pass
	// (health.MakeSharedNotifyDir).
	User *socketpass.User
	// IOURing lets generations under the bind takeover set up io_uring
	// rings, whose binds relay cannot see (takeover.Options.IOURing).
	IOURing bool

	// Check is a pre-flight command run before each requested restart
	// (not before crash replacements); nil for none.
	Check []string

	Health        health.Spec
	HealthTimeout time.Duration
	// Liveness is checked against the serving generation every
	// LivenessInterval while no restart is under way (Kind "" for
	// none); after LivenessFailures failures in a row, a restart
	// replaces it. See liveness.go.
	Liveness         health.Spec
	LivenessInterval time.Duration
	LivenessFailures int
	// ChildWatchdog, if not zero, is each child's WATCHDOG_USEC: a
	// serving child that sent WATCHDOG=1 and then none for this long is
	// replaced like one that failed Liveness.
	ChildWatchdog time.Duration
	// Drain bounds the time from the switch to the new generation until
	// the old one gets its stop signal. Where Sockets can show it
	// (Sockets.DrainObservable), the stop signal comes as soon as nothing
	// more can reach the old generation's steered sockets, and Drain is
	// the most it waits; elsewhere it waits Drain. On steered listeners
	// the old generation gets no new connection meanwhile and finishes
	// what it has; on shared ones both accept. 0: no drain.
	Drain time.Duration
	// Confirm, if not zero, is the confirmation window of a requested
	// restart (confirm.go): for this long after the switch the
	// generation it replaced stays warm, getting no new connections and
	// no stop signal, and a failure of the new one sends new connections
	// back to it. It needs steered sockets to mean anything: the caller
	// checks that some listener is steered.
	Confirm     time.Duration
	StopSignal  syscall.Signal
	StopTimeout time.Duration
	// KillMode says which processes of a generation the stop signal
	// reaches; SIGCONT after it and SIGKILL after StopTimeout reach all
	// of them either way. "" is KillMixed.
	KillMode KillMode
	// MaxDraining bounds the old generations of which any process is
	// still alive: draining, stopping, or exited with processes left
	// (workers finishing, a daemon it started). A restart that would go
	// past it waits for the oldest to be gone before it starts its new
	// generation; StopTimeout bounds that wait. At most MaxDraining+1
	// generations have live processes at once.
	MaxDraining int
	// Workers is how many copies of the command make a generation; 0
	// means 1. Each copy gets its own socket on every steered TCP
	// listener, and the serving generation's new connections spread over
	// them; a copy that exits while its generation serves is replaced
	// alone.
	Workers int
	// Rolling, when above 0 and below Workers, makes restarts of a
	// serving generation roll: the new generation's copies start Rolling
	// at a time, each batch in the place of as many old copies, so that
	// at most Workers+Rolling copies are alive (rolling.go). 0 starts
	// every new copy at once.
	Rolling int
	// RestartBackoff is the first delay before replacing a crashed
	// child; it doubles with each failure in a row up to MaxBackoff.
	RestartBackoff time.Duration
	MaxBackoff     time.Duration

	// RuntimeDir is a private (0700) directory for the per-child notify
	// sockets.
	RuntimeDir string
	Stdin      *os.File
	Stdout     *os.File
	// Stderr receives the children's stderr, byte for byte.
	Stderr io.Writer

	// Reaper starts the children and the check commands, and reaps
	// them; New requires it.
	Reaper *reaper.Reaper
	// Cgroups, if not nil, is relay's cgroup: each generation runs in a
	// cgroup of its own there, and stopping a generation kills all of
	// it. Nil contains generations by process group only.
	Cgroups *cgroup.Tree
	Log     *slog.Logger

	// Observer hears what a service manager needs to know; nil for
	// nobody.
	Observer Observer
	// Recorder hears each readiness and each restart's outcome, for
	// metrics; nil for nobody.
	Recorder Recorder
}

// TakeoverMode is the --takeover setting.
type TakeoverMode string

// The takeover modes.
const (
	// TakeoverAuto takes over binds where the kernel allows, and logs
	// once why not where it does not.
	TakeoverAuto TakeoverMode = "auto"
	// TakeoverOn makes a generation whose filter cannot be installed
	// fail its start.
	TakeoverOn TakeoverMode = "on"
	// TakeoverOff passes the sockets as inherited fds only.
	TakeoverOff TakeoverMode = "off"
)

// KillMode is the --kill-mode setting: who gets the stop signal. The names
// and meanings are those of systemd's KillMode=.
type KillMode string

// The kill modes.
const (
	// KillMixed sends the stop signal to the generation's main process
	// alone, which passes it on to its workers as its own graceful stop
	// protocol says (a prefork master signals its workers to finish
	// their requests); then SIGCONT to every process of the generation,
	// and SIGKILL to every one after the stop timeout.
	KillMixed KillMode = "mixed"
	// KillControlGroup sends the stop signal, then SIGCONT, to every
	// process of the generation at once: for a main process that does
	// not pass it on, such as a shell that runs the server without
	// exec. SIGKILL after the stop timeout, as with KillMixed.
	KillControlGroup KillMode = "control-group"
)

// ParseKillMode parses a --kill-mode value. systemd's other modes,
// process and none, would leave processes of a stopped generation
// running, which relay never does.
func ParseKillMode(v string) (KillMode, error) {
	switch m := KillMode(v); m {
	case KillMixed, KillControlGroup:
		return m, nil
	case "process", "none":
		return "", fmt.Errorf("%q would leave a stopped generation's other processes running, and relay stops all of a generation; use mixed (the stop signal to the main process) or control-group (to every process)", v)
	}
	return "", fmt.Errorf("%q is not a kill mode; use mixed (the stop signal to the main process) or control-group (to every process)", v)
}

// Observer hears of the supervisor's milestones, for a service manager
// such as systemd. Its methods are called from the supervisor's goroutine,
// in order, and must not block.
type Observer interface {
	// Ready: the first generation is ready, or a requested restart ended,
	// whether it succeeded, was rolled back or was refused, or reached
	// its switch and opened a confirmation window (then Ready comes
	// again when it ends).
	Ready()
	// Reloading: a requested restart (a signal or a control request)
	// began. Crash replacements are not reloads.
	Reloading()
	// Stopping: relay began to stop.
	Stopping()
	// Status: the one-line summary of the generations changed, e.g.
	// "gen 4 pid 1234 serving; gen 5 pid 1240 starting".
	Status(line string)
}

// Recorder hears what the metrics count one by one, where a snapshot
// (Status) would miss all but the last. Its methods are called from the
// supervisor's goroutine and must not block.
type Recorder interface {
	// GenerationReady: generation gen became ready, readyAfter after its
	// start. Every generation that serves is told once, the first and
	// the replacements included.
	GenerationReady(gen int, readyAfter time.Duration)
	// RestartFinished: a requested restart that began ended with res
	// (OK, Refused, or else rolled back; res.Duration from its begin to
	// its outcome). Restarts refused before they began (queued at the
	// stop, or past maxQueued) are counted in Status only.
	RestartFinished(res Result)
}

type noRecorder struct{}

func (noRecorder) GenerationReady(int, time.Duration) {}
func (noRecorder) RestartFinished(Result)             {}

type noObserver struct{}

func (noObserver) Ready()        {}
func (noObserver) Reloading()    {}
func (noObserver) Stopping()     {}
func (noObserver) Status(string) {}

// MaxWorkers bounds Config.Workers: the copies a steering program spreads
// connections over.
const MaxWorkers = 64

// Defaults used where a Config field is zero.
const (
	DefaultHealthTimeout  = 60 * time.Second
	DefaultStopTimeout    = 30 * time.Second
	DefaultMaxDraining    = 1
	DefaultRestartBackoff = 100 * time.Millisecond
	DefaultMaxBackoff     = 30 * time.Second
	// DefaultLivenessInterval and DefaultLivenessFailures: a serving
	// generation that stopped answering is replaced within about 30s.
	DefaultLivenessInterval = 10 * time.Second
	DefaultLivenessFailures = 3
)

func (c *Config) setDefaults() error {
	if c.Command.Path == "" || len(c.Command.Args) == 0 {
		return errors.New("no command to run")
	}
	if c.RuntimeDir == "" {
		return errors.New("no runtime directory")
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.HealthTimeout <= 0 {
		c.HealthTimeout = DefaultHealthTimeout
	}
	if c.StopTimeout <= 0 {
		c.StopTimeout = DefaultStopTimeout
	}
	if c.StopSignal == 0 {
		c.StopSignal = syscall.SIGTERM
	}
	switch c.KillMode {
	case "":
		c.KillMode = KillMixed
	case KillMixed, KillControlGroup:
	default:
		return fmt.Errorf("unknown kill mode %q", c.KillMode)
	}
	if c.MaxDraining == 0 {
		c.MaxDraining = DefaultMaxDraining
	}
	if c.MaxDraining < 0 {
		return fmt.Errorf("max draining %d is negative", c.MaxDraining)
	}
	if c.RestartBackoff <= 0 {
		c.RestartBackoff = DefaultRestartBackoff
	}
	if c.MaxBackoff < c.RestartBackoff {
		c.MaxBackoff = max(DefaultMaxBackoff, c.RestartBackoff)
	}
	if c.LivenessInterval <= 0 {
		c.LivenessInterval = DefaultLivenessInterval
	}
	if c.LivenessFailures <= 0 {
		c.LivenessFailures = DefaultLivenessFailures
	}
	if c.Confirm < 0 {
		return fmt.Errorf("confirmation window %s is negative", c.Confirm)
	}
	if c.ChildWatchdog < 0 {
		return fmt.Errorf("child watchdog %s is negative", c.ChildWatchdog)
	}
	if c.Health.Kind == "" {
		c.Health.Kind, c.Health.Raw = health.Auto, "auto"
	}
	if c.Workers == 0 {
		c.Workers = 1
	}
	if c.Workers < 0 || c.Workers > MaxWorkers {
		return fmt.Errorf("%d workers: want 1 to %d", c.Workers, MaxWorkers)
	}
	if c.Rolling < 0 {
		return fmt.Errorf("rolling %d is negative", c.Rolling)
	}
	if c.Workers > 1 && c.Confirm > 0 {
		return errors.New("the confirmation window does not work with more than one worker yet")
	}
	if c.Sockets == nil {
		c.Sockets = sockets.Empty()
	}
	switch c.Takeover {
	case "":
		c.Takeover = TakeoverOff
	case TakeoverOff, TakeoverAuto, TakeoverOn:
	default:
		return fmt.Errorf("unknown takeover mode %q", c.Takeover)
	}
	if c.Observer == nil {
		c.Observer = noObserver{}
	}
	if c.Recorder == nil {
		c.Recorder = noRecorder{}
	}
	if c.Stdin == nil {
		c.Stdin = os.Stdin
	}
	if c.Stdout == nil {
		c.Stdout = os.Stdout
	}
	if c.Stderr == nil {
		c.Stderr = os.Stderr
	}
	return nil
}
