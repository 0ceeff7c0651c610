package main

import (
	"strings"
	"testing"
)

// The liveness flags' bad values are usage errors (exit 2) that name the
// fix: the forms that cannot be repeated against a serving child, timings
// that would spin, and an accept check with no listener to probe.
func TestRunLivenessUsageErrors(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", t.TempDir())
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"--liveness notify", []string{"--liveness", "notify"}, "--liveness \"notify\": READY=1 comes once and says nothing later; use accept"},
		{"--liveness auto", []string{"--liveness", "auto"}, "--child-watchdog DURATION for a child that pings WATCHDOG=1"},
		{"--liveness delay", []string{"--liveness", "delay:1s"}, "a delay proves nothing about a serving child"},
		{"unknown --liveness", []string{"--liveness", "ping"}, "--liveness \"ping\": unknown check; use accept, http://…, tcp://… or exec:CMD"},
		{"bad --liveness URL", []string{"--liveness", "http://"}, "--liveness \"http://\": not a valid URL"},
		{"tiny --liveness-interval", []string{"--liveness", "accept", "--liveness-interval", "1ms"}, "--liveness-interval 1ms: must be at least 10ms"},
		{"--liveness-failures 0", []string{"--liveness", "accept", "--liveness-failures", "0"}, "--liveness-failures 0: must be at least 1"},
		{"tiny --child-watchdog", []string{"--child-watchdog", "5us"}, "--child-watchdog 5µs: must be at least 100ms"},
		{"--liveness accept unsteered", []string{"--log-level", "error", "--steer", "off", "--liveness", "accept"}, "--liveness accept needs a steered TCP listener"},
	} {
		args := append(append([]string{"run", "--listen", "127.0.0.1:0"}, c.args...), "--", "true")
		code, line := runRelay(t, args...)
		if code != exitUsage || !strings.Contains(line, c.want) {
			t.Errorf("%s: exit %d, %q; want exit %d and a line with %q", c.name, code, line, exitUsage, c.want)
		}
	}
}
