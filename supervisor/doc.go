// Package supervisor runs the generations of one command on relay's shared
// sockets and owns the restart state machine.
//
// One goroutine, Run's, owns all state. Other goroutines talk to it through
// two mailboxes: requests from the API (Restart, Stop, Status, ...; with a
// reply channel where they want an answer) and events from helper
// goroutines and timers (a child exited, a check finished, a timer fired;
// mailbox.go lists them all). No lock guards the generations, the restarts
// or the counts: a helper goroutine reads only what is set before it starts
// and never changes (Config, env, a generation's number, process, health
// address and cgroup, a restart's command), and says what it found by
// posting an event. These are the exceptions, each shared on purpose:
//
//   - Supervisor.speaksNotify (atomic): the notify socket's goroutine sets
//     it at a child's first sd_notify message, and the readiness checks'
//     goroutines read it (health.Auto).
//   - Supervisor.takeoverWarned (atomic): the takeover goroutines of all
//     generations log "bind takeover unavailable" once between them.
//   - generation.pidForNotify (atomic): the pid, for the notify
//     goroutine's log lines; its socket listens before the child starts.
//   - generation.pingPosted (atomic): the notify goroutine sets it as it
//     posts a watchdogPing, and the loop clears it as it handles one, so
//     that at most one is on its way.
//   - generation.notified, closed once (notifiedOnce) by the notify
//     goroutine: the readiness check hears that the child spoke.
//   - generation.stderr (a tailBuffer, under its own mutex): the goroutine
//     that copies the child's stderr writes it; the loop reads its tail
//     for the reports of a failure.
//   - generation.takeover (a bindTakeover, takeover.go, under its mutex
//     mu): the goroutine that answers the child's binds writes how each
//     listener was taken, the claims and the failure; the readiness
//     check's goroutine reads the claims and the failure; the loop reads
//     how they were taken (status, logs) and the failure (onCheck), and
//     stops it, waiting until nothing answers, before the sockets go back.
//   - generation.copier (a stderrCopier, tail.go): Handoff pauses and
//     resumes the goroutine that copies the child's stderr, through its
//     channels; the pipe's fd and the partial line are read while it is
//     paused.
//
// Processes, the clock and the checks are reached through env (env.go),
// which tests replace with fakes.
//
// # Generations
//
// Each start of the command is a generation, numbered from 1. Its state
// (State) moves one way, but for a rollback in the drain window or the
// confirmation window:
//
//	Starting ──ready──▶ Serving ──newer one ready──▶ Draining ──drain ends──▶ Stopping
//	   │                 │   ▲                          │                      │
//	   │                 │   └──the newer one exits─────┤                      │
//	   ▼ exits           ▼ exits                        ▼ exits                ▼ exits
//	 Exited            Exited                         Exited                 Exited
//	 (rolled back)     (a crash: replaced)            (an old one gone)      (an old one gone)
//
// With --confirm (confirm.go), a requested restart's old generation is Warm
// between Serving and Draining, for the window; the newer one failing in
// it takes it back to Serving, and makes the newer one Draining:
//
//	Serving ──newer one ready──▶ Warm ──window ends──▶ Draining
//	   ▲                          │
//	   └──the newer one fails─────┘
//
// A graceful stop makes every live generation Stopping (Stop(now) kills
// them as they are). A generation's state puts
// it in one slot of the supervisor's (the serving one, the starting one,
// the old ones, the lingering ones, or none once it is gone: supervisor.go
// says which), and generations.move changes both together.
//
// TestDocEventTable drives the supervisor through each row of this table.
// What each event does to a generation, by its state:
//
//	state     event                  what happens
//	────────  ─────────────────────  ────────────────────────────────────────────────
//	Starting  check passed           new connections go to it; Serving. The serving
//	                                 one drains (Draining, for --drain) or stops
//	Starting  check passed, but it   nothing: its exit event rolls it back
//	          has exited meanwhile
//	Starting  check failed, or       SIGKILL to its group; rolled back once it exits
//	          --health-timeout
//	Starting  exits                  rolled back: what served was never touched. For
//	                                 the first generation, Run ends with an error
//	Serving   exits in its drain     its restart is rolled back: the old one serves
//	          window                 again if still Draining, else nothing serves
//	                                 and a replacement follows
//	Serving   exits in its           its restart is rolled back: new connections go
//	          confirmation window    to the Warm one again (Serving)
//	Serving   fails its liveness     its restart is rolled back: new connections go
//	          check, sends           to the Warm one again (Serving); it drains
//	          STOPPING=1 or ERRNO=,  (Draining), then stops
//	          or relay rollback, in
//	          its confirmation
//	          window
//	Serving   exits, otherwise       a crash: a replacement after the backoff
//	Warm      confirmation window    Draining: it drains, then stops, as after a
//	          ends, or a restart is  switch without a window
//	          requested
//	Warm      exits                  the window ends: nothing to go back to, the new
//	                                 one is confirmed
//	Draining  drain timer, or its    stop signal, Stopping; its restart is done
//	          sockets emptied
//	Draining  it failed its liveness its steered sockets leave their groups, and
//	          check, and accepted    what was queued on them moves to the new
//	          nothing queued for     one's (the hand-over); stop signal, Stopping
//	          stallQuiet
//	Draining  exits                  leaves the old ones; a restart waiting on
//	Stopping                         --max-draining starts its generation, once
//	                                 nothing of it is left
//	Stopping  stop timeout           SIGKILL to its group (its whole cgroup, where
//	                                 relay has cgroups: contain.go)
//	any       Stop                   check cancelled; stop signal, Stopping (a
//	                                 second Stop changes nothing)
//	any       Stop(now)              SIGKILL to its group, lingering ones too
//	any       StopAfter(d)           nothing, for d (the shutdown delay); then Stop
//	Exited    orphans reaped, or     gone once its group (or cgroup) is empty: its
//	          its cgroup emptied     cgroup is removed, the restart that retired it
//	                                 reports its exit, and a restart waiting on
//	                                 --max-draining may start
//
// The stop signal goes where --kill-mode says (sendStop): to the main
// process alone (KillMixed, the default: a prefork master passes it on to
// its workers as its own graceful stop protocol says), or to every process
// of the generation (KillControlGroup). SIGCONT to every process follows
// it, and SIGKILL to every process follows the stop timeout, either way.
//
// An exited generation whose group (or cgroup) still has processes
// lingers, and is a generation still: Status lists it (Exited, with its
// processes), it counts against --max-draining, and the restart that
// retired it is told it exited only when it is gone. What is left of one
// that was Stopping gets nothing more until SIGKILL at the stop timeout
// (workers finishing their requests are left to finish); what is left of
// one that exited on its own gets the stop signal at once, there being no
// main process to pass it on, and SIGKILL after the stop timeout.
//
// Run returns once relay stops and nothing is alive or lingering; its
// Outcome is the exit status of the generation that served when the stop
// began.
//
// # Restarts
//
// A restart moves through the phases of Event (any may be skipped), each
// told to the callers following it and kept as its phase (restartRun.phase,
// which the code reads to know where the restart is):
//
//	queued ─▶ checking ─▶ checked ─▶ waiting_for_old ─▶ starting ─▶ waiting
//	       ─▶ ready ─▶ [confirming ─▶ confirmed | rolling_back] ─▶ draining
//	       ─▶ stopping ─▶ done ─▶ old_exited
//
//	phase            entered when                         leaves
//	───────────────  ───────────────────────────────────  ─────────────────────────────────────────
//	queued           asked for during another restart     begins when that one is done; the same
//	                                                      request is coalesced, a different one
//	                                                      queued in order (at most maxQueued)
//	checking         it has a pre-flight command          done, refused, if it fails or relay stops
//	waiting_for_old  --max-draining old ones still live   when one is gone, every process of it
//	                                                      (or when nothing serves)
//	starting         the new generation was started       done, rolled back, if it fails
//	ready            its readiness check passed           done at once when nothing served before
//	confirming       --confirm, for a requested restart   confirmed when the window ends, or a
//	                 that replaces a serving generation:  restart is asked for, or the old one
//	                 the old one is kept Warm             exits; rolling_back if the new one fails
//	confirmed        the new one is kept                  draining, for the old one
//	rolling_back     the old one serves again             draining, for the new one (done, rolled
//	                                                      back, if it has exited)
//	draining         the old one serves for --drain       done at its end or at a stop: ok, or
//	                                                      rolled back after rolling_back; rolled
//	                                                      back if the new one exits meanwhile
//	stopping         the old one got its stop signal      done
//	old_exited       after done: the old one is gone,     the channel is closed
//	                 every process of it
//
// Relay begins two restarts by itself, never counted as requested and never
// told to the Observer as reloads: the first start, and the replacement of
// a serving generation that exited on its own. A replacement waits
// RestartBackoff, doubled for each failure in a row up to MaxBackoff (the
// count starts again after a generation served stableAfter); a requested
// restart in the meantime takes its place.
//
// # The stop
//
// Stop answers the queued restarts as refused and ends the one under way: a
// restart in its pre-flight check or waiting for an old generation is
// refused, one in its drain window or its confirmation window is done (the
// new generation serves; a warm one stops with the rest), one whose new
// generation is starting ends when that one has exited.
// Every live generation then gets the stop signal (sendStop: its main
// process, or every process of it, by --kill-mode), and SIGKILL to all of
// it after the stop timeout.
//
// StopAfter(d) puts a shutdown delay before the stop: for d, everything
// serves as before and crashed generations are still replaced, but the
// queued restarts are refused at once and the ones asked for later on
// arrival (a restart under way goes on), and Status.ShutdownAt says when
// the stop begins, so a readiness probe can fail meanwhile. When d has
// passed, or at a Stop, the stop above begins.
package supervisor
