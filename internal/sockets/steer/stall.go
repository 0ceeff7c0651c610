package steer

import (
	"context"
	"time"
)

// stallPoll is how often WaitStalled reads the accept queues.
const stallPoll = 5 * time.Millisecond

// WaitStalled returns nil once generation gen, switched away from, has
// connections waiting in the accept queue of its socket in one of groups
// and has taken none of them for quiet: its queue never shrank meanwhile.
// After the switch nothing new joins that queue but the handshakes already
// on their way, so a queue that does not shrink is one nobody accepts from:
// the generation hung (deadlocked, or stopped with SIGSTOP), and what waits
// there will be served only if it moves (Evict). It returns ctx's error if
// ctx ends first; a queue it cannot read counts as empty.
func WaitStalled(ctx context.Context, groups []*Group, gen int, quiet time.Duration) error {
	return waitStalled(ctx, groups, gen, quiet, nil)
}

// waitStalled is WaitStalled; polled, if not nil, is called after each
// reading of the queues (a test's hook).
func waitStalled(ctx context.Context, groups []*Group, gen int, quiet time.Duration, polled func()) error {
	type watch struct {
		last  int       // the queue at the last look
		since time.Time // when it was last empty or shrank
	}
	watches := make([]watch, len(groups))
	start := time.Now()
	for i := range watches {
		watches[i].since = start
	}
	for {
		now := time.Now()
		for i, g := range groups {
			n, err := g.Queued(gen)
			if err != nil {
				n = 0
			}
			w := &watches[i]
			if n == 0 || n < w.last {
				w.since = now // empty, or one was taken: not stalled
			}
			w.last = n
			if now.Sub(w.since) >= quiet {
				return nil
			}
		}
		if polled != nil {
			polled()
		}
		if err := sleep(ctx, stallPoll); err != nil {
			return err
		}
	}
}
