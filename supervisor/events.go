package supervisor

import (
	"time"
)

// Phase names a step of a restart, as reported to the caller who asked for
// it. Package control carries them on the wire under the same names.
type Phase string

// The phases of a restart, in the order they can happen.
const (
	PhaseQueued   Phase = "queued"          // waiting for the restart under way
	PhaseChecking Phase = "checking"        // the pre-flight --check runs
	PhaseChecked  Phase = "checked"         // it passed
	PhaseWaitOld  Phase = "waiting_for_old" // --max-draining old generations still run
	PhaseStarting Phase = "starting"        // the new generation was started
	PhaseWaiting  Phase = "waiting"         // its readiness check runs
	PhaseReady    Phase = "ready"           // it is ready and serving
	// With --confirm, after ready: the old generation stays warm until
	// the new one is confirmed, or new connections go back to it.
	PhaseConfirming  Phase = "confirming"   // the window is open; the old generation is warm
	PhaseConfirmed   Phase = "confirmed"    // it ended with the new generation kept
	PhaseRollingBack Phase = "rolling_back" // the new one failed: the warm one serves again
	PhaseDraining    Phase = "draining"     // the old generation finishes what it has, --drain at most
	PhaseStopping    Phase = "stopping"     // the old generation got its stop signal
	PhaseDone        Phase = "done"         // final: see Event.Result
	PhaseOldExit     Phase = "old_exited"   // after done: the old generation exited
)

// Event is one step of a restart.
type Event struct {
	Phase      Phase
	Generation int
	Pid        int
	Check      string
	Signal     string
	Status     string // how an old generation exited
	// Duration, on PhaseReady, is from the child's start to its
	// readiness; on PhaseDraining, --drain; on PhaseStopping, how long
	// the drain window lasted; on PhaseConfirming, --confirm; on
	// PhaseConfirmed and PhaseRollingBack, how long the confirmation
	// window lasted.
	Duration time.Duration
	// Until, on PhaseDraining, is how the window is to end.
	Until DrainMode
	// Ended, on PhaseStopping, is how the window ended; "" for no
	// window.
	Ended DrainEnd
	// Cause, on PhaseConfirmed, is how the window ended (ConfirmEnd);
	// on PhaseRollingBack, what rolled the restart back (RollbackCause),
	// and Reason says it in words.
	Cause  string
	Reason string
	Result *Result // with PhaseDone
}

// RestartOutcome is how a restart ended. (Outcome is how Run ended.) Its
// words are the outcome label of relay's restart metrics too.
type RestartOutcome string

// How a restart can end.
const (
	// RestartOK: the new generation serves.
	RestartOK RestartOutcome = "ok"
	// RestartRolledBack: the new generation failed, or could not be
	// started; the one that served serves on.
	RestartRolledBack RestartOutcome = "rolled_back"
	// RestartRefused: nothing was started: the pre-flight check
	// failed, too many different restarts were queued, or relay is
	// stopping. (A command that cannot be found is refused before it
	// reaches the supervisor, by control's server.)
	RestartRefused RestartOutcome = "refused"
)

// Result is the outcome of one restart.
type Result struct {
	Outcome RestartOutcome
	// Generation and Pid name the new generation, if one was started.
	Generation int
	Pid        int
	// Command is what the new generation ran.
	Command []string
	// Reason says why a restart was rolled back or refused.
	Reason string
	// StderrTail is the end of a failed child's (or check's) stderr.
	StderrTail string
	// ReadyAfter is from the child's start to its readiness.
	ReadyAfter time.Duration
	// Duration is from the request to the outcome.
	Duration time.Duration
}

// waiterBuffer holds every event of one restart; a restart emits fewer.
const waiterBuffer = 32

// waiter is one caller following a restart.
type waiter struct{ c chan Event }

func newWaiter() *waiter { return &waiter{c: make(chan Event, waiterBuffer)} }

// send never blocks the supervisor: a caller that stopped reading loses
// events, not relay its loop.
func (w *waiter) send(ev Event) {
	select {
	case w.c <- ev:
	default:
	}
}

func (w *waiter) close() { close(w.c) }

// emit sends ev to every caller following run, whose phase it now is.
func (run *restartRun) emit(ev Event) {
	run.phase = ev.Phase
	for _, w := range run.waiters {
		w.send(ev)
	}
}
