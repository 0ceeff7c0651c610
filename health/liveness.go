package health

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
)

// ParseLiveness parses a --liveness value: the forms of --health that can
// be asked of a serving child again and again, accept, http://…, tcp://…
// and exec:CMD. auto and notify wait for a READY=1 that a child sends once,
// and delay proves nothing, so they are refused with the fix.
func ParseLiveness(value string) (Spec, error) {
	switch {
	case value == "accept", strings.HasPrefix(value, "http://"), strings.HasPrefix(value, "https://"),
		strings.HasPrefix(value, "tcp://"), strings.HasPrefix(value, "exec:"):
		return parse("--liveness", value)
	case value == "auto", value == "notify":
		return Spec{}, fmt.Errorf("--liveness %q: READY=1 comes once and says nothing later; use accept, http://…, tcp://… or exec:CMD, and --child-watchdog DURATION for a child that pings WATCHDOG=1", value)
	case strings.HasPrefix(value, "delay:"):
		return Spec{}, fmt.Errorf("--liveness %q: a delay proves nothing about a serving child; use accept, http://…, tcp://… or exec:CMD", value)
	}
	return Spec{}, fmt.Errorf("--liveness %q: unknown check; use accept, http://…, tcp://… or exec:CMD", value)
}

// Probe makes one attempt of the check against a serving child and
// returns nil if it passed, or what it saw; ctx bounds it. An http or tcp
// probe of a steered listener's public address goes to the child's own
// socket (Child.Control), as during readiness. accept probes each steered
// listener (Listener.Probe) once and passes when the child accepted every
// probe: a connection left in its accept queue until ctx ends is a
// failure. A listener with no probe is not checked; AdviseLiveness refuses
// an accept check with none.
func (c *Checker) Probe(ctx context.Context, ch Child) error {
	switch c.spec.Kind {
	case HTTP, TCP, Exec:
		if err := c.attempt(ctx, ch); err != nil {
			return withCtxErr(ctx, err)
		}
		return nil
	case Accept:
		ctx = withControl(ctx, ch)
		probed := 0
		for _, l := range ch.Listeners {
			if l.Probe == "" {
				continue
			}
			probed++
			if err := probeAccepted(ctx, l.Probe); err != nil {
				return fmt.Errorf("the child did not accept on %s: %w", l.Name, err)
			}
		}
		if probed == 0 {
			return errors.New("--liveness accept: no listener can be probed alone (none is steered)")
		}
		return nil
	}
	return fmt.Errorf("--liveness %s: not a check relay can repeat", c.spec)
}

// AdviseLiveness says, before the first generation starts, what the
// liveness check spec can tell on these listeners. A non-nil error means
// that it could tell nothing: a usage error.
func AdviseLiveness(spec Spec, f Facts) ([]Advice, error) {
	var out []Advice
	if spec.Kind == Accept {
		var unprobed []string
		probed := 0
		for _, l := range f.Listeners {
			if l.Probed {
				probed++
			} else {
				unprobed = append(unprobed, l.Name)
			}
		}
		if probed == 0 {
			return nil, errors.New("--liveness accept needs a steered TCP listener to probe (UDP, unix and shared sockets cannot be probed alone); use --liveness http://{health_addr}/..., tcp://{health_addr} or exec:CMD")
		}
		if len(unprobed) > 0 {
			out = append(out, Advice{Level: slog.LevelInfo, Msg: "liveness: these listeners cannot be probed alone and are not checked",
				Args: []any{"check", spec.String(), "listeners", unprobed}})
		}
		return out, nil
	}
	host, port, ok := spec.hostPort()
	steered := ok && f.Steered != nil && f.Steered(host, port)
	if shared := spec.sharedTarget(f.Listeners); shared != "" && !steered {
		out = append(out, Advice{Level: slog.LevelWarn,
			Msg:  "the liveness check probes a shared listener, so an old generation still stopping may answer for the serving one; probe {health_addr} instead",
			Args: []any{"check", spec.String(), "shared_addr", shared}})
	}
	return out, nil
}
