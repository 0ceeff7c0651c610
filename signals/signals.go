// Package signals holds relay's signal policy: what each signal sent to
// relay means, and how signal names on the command line are read.
package signals

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Action is what relay does on a signal.
type Action int

// The actions.
const (
	// Ignore: nothing (SIGPIPE, so a closed log reader never kills relay).
	Ignore Action = iota
	// Restart: start a new generation (SIGHUP).
	Restart
	// Stop: stop every generation gracefully, then exit (SIGTERM, SIGINT).
	Stop
	// StopNow: kill every generation at once, then exit (a second
	// SIGINT or SIGTERM while stopping).
	StopNow
	// Forward: pass the signal on to the serving child (SIGUSR1,
	// SIGWINCH).
	Forward
	// StopDelayed: keep serving for the shutdown delay, then stop as
	// Stop (the first stop signal, with --shutdown-delay).
	StopDelayed
	// Upgrade: replace relay's own binary in place, the server untouched
	// (SIGUSR2, as nginx and unicorn upgrade their masters).
	Upgrade
)

func (a Action) String() string {
	return [...]string{"ignore", "restart", "stop", "stop-now", "forward", "stop-delayed", "upgrade"}[a]
}

// Handled lists the signals relay takes over; pass them to signal.Notify.
func Handled() []os.Signal {
	return []os.Signal{
		syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT,
		syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH, syscall.SIGPIPE,
	}
}

// Decide returns the action for sig. stopping says whether a graceful stop
// is already under way: a second stop request then means stop now.
func Decide(sig os.Signal, stopping bool) Action {
	switch sig {
	case syscall.SIGHUP:
		return Restart
	case syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT:
		if stopping {
			return StopNow
		}
		return Stop
	case syscall.SIGUSR2:
		return Upgrade
	case syscall.SIGUSR1, syscall.SIGWINCH:
		return Forward
	}
	return Ignore
}

// StopStep returns what the n-th stop signal (TERM, INT or QUIT; n from
// 1) asks for. Without a shutdown delay, the first stops gracefully and
// any later one kills at once. With one, the first begins the delay, the
// second ends it and begins the graceful stop (nothing more if the delay
// is over), and any later one kills at once.
func StopStep(n int, delayed bool) Action {
	switch {
	case n <= 1 && delayed:
		return StopDelayed
	case n <= 1, n == 2 && delayed:
		return Stop
	}
	return StopNow
}

// Parse reads a signal given as a name ("TERM", "SIGTERM", "term") or a
// number ("15").
func Parse(s string) (syscall.Signal, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n > 64 {
			return 0, fmt.Errorf("signal %q: number out of range 1-64", s)
		}
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("unknown signal %q; use a name such as TERM, QUIT, INT or USR1", s)
}

// ParseStop reads a --stop-signal: a signal as Parse reads it, which must
// be one a server can take as "stop gracefully". Refused are the signals
// whose meaning the kernel fixes or that it sends on its own:
//
//   - KILL cannot be caught, so it can never mean "finish what you are
//     doing"; relay sends it itself after --stop-timeout.
//   - STOP cannot be caught either, and TSTP, TTIN and TTOU suspend a
//     process by default: the server would hang, not stop.
//   - CONT resumes a process and is ignored by default; CHLD and URG are
//     sent by the kernel (a child of the server changed state, out-of-band
//     data arrived) and ignored by default, so a server that took one of
//     them as "stop" would stop by accident, and one that does not would
//     never stop.
//
// WINCH stays allowed: it too is ignored by default, but Apache httpd's
// graceful-stop is SIGWINCH.
func ParseStop(s string) (syscall.Signal, error) {
	sig, err := Parse(s)
	if err != nil {
		return 0, err
	}
	switch sig {
	case syscall.SIGKILL:
		return 0, fmt.Errorf("signal %q cannot be caught, so it cannot ask for a graceful stop; give the signal the server stops on (TERM, QUIT, INT...) and bound the stop with --stop-timeout, after which relay sends KILL", s)
	case syscall.SIGSTOP, syscall.SIGTSTP, syscall.SIGTTIN, syscall.SIGTTOU:
		return 0, fmt.Errorf("signal %q suspends a process instead of stopping it; give the signal the server stops on, such as TERM, QUIT or INT", s)
	case syscall.SIGCONT, syscall.SIGCHLD, syscall.SIGURG:
		return 0, fmt.Errorf("signal %q is ignored by default and sent by the kernel on its own, so it cannot ask for a stop; give the signal the server stops on, such as TERM, QUIT or INT", s)
	}
	return sig, nil
}

// Name returns the short name of sig, such as "TERM".
func Name(sig syscall.Signal) string {
	if n := unix.SignalName(sig); n != "" {
		return strings.TrimPrefix(n, "SIG")
	}
	return strconv.Itoa(int(sig))
}
