package main

import (
	"context"
	"testing"
	"time"
)

// countingObserver counts the milestones it hears.
type countingObserver struct{ ready, reloading, stopping, status int }

func (o *countingObserver) Ready()        { o.ready++ }
func (o *countingObserver) Reloading()    { o.reloading++ }
func (o *countingObserver) Stopping()     { o.stopping++ }
func (o *countingObserver) Status(string) { o.status++ }

// The returner passes every milestone on to the Observer it wraps (systemd
// still hears READY=1 after each restart), and the end of a restart, told
// as Ready, never blocks the supervisor: restarts that end before a pass
// runs are coalesced into one pass.
func TestMemoryReturnerPassesMilestonesOnAndCoalesces(t *testing.T) {
	inner := &countingObserver{}
	m := newMemoryReturner(inner)
	m.Reloading()
	for range 5 {
		m.Ready() // nothing reads yet: must not block
	}
	m.Stopping()
	m.Status("gen 2 pid 10 serving")
	if *inner != (countingObserver{ready: 5, reloading: 1, stopping: 1, status: 1}) {
		t.Fatalf("inner observer heard %+v, want every milestone once as told", *inner)
	}

	passes := make(chan struct{}, 10)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.run(ctx, func() { passes <- struct{}{} }); close(done) }()
	recv(t, passes, "the pass for the restarts that ended")
	m.Ready()
	recv(t, passes, "the pass for one more restart")
	cancel()
	recv(t, done, "run to return once relay stops")
	if n := len(passes); n != 0 {
		t.Errorf("%d more passes, want one per pending Ready: five coalesced, then one", n)
	}
}

func recv[T any](t *testing.T, c <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-c:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}
