package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/control"
	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/internal/sockets"
	"github.com/relaysh/relay/signals"
	"github.com/relaysh/relay/socketpass"
	"github.com/relaysh/relay/supervisor"
)

// runOptions are relay run's flags, checked.
type runOptions struct {
	listens                           []sockets.Spec
	socketMode                        os.FileMode
	health                            health.Spec
	steer                             sockets.SteerMode
	takeover                          supervisor.TakeoverMode
	healthTimeout, drain, stopTimeout time.Duration
	shutdownDelay                     time.Duration
	drainSet                          bool // --drain was given
	confirm                           time.Duration
	stopSignal                        syscall.Signal
	killMode                          supervisor.KillMode
	maxDraining                       int
	workers                           int // --workers: copies per generation
	rolling                           int // --rolling: copies restarted at a time; 0 for all
	name, controlPath                 string
	check                             []string
	logFormat                         string
	logLevel                          slog.Level
	command                           supervisor.Command
	liveness                          livenessOptions
	metrics                           string           // --metrics: the admin listener's address; "" for none
	user                              *socketpass.User // --user; nil for relay's own
	ioURing                           bool             // --allow-io-uring
}

// livenessOptions are the flags of the serving generation's liveness.
type livenessOptions struct {
	check         health.Spec // Kind "" for none
	interval      time.Duration
	failures      int
	childWatchdog time.Duration
}

