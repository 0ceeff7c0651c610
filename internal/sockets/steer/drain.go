package steer

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockdiag"
)

// After a switch, only two things can still reach the old generation's
// socket: the connections already in its accept queue, and the handshakes
// towards it that were in progress at the switch (the program picks a
// socket when the SYN arrives; the handshake then completes into that
// socket's queue, however long the client takes). A SYN that arrives
// after the switch goes to the new socket. So the old socket's drain is
// over once every handshake in progress at the switch has ended and its
// accept queue is empty: from then on nothing can ever be queued on it.
//
// Both are read from the kernel: the queue from TCP_INFO on the socket
// (tcpi_unacked of a listener), the handshakes from socket diagnostics.
// These do not say which socket of the group a handshake belongs to, so
// the drain waits for all of those on the group's address that were in
// progress shortly after the switch: the old socket's are among them, and
// waiting for the new socket's too costs at most their handshake.
const (
	// drainSettle is how long after the switch the handshakes in
	// progress are listed. A SYN that the kernel was steering with the
	// old program while the new one was attached makes its request
	// socket within microseconds; this leaves that a wide margin.
	drainSettle = 10 * time.Millisecond
	// drainPoll is how often the queue and the handshakes are read.
	drainPoll = 5 * time.Millisecond
	// drainQuiet is how long the socket must stay empty. It covers the
	// kernel's completion of a handshake, which takes the request socket
	// out of the table a moment before its connection joins the accept
	// queue, and a server's step from accept(2) to counting the
	// connection as one to finish (a Go http.Server tracks it just
	// after Accept returns), so that the stop signal never lands between
	// the two, or a server that dies at the stop signal (Python's
	// http.server) between accepting a connection and answering it. That
	// step is microseconds, but a server's thread can wait far longer for
	// a CPU on a busy machine: with 20 ms, the integration tests' plain Go
	// server and Python's http.server each lost a connection to it about
	// once in a few hundred restarts on 2 loaded cores (a Python handler
	// thread waits for the interpreter lock too). 50 ms leaves room for
	// that, and only the old generation's stop waits for it: the new one
	// serves meanwhile.
	drainQuiet = 50 * time.Millisecond
)

// ErrUnobservable is returned where the kernel's socket diagnostics
// cannot be read, so a socket's emptying cannot be seen.
var ErrUnobservable = errors.New("the kernel's TCP socket diagnostics (NETLINK_SOCK_DIAG, module tcp_diag) are unavailable")

// Observer sees the sockets of replaced generations empty.
type Observer struct {
	diag *sockdiag.Conn
	// polled, if set, is called after each reading: for tests that
	// wait for the observer to have looked.
	polled func()
}

// NewObserver opens the kernel's socket diagnostics and reads them once,
// so that a kernel without them is found at start. The error wraps
// ErrUnobservable.
func NewObserver() (*Observer, error) {
	diag, err := sockdiag.Dial()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnobservable, err)
	}
	if _, err := diag.Handshakes(unix.AF_INET, 0); err != nil {
		diag.Close()
		return nil, fmt.Errorf("%w: %w", ErrUnobservable, err)
	}
	return &Observer{diag: diag}, nil
}

// Close closes the diagnostics connection.
func (o *Observer) Close() error { return o.diag.Close() }

// WaitDrained returns once nothing can reach generation gen's socket in
// any of groups any more, gen having been switched away from just now:
// the handshakes in progress on the groups' addresses drainSettle after
// the call have all ended, and gen's sockets have had empty accept queues
// for drainQuiet. A group where gen has no socket (it exited) is drained.
// It returns ctx's error if ctx ends first, or the error of a reading
// that failed. If waiting is not nil, it is called once, with what the
// first reading found, if that was not nothing.
func (o *Observer) WaitDrained(ctx context.Context, groups []*Group, gen int, waiting func(Backlog)) error {
	if err := sleep(ctx, drainSettle); err != nil {
		return err
	}
	pending := make([]map[sockdiag.Handshake]bool, len(groups))
	for i, g := range groups {
		hs, err := g.handshakes(o.diag)
		if err != nil {
			return err
		}
		pending[i] = make(map[sockdiag.Handshake]bool, len(hs))
		for _, h := range hs {
			pending[i][h] = true
		}
	}
	var quietSince time.Time
	for first := true; ; first = false {
		b, err := o.backlog(groups, gen, pending)
		if err != nil {
			return err
		}
		if o.polled != nil {
			o.polled()
		}
		busy := b != Backlog{}
		if first && busy && waiting != nil {
			waiting(b)
		}
		now := time.Now()
		switch {
		case busy:
			quietSince = time.Time{}
		case quietSince.IsZero():
			quietSince = now
		case now.Sub(quietSince) >= drainQuiet:
			return nil
		}
		if err := sleep(ctx, drainPoll); err != nil {
			return err
		}
	}
}

// Backlog is what can still reach a replaced generation's sockets.
type Backlog struct {
	Queued     int // connections in their accept queues
	Handshakes int // handshakes in progress at the switch, not yet ended
}

// backlog reads what can still reach gen's sockets: the handshakes of
// pending still in progress (those that ended are struck off), and the
// connections in their accept queues. Handshakes are read first: one that
// completes in between is then seen in the queue.
func (o *Observer) backlog(groups []*Group, gen int, pending []map[sockdiag.Handshake]bool) (Backlog, error) {
	var b Backlog
	for i, g := range groups {
		if len(pending[i]) == 0 {
			continue
		}
		hs, err := g.handshakes(o.diag)
		if err != nil {
			return Backlog{}, err
		}
		still := make(map[sockdiag.Handshake]bool, len(pending[i]))
		for _, h := range hs {
			if pending[i][h] {
				still[h] = true
			}
		}
		pending[i] = still
		b.Handshakes += len(still)
	}
	for _, g := range groups {
		n, err := g.Queued(gen)
		if err != nil {
			return Backlog{}, err
		}
		b.Queued += n
	}
	return b, nil
}

// Queued is the number of connections waiting in the accept queue of
// generation gen's socket; 0 where gen has none (it exited, or Evict took
// its socket out).
func (g *Group) Queued(gen int) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	m := g.memberLocked(gen)
	if m == nil {
		return 0, nil
	}
	info, err := unix.GetsockoptTCPInfo(m.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, fmt.Errorf("reading the accept queue of %s: %w", g.name, err)
	}
	return int(info.Unacked), nil
}

// handshakes lists the handshakes in progress towards the group's address.
func (g *Group) handshakes(diag *sockdiag.Conn) ([]sockdiag.Handshake, error) {
	families := []uint8{uint8(g.sock.Family)}
	if g.sock.Family == unix.AF_INET6 && !g.sock.V6Only {
		families = append(families, unix.AF_INET)
	}
	var out []sockdiag.Handshake
	for _, f := range families {
		hs, err := diag.Handshakes(f, g.sock.Addr.Port())
		if err != nil {
			return nil, fmt.Errorf("watching %s drain: %w", g.name, err)
		}
		for _, h := range hs {
			if g.sock.Covers(h.Local) {
				out = append(out, h)
			}
		}
	}
	return out, nil
}

// sleep waits d, or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
