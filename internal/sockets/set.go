package sockets

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/relaysh/relay/internal/sockaddr"
	"github.com/relaysh/relay/internal/sockets/steer"
	"github.com/relaysh/relay/internal/sockets/udpsteer"
	"github.com/relaysh/relay/socketpass"
)

// Set is relay's listeners, for relay's whole life. Its methods are safe
// for concurrent use.
type Set struct {
	log     *slog.Logger
	entries []*entry // in --listen order: fd 3, 4, ... of every child
	// observer sees a replaced generation's steered sockets empty; nil
	// where nothing is steered or the kernel cannot show it.
	observer *steer.Observer
	// migrates: net.ipv4.tcp_migrate_req was on, or turned on, at Open.
	migrates bool

	mu sync.Mutex // guards the entries' holders
}

// entry is one listener.
type entry struct {
	Listener *Listener
	// Group gives each generation a socket of its own; nil where the
	// generations share the listener's socket.
	Group *steer.Group
	// UDP steers a UDP listener by flow, with a socket per generation;
	// nil where the generations share the listener's socket.
	UDP *udpsteer.Group
	// Stored: systemd's fd store keeps a copy.
	Stored bool
	// holders are the copies of generations that hold the shared socket.
	holders map[copyKey]bool
	// fresh are the copies whose member of the group (TCP or UDP) no
	// generation had before them: theirs alone (a UDP member is shared by
	// the copies of its generation).
	fresh map[copyKey]bool
	// addr is what a child's bind is compared with.
	addr addr
}

// copyKey names copy worker (0 for the first or only one) of generation
// gen.
type copyKey struct{ gen, worker int }

// Info describes one listener, for logs and status.
type Info struct {
	FD      int    // the child's fd number
	Name    string // its LISTEN_FDNAMES entry
	Network string
	Addr    string
	Origin  string // bound by relay, or passed by systemd
	Sharing Sharing
	// IP is where a TCP or UDP listener is bound, and its family; zero
	// for a unix listener.
	IP sockaddr.Socket
}

// Sharing is how the generations share a listener. Its values are the
// words of the log and of relay status.
type Sharing string

// The ways to share a listener.
const (
	Steered Sharing = "steered" // a socket per generation, new connections to the serving one only
	Shared  Sharing = "shared"  // one socket every generation accepts on
)

// Empty returns a set with no listeners.
func Empty() *Set { return &Set{log: slog.New(slog.DiscardHandler)} }

// Len is the number of listeners.
func (s *Set) Len() int { return len(s.entries) }

// Names returns the listeners' names, in fd order: what the children see
// in LISTEN_FDNAMES.
func (s *Set) Names() []string {
	out := make([]string, len(s.entries))
	for i, e := range s.entries {
		out[i] = e.Listener.Spec.Name
	}
	return out
}

// listeners returns the listeners, in fd order.
func (s *Set) listeners() []*Listener {
	out := make([]*Listener, len(s.entries))
	for i, e := range s.entries {
		out[i] = e.Listener
	}
	return out
}

// Info describes every listener, in fd order.
func (s *Set) Info() []Info {
	out := make([]Info, len(s.entries))
	for i, e := range s.entries {
		l := e.Listener
		out[i] = Info{FD: socketpass.FirstFD + i, Name: l.Spec.Name, Network: string(l.Spec.Network), Addr: l.Addr, Origin: string(l.Origin), Sharing: Shared, IP: e.addr.ip}
		if e.Group != nil || e.UDP != nil {
			out[i].Sharing = Steered
		}
	}
	return out
}

// Steered reports whether any listener, TCP or UDP, is steered.
func (s *Set) Steered() bool {
	for _, e := range s.entries {
		if e.Group != nil || e.UDP != nil {
			return true
		}
	}
	return false
}

// Take returns the sockets copy worker of generation gen (0 for the first
// or only one) gets, in fd order: its own member of each steered TCP
// listener's group, its generation's of each steered UDP one (the copies
// share it), and the shared socket of the others. A copy that takes again
// (a replacement) gets the same sockets. Release gives them back.
func (s *Set) Take(gen, worker int) ([]*os.File, error) {
	k := copyKey{gen, worker}
	files := make([]*os.File, len(s.entries))
	for i, e := range s.entries {
		var (
			f     *os.File
			fresh bool
			err   error
		)
		switch {
		case e.Group != nil:
			f, fresh, err = e.Group.Take(gen, worker)
		case e.UDP != nil:
			f, fresh, err = e.UDP.Take(gen)
		default:
			s.mu.Lock()
			e.holders[k] = true
			s.mu.Unlock()
			files[i] = e.Listener.File()
			continue
		}
		if err != nil {
			if worker == 0 {
				s.Release(gen)
			}
			return nil, fmt.Errorf("giving generation %d a socket of its own on %s: %w", gen, e.Listener.Spec.Name, err)
		}
		s.mu.Lock()
		if e.UDP != nil {
			e.holders[k] = true // its generation's copies share it
		}
		e.fresh[k] = fresh
		s.mu.Unlock()
		files[i] = f
	}
	return files, nil
}

