package main

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/relaysh/relay/control"
	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/internal/cgroup"
	"github.com/relaysh/relay/internal/handoff"
	"github.com/relaysh/relay/internal/reaper"
	"github.com/relaysh/relay/internal/sdnotify"
	"github.com/relaysh/relay/internal/sockets"
	"github.com/relaysh/relay/signals"
	"github.com/relaysh/relay/socketpass"
	"github.com/relaysh/relay/supervisor"
)

func runCommand(b boot) *cli.Command {
	return &cli.Command{
		Name:        "run",
		Usage:       "run COMMAND on relay's sockets and restart it without downtime",
		UsageText:   "relay run --listen ADDR [--listen ADDR ...] [options] -- COMMAND [ARG...]",
		Description: runDescription + "\n" + runExamples,
		Flags: []cli.Flag{
			&cli.StringSliceFlag{Name: "listen", Aliases: []string{"l"}, KeepSpace: true, Usage: "`ADDR` to listen on; repeat for more sockets (see the forms above); optional when systemd passes sockets"},
			&cli.StringFlag{Name: "socket-mode", Value: "0660", Usage: "permission `MODE` of unix sockets relay creates"},
			&cli.StringFlag{Name: "health", Value: "auto", Usage: "readiness `CHECK` of each new generation: auto, accept, notify, http://…, tcp://…, exec:CMD or delay:DURATION (see above)"},
			&cli.DurationFlag{Name: "health-timeout", Value: supervisor.DefaultHealthTimeout, Usage: "`DURATION` a new generation may take to become ready before it is killed and the restart rolled back"},
			&cli.StringFlag{Name: "liveness", Usage: "`CHECK` of the serving generation, repeated every --liveness-interval while no restart is under way: accept, http://…, tcp://… or exec:CMD; after --liveness-failures in a row, a restart replaces it", DefaultText: "none"},
			&cli.DurationFlag{Name: "liveness-interval", Value: supervisor.DefaultLivenessInterval, Usage: "`DURATION` between liveness checks; each may take as long, at most 5s"},
			&cli.IntFlag{Name: "liveness-failures", Value: supervisor.DefaultLivenessFailures, Usage: "`N` liveness checks failed in a row replace the serving generation"},
			&cli.DurationFlag{Name: "child-watchdog", Usage: "give each child WATCHDOG_USEC=`DURATION` (and WATCHDOG_PID); a serving child that sent WATCHDOG=1 and then none for that long is replaced", DefaultText: "off"},
			&cli.StringFlag{Name: "takeover", Value: string(supervisor.TakeoverAuto), Usage: "`MODE` of the bind takeover: auto makes a bind of a --listen address by the child (or anything it starts) land on relay's socket, where the kernel allows (else logged once, and children take the inherited fds only); on makes its absence an error; off passes the sockets as inherited fds only"},
			&cli.BoolFlag{Name: "allow-io-uring", Usage: "let generations under the bind takeover set up io_uring rings: a bind made through a ring (IORING_OP_BIND) is not seen by the takeover and can put the child's own socket on the port. By default relay refuses io_uring_setup with EPERM there, as container runtimes do, and logs it; nothing to allow with --takeover off"},
			&cli.StringFlag{Name: "user", Usage: "run every generation as `USER[:GROUP]` (names or numbers): its group and supplementary groups, or exactly GROUP, and USER, LOGNAME and HOME to match; no capabilities and no_new_privs. relay stays root, binds the ports (the server's own bind of a privileged port lands on relay's socket) and keeps its control socket", DefaultText: "relay's own user"},
			&cli.StringFlag{Name: "steer", Value: string(sockets.SteerAuto), Usage: "`MODE` of the drain: auto gives each generation a socket of its own, with new TCP connections and new UDP flows to the serving one only, where the kernel and relay's privileges allow (UDP needs CAP_BPF; else one shared socket, logged); on refuses to start without it; off shares one socket per listener"},
			&cli.DurationFlag{Name: "drain", DefaultText: "5s if any listener is steered, else 0", Usage: "the longest `DURATION` from the switch to the new generation to the old one's stop signal: on steered listeners the signal comes as soon as nothing more can reach the old sockets (after a fixed --drain, 1s by default, where the kernel cannot show that); on shared sockets, where both accept, after --drain"},
			&cli.DurationFlag{Name: "confirm", Usage: "keep the old generation warm for `DURATION` after the switch of a requested restart: no new connections, no stop signal; if the new one exits, fails --liveness (probed every tenth of the window), sends STOPPING=1 or ERRNO=, or relay rollback is run, new connections go back to the old one at once. Needs a steered (TCP) listener; costs a second generation in memory meanwhile", DefaultText: "off"},
			&cli.StringFlag{Name: "stop-signal", Value: "TERM", Usage: "`SIGNAL` that asks a generation to stop (nginx and unicorn want QUIT, haproxy USR1, lighttpd INT)"},
			&cli.StringFlag{Name: "kill-mode", Value: string(supervisor.KillMixed), Usage: "`MODE`, as systemd's KillMode=: who gets --stop-signal. mixed: the generation's main process alone, which passes it on to its workers as its own graceful stop does; control-group: every process of the generation (for a main process that does not pass it on, e.g. a shell running the server without exec). Either way SIGCONT to all after it, and SIGKILL to all after --stop-timeout"},
			&cli.DurationFlag{Name: "stop-timeout", Value: supervisor.DefaultStopTimeout, Usage: "`DURATION` a generation may take to stop before all of it (its cgroup, or its process group) gets SIGKILL"},
			&cli.DurationFlag{Name: "shutdown-delay", Usage: "on the first TERM, INT or QUIT, keep serving for `DURATION` (restarts refused, crashes still replaced, relay status says so), then stop as usual; a second stop signal ends the delay, a third kills. For a load balancer (a Kubernetes Service) to take relay out of rotation before it stops", DefaultText: "0: stop at once"},
			&cli.StringFlag{Name: "workers", Value: "1", Usage: "run `N` copies of COMMAND in each generation (or \"cpus\": one per CPU relay may use), each with a socket of its own on every TCP listener; new connections spread over them by a hash of the client's address and port (see Workers above)"},
			&cli.IntFlag{Name: "rolling", Usage: "restart `K` copies at a time (with --workers N above K): each batch of new copies, once ready, takes the place of as many old ones, which drain and stop before the next batch starts, so at most N+K copies are alive during a restart instead of 2N (see Workers above)", DefaultText: "0: every new copy at once"},
			&cli.IntFlag{Name: "max-draining", Value: supervisor.DefaultMaxDraining, Usage: "`N` old generations may still have processes alive (draining, stopping, or exited with workers or daemons left); a restart past it waits for the oldest to be gone"},
			&cli.StringFlag{Name: "name", Value: control.DefaultName, Usage: "`NAME` of this relay, for relay restart/status/stop; sets the default --control path"},
			&cli.StringFlag{Name: "control", Usage: "`PATH` of the control socket, in a directory only you can enter (created 0700 if missing; default: NAME.sock in $XDG_RUNTIME_DIR/relay, /run/relay for root, else $TMPDIR/relay-UID)"},
			&cli.StringFlag{Name: "check", Usage: "pre-flight `CMD` run before every requested restart, e.g. \"nginx -t\"; if it fails, the restart is refused and nothing changes (split on spaces, no shell)"},
			&cli.StringFlag{Name: "metrics", Usage: "serve /metrics (Prometheus), /healthz and /readyz on `ADDR` ([IP]:PORT, e.g. 127.0.0.1:9090 or :9090), a listener of relay's own that no child gets", DefaultText: "off"},
			&cli.StringFlag{Name: "log-format", Value: "text", Usage: "log `FORMAT`: text or json"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "log `LEVEL`: debug, info, warn or error"},
		},
		Action:       func(c *cli.Context) error { return runAction(c, b) },
		OnUsageError: onUsageError,
	}
}

