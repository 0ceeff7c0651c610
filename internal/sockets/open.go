package sockets

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sdnotify"
	"github.com/relaysh/relay/internal/sockaddr"
	"github.com/relaysh/relay/internal/sockets/steer"
	"github.com/relaysh/relay/internal/sockets/udpsteer"
)

// SteerMode is the --steer setting.
type SteerMode string

// The steering modes.
const (
	SteerAuto SteerMode = "auto" // steer where the kernel and the socket allow, else share
	SteerOn   SteerMode = "on"   // steer every TCP and UDP listener or refuse to start
	SteerOff  SteerMode = "off"  // one shared socket per listener
)

// ParseSteerMode checks a --steer value.
func ParseSteerMode(v string) (SteerMode, error) {
	switch m := SteerMode(v); m {
	case SteerAuto, SteerOn, SteerOff:
		return m, nil
	}
	return "", fmt.Errorf("--steer %q: use auto, on or off", v)
}

// Options say how to open the set.
type Options struct {
	// Specs are the --listen values, in order.
	Specs []Spec
	// Passed are the sockets systemd passed to relay (LISTEN_FDS).
	Passed []*Listener
	// UnixMode is the permission of unix sockets relay creates.
	UnixMode os.FileMode
	Steer    SteerMode
	// Notifier speaks to systemd, for the fd store; it may be disabled.
	Notifier *sdnotify.Notifier
	Log      *slog.Logger
}

// flushTimeout bounds how long relay waits for systemd to drop stale
// sockets from its fd store.
const flushTimeout = 2 * time.Second

// Open binds or adopts every listener, keeps the sockets relay bound in
// systemd's fd store where it offers one, and makes a steering group of
// every TCP and UDP listener that can have one. With SteerOn, a TCP or UDP
// listener that cannot be steered is an error. On error, nothing stays
// open.
func Open(opts Options) (*Set, error) {
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// UDP steering needs eBPF (package udpsteer): without it, a UDP
	// socket keeps no SO_REUSEPORT, which would only let another
	// process of relay's user join it.
	var udpErr error
	if opts.Steer == SteerOff {
		udpErr = errors.New("--steer off")
	} else if hasUDP(opts.Specs, opts.Passed) {
		udpErr = udpsteer.Available()
		if udpErr != nil && opts.Steer == SteerOn {
			return nil, fmt.Errorf("--steer on: UDP listeners cannot be steered: %w; use --steer auto to share each UDP socket among the generations instead", udpErr)
		}
	}
	listeners, err := openListeners(opts.Specs, opts.Passed,
		BindOptions{UnixMode: opts.UnixMode, ReusePort: opts.Steer != SteerOff, UDPReusePort: udpErr == nil},
		func(stale []string) { dropStale(log, opts.Notifier, stale) })
	if err != nil {
		return nil, err
	}
	stored := storeSockets(log, opts.Notifier, listeners)
	s := &Set{log: log}
	for _, l := range listeners {
		s.entries = append(s.entries, &entry{Listener: l, Stored: stored[l], holders: map[copyKey]bool{}, fresh: map[copyKey]bool{}})
	}
	for _, e := range s.entries {
		if e.addr, err = readAddr(e.Listener); err != nil {
			s.Close()
			return nil, err
		}
	}
	if err := s.steer(opts.Steer); err != nil {
		s.Close()
		return nil, err
	}
	if err := s.steerUDP(opts.Steer, udpErr); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// clearReusePort turns SO_REUSEPORT off on a bound socket: from then on no
// other socket can bind its address beside it.
func clearReusePort(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("reaching the socket: %w", err)
	}
	var inner error
	if err := rc.Control(func(fd uintptr) {
		inner = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 0)
	}); err != nil {
		return fmt.Errorf("reaching the socket: %w", err)
	}
	if inner != nil {
		return fmt.Errorf("turning SO_REUSEPORT off on a socket that stays shared: %w", inner)
	}
	return nil
}

// hasUDP reports whether a --listen or a passed socket is UDP.
func hasUDP(specs []Spec, passed []*Listener) bool {
	for _, sp := range specs {
		if sp.Network == sockaddr.UDP {
			return true
		}
	}
	for _, l := range passed {
		if l.Spec.Network == sockaddr.UDP {
			return true
		}
	}
	return false
}

// steerUDP makes a flow-steered group (package udpsteer) of every UDP
// listener that can have one. unavailable is why none can (nil if they
// can): it is said in one log line for all of them.
func (s *Set) steerUDP(mode SteerMode, unavailable error) error {
	var names []string
	for _, e := range s.entries {
		if e.Listener.Spec.Network == sockaddr.UDP {
			names = append(names, e.Listener.Spec.Name)
		}
	}
	if len(names) == 0 || mode == SteerOff {
		return nil
	}
	if unavailable != nil {
		s.log.Warn("UDP steering unavailable: every generation shares each UDP listener's socket, so a restart breaks the QUIC (HTTP/3) connections of the old generation; give relay CAP_BPF to steer UDP by flow",
			"listeners", strings.Join(names, ","), "err", unavailable)
		return nil
	}
	for _, e := range s.entries {
		l := e.Listener
		if l.Spec.Network != sockaddr.UDP {
			continue
		}
		g, err := udpsteer.FromFile(l.File(), udpsteer.Options{Name: l.Spec.Name, Log: s.log, QUIC: true})
		if err != nil {
			if mode == SteerOn {
				return fmt.Errorf("--steer on: UDP listener %s (%s) cannot be steered: %w; use --steer auto to share its socket instead", l.Spec.Name, l.Addr, err)
			}
			s.log.Warn("UDP steering unavailable for this listener: every generation shares its socket", "listener", l.Spec.Name, "addr", l.Addr, "err", err)
			if l.Origin == Bound {
				// Shared, it must not stay open to other sockets of
				// relay's user joining its port.
				if err := clearReusePort(l.File()); err != nil {
					return fmt.Errorf("listener %s (%s): %w", l.Spec.Name, l.Addr, err)
				}
			}
			continue
		}
		e.UDP = g
		s.log.Debug("UDP listener steered by flow", "listener", l.Spec.Name, "addr", l.Addr, "program_insns", g.Instructions())
	}
	return nil
}