// Release gives back the sockets of generation gen, all its copies, which
// have exited.
func (s *Set) Release(gen int) {
	for _, e := range s.entries {
		if e.Group != nil {
			e.Group.Release(gen)
		}
		if e.UDP != nil {
			e.UDP.Release(gen)
		}
		s.mu.Lock()
		maps.DeleteFunc(e.holders, func(k copyKey, _ bool) bool { return k.gen == gen })
		maps.DeleteFunc(e.fresh, func(k copyKey, _ bool) bool { return k.gen == gen })
		s.mu.Unlock()
	}
}

// Absent marks copy worker of generation gen absent on every steered TCP
// listener (it exited, and a replacement is to take its sockets), or
// present again: see steer.Group.Absent. UDP listeners need no mark: the
// copies share their generation's socket.
func (s *Set) Absent(gen, worker int, absent bool) error {
	var errs []error
	for _, g := range s.steered() {
		errs = append(errs, g.Absent(gen, worker, absent))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("steering new connections around copy %d of generation %d: %w", worker, gen, err)
	}
	return nil
}

// switcher is a steered listener: a TCP or a UDP group.
type switcher interface{ Switch(gen int) error }

// switchers are the steered listeners, in fd order.
func (s *Set) switchers() []switcher {
	var out []switcher
	for _, e := range s.entries {
		switch {
		case e.Group != nil:
			out = append(out, e.Group)
		case e.UDP != nil:
			out = append(out, e.UDP)
		}
	}
	return out
}

// Switch sends the new connections of every steered listener (the new
// flows of a UDP one) to generation gen. If one listener refuses, those
// already switched go back to generation back (0 for none), so that no
// listener is left pointing at gen alone.
func (s *Set) Switch(gen, back int) error {
	var done []switcher
	for _, g := range s.switchers() {
		if err := g.Switch(gen); err != nil {
			if back != 0 {
				for _, d := range done {
					if berr := d.Switch(back); berr != nil {
						s.log.Error("steering new connections back", "gen", back, "err", berr)
					}
				}
			}
			return fmt.Errorf("steering new connections to generation %d: %w", gen, err)
		}
		done = append(done, g)
	}
	return nil
}

// Spread sends the new connections of every steered TCP listener to the
// sockets of copies, whatever their generations (see steer.Group.Spread):
// a rolling restart's. UDP listeners keep their generation until Switch:
// their flows are by generation, and its copies share its socket.
func (s *Set) Spread(copies []steer.Copy) error {
	for _, g := range s.steered() {
		if err := g.Spread(copies); err != nil {
			return fmt.Errorf("spreading new connections over %d copies: %w", len(copies), err)
		}
	}
	return nil
}

// WaitCopyDrained returns once nothing more can reach the socket of copy
// worker of generation gen on any steered TCP listener, gen's copy having
// just been taken out of the spread (Spread); ctx's error if it ends
// first, steer.ErrUnobservable at once where the kernel cannot show it.
func (s *Set) WaitCopyDrained(ctx context.Context, gen, worker int, waiting func(steer.Backlog)) error {
	tcp := s.steered()
	if len(tcp) == 0 {
		return nil
	}
	if s.observer == nil {
		return steer.ErrUnobservable
	}
	if err := s.observer.WaitCopyDrained(ctx, tcp, gen, worker, waiting); err != nil {
		return fmt.Errorf("waiting for copy %d of generation %d to drain: %w", worker, gen, err)
	}
	return nil
}

// DrainObservable reports whether WaitDrained can see a replaced
// generation's sockets empty: some listener is steered, and the kernel
// shows the queue and handshakes of every steered TCP listener.
func (s *Set) DrainObservable() bool {
	if len(s.steered()) > 0 {
		return s.observer != nil
	}
	return len(s.udp()) > 0
}

// WaitDrained returns once nothing more can reach generation gen's steered
// sockets, gen having just been switched away from; ctx's error if it ends
// first. Shared sockets do not hold it up: the next generation reads them.
//
// TCP listeners first (see steer.Observer.WaitDrained): without an
// observer it returns steer.ErrUnobservable at once. Then UDP ones: gen is
// retired (see udpsteer.Group.Retire: its flows other than QUIC
// connections go to the serving generation from then on; its QUIC
// connections stay with it until it exits, since its stop ends them
// gracefully), and WaitDrained waits
// until gen's UDP sockets hold no unread datagram, so that what reached
// gen before is read by gen while it still reads, and until the QUIC
// handshakes clients began with gen are over (see drainUDP). waiting, if not nil,
// hears once what was still on its way to gen's TCP sockets at the first
// reading, if anything, and once the QUIC handshakes the UDP drain waits
// for (Backlog.QUIC), if any.
func (s *Set) WaitDrained(ctx context.Context, gen int, waiting func(steer.Backlog)) error {
	if tcp := s.steered(); len(tcp) > 0 {
		if s.observer == nil {
			return steer.ErrUnobservable
		}
		if err := s.observer.WaitDrained(ctx, tcp, gen, waiting); err != nil {
			return err
		}
	}
	return s.drainUDP(ctx, gen, waiting)
}

