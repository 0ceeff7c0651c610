package main

import (
	"context"
	"log/slog"
	"os"
	"time"

	"github.com/oklog/run"

	"github.com/relaysh/relay/control"
	"github.com/relaysh/relay/internal/admin"
	"github.com/relaysh/relay/internal/sdnotify"
	"github.com/relaysh/relay/signals"
	"github.com/relaysh/relay/supervisor"
)

// The actors of relay run, each added to the run group by one function:
// the first to return interrupts the others, and the group returns the
// first one's result once all have stopped.

// actors are what runActors runs.
type actors struct {
	log           *slog.Logger
	sigC          <-chan os.Signal
	shutdownDelay time.Duration
	sup           *supervisor.Supervisor
	ctl           *control.Server
	adm           *admin.Server // nil without --metrics
	notifier      *sdnotify.Notifier
	mem           *memoryReturner
	up            *upgrader
}

// runActors runs the control server, the admin listener, the supervisor,
// the signal loop, the watchdog and the memory returner until the
// supervisor is done, and says how relay ends.
func runActors(a actors) error {
	var g run.Group
	addControl(&g, a.ctl)
	addAdmin(&g, a.adm)
	outcome := addSupervisor(&g, a.sup)
	addSignalLoop(&g, a.sigC, a.shutdownDelay, signalTarget{Supervisor: a.sup, up: a.up})
	addWatchdog(&g, a.log, a.notifier, a.sup)
	addMemoryReturner(&g, a.mem)
	if err := g.Run(); err != nil {
		return err
	}
	return exitWith(a.log, *outcome)
}

// addControl serves the control socket.
func addControl(g *run.Group, ctl *control.Server) {
	g.Add(ctl.Serve, func(error) { ctl.Close() })
}

// addSupervisor runs the generations until relay stops. The outcome is
// set once g.Run has returned.
func addSupervisor(g *run.Group, sup *supervisor.Supervisor) *supervisor.Outcome {
	outcome := new(supervisor.Outcome)
	g.Add(func() error {
		var err error
		*outcome, err = sup.Run()
		return err
	}, func(error) { sup.Stop(false) })
	return outcome
}

// addSignalLoop turns signals sent to relay into supervisor requests
// (signals.Decide, signals.StopStep with the --shutdown-delay) until the
// supervisor is done. It never returns first: only the supervisor's result
// says how relay ends.
func addSignalLoop(g *run.Group, sigC <-chan os.Signal, delay time.Duration, sup signals.Target) {
	ctx, cancel := context.WithCancel(context.Background())
	g.Add(func() error { signals.Loop(ctx, sigC, sup, delay); return nil }, func(error) { cancel() })
}

// signalTarget is what relay's signals act on: the supervisor, and the
// upgrader for SIGUSR2.
type signalTarget struct {
	*supervisor.Supervisor
	up *upgrader
}

// Upgrade upgrades relay to its own path's binary, on a goroutine of its
// own: the signal loop goes on meanwhile. The upgrader logs the outcome.
func (t signalTarget) Upgrade(reason string) {
	t.up.log.Info("upgrade requested", "reason", reason)
	go t.up.Upgrade("", nil)
}

// addWatchdog pings systemd's watchdog (WatchdogSec=) while the supervisor
// answers; without a watchdog it adds nothing.
func addWatchdog(g *run.Group, log *slog.Logger, notifier *sdnotify.Notifier, sup *supervisor.Supervisor) {
	interval, err := sdnotify.WatchdogInterval()
	if err != nil {
		log.Warn("ignoring the watchdog settings", "err", err)
		return
	}
	if interval <= 0 || !notifier.Enabled() {
		return
	}
	every := sdnotify.PingInterval(interval)
	log.Info("watchdog: pinging while the supervisor answers", "watchdog_usec", interval.Microseconds(), "ping_every", every)
	ctx, cancel := context.WithCancel(context.Background())
	ticker := time.NewTicker(every)
	g.Add(func() error {
		defer ticker.Stop()
		notifier.RunWatchdog(ctx, ticker.C, func() bool {
			_, err := sup.Status()
			return err == nil
		})
		return nil
	}, func(error) { cancel() })
}

// exitWith is how relay ends once the supervisor is done: with the status
// of the child that ended it, if one did.
func exitWith(log *slog.Logger, o supervisor.Outcome) error {
	if o.Child == nil {
		return nil
	}
	log.Info("relay exiting", "child_status", o.Child.String(), "exit_code", o.Child.ExitCode())
	return childExit{code: o.Child.ExitCode()}
}
