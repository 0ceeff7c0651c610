package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/oklog/run"
	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/control"
	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/reaper"
	"github.com/relaysh/relay/sdnotify"
	"github.com/relaysh/relay/signals"
	"github.com/relaysh/relay/socketpass"
	"github.com/relaysh/relay/sockets"
	"github.com/relaysh/relay/supervisor"
)

const runDescription = `relay binds every --listen socket once, for its whole life, and runs COMMAND on them.
The server needs no relay-specific code, whichever way it gets its port:

   It binds its own port (http.ListenAndServe(":8080"), nginx "listen 8080;",
   python3 -m http.server): the bind lands on relay's socket (--takeover auto). The
   exec shim installs a seccomp filter that hands relay every bind(2) of the child and
   of everything it starts; a bind of an address a --listen covers (its port, and its
   address or a wildcard) gets relay's socket at the same fd number, and any other
   bind (another port, port 0) runs untouched. The child's listen(2) on it keeps
   relay's backlog. Linux 5.9+ on amd64 or arm64; without it, relay logs why once and
   goes on with inherited sockets only. Not a sandbox: without CAP_SYS_ADMIN (not
   root), the child's tree runs with no_new_privs (setuid and file-capability
   programs lose their privileges).

   It takes inherited sockets (systemd socket activation): the sockets are fds 3, 4, ...
   in --listen order, and the environment has LISTEN_FDS, LISTEN_FDNAMES and
   LISTEN_PID (the child's own pid). It gets the same socket either way.

Every child also gets RELAY_GENERATION, a private NOTIFY_SOCKET and RELAY_HEALTH_ADDR.

Family rule for taken-over binds: an IPv6 socket may get an IPv4 listener (Go's ":8080"
with --listen 127.0.0.1:8080), an IPv4 socket never gets an IPv6 one: nginx's
"listen 8080;" or Python's --bind 0.0.0.0 need --listen 0.0.0.0:8080 (or 127.0.0.1:8080),
not --listen :8080. Such a bind fails with one log line naming the --listen to use.

Control it with 'relay restart', 'relay status' and 'relay stop' (--name NAME), or signals.

Under systemd (see examples/systemd): with NOTIFY_SOCKET set, relay sends READY=1 once the
first generation is ready, RELOADING=1 and READY=1 around every restart, STATUS= lines,
STOPPING=1, and WATCHDOG=1 pings (WatchdogSec=). Sockets passed to relay in LISTEN_FDS (a
.socket unit) come first, under their LISTEN_FDNAMES names, then one per --listen; a --listen
uses a passed socket on its own address instead of binding. With FileDescriptorStoreMax= and
$FDSTORE, relay keeps its sockets in systemd's fd store, so a restart of relay itself
refuses no connection.

Signals to relay:
   HUP              restart: start a new generation on the same sockets, wait until it is
                    ready (--health), switch new connections to it, wait --drain, then send
                    the old one --stop-signal and SIGKILL its process group after
                    --stop-timeout.
                    A new generation that fails is killed; the old one is never touched.
   TERM, INT, QUIT  stop every generation gracefully and exit with the child's status.
                    A second one kills them at once.
   USR1, USR2, WINCH  forwarded to the serving child.

Listen forms (each may start with NAME= to set its LISTEN_FDNAMES entry):
   :8080  127.0.0.1:8080  [::1]:8080   TCP           (default name tcp-PORT)
   udp:127.0.0.1:5353                  UDP           (default name udp-PORT)
   unix:/run/app.sock                  unix stream   (default name unix-FILENAME)

Drain (--steer auto, the default): each generation gets a socket of its own in the TCP
listener's SO_REUSEPORT group, and a BPF program sends new connections to the old
generation until the new one is ready, then to the new one only. The old one finishes what
it has during --drain (1s) and gets its stop signal with nothing new arriving, so even a
plain http.Server.Shutdown loses nothing. UDP and unix sockets, and TCP sockets the kernel
will not steer (logged), stay one socket shared by every generation.

Readiness (--health) must be specific to the new child: a probe the old one could answer
proves nothing. The default, auto, needs nothing from the server:
   auto                       ready at READY=1 on the child's own NOTIFY_SOCKET; or, while
                              neither it nor an earlier generation has sent any sd_notify
                              message, once it has accepted relay's probe on each steered
                              TCP listener (relay steers the probe to the new generation's
                              own socket) and has bound and listened on each other listener
                              itself. Once any sd_notify message was heard, every later
                              generation is waited for until READY=1 (a server may accept
                              before it is warm; one that sends STATUS= but never READY=1 is
                              never ready). Use notify to wait for READY=1 from the start,
                              accept never to wait for it.
   accept                     only the accept half of auto
   notify                     the child sends READY=1 to its own NOTIFY_SOCKET (sd_notify)
   http://{health_addr}/path  GET must answer 2xx; {health_addr} is a loopback address relay
                              picks for each child and passes as RELAY_HEALTH_ADDR (and as
                              {health_addr}/{health_port} in COMMAND's arguments). A probe of a
                              steered listener's public address is steered to the new
                              generation's socket, so it is exact; on a shared socket it is not.
   tcp://{health_addr}        a connection must be accepted by the server (not just made)
   exec:CMD ARGS              CMD must exit 0; it gets RELAY_CHILD_PID, RELAY_GENERATION and
                              RELAY_HEALTH_ADDR; {pid} is replaced in ARGS. No shell is used.
   delay:2s                   the weakest form: only waits, proves nothing`