// udpPoll is how often drainUDP reads a retired generation's UDP queues: a
// server that reads at all empties them within a few of these.
const udpPoll = time.Millisecond

// handshakePoll is how often drainUDP reads the flow table while a retired
// generation has QUIC handshakes in progress: a handshake takes a round
// trip or two. Each reading walks the table, which takes about 25 ms when
// it is full (65,536 flows), so the pause is at least four times the last
// reading: the walk takes at most a fifth of a CPU.
const handshakePoll = 5 * time.Millisecond

// drainUDP retires gen on every steered UDP listener, then waits until
// nothing waits unread in gen's sockets and gen has no QUIC handshake in
// progress (udpsteer.Group.Handshakes), or until ctx ends. The handshakes:
// a client that began one with gen just before the switch finishes it with
// gen, and a QUIC server that stops refuses the connections it has not
// finished accepting (quic-go answers them CONNECTION_REFUSED). The wait
// ends when each client sends its first short-header packet, a round trip
// or two after its Initial, or when its flow has been silent for
// udpsteer's QUICInitialIdle (an abandoned handshake). waiting, if not
// nil, hears the first count of handshakes that holds the drain up.
func (s *Set) drainUDP(ctx context.Context, gen int, waiting func(steer.Backlog)) error {
	groups := s.udp()
	if len(groups) == 0 {
		return nil
	}
	if err := s.retireUDP(gen); err != nil {
		return err
	}
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		queued, handshakes := false, 0
		for _, g := range groups {
			n, err := g.Queued(gen)
			if err != nil {
				return fmt.Errorf("reading what waits for generation %d on %s: %w", gen, g.Addr(), err)
			}
			queued = queued || n > 0
		}
		if queued {
			t.Reset(udpPoll)
			continue
		}
		walked := time.Now()
		for _, g := range groups {
			n, err := g.Handshakes(gen)
			if err != nil {
				return fmt.Errorf("counting the QUIC handshakes of generation %d on %s: %w", gen, g.Addr(), err)
			}
			handshakes += n
		}
		if handshakes == 0 {
			return nil
		}
		if waiting != nil {
			waiting(steer.Backlog{QUIC: handshakes})
			waiting = nil
		}
		t.Reset(max(handshakePoll, 4*time.Since(walked)))
	}
}

// Retire retires generation gen, which no longer serves, on every steered
// UDP listener (see drainUDP), if its drain did not already; nil where no
// UDP listener is steered. A listener whose new flows still go to gen (a
// generation stopped before another was switched to) is left as it is.
func (s *Set) Retire(gen int) error { return s.retire(gen, true) }

// retireUDP retires gen on every steered UDP listener (see drainUDP); a
// listener on which gen still serves is an error.
func (s *Set) retireUDP(gen int) error { return s.retire(gen, false) }

func (s *Set) retire(gen int, unlessServing bool) error {
	var errs []error
	for _, e := range s.entries {
		if e.UDP == nil {
			continue
		}
		err := e.UDP.Retire(gen)
		if unlessServing && errors.Is(err, udpsteer.ErrServes) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("sending the datagrams of generation %d on %s to the serving generation: %w", gen, e.Listener.Spec.Name, err))
		}
	}
	return errors.Join(errs...)
}

// udp returns the steered UDP listeners' groups, in fd order.
func (s *Set) udp() []*udpsteer.Group {
	var groups []*udpsteer.Group
	for _, e := range s.entries {
		if e.UDP != nil {
			groups = append(groups, e.UDP)
		}
	}
	return groups
}

// UDPSteered reports whether a UDP listener is steered by flow.
func (s *Set) UDPSteered() bool { return len(s.udp()) > 0 }

// Flows counts, per generation, the UDP flows (client 4-tuples) the steered
// UDP listeners send to it: those heard from within the flow idle timeout
// (see udpsteer.Group.Flows). Empty where no UDP listener is steered.
func (s *Set) Flows() map[int]int {
	out := map[int]int{}
	for _, g := range s.udp() {
		for gen, n := range g.Flows() {
			out[gen] += n
		}
	}
	return out
}

