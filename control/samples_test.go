package control

import (
	"time"

	"github.com/relaysh/relay/supervisor"
)

// The samples set every field of the supervisor's types to a value that
// is not its zero, so that a field the conversion drops shows.

// sampleStart is when the sample relay and its first generation started.
func sampleStart() time.Time { return time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC) }

func sampleResult() supervisor.Result {
	return supervisor.Result{
		Outcome: supervisor.RestartRefused, Generation: 7, Pid: 4242, Command: []string{"/srv/api", "-v2"},
		Reason: "readiness check failed", StderrTail: "panic: x\nexit 2", ReadyAfter: 1500 * time.Microsecond,
		Duration: 2*time.Second + 3500*time.Microsecond,
	}
}

func sampleEvents() []supervisor.Event {
	res := sampleResult()
	return []supervisor.Event{
		{Phase: supervisor.PhaseQueued},
		{Phase: supervisor.PhaseChecking, Check: "nginx -t"},
		{Phase: supervisor.PhaseChecked},
		{Phase: supervisor.PhaseWaitOld, Generation: 3, Pid: 1003},
		{Phase: supervisor.PhaseStarting, Generation: 5, Pid: 1240},
		{Phase: supervisor.PhaseWaiting, Generation: 5, Pid: 1240, Check: "tcp 127.0.0.1:8080"},
		{Phase: supervisor.PhaseReady, Generation: 5, Pid: 1240, Duration: 12500 * time.Microsecond},
		{Phase: supervisor.PhaseConfirming, Generation: 4, Pid: 1100, Duration: time.Minute},
		{Phase: supervisor.PhaseRollingBack, Generation: 4, Pid: 1100, Duration: 2 * time.Second, Cause: string(supervisor.RollbackExited), Reason: "exited in the confirmation window: exit status 1"},
		{Phase: supervisor.PhaseConfirmed, Generation: 5, Pid: 1240, Duration: time.Minute, Cause: string(supervisor.ConfirmedQuiet)},
		{Phase: supervisor.PhaseDraining, Generation: 4, Pid: 1100, Duration: 5 * time.Second, Until: supervisor.DrainAdaptive},
		{Phase: supervisor.PhaseStopping, Generation: 4, Pid: 1100, Signal: "SIGTERM", Duration: 21500 * time.Microsecond, Ended: supervisor.EndedEmpty},
		{Phase: supervisor.PhaseDone, Generation: 5, Pid: 1240, Check: "c", Signal: "s", Status: "exit 0", Duration: 3250 * time.Microsecond, Result: &res},
		{Phase: supervisor.PhaseOldExit, Generation: 4, Pid: 1100, Status: "exit status 0"},
	}
}

func sampleStatus() supervisor.Status {
	return supervisor.Status{
		Command: []string{"/srv/api", "--port", "{health_port}"},
		Generations: []supervisor.GenerationStatus{
			{Generation: 4, Pid: 1100, State: supervisor.Draining, Started: sampleStart(),
				ReadyAfter: 20250 * time.Microsecond, Command: []string{"/srv/api"}, Sockets: map[string]string{"tcp-8080": "fd", "udp-53": "bind"}, Processes: 3, UDPFlows: 12,
				Copies: []supervisor.CopyStatus{{Worker: 0, Pid: 1100, State: "ready", Started: sampleStart(), Replaced: 0},
					{Worker: 1, Pid: 1180, State: "exited", Started: sampleStart().Add(30 * time.Second), Replaced: 2}}},
			{Generation: 5, Pid: 1240, State: supervisor.Starting, Started: sampleStart().Add(time.Minute),
				Command: []string{"/srv/api", "-v2"}},
		},
		Restarts: supervisor.RestartCounts{OK: 3, RolledBack: 2, Refused: 1, Replacements: 4, InProgress: true, Queued: true, QueuedRestarts: 2, LivenessReplacements: 5, CopyReplacements: 6,
			AfterSwitch: map[supervisor.RollbackCause]int{supervisor.RollbackExited: 1, supervisor.RollbackManual: 2}},
		LastRestart: &supervisor.LastRestart{
			Result: sampleResult(), Finished: sampleStart().Add(2 * time.Minute),
		},
		Stopping:   true,
		At:         sampleStart().Add(61*time.Second + 500*time.Millisecond),
		ShutdownAt: sampleStart().Add(3 * time.Minute),
		Confirm: &supervisor.ConfirmStatus{Generation: 5, Pid: 1240, Warm: 4, WarmPid: 1100,
			Began: sampleStart().Add(time.Minute), Until: sampleStart().Add(2 * time.Minute)},
		UDPSteered: true,
	}
}

func sampleInfo() Info {
	return Info{
		Name: "api", Started: sampleStart(),
		Listeners: []ListenerInfo{
			{FD: 3, Name: "tcp-8080", Network: "tcp", Address: "127.0.0.1:8080", Origin: "bound", Drain: "steered"},
			{FD: 4, Name: "udp-53", Network: "udp", Address: "[::1]:53", Origin: "inherited", Drain: "shared"},
		},
	}
}
