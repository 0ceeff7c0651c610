package steer

import (
	"errors"
	"fmt"
)

// A generation replaced because it hung never accepts what is queued on
// its socket, so its drain would last as long as it is allowed to, and
// those connections would wait for its stop. Evict takes its socket out
// of the group at once instead; where net.ipv4.tcp_migrate_req is on, the
// kernel then moves what was on its way to it to the group's other
// sockets.

// ErrPinned is returned by Evict for a socket another process keeps a copy
// of (Options.Pin: systemd's socket unit or fd store). That copy must stay
// a working listener, and a shut down socket listens no more, so the
// socket stays in the group with its queue.
var ErrPinned = errors.New("the socket is kept by another process (systemd), whose copy must go on listening")

// ErrTarget is returned by Evict for the socket that the program sends new
// connections or the readiness probe's to: switch to another generation
// first.
var ErrTarget = errors.New("the socket is where the steering program sends connections")

// Evict takes generation gen's sockets (all its copies') out of the group now, while gen
// still holds it: for a generation that will never accept what is queued
// there (it hung, and has been switched away from). The socket is shut
// down, which unhashes it at once whoever holds a copy. Where
// net.ipv4.tcp_migrate_req is on, the kernel moves the connections in its
// accept queue to another socket of the group at once, and each handshake
// in progress towards it when the client's final ACK arrives (or at its
// next SYN-ACK retransmission); where it is off, it resets them. queued is
// the number of connections that were in the accept queue.
//
// The kernel picks the receiving socket by hash among the group's
// listening sockets (relay's program is classic BPF, which cannot choose):
// the serving generation's, when it is the only other one (the group
// holds the hung generation's socket and its replacement's). Otherwise
// some go to another generation's socket, which accepts them or hands them
// on when it leaves, or to a free socket, which hands them on when it
// leaves (Evict lets those that can leave now go) or to the next
// generation that takes it.
//
// Moving the last socket into the freed slot, as every removal does, opens
// the window that canRemoveLocked avoids: until the program is rewritten
// for the moved socket's new index, a new connection to a target that was
// last is hashed over the group. Evict does not wait for a safer layout,
// since the queue would wait with it: the window lasts from shutdown(2) to
// the next setsockopt(2), microseconds under the lock, and does not exist
// with two sockets (the hash then has only the target to pick), or when
// the last socket is gen's or no target. A connection it misdirects fares
// like the queue above: accepted where it lands, or moved on when that
// socket leaves.
//
// gen keeps its descriptors, now of a socket that listens no more: its
// accept(2) fails. Relay's copy stays open until Release(gen), for relay's
// own use of it while gen lives (bind takeover); the socket has left
// already, so Release only closes that copy.
//
// Evict refuses with ErrTarget if gen's socket is the public target or the
// probe's, and with ErrPinned if another process keeps a copy; the group
// is unchanged then. Where gen has no socket it does nothing.
func (g *Group) Evict(gen int) (queued int, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	ms := g.copiesLocked(gen)
	for _, m := range ms {
		switch {
		case g.isActiveLocked(m):
			return 0, fmt.Errorf("%s: generation %d's socket gets the new connections: %w", g.name, gen, ErrTarget)
		case g.isProbeLocked(m):
			return 0, fmt.Errorf("%s: generation %d's socket gets the readiness probe: %w", g.name, gen, ErrTarget)
		case m.pinned:
			return 0, fmt.Errorf("%s: generation %d's socket: %w", g.name, gen, ErrPinned)
		}
	}
	var errs []error
	for _, m := range ms {
		n, err := g.detachLocked(m)
		queued += n
		g.evicted = append(g.evicted, m)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: shutting down generation %d's socket: %w", g.name, gen, err))
		}
	}
	if len(ms) == 0 {
		return 0, nil
	}
	// A free socket kept because its leaving would have moved a target
	// may be able to leave now, and take on what reached it.
	g.tidyLocked()
	if err := errors.Join(errs...); err != nil {
		return queued, err
	}
	g.log.Debug("took a generation's sockets out of the group", "listener", g.name, "gen", gen, "sockets", len(ms), "queued", queued, "left", len(g.members))
	return queued, nil
}
