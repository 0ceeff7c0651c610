package takeover

import (
	"bytes"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Close while Serve waits in Go's poller ends Serve with nil, as Close's
// doc says: the wait fails with "use of closed file" then, which is not
// os.ErrClosed, and relay logged it as an error at every generation's
// end.
func TestServeEndsWithoutErrorWhenClosedWhileWaiting(t *testing.T) {
	n, _ := pipeNotifier(t)
	served := make(chan error, 1)
	go func() { served <- n.Serve(Config{}) }()
	waitParkedIn(t, "(*Notifier).next")
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	servedNil(t, served, "after Close")
}

// pipeNotifier is a Notifier on the read end of a pipe, and that fd; the
// write end stays open until the test ends: it never hangs up, and
// nothing comes.
func pipeNotifier(t *testing.T) (*Notifier, int) {
	t.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(p[1]) })
	n, err := newNotifier(p[0], nil)
	if err != nil {
		t.Fatal(err)
	}
	return n, p[0]
}

// servedNil waits for Serve's result on served, at most 10s, and fails
// the test unless it is nil.
func servedNil(t *testing.T, served <-chan error, when string) {
	t.Helper()
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve %s: %v, want nil", when, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("Serve did not return %s", when)
	}
}

// waitParkedIn waits until a goroutine whose stack holds fn waits in Go's
// poller.
func waitParkedIn(t *testing.T, fn string) {
	t.Helper()
	buf := make([]byte, 1<<20)
	deadline := time.Now().Add(10 * time.Second)
	for {
		stacks := buf[:runtime.Stack(buf, true)]
		for _, g := range bytes.Split(stacks, []byte("\n\n")) {
			if bytes.Contains(g, []byte(fn)) && bytes.Contains(g, []byte("runtime_pollWait")) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no goroutine in %s waits in the poller:\n%s", fn, stacks)
		}
		time.Sleep(time.Millisecond)
	}
}
