package supervisor

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
)

// Status is a snapshot of the supervisor. Package control converts it to
// the document `relay status --json` prints.
type Status struct {
	Command     []string
	Generations []GenerationStatus
	Restarts    RestartCounts
	LastRestart *LastRestart
	// Stopping: the graceful stop has begun.
	Stopping bool
	// At is when the snapshot was taken, on the supervisor's clock: a
	// generation's age is At less its Started.
	At time.Time
	// ShutdownAt is zero unless a shutdown delay (StopAfter) runs: then
	// it is when the graceful stop begins. Meanwhile relay serves as
	// before but is going: a readiness probe should fail.
	ShutdownAt time.Time
	// Confirm is the confirmation window open now; nil for none.
	Confirm *ConfirmStatus
	// UDPSteered: a UDP listener is steered by flow, and each
	// generation's UDPFlows counts its flows.
	UDPSteered bool
}

// GenerationStatus describes one live generation: one of which any process
// is alive. Its State is Exited when its main process has exited but other
// processes of it live on (Processes counts them).
type GenerationStatus struct {
	Generation int
	Pid        int
	State      State
	Started    time.Time
	// ReadyAfter is from start to readiness; 0 while starting.
	ReadyAfter time.Duration
	Command    []string
	// Sockets says, per listener name, how the generation took its
	// socket: "fd" (inherited, LISTEN_FDS) or "bind" (its own bind,
	// taken over by relay).
	Sockets map[string]string
	// Processes counts its processes: those of its cgroup, or of its
	// process group where relay has no cgroups.
	Processes int
	// UDPFlows counts the UDP flows (client 4-tuples) the steered UDP
	// listeners send to it (Status.UDPSteered).
	UDPFlows int
	// Copies are its copies (--workers), by worker number; one for a
	// generation of one copy.
	Copies []CopyStatus
}

// RestartCounts counts restarts since relay started. Crash and liveness
// replacements are counted apart.
type RestartCounts struct {
	OK           int
	RolledBack   int
	Refused      int
	Replacements int
	InProgress   bool
	Queued       bool
	// QueuedRestarts counts the distinct restarts waiting.
	QueuedRestarts int
	// LivenessReplacements counts the restarts that replaced a serving
	// generation that failed its liveness check or its watchdog.
	LivenessReplacements int
	// CopyReplacements counts the copies (--workers) started in place of
	// one that exited while its generation served.
	CopyReplacements int
	// AfterSwitch counts the restarts rolled back in their confirmation
	// window, by what rolled them back (they count in RolledBack too).
	AfterSwitch map[RollbackCause]int
}

// CopyStatus describes one copy of a generation.
type CopyStatus struct {
	Worker int
	Pid    int
	// State: "starting" (not yet ready), "ready", "exited"
	// (its main process; a replacement may be pending).
	State    string
	Started  time.Time
	Replaced int // the replacements of this copy before this one
}

// LastRestart is the outcome of the last restart that finished.
type LastRestart struct {
	Result
	Finished time.Time
}

// Status returns a snapshot of the generations and counters.
func (s *Supervisor) Status() (Status, error) {
	reply := make(chan Status, 1)
	if err := s.request(statusReq{reply: reply}); err != nil {
		return Status{}, err
	}
	st := <-reply
	// Read outside the loop: a full flow table takes milliseconds.
	if s.cfg.Sockets.UDPSteered() {
		st.UDPSteered = true
		flows := s.cfg.Sockets.Flows()
		for i := range st.Generations {
			st.Generations[i].UDPFlows = flows[st.Generations[i].Generation]
		}
	}
	return st, nil
}

