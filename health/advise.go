package health

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"

	"github.com/relaysh/relay/internal/sockaddr"
)

// ListenerFact is what relay knows at start of one of its listeners.
type ListenerFact struct {
	Name string
	// IP is where a TCP or UDP listener is bound, and its family; zero for
	// a unix listener.
	IP sockaddr.Socket
	// Probed: a probe can reach one generation's own socket on this
	// listener (it is steered: Listener.Probe is set).
	Probed bool
	// QUIC: a QUIC probe can reach one generation's own socket on this
	// UDP listener, steered by flow (Listener.QUIC is set).
	QUIC bool
}

// Facts are what Advise weighs a check against.
type Facts struct {
	Listeners []ListenerFact
	// Binds: relay sees the child's own binds of its listeners (the bind
	// takeover is not off).
	Binds bool
	// Steered reports whether a probe dialled to host:port is steered to
	// the new generation's own socket; nil means never.
	Steered func(host, port string) bool
}

// Advice is one line to log at start.
type Advice struct {
	Level slog.Level
	Msg   string
	Args  []any
}

// Advise says, before the first generation starts, what spec can and
// cannot tell apart with these listeners, in the order to log it. A
// non-nil error means that spec could prove nothing here: a usage error,
// to report after the advice.
func Advise(spec Spec, f Facts) ([]Advice, error) {
	var out []Advice
	say := func(level slog.Level, msg string, args ...any) {
		out = append(out, Advice{Level: level, Msg: msg, Args: args})
	}
	host, port, ok := spec.hostPort()
	steered := ok && f.Steered != nil && f.Steered(host, port)
	if shared := spec.sharedTarget(f.Listeners); shared != "" && steered {
		say(slog.LevelInfo, "the readiness check probes a public address; relay steers each probe to the new generation's own socket, so only the new generation answers it",
			"check", spec.String(), "addr", shared)
	} else if shared != "" {
		say(slog.LevelWarn, "the readiness check probes a shared listener, so it cannot tell generations apart: the old generation may answer for the new one; probe {health_addr} instead",
			"check", spec.String(), "shared_addr", shared)
	}
	if spec.weak() {
		say(slog.LevelWarn, "--health delay only waits and proves nothing about the new child; prefer notify, or http/tcp on {health_addr}", "check", spec.String())
	}
	if spec.Kind == Notify {
		say(slog.LevelInfo, "readiness: waiting for READY=1 on each child's own NOTIFY_SOCKET; a server that does not speak sd_notify needs another --health")
	}
	if !spec.needsListeners() {
		return out, nil
	}
	// Which listeners can show that the new generation, and no other,
	// serves them: a steered one by a probe to its own socket, another
	// by the generation's own bind of it, taken over.
	var unproven, byBind, byQUIC []string
	for _, l := range f.Listeners {
		switch {
		case l.Probed:
		case l.QUIC:
			byQUIC = append(byQUIC, l.Name)
		case !f.Binds:
			unproven = append(unproven, l.Name)
		default:
			byBind = append(byBind, l.Name)
		}
	}
	if len(byBind) > 0 {
		say(slog.LevelInfo, "readiness: no probe can reach one generation alone on these listeners (shared sockets, or UDP); a child that never speaks sd_notify proves it serves them by binding them itself, and one that uses the inherited fd must send READY=1",
			"check", spec.String(), "listeners", byBind)
	}
	if len(byQUIC) > 0 {
		say(slog.LevelInfo, "readiness: on these UDP listeners relay sends a QUIC probe to the new generation's own socket, which a QUIC server answers with Version Negotiation; a child that never speaks sd_notify proves it serves them by answering it or by binding them itself, and another UDP server that uses the inherited fd must send READY=1",
			"check", spec.String(), "listeners", byQUIC)
	}
	switch {
	case len(f.Listeners) == 0 && spec.Kind == Accept:
		return out, errors.New("--health accept needs a listener to check; give --listen, or use --health notify")
	case len(unproven) > 0 && spec.Kind == Accept:
		return out, fmt.Errorf("--health accept cannot check %s: its socket is shared by every generation and --takeover is off; use --health notify, http://{health_addr}/..., or exec:CMD", strings.Join(unproven, ", "))
	case len(unproven) > 0:
		say(slog.LevelInfo, "readiness: a child is ready at READY=1 only, since nothing else can show that the new generation serves these listeners (shared sockets, --takeover off)",
			"check", spec.String(), "listeners", unproven)
	default:
		say(slog.LevelDebug, "readiness: READY=1, or for a child that never speaks sd_notify, its accept on each steered listener and its own bind of the others", "check", spec.String())
	}
	return out, nil
}

// sharedTarget returns the address of the listener the check probes, or
// "" if none: a probe of the public address, which an old generation
// accepting on the same socket may answer unless relay steers it. A host
// name may resolve to any address, so it hits every listener on its port.
func (s Spec) sharedTarget(listeners []ListenerFact) string {
	if s.usesPrivateAddr() {
		return ""
	}
	host, port, ok := s.hostPort()
	if !ok {
		return ""
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return ""
	}
	ip, err := netip.ParseAddr(host)
	for _, l := range listeners {
		if !l.IP.Addr.IsValid() {
			continue // a unix listener: no probe dials it
		}
		if err != nil && l.IP.Addr.Port() == uint16(p) || err == nil && l.IP.Covers(netip.AddrPortFrom(ip, uint16(p))) {
			return l.IP.Addr.String()
		}
	}
	return ""
}