const runExamples = `
Examples:
   relay run --listen :8080 -- ./server --config prod.yaml
   relay run --listen 127.0.0.1:8000 -- python3 -m http.server --bind 127.0.0.1 8000
   relay run --listen 0.0.0.0:8080 --stop-signal QUIT -- nginx -g 'daemon off;'   # "listen 8080;"
   relay run --listen :8080 --takeover off -- ./server-that-reads-LISTEN_FDS
   relay run --listen http=:8080 --listen admin=127.0.0.1:9090 --drain 2s -- ./server
   relay run --listen :8080 --health http://127.0.0.1:8080/healthz -- ./server
   relay run --listen :8080 --health 'http://{health_addr}/healthz' -- ./server --health-addr '{health_addr}'
   relay run --listen unix:/run/app/app.sock --socket-mode 0660 --stop-signal QUIT -- nginx -g 'daemon off;'
   relay restart --name api -- ./server-v2     # restart into a new binary
   kill -HUP $(pidof relay)                    # restart`

func runCommand() *cli.Command {
	return &cli.Command{
		Name:        "run",
		Usage:       "run COMMAND on relay's sockets and restart it without downtime",
		UsageText:   "relay run --listen ADDR [--listen ADDR ...] [options] -- COMMAND [ARG...]",
		Description: runDescription + "\n" + runExamples,
		Flags: []cli.Flag{
			&cli.StringSliceFlag{Name: "listen", Aliases: []string{"l"}, Usage: "`ADDR` to listen on; repeat for more sockets (see the forms above); optional when systemd passes sockets"},
			&cli.StringFlag{Name: "socket-mode", Value: "0660", Usage: "permission `MODE` of unix sockets relay creates"},
			&cli.StringFlag{Name: "health", Value: "auto", Usage: "readiness `CHECK` of each new generation: auto, accept, notify, http://…, tcp://…, exec:CMD or delay:DURATION (see above)"},
			&cli.DurationFlag{Name: "health-timeout", Value: supervisor.DefaultHealthTimeout, Usage: "`DURATION` a new generation may take to become ready before it is killed and the restart rolled back"},
			&cli.StringFlag{Name: "takeover", Value: string(supervisor.TakeoverAuto), Usage: "`MODE` of the bind takeover: auto makes a bind of a --listen address by the child (or anything it starts) land on relay's socket, where the kernel allows (else logged once, and children take the inherited fds only); on makes its absence an error; off passes the sockets as inherited fds only"},
			&cli.StringFlag{Name: "steer", Value: string(sockets.SteerAuto), Usage: "`MODE` of the drain on TCP listeners: auto gives each generation a socket of its own and new connections to the serving one only, where the kernel allows (else one shared socket, logged); on refuses to start without it; off shares one socket"},
			&cli.DurationFlag{Name: "drain", DefaultText: "1s if any listener is steered, else 0", Usage: "`DURATION` from the switch to the new generation until the old one is told to stop; when steered the old one gets no new connection meanwhile, on shared sockets both accept"},
			&cli.StringFlag{Name: "stop-signal", Value: "TERM", Usage: "`SIGNAL` that asks a generation to stop (nginx and unicorn want QUIT, haproxy USR1, lighttpd INT)"},
			&cli.DurationFlag{Name: "stop-timeout", Value: supervisor.DefaultStopTimeout, Usage: "`DURATION` a generation may take to stop before its process group gets SIGKILL"},
			&cli.IntFlag{Name: "max-draining", Value: supervisor.DefaultMaxDraining, Usage: "`N` old generations may still be running; a restart past it waits for the oldest to exit"},
			&cli.StringFlag{Name: "name", Value: control.DefaultName, Usage: "`NAME` of this relay, for relay restart/status/stop; sets the default --control path"},
			&cli.StringFlag{Name: "control", Usage: "`PATH` of the control socket, in a directory only you can enter (created 0700 if missing; default: NAME.sock in $XDG_RUNTIME_DIR/relay, /run/relay for root, else $TMPDIR/relay-UID)"},
			&cli.StringFlag{Name: "check", Usage: "pre-flight `CMD` run before every requested restart, e.g. \"nginx -t\"; if it fails, the restart is refused and nothing changes (split on spaces, no shell)"},
			&cli.StringFlag{Name: "log-format", Value: "text", Usage: "log `FORMAT`: text or json"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "log `LEVEL`: debug, info, warn or error"},
		},
		Action:       runAction,
		OnUsageError: onUsageError,
	}
}

