package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/socketpass"
	"github.com/relaysh/relay/steer"
)

// The --steer modes.
const (
	steerAuto = "auto" // steer where the kernel and the socket allow, else share
	steerOn   = "on"   // steer every TCP listener or refuse to start
	steerOff  = "off"  // one shared socket per listener, as before steering
)

// defaultSteeredDrain is --drain when a listener is steered and the flag is
// not given. From the switch on, the old generation gets no new
// connection; the drain only has to let it accept what was already queued
// on its socket, and let handshakes begun before the switch complete. Both
// take well under a millisecond on loopback and about one round trip on a
// network. One second covers slow clients' round trips, and a busy old
// generation's accept loop, with room to spare; the cost is one second
// more of two generations alive per restart.
const defaultSteeredDrain = time.Second

// Values of the "drain" field of the listening log line and of status.
const (
	drainSteered = "steered"
	drainShared  = "shared"
)

// setupSteering makes a reuseport group of every TCP listener that can
// have one, and says in one log line per listener which it has. pinned
// are the listeners whose socket another process keeps a copy of (systemd's
// socket unit or fd store). With --steer on, a listener that cannot be
// steered is an error.
func setupSteering(log *slog.Logger, mode string, listeners []*socketpass.Listener, pinned map[*socketpass.Listener]bool) ([]*steer.Group, error) {
	groups := make([]*steer.Group, len(listeners))
	if mode == steerOff {
		return groups, nil
	}
	steered := false
	for i, l := range listeners {
		if l.Spec.Network != socketpass.TCP {
			continue // unix and UDP sockets have no connections to steer
		}
		g, err := steer.New(l.File(), steer.Options{Name: l.Spec.Name, Pin: pinned[l] || l.Origin != socketpass.Bound, Log: log})
		if err != nil {
			if mode == steerOn {
				closeGroups(groups)
				return nil, fmt.Errorf("--steer on: listener %s (%s) cannot be steered: %w; use --steer auto to share its socket instead", l.Spec.Name, l.Addr, err)
			}
			if errors.Is(err, steer.ErrNotStream) {
				continue
			}
			log.Warn("steering unavailable; this listener keeps one socket shared by every generation", "listener", l.Spec.Name, "addr", l.Addr, "err", err)
			continue
		}
		groups[i] = g
		steered = true
	}
	if steered {
		switch state, err := steer.EnableMigration(); {
		case err != nil:
			log.Info("net.ipv4.tcp_migrate_req stays off: a connection still queued on a retired socket would be reset rather than moved (relay retires a socket only after its generation has exited)", "err", err)
		case state == steer.MigrationEnabled:
			log.Info("turned on net.ipv4.tcp_migrate_req for this network namespace: connections still queued on a retired socket move to another socket of its group instead of being reset")
		default:
			log.Debug("net.ipv4.tcp_migrate_req is on")
		}
	}
	return groups, nil
}

func closeGroups(groups []*steer.Group) {
	for _, g := range groups {
		if g != nil {
			g.Close()
		}
	}
}

func drainMode(g *steer.Group) string {
	if g != nil {
		return drainSteered
	}
	return drainShared
}

// probeSteered reports whether spec's probes of the public address are
// steered to the new generation, so that they test it and nothing else.
func probeSteered(spec health.Spec, groups []*steer.Group) bool {
	host, port, ok := spec.HostPort()
	if !ok {
		return false
	}
	if host == "localhost" {
		host = "127.0.0.1"
	}
	ap, err := netip.ParseAddrPort(net.JoinHostPort(host, port))
	if err != nil {
		return false
	}
	for _, g := range groups {
		if g != nil && g.Covers(ap) {
			return true
		}
	}
	return false
}
