package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/relaysh/relay/control"
	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/internal/cgroup"
	"github.com/relaysh/relay/internal/reaper"
	"github.com/relaysh/relay/internal/sdnotify"
	"github.com/relaysh/relay/internal/sockaddr"
	"github.com/relaysh/relay/internal/sockets"
	"github.com/relaysh/relay/internal/takeover"
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

// checkSockets refuses, before anything is bound or created, what these
// listeners could not serve whatever the kernel allows. --confirm, --health
// accept with --takeover off and --liveness accept need steered listeners,
// and only a TCP listener, without --steer off, can be one: the facts here
// count each such listener as steered, as it will be where the kernel
// allows. openSockets checks the same again on the bound sockets, for a
// kernel that steers none of them.
func checkSockets(opts runOptions, passed []*sockets.Listener) error {
	steerable := func(n sockaddr.Network) bool { return n == sockaddr.TCP && opts.steer != sockets.SteerOff }
	facts := health.Facts{Binds: opts.takeover != supervisor.TakeoverOff}
	anySteerable := false
	add := func(name string, n sockaddr.Network) {
		// A UDP listener is steered by flow, and so probed, where relay
		// may load eBPF: adviseHealth checks again once Open has said.
		facts.Listeners = append(facts.Listeners, health.ListenerFact{Name: name, Probed: steerable(n),
			QUIC: n == sockaddr.UDP && opts.steer != sockets.SteerOff})
		// A UDP listener is steered by flow where relay may load eBPF
		// (Open says, and --confirm is checked again once it has).
		anySteerable = anySteerable || steerable(n) || n == sockaddr.UDP
	}
	for _, p := range passed {
		// One stored for a --listen is the socket of that --listen, or
		// is closed (openListeners).
		if !strings.HasPrefix(p.PassedName, sockets.StoreNamePrefix) {
			add(p.Spec.Name, p.Spec.Network)
		}
	}
	for _, s := range opts.listens {
		add(specName(s), s.Network)
	}
	if _, err := healthAdvice(opts, facts); err != nil {
		return err
	}
	switch {
	case opts.confirm == 0:
	case opts.steer == sockets.SteerOff:
		return confirmUnsteered(opts.confirm, "--steer off shares one socket among generations")
	case !anySteerable:
		return confirmUnsteered(opts.confirm, "unix listeners share one socket among generations")
	}
	return nil
}

// specName is the name of s's socket, as far as it is known before the
// bind: a default name that holds a port 0 becomes the bound one, so the
// --listen value stands for it.
func specName(s sockets.Spec) string {
	switch {
	case s.NameGiven:
		return s.Name
	case s.Network == sockaddr.Unix:
		return sockets.DefaultName(s.Network, s.Address)
	}
	if _, port, err := net.SplitHostPort(s.Address); err == nil && port != "0" {
		return sockets.DefaultName(s.Network, s.Address)
	}
	return s.String()
}

// confirmUnsteered is the usage error of --confirm without a steered
// listener.
func confirmUnsteered(d time.Duration, why string) error {
	return usagef("--confirm %s: no listener is steered (%s), so new connections could not go back to the warm generation alone; use a TCP --listen with --steer auto or on, or drop --confirm", d, why)
}

// openSockets binds the --listen sockets that passed ones do not serve,
// and says what relay listens on and what the readiness check can tell
// apart there. What the sockets package logs while it binds is held until
// the last usage error is ruled out: a usage error comes alone, after
// nothing but the warnings that say why no listener could be steered.
func openSockets(log *slog.Logger, opts runOptions, passed []*sockets.Listener, notifier *sdnotify.Notifier) (*sockets.Set, error) {
	held := holdLogs()
	set, err := sockets.Open(sockets.Options{Specs: opts.listens, Passed: passed, UnixMode: opts.socketMode,
		Steer: opts.steer, Notifier: notifier, Log: slog.New(held.handler(log.Handler()))})
	if err != nil {
		held.release(slog.LevelDebug)
		return nil, err
	}
	// The fallbacks of checkSockets, for a kernel that steered nothing.
	advice, err := adviseHealth(opts, set)
	if err == nil && opts.confirm > 0 && !set.Steered() {
		err = confirmUnsteered(opts.confirm, "the kernel let relay steer none of them; see the warnings above")
	}
	if err != nil {
		set.Close()
		held.release(slog.LevelWarn)
		return nil, err
	}
	held.release(slog.LevelDebug)
	for _, in := range set.Info() {
		log.Info("listening", "fd", in.FD, "name", in.Name, "network", in.Network, "addr", in.Addr,
			"origin", in.Origin, "drain", string(in.Sharing), "takeover", string(opts.takeover))
	}
	for _, a := range advice {
		log.Log(context.Background(), a.Level, a.Msg, a.Args...)
	}
	return set, nil
}

