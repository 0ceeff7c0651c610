package steer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"testing"
	"time"
)

// stallFixture is a group whose generation 1 holds queued connections it
// never accepted, switched away from to generation 2.
func stallFixture(t *testing.T, queued int) (*Group, map[int]*os.File) {
	t.Helper()
	orig := listen(t, "127.0.0.1:0", true)
	g, err := New(orig, Options{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	socks := map[int]*os.File{}
	take(t, g, 1, socks)
	take(t, g, 2, socks)
	for i := range queued {
		request(t, g, "127.0.0.1", fmt.Sprintf("queued %d", i))
	}
	waitQueued(t, g, 1, queued)
	if err := g.Switch(2); err != nil {
		t.Fatal(err)
	}
	return g, socks
}

// A generation that takes nothing from its queue is found stalled.
func TestWaitStalledFindsAQueueNobodyTakes(t *testing.T) {
	t.Parallel()
	g, _ := stallFixture(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := WaitStalled(ctx, []*Group{g}, 1, 20*time.Millisecond); err != nil {
		t.Fatalf("WaitStalled: %v, want the queue found stalled", err)
	}
}

// A generation that has accepted what was queued is never found stalled,
// however short the quiet: only a queue with connections in it stalls. The
// watch ends with its context.
func TestWaitStalledLeavesAnEmptyQueueAlone(t *testing.T) {
	t.Parallel()
	g, socks := stallFixture(t, 3)
	served(t, map[int]*os.File{1: socks[1]}, 3) // generation 1 takes them all
	waitQueued(t, g, 1, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const looks = 20 // 100 ms of readings, a hundred times the quiet
	n := 0
	polled := func() {
		if n++; n == looks {
			cancel()
		}
	}
	done := make(chan error, 1)
	go func() { done <- waitStalled(ctx, []*Group{g}, 1, time.Millisecond, polled) }()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("WaitStalled returned %v after %d readings of an empty queue, want its context's end", err, n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("WaitStalled did not end with its context")
	}
}
