package main

import (
	"context"
	"os"
	"runtime"
	"runtime/debug"

	"github.com/oklog/run"

	"github.com/relaysh/relay/supervisor"
)

// memoryReturner gives the memory a restart used back to the system once
// the restart is over: relay's live heap is about half a megabyte, but the
// Go runtime lets the heap grow to its 4 MiB minimum goal between
// collections and keeps the freed pages, so that without this relay's
// anonymous memory settles some 5 MB above what it was after its first
// restart (see docs/limits.md). It wraps the Observer the supervisor tells
// of each restart's end, and never blocks the supervisor: the work runs on
// its own actor, and restarts that end while it runs are coalesced into one
// more pass.
type memoryReturner struct {
	supervisor.Observer
	c chan struct{}
}

func newMemoryReturner(o supervisor.Observer) *memoryReturner {
	return &memoryReturner{Observer: o, c: make(chan struct{}, 1)}
}

// Ready passes the milestone on, then asks for the memory back.
func (m *memoryReturner) Ready() {
	m.Observer.Ready()
	select {
	case m.c <- struct{}{}:
	default: // a pass is already due
	}
}

// run returns the memory after each restart until ctx is done. One pass is
// a garbage collection and a release of every free page
// (debug.FreeOSMemory): a few milliseconds of CPU, once per restart.
func (m *memoryReturner) run(ctx context.Context, free func()) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.c:
			free()
		}
	}
}

// addMemoryReturner runs m until relay stops.
func addMemoryReturner(g *run.Group, m *memoryReturner) {
	ctx, cancel := context.WithCancel(context.Background())
	g.Add(func() error { m.run(ctx, debug.FreeOSMemory); return nil }, func(error) { cancel() })
}

// oneProcessor runs relay's goroutines on one processor (GOMAXPROCS 1),
// unless GOMAXPROCS is set in its environment. relay's work is a few
// system calls per event, and none of its goroutines blocks in a system
// call for long (the child's notifications, the netlink replies and the
// sockets go through the poller; the reaper does not wait): with more
// processors, the Go scheduler wakes another thread to look for work at
// each event, which cost a third of relay's CPU per restart (20 against
// 29 ms per restart with no load, on 2 cores, 2026-12-05) and 0.4 MiB of
// memory. Only relay's process is concerned: its children get the
// environment relay got.
func oneProcessor() {
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
}
