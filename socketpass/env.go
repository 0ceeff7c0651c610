package socketpass

import (
	"strconv"
	"strings"
)

// Environment variables of the socket-activation and notify protocols.
const (
	EnvListenPID     = "LISTEN_PID"
	EnvListenFDs     = "LISTEN_FDS"
	EnvListenFDNames = "LISTEN_FDNAMES"
	EnvNotifySocket  = "NOTIFY_SOCKET"
)

// FirstFD is the fd number of the first passed socket (SD_LISTEN_FDS_START).
const FirstFD = 3

// ChildEnv returns base without any variable relay owns or sets in extra,
// followed by the socket-activation variables for listeners and by extra
// ("KEY=value" entries). LISTEN_PID is left to the exec shim, which alone
// knows the child's pid.
func ChildEnv(base []string, listeners []*Listener, extra ...string) []string {
	// Variables relay sets for each child: an inherited value is dropped,
	// since a stale LISTEN_PID or NOTIFY_SOCKET would point the child at
	// relay's own sockets or at systemd.
	drop := map[string]bool{
		EnvListenPID: true, EnvListenFDs: true, EnvListenFDNames: true, EnvNotifySocket: true,
		"WATCHDOG_USEC": true, "WATCHDOG_PID": true, "FDSTORE": true,
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
	if len(listeners) > 0 {
		names := make([]string, len(listeners))
		for i, l := range listeners {
			names[i] = l.Spec.Name
		}
		env = append(env,
			EnvListenFDs+"="+strconv.Itoa(len(listeners)),
			EnvListenFDNames+"="+strings.Join(names, ":"))
	}
	return append(env, extra...)
}
