package takeover

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Pause while Serve waits in Go's poller ends Serve with nil and leaves
// the fd open; a Serve called while paused returns at once; after Resume,
// Serve waits again, until Close.
func TestPauseWakesServeAndKeepsTheFD(t *testing.T) {
	n, fd := pipeNotifier(t)
	defer n.Close()
	served := make(chan error, 1)
	go func() { served <- n.Serve(Config{}) }()
	waitParkedIn(t, "(*Notifier).next")
	n.Pause()
	servedNil(t, served, "after Pause")
	if !n.Paused() {
		t.Error("Paused is false after Pause")
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
		t.Fatalf("the fd is gone after Pause: %v", err)
	}
	s, err := n.Save()
	if err != nil || s.FD != fd {
		t.Fatalf("Save: %+v, %v; want fd %d", s, err, fd)
	}
	go func() { served <- n.Serve(Config{}) }()
	servedNil(t, served, "called while paused")

	n.Resume()
	if n.Paused() {
		t.Error("Paused is true after Resume")
	}
	// Waiting in the poller again, not returned at once as when paused.
	go func() { served <- n.Serve(Config{}) }()
	waitParkedIn(t, "(*Notifier).next")
	n.Close()
	servedNil(t, served, "after Close")
}

// gatedChild is a binder under the filter whose binds of relay's socket
// each wait for the test in Claim.
type gatedChild struct {
	nt      *Notifier
	claims  chan Bind     // a bind waits in Claim
	release chan struct{} // one send lets it through
	results chan result
	done    chan error // the binder's exit
	stderr  *strings.Builder
}

func startGated(t *testing.T, specs ...string) *gatedChild {
	t.Helper()
	c := &gatedChild{claims: make(chan Bind), release: make(chan struct{}),
		results: make(chan result, len(specs)), done: make(chan error, 1), stderr: new(strings.Builder)}
	cmd, out, nt := startShim(t, c.stderr, specs...)
	c.nt = nt
	t.Cleanup(func() { cmd.Process.Kill(); <-c.done })
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var res result
			if json.Unmarshal(sc.Bytes(), &res) == nil {
				c.results <- res
			}
		}
		c.done <- cmd.Wait()
	}()
	return c
}

func (c *gatedChild) config(sock *os.File, events chan<- Event) Config {
	return Config{
		Sockets: []*os.File{sock},
		Claim: func(b Bind) Decision {
			c.claims <- b
			<-c.release
			return Decision{Socket: 0, Own: true}
		},
		Event: func(e Event) { events <- e },
	}
}

// serve runs n.Serve in a goroutine.
func serve(n *Notifier, cfg Config) <-chan error {
	served := make(chan error, 1)
	go func() { served <- n.Serve(cfg) }()
	return served
}

func (c *gatedChild) waitClaim(t *testing.T) {
	t.Helper()
	select {
	case <-c.claims:
	case <-time.After(10 * time.Second):
		t.Fatalf("no bind reached Claim (stderr: %s)", c.stderr.String())
	}
}

// pauseDuringClaim pauses n while a bind waits in Claim, lets the bind
// through, and waits for Serve's nil: the bind is answered first.
func (c *gatedChild) pauseDuringClaim(t *testing.T, n *Notifier, served <-chan error) {
	t.Helper()
	paused := make(chan struct{})
	go func() { n.Pause(); close(paused) }()
	for !n.Paused() {
		time.Sleep(time.Millisecond)
	}
	c.release <- struct{}{}
	servedNil(t, served, "after Pause")
	<-paused
}

