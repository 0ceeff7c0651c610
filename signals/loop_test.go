package signals

import (
	"context"
	"os"
	"slices"
	"syscall"
	"testing"
	"time"
)

// recorder is a Target that writes down each request.
type recorder struct{ c chan string }

func (r recorder) RequestRestart(reason string) error { r.c <- "restart " + reason; return nil }
func (r recorder) Stop(now bool) {
	if now {
		r.c <- "stop now"
		return
	}
	r.c <- "stop"
}
func (r recorder) StopAfter(d time.Duration)  { r.c <- "stop after " + d.String() }
func (r recorder) Forward(sig syscall.Signal) { r.c <- "forward " + Name(sig) }
func (r recorder) Upgrade(reason string)      { r.c <- "upgrade " + reason }

// next waits for the next n requests.
func (r recorder) next(t *testing.T, n int) []string {
	t.Helper()
	var got []string
	timeout := time.After(10 * time.Second)
	for len(got) < n {
		select {
		case req := <-r.c:
			got = append(got, req)
		case <-timeout:
			t.Fatalf("got %q so far, want %d requests", got, n)
		}
	}
	return got
}

func TestLoopTurnsSignalsIntoRequests(t *testing.T) {
	sigC := make(chan os.Signal, 8)
	rec := recorder{c: make(chan string, 8)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); Loop(ctx, sigC, rec, 0) }()

	for _, s := range []syscall.Signal{syscall.SIGHUP, syscall.SIGPIPE, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTERM, syscall.SIGINT} {
		sigC <- s
	}
	want := []string{"restart signal HUP", "forward USR1", "upgrade signal USR2", "stop", "stop now"}
	got := rec.next(t, len(want))
	if !slices.Equal(got, want) {
		t.Fatalf("requests %q, want %q (SIGPIPE ignored, a second stop signal stops now)", got, want)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Loop did not return when its context ended")
	}
	select {
	case r := <-rec.c:
		t.Fatalf("unexpected request %q", r)
	default:
	}
}

// With a shutdown delay, the first stop signal begins it, the second
// stops gracefully at once, the third kills.
func TestLoopWithShutdownDelay(t *testing.T) {
	sigC := make(chan os.Signal, 8)
	rec := recorder{c: make(chan string, 8)}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go Loop(ctx, sigC, rec, 2*time.Second)
	for _, s := range []syscall.Signal{syscall.SIGTERM, syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGTERM} {
		sigC <- s
	}
	want := []string{"stop after 2s", "restart signal HUP", "stop", "stop now", "stop now"}
	got := rec.next(t, len(want))
	if !slices.Equal(got, want) {
		t.Fatalf("requests %q, want %q", got, want)
	}
}