// runAction is relay run: it opens the sockets, then runs the control
// server, the supervisor, the signal loop and the watchdog as one group of
// actors until the supervisor is done. Its processes are forked on b's
// thread. Every usage error comes first, alone: parseRunFlags and
// checkSockets find them before anything is bound, created or logged, and
// openSockets the few that only the bound sockets can tell (a kernel that
// steers no listener).
func runAction(c *cli.Context, b boot) error {
	thread := b.thread
	opts, err := parseRunFlags(c)
	if err != nil || b.checkOnly {
		return err
	}
	// Take over the signals first, so that none sent while relay starts
	// kills it with the default action; they wait in the buffer. main
	// took them over already in an image an upgrade execed.
	sigC, stopSignals := b.sigC, b.stopSignals
	if sigC == nil {
		sigC, stopSignals = signals.Notify()
	}
	defer stopSignals()
	// relay's log lines and the children's stderr share one stream: one
	// Write at a time, and the children's in whole lines, keeps every
	// line whole.
	stderr := &lineWriter{w: c.App.ErrWriter}
	log := newLogger(stderr, opts.logFormat, opts.logLevel)
	// An earlier image of relay execed this one (relay upgrade): take its
	// state over instead of starting afresh.
	switch doc, err := handoff.Take(); {
	case err == nil:
		return restoreRun(thread, opts, doc, sigC, stderr, log)
	case !errors.Is(err, handoff.ErrNone) && doc.Image > 2:
		return returnTo(thread, log, doc, err)
	case !errors.Is(err, handoff.ErrNone):
		return err
	}
	// Where relay runs from, before anything replaces the file: where
	// relay upgrade looks for the new binary by default.
	exePath, err := os.Executable()
	if err != nil {
		return fmt.Errorf("finding relay's own binary: %w", err)
	}
	// Nothing relay inherited may reach a child by accident.
	if err := socketpass.CloseOnExecFrom(socketpass.FirstFD); err != nil {
		return err
	}
	passed, err := takePassed(log, opts)
	if err != nil {
		return err
	}
	// The last usage errors, before anything is bound, created or
	// logged: the few that need the bound sockets come from openSockets.
	if err := checkSockets(opts, passed); err != nil {
		sockets.CloseAll(passed)
		return err
	}
	if err := checkInspect(log, opts); err != nil {
		sockets.CloseAll(passed)
		return err
	}
	// Before the sockets: what a relay of this name killed with SIGKILL
	// left in its cgroup may hold the port.
	cg, noCgroup := cgroup.Setup(opts.name, log)
	if cg != nil {
		defer cg.Close()
	}
	notifier := sdnotify.New(log)
	defer notifier.Close(notifyFlushTimeout)
	set, err := openSockets(log, opts, passed, notifier)
	if err != nil {
		return err
	}
	defer set.Close()
	cgroup.Announce(log, cg, noCgroup)
	makeNotifyDir := health.MakeNotifyDir
	if opts.user != nil {
		makeNotifyDir = health.MakeSharedNotifyDir
	}
	notifyDir, err := makeNotifyDir()
	if err != nil {
		return err
	}
	defer os.RemoveAll(notifyDir)
	rp, err := reaper.New(log, thread)
	if err != nil {
		return err
	}
	defer rp.Close()
	mem := newMemoryReturner(notifier)
	rec := newRecorder(opts)
	sup, err := newSupervisor(opts, set, notifyDir, rp, cg, log, stderr, mem, supervisorRecorder(rec))
	if err != nil {
		return err
	}
	adm, err := listenAdmin(opts, sup, rec, log)
	if err != nil {
		return err
	}
	ctl, err := listenControl(opts, sup, set, log)
	if err != nil {
		adm.Close()
		return err
	}
	up := &upgrader{thread: thread, rp: rp, log: log, version: thisVersion(), exePath: exePath, notifyDir: notifyDir,
		sup: sup, set: set, cg: cg, ctl: ctl, adm: adm}
	ctl.SetUpgrader(up)
	return runActors(actors{log: log, sigC: sigC, shutdownDelay: opts.shutdownDelay, sup: sup, ctl: ctl, adm: adm, notifier: notifier, mem: mem, up: up})
}

// notifyFlushTimeout bounds how long relay waits, at exit, for the service
// manager to take its last messages (STOPPING=1, the final STATUS=).
const notifyFlushTimeout = 2 * time.Second

// The --drain defaults where a listener is steered and the flag is not
// given. From the switch on, the old generation gets no new connection;
// its drain only has to let it accept what was already queued on its
// socket, and let the handshakes begun before the switch complete.
//
// Where relay can see that (the kernel's socket diagnostics), the drain
// ends as soon as nothing more can reach the old socket, a few tens of
// milliseconds after the switch, and --drain is only its upper bound:
// defaultAdaptiveDrain. That bound matters only when the old socket does
// not empty: a client whose SYN-ACK was lost completes its handshake one
// retransmission later (1s, then 2s more), and an old child that stopped
// accepting never empties it. Five seconds lets two lost packets in a row
// through, and still bounds what a wedged old child costs a restart.
//
// Where relay cannot see it, the drain is the fixed defaultSteeredDrain:
// one second covers slow clients' round trips and a busy old generation's
// accept loop, with room to spare, for one second more of two generations
// alive per restart.
const (
	defaultAdaptiveDrain = 5 * time.Second
	defaultSteeredDrain  = time.Second
)
