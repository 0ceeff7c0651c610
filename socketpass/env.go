// Package socketpass is what crosses from relay to each child: the
// environment of the systemd socket-activation protocol (LISTEN_FDS,
// LISTEN_FDNAMES, and the LISTEN_PID that the exec shim sets to the
// child's own pid), and the exec shim itself, which also installs the bind
// takeover filter and lets no fd but the passed sockets cross the exec.
package socketpass

import (
	"strconv"
	"strings"

	"github.com/relaysh/relay/internal/sdnotify"
)

// Environment variables of the socket-activation protocol.
const (
	EnvListenPID     = "LISTEN_PID"
	EnvListenFDs     = "LISTEN_FDS"
	EnvListenFDNames = "LISTEN_FDNAMES"
	// EnvWatchdogUsec and EnvWatchdogPID are systemd's watchdog
	// variables: relay sets the first for a child with
	// --child-watchdog, and the exec shim the second, to the child's
	// own pid.
	EnvWatchdogUsec = "WATCHDOG_USEC"
	EnvWatchdogPID  = "WATCHDOG_PID"
)

// FirstFD is the fd number of the first passed socket (SD_LISTEN_FDS_START).
const FirstFD = 3

// ChildEnv returns base without any variable relay owns or sets in extra,
// followed by the socket-activation variables for the sockets passed under
// names (in fd order, from FirstFD) and by extra ("KEY=value" entries).
// LISTEN_PID is left to the exec shim, which alone knows the child's pid.
func ChildEnv(base []string, names []string, extra ...string) []string {
	// Variables relay sets for each child: an inherited value is dropped,
	// since a stale LISTEN_PID or NOTIFY_SOCKET would point the child at
	// relay's own sockets or at systemd.
	drop := map[string]bool{
		EnvListenPID: true, EnvListenFDs: true, EnvListenFDNames: true, sdnotify.EnvNotifySocket: true,
		EnvWatchdogUsec: true, EnvWatchdogPID: true, sdnotify.EnvFDStore: true,
	}
	for _, kv := range extra {
		k, _, _ := strings.Cut(kv, "=")
		drop[k] = true
	}
	env := make([]string, 0, len(base)+len(extra)+2)
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if !drop[k] {
			env = append(env, kv)
		}
	}
	if len(names) > 0 {
		env = append(env,
			EnvListenFDs+"="+strconv.Itoa(len(names)),
			EnvListenFDNames+"="+strings.Join(names, ":"))
	}
	return append(env, extra...)
}