func runAction(c *cli.Context) error {
	opts, err := parseRunFlags(c)
	if err != nil {
		return err
	}
	// Take over the signals first, so that none sent while relay starts
	// kills it with the default action; they wait in the buffer.
	sigC := make(chan os.Signal, 8)
	signal.Notify(sigC, signals.Handled()...)
	defer signal.Stop(sigC)
	// relay's log lines and the children's stderr share one stream: one
	// Write at a time, and the children's in whole lines, keeps every
	// line whole.
	stderr := &lineWriter{w: c.App.ErrWriter}
	log := newLogger(stderr, opts.logFormat, opts.logLevel)
	// Nothing relay inherited may reach a child by accident.
	if err := socketpass.CloseOnExecFrom(3); err != nil {
		return err
	}

	if pid, foreign := socketpass.ForeignListenPID(); foreign {
		log.Warn("ignoring LISTEN_FDS: LISTEN_PID is not relay's pid", "listen_pid", pid, "pid", os.Getpid())
	}
	passed, err := socketpass.TakeActivated()
	if err != nil {
		return err
	}
	if len(opts.listens) == 0 && len(passed) == 0 {
		socketpass.CloseAll(passed)
		return usagef("no --listen address and no sockets from systemd; give at least one, e.g. --listen :8080")
	}
	notifier := sdnotify.New(log)
	defer notifier.Close(notifyFlushTimeout)
	set, err := sockets.Open(sockets.Options{Specs: opts.listens, Passed: passed, UnixMode: opts.socketMode,
		Steer: opts.steer, Notifier: notifier, Log: log})
	if err != nil {
		return err
	}
	defer set.Close()
	var addrs []string
	for _, in := range set.Info() {
		log.Info("listening", "fd", in.FD, "name", in.Name, "network", in.Network, "addr", in.Addr,
			"origin", in.Origin, "drain", in.Drain, "takeover", string(opts.takeover))
		addrs = append(addrs, in.Addr)
	}
	if !c.IsSet("drain") && set.Steered() {
		opts.drain = defaultSteeredDrain
	}
	if err := warnAboutHealth(log, opts, addrs, set); err != nil {
		return err
	}

	runtimeDir, err := makeRuntimeDir()
	if err != nil {
		return err
	}
	defer os.RemoveAll(runtimeDir)

	rp, err := reaper.New(log)
	if err != nil {
		return err
	}
	defer rp.Close()

	sup, err := supervisor.New(supervisor.Config{
		Command:       opts.command,
		Check:         opts.check,
		Env:           os.Environ(),
		Sockets:       set,
		Takeover:      opts.takeover,
		Health:        opts.health,
		HealthTimeout: opts.healthTimeout,
		Drain:         opts.drain,
		StopSignal:    opts.stopSignal,
		StopTimeout:   opts.stopTimeout,
		MaxDraining:   opts.maxDraining,
		RuntimeDir:    runtimeDir,
		Reaper:        rp,
		Log:           log,
		Stderr:        stderr,
		Observer:      notifier,
	})
	if err != nil {
		return err
	}

	info := control.Info{Name: opts.name, Started: time.Now()}
	for _, in := range set.Info() {
		info.Listeners = append(info.Listeners, control.ListenerInfo{
			FD: in.FD, Name: in.Name, Network: in.Network, Address: in.Addr, Origin: in.Origin, Drain: in.Drain,
		})
	}
	ctl, err := control.Listen(opts.controlPath, sup, info, log)
	if err != nil {
		return err
	}
	log.Info("control socket", "path", ctl.Path(), "name", opts.name)

	var outcome supervisor.Outcome
	var g run.Group
	g.Add(ctl.Serve, func(error) { ctl.Close() })
	g.Add(func() error {
		var err error
		outcome, err = sup.Run()
		return err
	}, func(error) { sup.Stop(false) })
	ctx, cancel := context.WithCancel(context.Background())
	g.Add(func() error {
		return signalLoop(ctx, sigC, sup)
	}, func(error) { cancel() })
	if interval, err := sdnotify.WatchdogInterval(); err != nil {
		log.Warn("ignoring the watchdog settings", "err", err)
	} else if interval > 0 && notifier.Enabled() {
		every := sdnotify.PingInterval(interval)
		log.Info("watchdog: pinging while the supervisor answers", "watchdog_usec", interval.Microseconds(), "ping_every", every)
		wctx, wcancel := context.WithCancel(context.Background())
		ticker := time.NewTicker(every)
		defer ticker.Stop()
		g.Add(func() error {
			notifier.RunWatchdog(wctx, ticker.C, func() bool {
				_, err := sup.Status()
				return err == nil
			})
			return nil
		}, func(error) { wcancel() })
	}
	if err := g.Run(); err != nil {
		return err
	}
	if outcome.Child != nil {
		log.Info("relay exiting", "child_status", outcome.Child.String(), "exit_code", outcome.Child.ExitCode())
		return childExit{code: outcome.Child.ExitCode()}
	}
	return nil
}

