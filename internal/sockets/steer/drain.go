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
// after the switch goes to the new socket. So nothing more can ever be
// queued on the old socket once every handshake in progress at the switch
// has ended and its accept queue is empty.
//
// That is not yet the moment for the stop signal. A connection the old
// generation has accepted but whose request it has not read is lost to
// many servers at their stop: Go's http.Server closes, unanswered, a
// connection whose request it reads after Shutdown began; Python's
// http.server dies at SIGTERM. So the drain also waits until each
// connection that may be the old generation's has had what its client
// sent read, or is gone; one whose client has sent nothing yet is waited
// for until drainFirstByte after it was made, as its request is on its
// way.
//
// All three are read from the kernel: the queue from TCP_INFO on the
// socket (tcpi_unacked of a listener), the handshakes and connections
// from socket diagnostics. These do not say which socket of the group a
// handshake or a connection belongs to, so the drain watches all of those
// on the group's address that were there shortly after the switch, or
// came out of a handshake that was: the old socket's are among them, and
// waiting for the new socket's too costs at most their handshake, or the
// moment the new generation takes to read a request. A connection still
// in an accept queue is no process's yet: in the old socket's, the queue
// counts it.
const (
	// drainSettle is how long after the switch the handshakes in
	// progress are listed. A SYN that the kernel was steering with the
	// old program while the new one was attached makes its request
	// socket within microseconds; this leaves that a wide margin.
	drainSettle = 10 * time.Millisecond
	// drainPoll is how often the queue and the handshakes are read.
	drainPoll = 5 * time.Millisecond
	// drainQuiet is how long all of it must stay empty. It covers the
	// kernel's completion of a handshake, which takes the request socket
	// out of the table a moment before its connection joins the accept
	// queue, and a server's step from reading a request to counting it
	// as one to finish (Go's http.Server checks whether Shutdown has
	// begun right after the read), or, for a server that dies at the stop
	// signal, to answering it. A thread can wait for a CPU far longer
	// than that step on a busy machine; only the old generation's stop
	// waits for the quiet: the new one serves meanwhile.
	drainQuiet = 50 * time.Millisecond
	// drainLookMax is how many watched handshakes and connections a
	// look asks for one by one; with more, it walks the kernel's table
	// once. A walk costs the same for one socket as for thousands (1.5
	// to 3 ms on a host with a table of 262144 buckets), a lookup a hash
	// lookup.
	drainLookMax = 64
	// drainFirstByte is how long a connection whose client has sent
	// nothing is waited for. HTTP clients send their request as soon as
	// they are connected; a client that opened a connection ahead of
	// its need (a browser's preconnect) delays the old generation's stop
	// by this much at most, and its request, sent after the stop, is the
	// old generation's to handle as it handles any request at its stop.
	drainFirstByte = time.Second
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
	// lookMax is drainLookMax, but for tests of the walk.
	lookMax int
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
	return &Observer{diag: diag, lookMax: drainLookMax}, nil
}

// Close closes the diagnostics connection.
func (o *Observer) Close() error { return o.diag.Close() }

// WaitDrained returns once nothing can reach generation gen's socket in
// any of groups any more and it has read what reached it, gen having been
// switched away from just now: the handshakes in progress on the groups'
// addresses drainSettle after the call have all ended, the connections
// there then, or made by those handshakes, have each had their client's
// bytes read (or are gone), and gen's sockets have had empty accept
// queues, all of it for drainQuiet. A group where gen has no socket (it
// exited) is drained. It returns ctx's error if ctx ends first, or the
// error of a reading that failed. If waiting is not nil, it is called
// once, with what the first reading found, if that was not nothing.
func (o *Observer) WaitDrained(ctx context.Context, groups []*Group, gen int, waiting func(Backlog)) error {
	return o.waitDrained(ctx, groups, func(g *Group) (int, error) { return g.Queued(gen) }, waiting)
}

// WaitCopyDrained is WaitDrained for the socket of one copy of generation
// gen, taken out of the spread just now (Spread) while its siblings, or
// the next generation's copies, take the new connections.
func (o *Observer) WaitCopyDrained(ctx context.Context, groups []*Group, gen, worker int, waiting func(Backlog)) error {
	return o.waitDrained(ctx, groups, func(g *Group) (int, error) { return g.QueuedCopy(gen, worker) }, waiting)
}