func (c *gatedChild) result(t *testing.T, ino uint64) {
	t.Helper()
	select {
	case res := <-c.results:
		if res.Errno != 0 || res.Ino != ino {
			t.Errorf("%s: %+v, want relay's socket (inode %d)", res.Spec, res, ino)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the child reported no bind (stderr: %s)", c.stderr.String())
	}
}

// noResult checks that the child is still held in its call.
func (c *gatedChild) noResult(t *testing.T, what string) {
	t.Helper()
	select {
	case res := <-c.results:
		t.Errorf("%s returned while relay was paused: %+v", what, res)
	case <-time.After(100 * time.Millisecond):
	}
}

// A real child tree: Pause answers the bind in hand and stops Serve; the
// child's next call (its listen, after which it reports the bind) waits,
// unanswered, with the fd open; a Serve after Resume answers it. Then,
// paused again, the fd's dup adopted as the next image would do serves the
// rest of the tree.
func TestPauseResumeAndAdoptServeARealChild(t *testing.T) {
	sock, port, ino := relaySock(t, 128)
	spec := fmt.Sprintf("tcp4 127.0.0.1:%d", port)
	c := startGated(t, spec, spec, spec)
	defer c.nt.Close()
	events := make(chan Event, 16)
	cfg := c.config(sock, events)

	served := serve(c.nt, cfg)
	c.waitClaim(t)
	c.pauseDuringClaim(t, c.nt, served)
	c.noResult(t, "the first listen")
	saved, err := c.nt.Save()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.FcntlInt(uintptr(saved.FD), unix.F_GETFD, 0); err != nil {
		t.Fatalf("the notification fd is gone after Pause: %v", err)
	}

	c.nt.Resume()
	served = serve(c.nt, cfg)
	c.waitClaim(t) // the second bind, after the listen was answered
	c.result(t, ino)
	c.pauseDuringClaim(t, c.nt, served)
	c.noResult(t, "the second listen")

	// As across the exec: the fd, without close-on-exec, named in JSON.
	if saved, err = c.nt.Save(); err != nil {
		t.Fatal(err)
	}
	dup, err := unix.Dup(saved.FD)
	if err != nil {
		t.Fatal(err)
	}
	saved.FD = dup
	b, _ := json.Marshal(saved)
	if !strings.Contains(string(b), `"no_new_privs"`) {
		t.Errorf("SavedNotifier as JSON: %s, want snake_case names", b)
	}
	var back SavedNotifier
	if err := json.Unmarshal(b, &back); err != nil || back != saved {
		t.Fatalf("SavedNotifier through JSON: %+v, %v; want %+v", back, err, saved)
	}
	adopted, err := Adopt(back)
	if err != nil {
		t.Fatal(err)
	}
	defer adopted.Close()
	if adopted.Killable != c.nt.Killable || adopted.NoNewPrivs != c.nt.NoNewPrivs {
		t.Errorf("adopted flags %v %v, want %v %v", adopted.Killable, adopted.NoNewPrivs, c.nt.Killable, c.nt.NoNewPrivs)
	}
	if fl, err := unix.FcntlInt(uintptr(dup), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
		t.Errorf("the adopted fd's flags: %#x, %v; want close-on-exec", fl, err)
	}
	served = serve(adopted, cfg)
	c.waitClaim(t)
	c.result(t, ino)
	c.release <- struct{}{}
	c.result(t, ino)
	select {
	case err := <-c.done:
		if err != nil {
			t.Fatalf("binder: %v (stderr: %s)", err, c.stderr.String())
		}
		c.done <- err // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("the binder did not exit")
	}
	servedNil(t, served, "after the child tree exited")
	close(events)
	var bound, listened int
	for e := range events {
		switch e.Kind {
		case Bound:
			bound++
		case Listened:
			listened++
		default:
			t.Errorf("unexpected event %+v", e)
		}
	}
	if bound != 3 || listened != 3 {
		t.Errorf("events: %d bound, %d listened; want 3 and 3", bound, listened)
	}
}

// Adopt refuses an fd that is no seccomp listener, and leaves it open,
// for the return to the earlier image.
func TestAdoptRefusesAnotherFD(t *testing.T) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	if _, err := Adopt(SavedNotifier{FD: p[0]}); err == nil || !strings.Contains(err.Error(), "not a seccomp notification listener") {
		t.Errorf("Adopt of a pipe: %v, want a refusal", err)
	}
	if _, err := unix.FcntlInt(uintptr(p[0]), unix.F_GETFD, 0); err != nil {
		t.Errorf("Adopt closed the fd it refused: %v", err)
	}
	if _, err := Adopt(SavedNotifier{FD: -1}); err == nil {
		t.Error("Adopt of fd -1 succeeded")
	}
}
