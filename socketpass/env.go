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

// ownedVars are set by relay for each child, so any inherited value is
// dropped: a stale LISTEN_PID or NOTIFY_SOCKET would point the child at
// relay's own sockets or at systemd.
var ownedVars = []string{
	EnvListenPID, EnvListenFDs, EnvListenFDNames, EnvNotifySocket,
	"WATCHDOG_USEC", "WATCHDOG_PID",
}

// ChildEnv returns base without any variable relay owns or sets in extra,
// followed by the socket-activation variables for listeners and by extra
// ("KEY=value" entries). LISTEN_PID is left to the exec shim, which alone
// knows the child's pid.
func ChildEnv(base []string, listeners []*Listener, extra ...string) []string {
	drop := make(map[string]bool, len(ownedVars)+len(extra))
	for _, k := range ownedVars {
		drop[k] = true
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