// Migrates reports whether the kernel moves the connections queued on a
// socket that leaves its group to another socket of the group, rather
// than resetting them: net.ipv4.tcp_migrate_req was on at Open, or Open
// turned it on (relay never turns it off). False where no listener is
// steered.
func (s *Set) Migrates() bool { return s.migrates }

// HandOver takes generation gen's own sockets out of every steered
// listener's group now, although gen still holds them, so that the
// connections queued on them and the handshakes towards them go to the
// other sockets of each group (see steer.Group.Evict): for a generation
// replaced because it hung, which will never accept them. gen must have
// been switched away from. Where Migrates is false the kernel resets those
// connections instead. Steered UDP listeners retire gen (see drainUDP): the
// datagrams already in its sockets stay there. Shared sockets are
// untouched: the next generation accepts from them already.
//
// queued is the number of connections that were in gen's accept queues. A
// listener whose socket cannot leave (the error wraps steer.ErrPinned or
// steer.ErrTarget) does not stop the others; the errors are joined.
// Release(gen) once gen has exited is still needed.
func (s *Set) HandOver(gen int) (queued int, err error) {
	var errs []error
	for _, e := range s.entries {
		if e.Group == nil {
			continue
		}
		n, err := e.Group.Evict(gen)
		queued += n
		if err != nil {
			errs = append(errs, fmt.Errorf("handing the connections queued for generation %d on %s over: %w", gen, e.Listener.Spec.Name, err))
		}
	}
	if err := s.retireUDP(gen); err != nil {
		errs = append(errs, err)
	}
	return queued, errors.Join(errs...)
}

// WaitStalled returns nil once generation gen, switched away from, has
// connections queued on one of its steered sockets and has accepted none of
// them for quiet (see steer.WaitStalled): it will not take them, and only
// HandOver can get them served. It returns ctx's error if ctx ends first,
// and waits for ctx where nothing is steered.
func (s *Set) WaitStalled(ctx context.Context, gen int, quiet time.Duration) error {
	return steer.WaitStalled(ctx, s.steered(), gen, quiet)
}

// steered returns the steered listeners' groups, in fd order.
func (s *Set) steered() []*steer.Group {
	var groups []*steer.Group
	for _, e := range s.entries {
		if e.Group != nil {
			groups = append(groups, e.Group)
		}
	}
	return groups
}

// ProbeControl returns the dialer Control function of the readiness probes
// of copy worker of generation gen: a probe of a steered listener's public
// address goes to that copy's own socket.
func (s *Set) ProbeControl(gen, worker int) func(network, address string, c syscall.RawConn) error {
	return steer.ProbeControl(s.groups(), gen, worker)
}

func (s *Set) groups() []*steer.Group {
	gs := make([]*steer.Group, len(s.entries))
	for i, e := range s.entries {
		gs[i] = e.Group
	}
	return gs
}

// Probe returns, for listener i, the address a readiness probe dials to
// reach one generation's own socket (steered through ProbeControl): the
// bound address, or loopback for a wildcard. "" where the listener is not
// steered, so that no probe can tell its generations apart.
func (s *Set) Probe(i int) string {
	g := s.entries[i].Group
	if g == nil {
		return ""
	}
	a := g.Addr()
	host := a.Addr().Unmap()
	if host.IsUnspecified() {
		host = netip.AddrFrom4([4]byte{127, 0, 0, 1})
		if !g.Covers(netip.AddrPortFrom(host, a.Port())) {
			host = netip.IPv6Loopback()
		}
	}
	return net.JoinHostPort(host.String(), fmt.Sprint(a.Port()))
}

// QUICProbe returns the readiness probe of generation gen's own socket of
// listener i, a UDP listener steered by flow (see udpsteer.Group.ProbeQUIC:
// a QUIC server answers it with Version Negotiation); nil for any other
// listener, which no such probe can reach alone.
func (s *Set) QUICProbe(i, gen int) func(context.Context) error {
	g := s.entries[i].UDP
	if g == nil {
		return nil
	}
	return func(ctx context.Context) error { return g.ProbeQUIC(ctx, gen) }
}

// ProbesSteered reports whether a connection to host:port reaches a steered
// listener, so that a probe of it is steered to one generation.
func (s *Set) ProbesSteered(host, port string) bool {
	if host == "localhost" {
		host = "127.0.0.1"
	}
	ap, err := netip.ParseAddrPort(net.JoinHostPort(host, port))
	if err != nil {
		return false
	}
	for _, e := range s.entries {
		if e.Group != nil && e.Group.Covers(ap) {
			return true
		}
	}
	return false
}

// Close closes every socket, the groups' first.
func (s *Set) Close() error {
	if s.observer != nil {
		s.observer.Close()
	}
	for _, e := range s.entries {
		if e.Group != nil {
			e.Group.Close()
		}
		if e.UDP != nil {
			e.UDP.Close()
		}
	}
	return CloseAll(s.listeners())
}