// signalLoop turns signals sent to relay into supervisor requests until ctx
// ends, which happens when the supervisor is done. It must not end on its
// own before that: the run group returns the first actor's result, and
// only the supervisor's says how relay ends.
func signalLoop(ctx context.Context, sigC <-chan os.Signal, sup *supervisor.Supervisor) error {
	stopping := false
	for {
		select {
		case <-ctx.Done():
			// The supervisor actor returning ends this one: it
			// alone carries Run's outcome and error out of g.Run.
			return nil
		case sig := <-sigC:
			switch signals.Decide(sig, stopping) {
			case signals.Restart:
				sup.RequestRestart("signal " + signals.Name(sig.(syscall.Signal)))
			case signals.Stop:
				stopping = true
				sup.Stop(false)
			case signals.StopNow:
				sup.Stop(true)
			case signals.Forward:
				sup.Forward(sig.(syscall.Signal))
			}
		}
	}
}

type runOptions struct {
	listens                           []socketpass.Spec
	socketMode                        os.FileMode
	health                            health.Spec
	steer                             sockets.SteerMode
	takeover                          supervisor.TakeoverMode
	healthTimeout, drain, stopTimeout time.Duration
	stopSignal                        syscall.Signal
	maxDraining                       int
	name, controlPath                 string
	check                             []string
	logFormat                         string
	logLevel                          slog.Level
	command                           supervisor.Command
}

