package supervisor

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"
)

// fakeClock is a clock that moves only by advance.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	timers  []*fakeTimer
	changed chan struct{} // closed and replaced when a timer is armed
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC), changed: make(chan struct{})}
}

type fakeTimer struct {
	c    *fakeClock
	d    time.Duration
	at   time.Time
	f    func()
	done bool // fired or stopped
}

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	pending := !t.done
	t.done = true
	return pending
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, d: d, at: c.now.Add(d), f: f}
	c.timers = append(c.timers, t)
	close(c.changed)
	c.changed = make(chan struct{})
	return t
}

// advance moves the clock by d and makes the calls that came due, in the
// order of their times, on the caller's goroutine.
func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	var due, kept []*fakeTimer
	for _, t := range c.timers {
		switch {
		case t.done:
		case !t.at.After(c.now):
			t.done = true
			due = append(due, t)
		default:
			kept = append(kept, t)
		}
	}
	c.timers = kept
	c.mu.Unlock()
	slices.SortStableFunc(due, func(a, b *fakeTimer) int { return a.at.Compare(b.at) })
	for _, t := range due {
		t.f()
	}
}

// pending reports whether a call armed d before it is pending.
func (c *fakeClock) pending(d time.Duration) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, t := range c.timers {
		if !t.done && t.d == d {
			return true
		}
	}
	return false
}

// waitTimer waits until a call armed d before it is pending.
func (c *fakeClock) waitTimer(t *testing.T, d time.Duration) {
	t.Helper()
	deadline := time.After(waitLimit)
	for {
		c.mu.Lock()
		changed := c.changed
		c.mu.Unlock()
		if c.pending(d) {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("no timer of %s was armed", d)
		}
	}
}

// WithTimeout is context.WithTimeout on the fake clock: the context ends
// with context.DeadlineExceeded when the clock has moved by d.
func (c *fakeClock) WithTimeout(parent context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	ctx := &fakeDeadline{parent: parent, done: make(chan struct{})}
	t := c.AfterFunc(d, func() { ctx.end(context.DeadlineExceeded) })
	stop := context.AfterFunc(parent, func() { ctx.end(parent.Err()) })
	return ctx, func() {
		t.Stop()
		stop()
		ctx.end(context.Canceled)
	}
}

// fakeDeadline is a context that a fake timer ends. It has no Deadline:
// its end is not a time on the wall clock.
type fakeDeadline struct {
	parent context.Context
	done   chan struct{}
	mu     sync.Mutex
	err    error
}

func (c *fakeDeadline) Deadline() (time.Time, bool) { return time.Time{}, false }
func (c *fakeDeadline) Done() <-chan struct{}       { return c.done }
func (c *fakeDeadline) Value(key any) any           { return c.parent.Value(key) }

func (c *fakeDeadline) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *fakeDeadline) end(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
		close(c.done)
	}
}