// parseRunFlags checks relay run's flags and arguments. Every error it
// returns is a usage error.
func parseRunFlags(c *cli.Context) (runOptions, error) {
	var o runOptions
	if c.Args().Len() == 0 {
		return o, usagef("no command to run; put it after the flags: relay run --listen :8080 -- ./server")
	}
	if err := o.parseListeners(c); err != nil {
		return o, err
	}
	if err := o.parseRestarts(c); err != nil {
		return o, err
	}
	if err := o.liveness.parse(c); err != nil {
		return o, err
	}
	if o.workers > 1 && o.confirm > 0 {
		return o, usagef("--confirm does not work with --workers above 1 yet; drop one of them")
	}
	var err error
	o.name = c.String("name")
	if err := control.ValidateName(o.name); err != nil {
		return o, usageError{err}
	}
	if o.controlPath, err = control.Path(o.name, c.String("control")); err != nil {
		return o, usageError{err}
	}
	if o.check, err = checkFlag(c); err != nil {
		return o, err
	}
	if o.metrics, err = parseMetricsAddr(c.String("metrics")); err != nil {
		return o, err
	}
	if c.IsSet("user") {
		if o.user, err = socketpass.LookupUser(c.String("user"), os.Geteuid()); err != nil {
			return o, usageError{err}
		}
	}
	o.ioURing = c.Bool("allow-io-uring")
	if o.logFormat = c.String("log-format"); o.logFormat != "text" && o.logFormat != "json" {
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

// parseListeners checks the flags about the sockets and the readiness
// check.
func (o *runOptions) parseListeners(c *cli.Context) error {
	for _, v := range c.StringSlice("listen") {
		s, err := sockets.ParseSpec(v)
		if err != nil {
			return usageError{err}
		}
		o.listens = append(o.listens, s)
	}
	if err := sockets.CheckDistinct(o.listens); err != nil {
		return usageError{err}
	}
	var err error
	if o.socketMode, err = sockets.ParseFileMode(c.String("socket-mode")); err != nil {
		return usageError{err}
	}
	if o.health, err = health.Parse(c.String("health")); err != nil {
		return usageError{err}
	}
	return nil
}

// parseRestarts checks the flags about how a restart goes: the stop
// signal, steering, the bind takeover and the timings.
func (o *runOptions) parseRestarts(c *cli.Context) error {
	var err error
	if o.stopSignal, err = signals.ParseStop(c.String("stop-signal")); err != nil {
		return usageError{fmt.Errorf("--stop-signal: %w", err)}
	}
	if o.killMode, err = supervisor.ParseKillMode(c.String("kill-mode")); err != nil {
		return usageError{fmt.Errorf("--kill-mode: %w", err)}
	}
	if o.steer, err = sockets.ParseSteerMode(c.String("steer")); err != nil {
		return usageError{err}
	}
	switch o.takeover = supervisor.TakeoverMode(c.String("takeover")); o.takeover {
	case supervisor.TakeoverAuto, supervisor.TakeoverOn, supervisor.TakeoverOff:
	default:
		return usagef("--takeover %q: use auto, on or off", o.takeover)
	}
	o.healthTimeout, o.drain, o.stopTimeout = c.Duration("health-timeout"), c.Duration("drain"), c.Duration("stop-timeout")
	o.drainSet = c.IsSet("drain")
	if o.healthTimeout <= 0 {
		return usagef("--health-timeout %s: must be positive, e.g. --health-timeout 60s (how long a new generation may take to become ready)", o.healthTimeout)
	}
	if o.stopTimeout <= 0 {
		return usagef("--stop-timeout %s: must be positive, e.g. --stop-timeout 30s (how long a generation may take to stop before SIGKILL)", o.stopTimeout)
	}
	if o.drain < 0 {
		return usagef("--drain %s: must not be negative, e.g. --drain 2s (0 tells the old generation to stop at the switch; without --drain, 5s on steered listeners)", o.drain)
	}
	if o.confirm = c.Duration("confirm"); o.confirm < 0 {
		return usagef("--confirm %s: must not be negative, e.g. --confirm 60s (0, the default, stops the old generation once drained)", o.confirm)
	}
	if o.shutdownDelay = c.Duration("shutdown-delay"); o.shutdownDelay < 0 {
		return usagef("--shutdown-delay %s: must not be negative, e.g. --shutdown-delay 5s (0, the default, stops at once)", o.shutdownDelay)
	}
	if o.maxDraining = c.Int("max-draining"); o.maxDraining < 1 {
		return usagef("--max-draining %d: must be at least 1", o.maxDraining)
	}
	if o.workers, err = parseWorkers(c.String("workers")); err != nil {
		return usageError{err}
	}
	if o.rolling = c.Int("rolling"); o.rolling < 0 || (o.rolling > 0 && o.rolling >= o.workers) {
		return usagef("--rolling %d: restarts K copies at a time, from 1 to --workers less one (--workers is %d); 0, the default, starts every new copy at once", o.rolling, o.workers)
	}
	return nil
}

// parseWorkers reads --workers: a count, or "cpus" for the CPUs relay may
// run on (its affinity mask, as a container's cpuset limits it).
func parseWorkers(v string) (int, error) {
	n := 0
	if v == "cpus" {
		var set unix.CPUSet
		if err := unix.SchedGetaffinity(0, &set); err != nil {
			return 0, fmt.Errorf("--workers cpus: reading the CPUs relay may use: %w", err)
		}
		n = min(set.Count(), supervisor.MaxWorkers)
	} else if _, err := fmt.Sscanf(v, "%d", &n); err != nil || strconv.Itoa(n) != v {
		return 0, fmt.Errorf("--workers %q: want a number of copies, e.g. --workers 4, or cpus for one per CPU", v)
	}
	if n < 1 || n > supervisor.MaxWorkers {
		return 0, fmt.Errorf("--workers %d: want 1 to %d copies", n, supervisor.MaxWorkers)
	}
	return n, nil
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

// Bounds of the liveness timings: shorter ones would make relay, or a
// child pinging its watchdog at half of it, spin.
const (
	minLivenessInterval = 10 * time.Millisecond
	minChildWatchdog    = 100 * time.Millisecond
)

// parse checks the flags of the serving generation's liveness.
func (l *livenessOptions) parse(c *cli.Context) error {
	if v := c.String("liveness"); v != "" {
		var err error
		if l.check, err = health.ParseLiveness(v); err != nil {
			return usageError{err}
		}
	}
	l.interval, l.failures, l.childWatchdog = c.Duration("liveness-interval"), c.Int("liveness-failures"), c.Duration("child-watchdog")
	if l.interval < minLivenessInterval {
		return usagef("--liveness-interval %s: must be at least %s, e.g. --liveness-interval 10s", l.interval, minLivenessInterval)
	}
	if l.failures < 1 {
		return usagef("--liveness-failures %d: must be at least 1, e.g. --liveness-failures 3", l.failures)
	}
	if l.childWatchdog != 0 && l.childWatchdog < minChildWatchdog {
		return usagef("--child-watchdog %s: must be at least %s (the child pings every half of it), e.g. --child-watchdog 30s", l.childWatchdog, minChildWatchdog)
	}
	return nil
}