func parseRunFlags(c *cli.Context) (runOptions, error) {
	var o runOptions
	var err error
	if c.Args().Len() == 0 {
		return o, usagef("no command to run; put it after the flags: relay run --listen :8080 -- ./server")
	}
	for _, v := range c.StringSlice("listen") {
		s, err := socketpass.ParseListen(v)
		if err != nil {
			return o, usageError{err}
		}
		o.listens = append(o.listens, s)
	}
	if o.socketMode, err = socketpass.FileMode(c.String("socket-mode")); err != nil {
		return o, usageError{err}
	}
	if o.health, err = health.Parse(c.String("health")); err != nil {
		return o, usageError{err}
	}
	if o.stopSignal, err = signals.Parse(c.String("stop-signal")); err != nil {
		return o, usageError{fmt.Errorf("--stop-signal: %w", err)}
	}
	if o.steer, err = sockets.ParseSteerMode(c.String("steer")); err != nil {
		return o, usageError{err}
	}
	switch o.takeover = supervisor.TakeoverMode(c.String("takeover")); o.takeover {
	case supervisor.TakeoverAuto, supervisor.TakeoverOn, supervisor.TakeoverOff:
	default:
		return o, usagef("--takeover %q: use auto, on or off", o.takeover)
	}
	o.healthTimeout, o.drain, o.stopTimeout = c.Duration("health-timeout"), c.Duration("drain"), c.Duration("stop-timeout")
	if o.healthTimeout <= 0 || o.stopTimeout <= 0 || o.drain < 0 {
		return o, usagef("--health-timeout and --stop-timeout must be positive and --drain not negative")
	}
	if o.maxDraining = c.Int("max-draining"); o.maxDraining < 1 {
		return o, usagef("--max-draining %d: must be at least 1", o.maxDraining)
	}
	o.name = c.String("name")
	if err := control.ValidateName(o.name); err != nil {
		return o, usageError{err}
	}
	if o.controlPath, err = control.Path(o.name, c.String("control")); err != nil {
		return o, usageError{err}
	}
	if o.check, err = parseCheck(c.String("check")); err != nil {
		return o, err
	}
	o.logFormat = c.String("log-format")
	if o.logFormat != "text" && o.logFormat != "json" {
		return o, usagef("--log-format %q: use text or json", o.logFormat)
	}
	if err := o.logLevel.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return o, usagef("--log-level %q: use debug, info, warn or error", c.String("log-level"))
	}
	args := c.Args().Slice()
	path, err := exec.LookPath(args[0])
	if err != nil {
		return o, usageError{commandError(args[0], err)}
	}
	o.command = supervisor.Command{Path: path, Args: args}
	return o, nil
}

func commandError(name string, err error) error {
	switch {
	case errors.Is(err, exec.ErrNotFound):
		return fmt.Errorf("command %q not found in PATH; give a path such as ./%s: %w", name, name, err)
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("command %q does not exist; check the path: %w", name, err)
	case errors.Is(err, os.ErrPermission):
		return fmt.Errorf("command %q is not executable; chmod +x it: %w", name, err)
	}
	return fmt.Errorf("command %q cannot be run: %w", name, err)
}

// lineWriter serializes the Writes of relay's logger and of the copies of
// the children's stderr to one writer.
type lineWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lineWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

