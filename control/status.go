package control

import "time"

// StatusDoc is the status of a relay, what relay status --json prints:
// relay's own facts and its supervisor's. Fields are added, never changed,
// within a Version.
type StatusDoc struct {
	Version   int            `json:"version"`
	Name      string         `json:"name"`
	Pid       int            `json:"pid"`
	Started   time.Time      `json:"started"`
	Control   string         `json:"control"`
	Listeners []ListenerInfo `json:"listeners"`
	// Command is what the next generation runs.
	Command []string `json:"command"`
	// Generations lists the live generations, oldest first.
	Generations []GenerationStatus `json:"generations"`
	Restarts    RestartCounts      `json:"restarts"`
	// LastRestart is absent until a requested restart has finished.
	LastRestart *LastRestart `json:"last_restart,omitempty"`
	// Stopping: the graceful stop has begun.
	Stopping bool `json:"stopping"`
	// ShutdownAt is absent unless a shutdown delay runs (relay got a
	// stop signal with --shutdown-delay): then it is when the graceful
	// stop begins. Meanwhile relay serves, but is going.
	ShutdownAt time.Time `json:"shutdown_at,omitzero"`
	// RelayVersion is the version line of the relay binary that answers
	// (relay version); absent from a relay that predates it.
	RelayVersion string `json:"relay_version,omitempty"`
	// Upgrades counts the in-place upgrades (relay upgrade) since relay
	// started; LastUpgrade is when the last one was, absent before the
	// first.
	Upgrades    int       `json:"upgrades,omitempty"`
	LastUpgrade time.Time `json:"last_upgrade,omitzero"`
	// Confirm is absent unless a confirmation window is open.
	Confirm *ConfirmDoc `json:"confirm,omitempty"`
}

// ListenerInfo describes one socket relay holds.
type ListenerInfo struct {
	FD      int    `json:"fd"`
	Name    string `json:"name"`
	Network string `json:"network"`
	Address string `json:"address"`
	// Origin is bound (relay bound it), inherited (passed to relay for a
	// --listen address) or activated (passed to relay, passed on as is).
	Origin string `json:"origin,omitempty"`
	// Drain is steered (a socket per generation, new connections to the
	// serving one only) or shared (one socket every generation accepts
	// on).
	Drain string `json:"drain,omitempty"`
}

// State is the state of a generation.
type State string

// The states of a generation.
const (
	StateStarting State = "starting" // started, not yet proven ready
	StateServing  State = "serving"  // ready, and the newest ready generation
	StateWarm     State = "warm"     // replaced, kept ready to serve again until the new one is confirmed
	StateDraining State = "draining" // replaced, still serving for the drain window
	StateStopping State = "stopping" // sent its stop signal
	StateExited   State = "exited"   // its main process is gone
)

// GenerationStatus describes one live generation.
type GenerationStatus struct {
	Generation int       `json:"generation"`
	Pid        int       `json:"pid"`
	State      State     `json:"state"`
	Started    time.Time `json:"started"`
	AgeSeconds float64   `json:"age_seconds"`
	// ReadyAfterMs is from start to readiness; 0 while starting.
	ReadyAfterMs float64  `json:"ready_after_ms,omitempty"`
	Command      []string `json:"command"`
	// Sockets says, per listener name, how the generation took its
	// socket: "fd" (inherited, LISTEN_FDS) or "bind" (its own bind,
	// taken over by relay).
	Sockets map[string]string `json:"sockets,omitempty"`
	// Processes counts its processes: those of its cgroup, or of its
	// process group where relay has no cgroups (docs/containment.md).
	Processes int `json:"processes"`
	// UDPFlows counts the UDP flows (client 4-tuples) relay's steered UDP
	// listeners send to it (docs/steering.md); absent where no UDP
	// listener is steered.
	UDPFlows *int `json:"udp_flows,omitempty"`
	// Copies are its copies (relay run --workers), by worker number: one
	// for a generation of one copy.
	Copies []CopyStatus `json:"copies,omitempty"`
}

// CopyStatus describes one copy of a generation (relay run --workers).
type CopyStatus struct {
	Worker int `json:"worker"`
	Pid    int `json:"pid"`
	// State is starting (not yet ready), ready, or exited (a replacement
	// may be pending).
	State      string    `json:"state"`
	Started    time.Time `json:"started"`
	AgeSeconds float64   `json:"age_seconds"`
	// Replaced counts the replacements of this copy before this one,
	// while its generation served.
	Replaced int `json:"replaced"`
}

// RestartCounts counts restarts since relay started. Crash and liveness
// replacements are counted apart.
type RestartCounts struct {
	OK           int  `json:"ok"`
	RolledBack   int  `json:"rolled_back"`
	Refused      int  `json:"refused"`
	Replacements int  `json:"crash_replacements"`
	InProgress   bool `json:"in_progress"`
	Queued       bool `json:"queued"`
	// QueuedRestarts counts the distinct restarts waiting.
	QueuedRestarts int `json:"queued_restarts"`
	// LivenessReplacements counts the restarts that replaced a serving
	// generation that failed --liveness or --child-watchdog.
	LivenessReplacements int `json:"liveness_replacements"`
	// CopyReplacements counts the copies (relay run --workers) started in
	// place of one that exited while its generation served.
	CopyReplacements int `json:"copy_replacements"`
	// RolledBackAfterSwitch counts the restarts rolled back in their
	// confirmation window (relay run --confirm), by what failed: exited,
	// liveness, notify, manual. They count in rolled_back too.
	AfterSwitch map[string]int `json:"rolled_back_after_switch,omitempty"`
}

// ConfirmDoc is the confirmation window open now.
type ConfirmDoc struct {
	// Generation and Pid are the new generation, on trial.
	Generation int `json:"generation"`
	Pid        int `json:"pid"`
	// Warm and WarmPid are the generation kept warm, which relay
	// rollback (or a failure of the new one) sends traffic back to.
	Warm    int `json:"warm_generation"`
	WarmPid int `json:"warm_pid"`
	// Began is the switch; Until, when the new generation is confirmed
	// unless it fails first; LeftSeconds, the time left.
	Began       time.Time `json:"began"`
	Until       time.Time `json:"until"`
	LeftSeconds float64   `json:"left_seconds"`
}

// LastRestart is the outcome of the last restart that finished.
type LastRestart struct {
	Result
	Finished   time.Time `json:"finished"`
	DurationMs float64   `json:"duration_ms"`
}