// waitDrained is WaitDrained with queued reading the accept queues of the
// sockets drained in each group.
func (o *Observer) waitDrained(ctx context.Context, groups []*Group, queued func(*Group) (int, error), waiting func(Backlog)) error {
	if err := sleep(ctx, drainSettle); err != nil {
		return err
	}
	watches := make([]*watch, len(groups))
	for i, g := range groups {
		w, err := g.watch(o.diag)
		if err != nil {
			return err
		}
		watches[i] = w
	}
	var quietSince time.Time
	for first := true; ; first = false {
		b, err := o.backlog(groups, queued, watches)
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

// Backlog is what can still reach a replaced generation's sockets, or has
// reached it unread.
type Backlog struct {
	Queued     int // connections in their accept queues
	Handshakes int // handshakes in progress at the switch, not yet ended
	Unread     int // connections taken whose client's bytes are not all read
	// QUIC: QUIC handshakes clients began with it on steered UDP
	// listeners, not yet ended (relay's sockets package fills it in; steer
	// itself sees TCP only).
	QUIC int
}

// watch is what may still reach, or has reached unread, one group's old
// socket, as listed shortly after the switch.
type watch struct {
	// handshakes are those still in progress.
	handshakes map[sockdiag.Handshake]bool
	// conns are the connections not yet seen read, by 4-tuple.
	conns map[sockdiag.Handshake]bool
}

// watch lists what to watch on g's address.
func (g *Group) watch(diag *sockdiag.Conn) (*watch, error) {
	l, err := g.list(diag)
	if err != nil {
		return nil, err
	}
	w := &watch{handshakes: make(map[sockdiag.Handshake]bool, len(l.Handshakes)), conns: make(map[sockdiag.Handshake]bool, len(l.Handshakes)+len(l.Connections))}
	for _, h := range l.Handshakes {
		w.handshakes[h] = true
		w.conns[h] = true // the connection it makes
	}
	for _, c := range l.Connections {
		w.conns[sockdiag.Handshake{Local: c.Local, Remote: c.Remote}] = true
	}
	return w, nil
}

// read reports whether the process that has connection c has read what
// its client sent, counting a client that has sent nothing for
// drainFirstByte as done.
func read(c sockdiag.Connection) bool {
	return c.Unread == 0 && (c.Received > 0 || c.SinceReceived >= drainFirstByte)
}

// backlog reads what can still reach gen's sockets, or has reached them
// unread: the handshakes of the watches still in progress and their
// connections not yet read (what ended or was read is struck off), and
// the connections in gen's accept queues. Handshakes and connections are
// read in one walk, then the queues: a connection accepted in between is
// then seen as taken.
func (o *Observer) backlog(groups []*Group, queued func(*Group) (int, error), watches []*watch) (Backlog, error) {
	var b Backlog
	for i, g := range groups {
		w := watches[i]
		if len(w.handshakes) == 0 && len(w.conns) == 0 {
			continue
		}
		l, err := g.recheck(o.diag, w, o.lookMax)
		if err != nil {
			return Backlog{}, err
		}
		still := make(map[sockdiag.Handshake]bool, len(w.handshakes))
		for _, h := range l.Handshakes {
			if w.handshakes[h] {
				still[h] = true
			}
		}
		w.handshakes = still
		b.Handshakes += len(still)
		open := make(map[sockdiag.Handshake]bool, len(w.conns))
		for _, c := range l.Connections {
			k := sockdiag.Handshake{Local: c.Local, Remote: c.Remote}
			switch {
			case !w.conns[k]:
			case c.Inode == 0:
				open[k] = true // queued: no process has it yet
			case read(c):
				delete(w.conns, k)
			default:
				open[k] = true
				b.Unread++
			}
		}
		// A watched connection not listed is gone, unless its handshake
		// is still in progress.
		for k := range w.conns {
			if !open[k] && !w.handshakes[k] {
				delete(w.conns, k)
			}
		}
	}
	for _, g := range groups {
		n, err := queued(g)
		if err != nil {
			return Backlog{}, err
		}
		b.Queued += n
	}
	return b, nil
}

// QueuedCopy is the number of connections waiting in the accept queue of
// the socket of copy worker of generation gen; 0 where it has none.
func (g *Group) QueuedCopy(gen, worker int) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	m := g.copyLocked(gen, worker)
	if m == nil {
		return 0, nil
	}
	info, err := unix.GetsockoptTCPInfo(m.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, fmt.Errorf("reading the accept queue of %s: %w", g.name, err)
	}
	return int(info.Unacked), nil
}

// Queued is the number of connections waiting in the accept queues of
// generation gen's sockets, all its copies'; 0 where gen has none (it
// exited, or Evict took its sockets out).
func (g *Group) Queued(gen int) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for _, m := range g.copiesLocked(gen) {
		info, err := unix.GetsockoptTCPInfo(m.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			return 0, fmt.Errorf("reading the accept queue of %s: %w", g.name, err)
		}
		n += int(info.Unacked)
	}
	return n, nil
}

// recheck finds what is left of w: by 4-tuple while it is at most
// lookMax sockets, else by a walk of the table.
func (g *Group) recheck(diag *sockdiag.Conn, w *watch, lookMax int) (sockdiag.Listing, error) {
	if len(w.conns) > lookMax {
		return g.list(diag)
	}
	// Every watched handshake's 4-tuple is among the connections.
	tuples := make([]sockdiag.Handshake, 0, len(w.conns))
	for k := range w.conns {
		tuples = append(tuples, k)
	}
	l, err := diag.Look(tuples)
	if err != nil {
		return sockdiag.Listing{}, fmt.Errorf("watching %s drain: %w", g.name, err)
	}
	return l, nil
}

// list lists the handshakes in progress towards the group's address and
// the connections made to it, under each address family the kernel may
// list them under: both for a dual-stack IPv6 socket.
func (g *Group) list(diag *sockdiag.Conn) (sockdiag.Listing, error) {
	families := []uint8{uint8(g.sock.Family)}
	if g.sock.Family == unix.AF_INET6 && !g.sock.V6Only {
		families = append(families, unix.AF_INET)
	}
	var out sockdiag.Listing
	for _, f := range families {
		l, err := diag.List(f, g.sock.Addr.Port())
		if err != nil {
			return sockdiag.Listing{}, fmt.Errorf("watching %s drain: %w", g.name, err)
		}
		for _, h := range l.Handshakes {
			if g.sock.Covers(h.Local) {
				out.Handshakes = append(out.Handshakes, h)
			}
		}
		for _, c := range l.Connections {
			if g.sock.Covers(c.Local) {
				out.Connections = append(out.Connections, c)
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
