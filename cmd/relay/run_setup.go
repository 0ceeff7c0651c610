package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/relaysh/relay/control"
	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/internal/cgroup"
	"github.com/relaysh/relay/internal/reaper"
	"github.com/relaysh/relay/internal/sdnotify"
	"github.com/relaysh/relay/internal/sockets"
	"github.com/relaysh/relay/supervisor"
)

// takePassed takes the sockets systemd passed to relay, if any: with no
// --listen either, relay has nothing to serve.
func takePassed(log *slog.Logger, opts runOptions) ([]*sockets.Listener, error) {
	if pid, foreign := sockets.ForeignListenPID(); foreign {
		log.Warn("ignoring LISTEN_FDS: LISTEN_PID is not relay's pid", "listen_pid", pid, "pid", os.Getpid())
	}
	passed, err := sockets.TakeActivated()
	if err != nil {
		return nil, err
	}
	if len(opts.listens) == 0 && len(passed) == 0 {
		return nil, usagef("no --listen address and no sockets from systemd; give at least one, e.g. --listen :8080")
	}
	return passed, nil
}

// openSockets binds the --listen sockets that passed ones do not serve,
// and says what relay listens on and what the readiness check can tell
// apart there.
func openSockets(log *slog.Logger, opts runOptions, passed []*sockets.Listener, notifier *sdnotify.Notifier) (*sockets.Set, error) {
	set, err := sockets.Open(sockets.Options{Specs: opts.listens, Passed: passed, UnixMode: opts.socketMode,
		Steer: opts.steer, Notifier: notifier, Log: log})
	if err != nil {
		return nil, err
	}
	for _, in := range set.Info() {
		log.Info("listening", "fd", in.FD, "name", in.Name, "network", in.Network, "addr", in.Addr,
			"origin", in.Origin, "drain", string(in.Sharing), "takeover", string(opts.takeover))
	}
	if err := adviseHealth(log, opts, set); err != nil {
		set.Close()
		return nil, err
	}
	if opts.confirm > 0 && !set.Steered() {
		set.Close()
		return nil, usagef("--confirm %s: no listener is steered, so new connections could not go back to the warm generation alone (unix, UDP and --steer off share one socket among generations); use a TCP --listen with --steer auto or on, or drop --confirm", opts.confirm)
	}
	return set, nil
}

// adviseHealth logs what the readiness check can and cannot tell apart on
// these sockets, and refuses a check that could prove nothing.
func adviseHealth(log *slog.Logger, opts runOptions, set *sockets.Set) error {
	facts := health.Facts{Binds: opts.takeover != supervisor.TakeoverOff, Steered: set.ProbesSteered}
	for i, in := range set.Info() {
		facts.Listeners = append(facts.Listeners, health.ListenerFact{Name: in.Name, IP: in.IP, Probed: set.Probe(i) != ""})
	}
	advice, err := health.Advise(opts.health, facts)
	if err == nil && opts.liveness.check.Kind != "" {
		var more []health.Advice
		more, err = health.AdviseLiveness(opts.liveness.check, facts)
		advice = append(advice, more...)
	}
	for _, a := range advice {
		log.Log(context.Background(), a.Level, a.Msg, a.Args...)
	}
	if err != nil {
		return usageError{err}
	}
	return nil
}

// newSupervisor makes the supervisor of the generations on set.
func newSupervisor(opts runOptions, set *sockets.Set, notifyDir string, rp *reaper.Reaper, cg *cgroup.Tree,
	log *slog.Logger, stderr io.Writer, observer supervisor.Observer, rec supervisor.Recorder) (*supervisor.Supervisor, error) {
	drain := opts.drain
	switch {
	case opts.drainSet || !set.Steered():
	case set.DrainObservable():
		drain = defaultAdaptiveDrain
	default:
		drain = defaultSteeredDrain
	}
	return supervisor.New(supervisor.Config{
		Command:       opts.command,
		Check:         opts.check,
		Env:           os.Environ(),
		Sockets:       set,
		Takeover:      opts.takeover,
		Health:        opts.health,
		HealthTimeout: opts.healthTimeout,
		Drain:         drain,
		Confirm:       opts.confirm,
		StopSignal:    opts.stopSignal,
		KillMode:      opts.killMode,
		StopTimeout:   opts.stopTimeout,
		MaxDraining:   opts.maxDraining,
		RuntimeDir:    notifyDir,
		Reaper:        rp,
		Cgroups:       cg,
		Log:           log,
		Stderr:        stderr,
		Observer:      observer,
		Recorder:      rec,

		Liveness:         opts.liveness.check,
		LivenessInterval: opts.liveness.interval,
		LivenessFailures: opts.liveness.failures,
		ChildWatchdog:    opts.liveness.childWatchdog,
	})
}

// controlInfo is what relay says of itself in status documents.
func controlInfo(opts runOptions, set *sockets.Set) control.Info {
	info := control.Info{Name: opts.name, Started: time.Now(), Version: thisVersion()}
	for _, in := range set.Info() {
		info.Listeners = append(info.Listeners, control.ListenerInfo{
			FD: in.FD, Name: in.Name, Network: in.Network, Address: in.Addr, Origin: in.Origin, Drain: string(in.Sharing),
		})
	}
	return info
}

// listenControl creates the control socket of relay restart, status and
// stop.
func listenControl(opts runOptions, sup *supervisor.Supervisor, set *sockets.Set, log *slog.Logger) (*control.Server, error) {
	ctl, err := control.Listen(opts.controlPath, sup, controlInfo(opts, set), log)
	if err != nil {
		return nil, err
	}
	log.Info("control socket", "path", ctl.Path(), "name", opts.name)
	return ctl, nil
}