// steer makes a reuseport group of every TCP listener that can have one,
// and says in one log line per listener that cannot why.
func (s *Set) steer(mode SteerMode) error {
	if mode == SteerOff {
		return nil
	}
	steered := false
	for _, e := range s.entries {
		l := e.Listener
		if l.Spec.Network != sockaddr.TCP {
			continue // unix and UDP sockets have no connections to steer
		}
		// A socket another process holds a copy of (systemd's socket
		// unit or fd store) must stay a working listener.
		pin := e.Stored || l.Origin != Bound
		g, err := steer.New(l.File(), steer.Options{Name: l.Spec.Name, Pin: pin, Log: s.log})
		if err != nil {
			if mode == SteerOn {
				return fmt.Errorf("--steer on: listener %s (%s) cannot be steered: %w; use --steer auto to share its socket instead", l.Spec.Name, l.Addr, err)
			}
			if !errors.Is(err, steer.ErrNotStream) {
				s.log.Warn("steering unavailable; this listener keeps one socket shared by every generation", "listener", l.Spec.Name, "addr", l.Addr, "err", err)
			}
			continue
		}
		e.Group = g
		steered = true
	}
	if !steered {
		return nil
	}
	s.observe() // TCP listeners only: UDP ones drain by their queues
	state, err := steer.EnableMigration()
	s.migrates = err == nil
	switch {
	case err != nil:
		s.log.Info("net.ipv4.tcp_migrate_req stays off: a connection still queued on a retired socket would be reset rather than moved (relay retires a socket once its generation has exited, and a generation that failed its liveness check drains instead of handing its queue over)", "err", err)
	case state == steer.MigrationEnabled:
		s.log.Info("turned on net.ipv4.tcp_migrate_req for this network namespace: connections still queued on a retired socket move to another socket of its group instead of being reset")
	default:
		s.log.Debug("net.ipv4.tcp_migrate_req is on")
	}
	return nil
}

// observe opens the observer that sees the steered listeners drain, or
// says in the log why there is none.
func (s *Set) observe() {
	o, err := steer.NewObserver()
	if err != nil {
		s.log.Warn("adaptive drain unavailable: a replaced generation drains for the whole --drain", "err", err)
		return
	}
	s.observer = o
}

// dropStale removes from systemd's fd store the sockets stored for a
// --listen that is gone or changed, and waits until systemd has closed
// them: its copy would keep the address busy for the new bind.
func dropStale(log *slog.Logger, n *sdnotify.Notifier, stale []string) {
	if n == nil || !n.Enabled() {
		log.Warn("closed sockets from the fd store that no --listen asks for; without NOTIFY_SOCKET they stay in the store", "fdnames", stale)
		return
	}
	for _, name := range stale {
		if err := n.RemoveFD(name); err != nil {
			log.Warn("removing a stale socket from the fd store", "fdname", name, "err", err)
			continue
		}
		log.Info("closed a socket from the fd store that no --listen asks for, and removed it from the store", "fdname", name)
	}
	if err := n.Barrier(flushTimeout); err != nil {
		log.Warn("waiting for the service manager to drop stale sockets", "err", err)
	}
}

// storeSockets keeps the sockets relay bound, and those that came back
// from the store, in systemd's fd store ($FDSTORE), so that a restart of
// relay itself (systemctl restart, or a crash with Restart=) hands the same
// sockets back and no connection is refused in between. Sockets a .socket
// unit passed stay with that unit. It returns the listeners it stored.
func storeSockets(log *slog.Logger, n *sdnotify.Notifier, listeners []*Listener) map[*Listener]bool {
	kept := map[*Listener]bool{}
	if n == nil || !n.Enabled() {
		return kept
	}
	limit := sdnotify.FDStoreMax()
	if limit == 0 {
		log.Debug("no fd store offered (FDSTORE unset); a restart of relay itself rebinds its sockets")
		return kept
	}
	stored := 0
	for _, l := range listeners {
		if l.Origin == Activated || (l.Origin == Inherited && !strings.HasPrefix(l.PassedName, StoreNamePrefix)) {
			continue // a .socket unit holds it already
		}
		name := StoreNamePrefix + l.Spec.Name
		if stored >= limit {
			log.Warn("the fd store is full: this socket will be bound anew if relay restarts; raise FileDescriptorStoreMax=", "fdname", name, "fdstore_max", limit)
			continue
		}
		if err := n.StoreFD(name, l.File()); err != nil {
			log.Warn("keeping a socket in the fd store", "fdname", name, "err", err)
			continue
		}
		stored++
		kept[l] = true
		l.KeepPath()
		log.Info("socket kept in the fd store", "fdname", name, "addr", l.Addr)
	}
	return kept
}
