package control

import "time"

// Phase names a step of a restart. The names are part of the protocol:
// they are only ever added to.
type Phase string

// The phases of a restart, in the order they can happen.
const (
	PhaseQueued   Phase = "queued"          // waiting for the restart under way
	PhaseChecking Phase = "checking"        // the pre-flight check runs
	PhaseChecked  Phase = "checked"         // it passed
	PhaseWaitOld  Phase = "waiting_for_old" // --max-draining old generations still run
	PhaseStarting Phase = "starting"        // the new generation was started
	PhaseWaiting  Phase = "waiting"         // its readiness check runs
	PhaseReady    Phase = "ready"           // it is ready and serving
	// With relay run --confirm, after ready: the old generation stays
	// warm until the new one is confirmed, or traffic goes back to it.
	PhaseConfirming  Phase = "confirming"   // the window is open; the old generation (generation, pid) is warm
	PhaseConfirmed   Phase = "confirmed"    // the window ended with the new generation kept
	PhaseRollingBack Phase = "rolling_back" // the new one failed: the warm one (generation, pid) serves again
	PhaseDraining    Phase = "draining"     // the old generation finishes what it has, --drain at most
	PhaseStopping    Phase = "stopping"     // the old generation got its stop signal
	PhaseDone        Phase = "done"         // final: see Event.Result
	PhaseOldExit     Phase = "old_exited"   // after done: the old generation exited
)

// Event is one step of a restart, the event of a response line.
type Event struct {
	Phase      Phase   `json:"phase"`
	Generation int     `json:"generation,omitempty"`
	Pid        int     `json:"pid,omitempty"`
	Check      string  `json:"check,omitempty"`  // the check that runs, with checking and waiting
	Signal     string  `json:"signal,omitempty"` // the stop signal, with stopping
	Status     string  `json:"status,omitempty"` // how an old generation exited
	DurationMs float64 `json:"duration_ms,omitempty"`
	// Drain, with draining, is how the drain is to end: "adaptive" (as
	// soon as nothing more can reach the old generation's sockets, at
	// most duration_ms) or "fixed" (after duration_ms). With stopping,
	// it is how it ended: "empty", "max" (duration_ms reached before the
	// sockets emptied) or "fixed", duration_ms being how long it lasted;
	// or "handed_over": the old generation had failed its liveness
	// check and accepted nothing queued on its sockets, so what was
	// queued there moved to the new one, duration_ms after the switch.
	Drain string `json:"drain,omitempty"`
	// Cause, with confirmed, is how the window ended: "window" (it
	// passed), "restart" (one was asked for), "warm_exited" (nothing
	// left to go back to) or "no_way_back" (the switch back failed).
	// With rolling_back it is what failed: "exited", "liveness",
	// "notify" (STOPPING=1 or ERRNO= unasked) or "manual" (relay
	// rollback), and Reason says it in words. duration_ms, with both,
	// is how long the window lasted.
	Cause  string  `json:"cause,omitempty"`
	Reason string  `json:"reason,omitempty"`
	Result *Result `json:"result,omitempty"` // with PhaseDone
}

// The values of Event.Drain.
const (
	DrainAdaptive = "adaptive"
	DrainFixed    = "fixed"
	DrainEmpty    = "empty"
	DrainMax      = "max"
	DrainHandover = "handed_over"
)

// Result is the outcome of one restart.
type Result struct {
	OK bool `json:"ok"`
	// Refused is set when nothing was started: the pre-flight check
	// failed, the command could not be found, or relay is stopping.
	Refused bool `json:"refused,omitempty"`
	// Generation and Pid name the new generation, if one was started.
	Generation int `json:"generation,omitempty"`
	Pid        int `json:"pid,omitempty"`
	// Command is what the new generation ran.
	Command []string `json:"command,omitempty"`
	// Reason says why a restart was rolled back or refused.
	Reason string `json:"reason,omitempty"`
	// StderrTail is the end of a failed child's (or check's) stderr.
	StderrTail string `json:"stderr_tail,omitempty"`
	// ReadyAfter is from the child's start to its readiness, in
	// nanoseconds on the wire.
	ReadyAfter time.Duration `json:"ready_after_ns,omitempty"`
	// Duration is from the request to the outcome, in nanoseconds on the
	// wire.
	Duration time.Duration `json:"duration_ns"`
}