// adviseHealth says what the readiness check can and cannot tell apart on
// these sockets, to log, and refuses a check that could prove nothing.
func adviseHealth(opts runOptions, set *sockets.Set) ([]health.Advice, error) {
	facts := health.Facts{Binds: opts.takeover != supervisor.TakeoverOff, Steered: set.ProbesSteered}
	for i, in := range set.Info() {
		facts.Listeners = append(facts.Listeners, health.ListenerFact{Name: in.Name, IP: in.IP, Probed: set.Probe(i) != "", QUIC: set.QUICProbe(i, 0) != nil})
	}
	return healthAdvice(opts, facts)
}

// healthAdvice is the advice on the readiness and liveness checks with
// these facts, and a usage error for a check that could prove nothing.
func healthAdvice(opts runOptions, facts health.Facts) ([]health.Advice, error) {
	advice, err := health.Advise(opts.health, facts)
	if err == nil && opts.liveness.check.Kind != "" {
		var more []health.Advice
		more, err = health.AdviseLiveness(opts.liveness.check, facts)
		advice = append(advice, more...)
	}
	if err != nil {
		return nil, usageError{err}
	}
	return advice, nil
}

// heldLogs holds log records until release: see openSockets.
type heldLogs struct {
	mu      sync.Mutex
	holding bool
	records []heldRecord
}

type heldRecord struct {
	h slog.Handler
	r slog.Record
}

func holdLogs() *heldLogs { return &heldLogs{holding: true} }

// handler is h, with its records held until release.
func (l *heldLogs) handler(h slog.Handler) slog.Handler { return heldHandler{logs: l, h: h} }

// release writes the records held of level min or above, in order, drops
// the others, and lets every later record through.
func (l *heldLogs) release(min slog.Level) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, rec := range l.records {
		if rec.r.Level >= min {
			rec.h.Handle(context.Background(), rec.r)
		}
	}
	l.records, l.holding = nil, false
}

type heldHandler struct {
	logs *heldLogs
	h    slog.Handler
}

func (h heldHandler) Enabled(ctx context.Context, level slog.Level) bool {
	return h.h.Enabled(ctx, level)
}

func (h heldHandler) Handle(ctx context.Context, r slog.Record) error {
	h.logs.mu.Lock()
	if h.logs.holding {
		h.logs.records = append(h.logs.records, heldRecord{h: h.h, r: r.Clone()})
		h.logs.mu.Unlock()
		return nil
	}
	h.logs.mu.Unlock()
	return h.h.Handle(ctx, r)
}

func (h heldHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return heldHandler{logs: h.logs, h: h.h.WithAttrs(attrs)}
}

func (h heldHandler) WithGroup(name string) slog.Handler {
	return heldHandler{logs: h.logs, h: h.h.WithGroup(name)}
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
		User:          opts.user,
		IOURing:       opts.ioURing,
		Health:        opts.health,
		HealthTimeout: opts.healthTimeout,
		Drain:         drain,
		Confirm:       opts.confirm,
		StopSignal:    opts.stopSignal,
		KillMode:      opts.killMode,
		StopTimeout:   opts.stopTimeout,
		MaxDraining:   opts.maxDraining,
		Workers:       opts.workers,
		Rolling:       opts.rolling,
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

// checkInspect says whether the bind takeover can read the binds of a
// server that runs as another user (--user): that takes CAP_SYS_PTRACE,
// which a container runtime's default set may lack. Without it the server's
// own binds go to the kernel untouched: an error under --takeover on, a
// warning otherwise.
func checkInspect(log *slog.Logger, opts runOptions) error {
	if opts.user == nil || opts.takeover == supervisor.TakeoverOff || takeover.CanInspect() {
		return nil
	}
	const why = "relay lacks CAP_SYS_PTRACE, which reading the binds of a server of another user (--user) takes"
	if opts.takeover == supervisor.TakeoverOn {
		return fmt.Errorf("--takeover on with --user: %s; give relay CAP_SYS_PTRACE (systemd: AmbientCapabilities=CAP_SYS_PTRACE; docker: --cap-add SYS_PTRACE), or run the server on the inherited sockets with --takeover off", why)
	}
	log.Warn("bind takeover: "+why+"; the server's own binds of relay's addresses will fail, so it must take the inherited sockets", "user", opts.user.Name)
	return nil
}