func newLogger(w io.Writer, format string, level slog.Level) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// warnAboutHealth says at start what the readiness check can and cannot
// tell apart, and refuses --health accept where it could prove nothing.
func warnAboutHealth(log *slog.Logger, opts runOptions, addrs []string, set *sockets.Set) error {
	spec := opts.health
	host, port, ok := spec.HostPort()
	steered := ok && set.ProbesSteered(host, port)
	if shared := spec.SharedTarget(addrs); shared != "" && steered {
		log.Info("the readiness check probes a public address; relay steers each probe to the new generation's own socket, so only the new generation answers it",
			"check", spec.String(), "addr", shared)
	} else if shared != "" {
		log.Warn("the readiness check probes a shared listener, so it cannot tell generations apart: the old generation may answer for the new one; probe {health_addr} instead",
			"check", spec.String(), "shared_addr", shared)
	}
	if spec.Weak() {
		log.Warn("--health delay only waits and proves nothing about the new child; prefer notify, or http/tcp on {health_addr}", "check", spec.String())
	}
	if spec.Kind == health.Notify {
		log.Info("readiness: waiting for READY=1 on each child's own NOTIFY_SOCKET; a server that does not speak sd_notify needs another --health")
	}
	if !spec.NeedsListeners() {
		return nil
	}
	// Which listeners can show that the new generation, and no other,
	// serves them: a steered one by a probe to its own socket, another
	// by the generation's own bind of it, taken over.
	var unproven, byBind []string
	for i, in := range set.Info() {
		switch {
		case set.Probe(i) != "":
		case opts.takeover == supervisor.TakeoverOff:
			unproven = append(unproven, in.Name)
		default:
			byBind = append(byBind, in.Name)
		}
	}
	if len(byBind) > 0 {
		log.Info("readiness: no probe can reach one generation alone on these listeners (shared sockets); a child that never speaks sd_notify proves it serves them by binding them itself, and one that uses the inherited fd must send READY=1",
			"check", spec.String(), "listeners", byBind)
	}
	switch {
	case set.Len() == 0 && spec.Kind == health.Accept:
		return usagef("--health accept needs a listener to check; give --listen, or use --health notify")
	case len(unproven) > 0 && spec.Kind == health.Accept:
		return usagef("--health accept cannot check %s: its socket is shared by every generation and --takeover is off; use --health notify, http://{health_addr}/..., or exec:CMD", strings.Join(unproven, ", "))
	case len(unproven) > 0:
		log.Info("readiness: a child is ready at READY=1 only, since nothing else can show that the new generation serves these listeners (shared sockets, --takeover off)",
			"check", spec.String(), "listeners", unproven)
	default:
		log.Debug("readiness: READY=1, or for a child that never speaks sd_notify, its accept on each steered listener and its own bind of the others", "check", spec.String())
	}
	return nil
}

// makeRuntimeDir creates the private (0700) directory for the children's
// notify sockets: under $XDG_RUNTIME_DIR when set, else $TMPDIR or /tmp,
// whichever first leaves room for a socket path (108 bytes on Linux).
func makeRuntimeDir() (string, error) {
	const room = len("/relay-0123456789/gen-0123456789.notify")
	var tried []string
	for _, base := range []string{os.Getenv("XDG_RUNTIME_DIR"), os.TempDir(), "/tmp"} {
		if st, err := os.Stat(base); base == "" || err != nil || !st.IsDir() {
			continue
		}
		if len(base)+room >= len(unix.RawSockaddrUnix{}.Path) {
			tried = append(tried, base+" (path too long for a unix socket)")
			continue
		}
		dir, err := os.MkdirTemp(base, "relay-")
		if err != nil {
			tried = append(tried, fmt.Sprintf("%s (%v)", base, err))
			continue
		}
		return dir, nil
	}
	return "", fmt.Errorf("creating relay's runtime directory: no usable base among %s; set XDG_RUNTIME_DIR or TMPDIR to a short writable directory", strings.Join(tried, ", "))
}

// notifyFlushTimeout bounds how long relay waits, at exit, for the service
// manager to take its last messages (STOPPING=1, the final STATUS=).
const notifyFlushTimeout = 2 * time.Second

// defaultSteeredDrain is --drain when a listener is steered and the flag is
// not given. From the switch on, the old generation gets no new
// connection; the drain only has to let it accept what was already queued
// on its socket, and let handshakes begun before the switch complete. Both
// take well under a millisecond on loopback and about one round trip on a
// network. One second covers slow clients' round trips, and a busy old
// generation's accept loop, with room to spare; the cost is one second
// more of two generations alive per restart.
const defaultSteeredDrain = time.Second
