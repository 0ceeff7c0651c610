package control

import (
	"time"

	"github.com/relaysh/relay/supervisor"
)

// The supervisor's types become wire types here and nowhere else, so that
// the protocol changes only when this file does. The supervisor counts in
// time.Duration and time.Time; the display units of the wire (duration_ms,
// age_seconds, ready_after_ms) are made here.

// ms is d in milliseconds, to the microsecond.
func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func eventFrom(ev supervisor.Event) Event {
	out := Event{
		Phase: phaseFrom(ev.Phase), Generation: ev.Generation, Pid: ev.Pid, Check: ev.Check,
		Signal: ev.Signal, Status: ev.Status, DurationMs: ms(ev.Duration), Drain: drainFrom(ev),
		Cause: ev.Cause, Reason: ev.Reason,
	}
	if ev.Result != nil {
		res := resultFrom(*ev.Result)
		out.Result = &res
	}
	return out
}

func resultFrom(r supervisor.Result) Result {
	return Result{
		OK: r.Outcome == supervisor.RestartOK, Refused: r.Outcome == supervisor.RestartRefused,
		Generation: r.Generation, Pid: r.Pid, Command: r.Command,
		Reason: r.Reason, StderrTail: r.StderrTail, ReadyAfter: r.ReadyAfter, Duration: r.Duration,
	}
}

// drainFrom is the drain of ev on the wire: how its window is to end, with
// draining, or how it ended, with stopping. The supervisor's words are the
// wire's.
func drainFrom(ev supervisor.Event) string {
	if ev.Until != "" {
		return string(ev.Until)
	}
	return string(ev.Ended)
}

// phaseFrom names a supervisor phase on the wire; one the protocol does
// not know yet goes under its own name.
func phaseFrom(p supervisor.Phase) Phase {
	switch p {
	case supervisor.PhaseQueued:
		return PhaseQueued
	case supervisor.PhaseChecking:
		return PhaseChecking
	case supervisor.PhaseChecked:
		return PhaseChecked
	case supervisor.PhaseWaitOld:
		return PhaseWaitOld
	case supervisor.PhaseStarting:
		return PhaseStarting
	case supervisor.PhaseWaiting:
		return PhaseWaiting
	case supervisor.PhaseReady:
		return PhaseReady
	case supervisor.PhaseConfirming:
		return PhaseConfirming
	case supervisor.PhaseConfirmed:
		return PhaseConfirmed
	case supervisor.PhaseRollingBack:
		return PhaseRollingBack
	case supervisor.PhaseDraining:
		return PhaseDraining
	case supervisor.PhaseStopping:
		return PhaseStopping
	case supervisor.PhaseDone:
		return PhaseDone
	case supervisor.PhaseOldExit:
		return PhaseOldExit
	}
	return Phase(p)
}

// stateFrom names a generation's state on the wire, as phaseFrom does.
func stateFrom(s supervisor.State) State {
	switch s {
	case supervisor.Starting:
		return StateStarting
	case supervisor.Serving:
		return StateServing
	case supervisor.Warm:
		return StateWarm
	case supervisor.Draining:
		return StateDraining
	case supervisor.Stopping:
		return StateStopping
	case supervisor.Exited:
		return StateExited
	}
	return State(s)
}

// statusDoc is the status document of the relay at control, with pid,
// described by info, whose supervisor reported st.
func statusDoc(info Info, control string, pid int, st supervisor.Status) *StatusDoc {
	doc := &StatusDoc{
		Version: Version, Name: info.Name, Pid: pid, Started: info.Started, Control: control,
		Listeners: info.Listeners, Command: st.Command, Generations: []GenerationStatus{},
		Restarts: RestartCounts{
			OK: st.Restarts.OK, RolledBack: st.Restarts.RolledBack, Refused: st.Restarts.Refused,
			Replacements: st.Restarts.Replacements, InProgress: st.Restarts.InProgress,
			Queued: st.Restarts.Queued, QueuedRestarts: st.Restarts.QueuedRestarts,
			LivenessReplacements: st.Restarts.LivenessReplacements,
			CopyReplacements:     st.Restarts.CopyReplacements,
			AfterSwitch:          map[string]int{},
		},
		Stopping:     st.Stopping,
		ShutdownAt:   st.ShutdownAt,
		RelayVersion: info.Version, Upgrades: info.Upgrades, LastUpgrade: info.LastUpgrade,
	}
	for cause, n := range st.Restarts.AfterSwitch {
		doc.Restarts.AfterSwitch[string(cause)] = n
	}
	if c := st.Confirm; c != nil {
		doc.Confirm = &ConfirmDoc{Generation: c.Generation, Pid: c.Pid, Warm: c.Warm, WarmPid: c.WarmPid,
			Began: c.Began, Until: c.Until, LeftSeconds: max(c.Until.Sub(st.At), 0).Seconds()}
	}
	for _, g := range st.Generations {
		gs := GenerationStatus{
			Generation: g.Generation, Pid: g.Pid, State: stateFrom(g.State), Started: g.Started,
			AgeSeconds: st.At.Sub(g.Started).Seconds(), ReadyAfterMs: ms(g.ReadyAfter), Command: g.Command, Sockets: g.Sockets,
			Processes: g.Processes,
		}
		if st.UDPSteered {
			gs.UDPFlows = &g.UDPFlows
		}
		for _, c := range g.Copies {
			gs.Copies = append(gs.Copies, CopyStatus{Worker: c.Worker, Pid: c.Pid, State: c.State, Started: c.Started,
				AgeSeconds: st.At.Sub(c.Started).Seconds(), Replaced: c.Replaced})
		}
		doc.Generations = append(doc.Generations, gs)
	}
	if l := st.LastRestart; l != nil {
		doc.LastRestart = &LastRestart{Result: resultFrom(l.Result), Finished: l.Finished, DurationMs: ms(l.Duration)}
	}
	return doc
}