func (s *Supervisor) status() Status {
	now := s.env.now()
	counts := s.counts
	counts.AfterSwitch = maps.Clone(s.counts.AfterSwitch)
	counts.InProgress = s.restarts.current != nil
	counts.QueuedRestarts = len(s.restarts.queued)
	counts.Queued = counts.QueuedRestarts > 0
	st := Status{
		Command:     s.gens.command.Args,
		Generations: []GenerationStatus{},
		Restarts:    counts,
		LastRestart: s.last,
		Stopping:    s.stop.begun,
		At:          now,
		ShutdownAt:  s.stop.delayUntil,
	}
	if run := s.inWindow(); run != nil {
		st.Confirm = &ConfirmStatus{Generation: run.gen.n, Pid: run.gen.pid(), Warm: run.prev.n, WarmPid: run.prev.pid(),
			Began: run.confirm.began, Until: run.confirm.until}
	}
	for _, g := range s.oldestFirst() {
		gs := GenerationStatus{
			Generation: g.n, Pid: g.pid(), State: g.state, Started: g.started,
			Command: g.cmd.Args, Sockets: s.tookSockets(g.first()),
			Processes: g.contain.count(),
		}
		for _, c := range g.copies {
			state := "starting"
			switch {
			case c.exited:
				state = "exited"
			case c.ready:
				state = "ready"
			}
			gs.Copies = append(gs.Copies, CopyStatus{Worker: c.worker, Pid: c.pid(), State: state, Started: c.started, Replaced: c.replaced})
		}
		if !g.readyAt.IsZero() {
			gs.ReadyAfter = g.readyAt.Sub(g.started)
		}
		st.Generations = append(st.Generations, gs)
	}
	return st
}

// oldestFirst lists the generations of which any process is alive, oldest
// first: the lingering ones (exited, with processes left) among the old
// ones, then the serving one, then a new one.
func (s *Supervisor) oldestFirst() []*generation {
	gens := append(s.gens.alive(), s.gens.lingering...)
	slices.SortFunc(gens, func(a, b *generation) int { return a.n - b.n })
	return gens
}

// publishStatus tells the Observer the status line, if it changed.
func (s *Supervisor) publishStatus() {
	if line := s.statusSummary(); line != s.statusLine {
		s.statusLine = line
		s.cfg.Observer.Status(line)
	}
}

// maxReasonInStatus bounds the failure reason quoted in the status line,
// in characters.
const maxReasonInStatus = 160

// statusSummary says in one line what serves and what is happening, oldest
// generation first: "gen 4 pid 1234 serving; gen 5 pid 1240 starting".
func (s *Supervisor) statusSummary() string {
	var parts []string
	if s.stop.begun {
		parts = append(parts, "stopping")
	} else if s.delaying() {
		parts = append(parts, "shutdown delay: stopping at "+s.stop.delayUntil.Format(time.TimeOnly))
	} else if s.gens.serving == nil && s.gens.everReady {
		parts = append(parts, "no generation serving")
	}
	for _, g := range s.oldestFirst() {
		part := fmt.Sprintf("gen %d pid %d %s", g.n, g.pid(), g.state)
		if g.state == Exited {
			part += ", processes left"
		}
		parts = append(parts, part)
	}
	if run := s.restarts.current; run != nil && !s.stop.begun {
		switch run.phase {
		case PhaseChecking:
			parts = append(parts, "pre-flight check running")
		case PhaseWaitOld:
			parts = append(parts, "restart waiting for an old generation to be gone")
		case PhaseConfirming:
			parts = append(parts, fmt.Sprintf("gen %d on trial until %s", run.gen.n, run.confirm.until.Format(time.TimeOnly)))
		}
	}
	if s.crash.timer != nil {
		parts = append(parts, "replacement pending")
	}
	if s.live.pending != nil {
		parts = append(parts, "liveness replacement pending")
	}
	if n := len(s.restarts.queued); n > 0 {
		parts = append(parts, fmt.Sprintf("%d restart(s) queued", n))
	}
	if l := s.last; l != nil && l.Outcome != RestartOK && !s.stop.begun {
		reason := l.Reason
		if r := []rune(reason); len(r) > maxReasonInStatus {
			reason = string(r[:maxReasonInStatus]) + "…" // whole characters: systemd drops a STATUS= that is not UTF-8
		}
		what := "rolled back"
		if l.Outcome == RestartRefused {
			what = "refused"
		}
		parts = append(parts, fmt.Sprintf("last restart %s: %s", what, reason))
	}
	if len(parts) == 0 {
		return "starting"
	}
	return strings.Join(parts, "; ")
}
