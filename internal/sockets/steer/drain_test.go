package steer

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// drainFixture is a group whose generation 1 was just switched away from,
// for generation 2, and an observer watching generation 1 drain.
type drainFixture struct {
	g     *Group
	socks map[int]*os.File
	polls chan struct{}
	done  chan error
	first chan Backlog // what the first reading found, if anything
}

// newDrainFixture makes a fixture whose observer looks for the watched
// sockets one by one; newDrainFixtureWalking's walks the table each time.
func newDrainFixture(t *testing.T, deferAccept bool, before func(*Group)) *drainFixture {
	t.Helper()
	return newDrainFixtureLooking(t, deferAccept, before, drainLookMax)
}

func newDrainFixtureWalking(t *testing.T, deferAccept bool, before func(*Group)) *drainFixture {
	t.Helper()
	return newDrainFixtureLooking(t, deferAccept, before, 0)
}

func newDrainFixtureLooking(t *testing.T, deferAccept bool, before func(*Group), lookMax int) *drainFixture {
	t.Helper()
	orig := listen(t, "127.0.0.1:0", true)
	if deferAccept {
		// A client that connected and sent nothing stays a handshake
		// in progress: a slow client, held as long as needed.
		if err := unix.SetsockoptInt(int(orig.Fd()), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 30); err != nil {
			t.Fatal(err)
		}
	}
	g, err := New(orig, Options{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	o, err := NewObserver()
	if errors.Is(err, ErrUnobservable) {
		t.Skipf("no socket diagnostics here: %v", err)
	} else if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close() })
	f := &drainFixture{g: g, socks: map[int]*os.File{}, polls: make(chan struct{}, 1), done: make(chan error, 1), first: make(chan Backlog, 1)}
	take(t, g, 1, f.socks)
	take(t, g, 2, f.socks)
	if before != nil {
		before(g)
	}
	if err := g.Switch(2); err != nil {
		t.Fatal(err)
	}
	o.lookMax = lookMax
	o.polled = func() {
		select {
		case f.polls <- struct{}{}:
		default:
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	go func() { f.done <- o.WaitDrained(ctx, []*Group{g}, 1, func(b Backlog) { f.first <- b }) }()
	return f
}

// looked waits until the observer has read the sockets n more times
// (spanning more than drainQuiet), and fails if it has returned.
func (f *drainFixture) looked(t *testing.T, why string) {
	t.Helper()
	for i := 0; i < 2*int(drainQuiet/drainPoll)+2; i++ {
		select {
		case <-f.polls:
		case err := <-f.done:
			t.Fatalf("the drain ended (%v) %s", err, why)
		case <-time.After(10 * time.Second):
			t.Fatal("the observer stopped looking")
		}
	}
	select {
	case err := <-f.done:
		t.Fatalf("the drain ended (%v) %s", err, why)
	default:
	}
}

func (f *drainFixture) ends(t *testing.T) {
	t.Helper()
	select {
	case err := <-f.done:
		if err != nil {
			t.Fatalf("the drain ended with %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the drain never ended")
	}
}

func acceptOne(t *testing.T, f *os.File) {
	t.Helper()
	nfd, _, err := unix.Accept4(int(f.Fd()), unix.SOCK_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(nfd)
}

func TestWaitDrainedWaitsForTheAcceptQueue(t *testing.T) {
	f := newDrainFixture(t, false, func(g *Group) { dialTo(t, g, "127.0.0.1", nil) })
	if n, err := f.g.Queued(1); err != nil || n != 1 {
		t.Fatalf("generation 1's queue: %d, %v; want 1", n, err)
	}
	f.looked(t, "with a connection in generation 1's queue")
	if b := <-f.first; b != (Backlog{Queued: 1}) {
		t.Errorf("first reading %+v, want one connection queued", b)
	}
	acceptOne(t, f.socks[1])
	f.ends(t)
}

func TestWaitDrainedWaitsForAHandshakeBegunBeforeTheSwitch(t *testing.T) {
	eachLook(t, func(t *testing.T, newFixture fixtureMaker) {
		var slow interface{ Write([]byte) (int, error) }
		f := newFixture(t, true, func(g *Group) { slow = dialTo(t, g, "127.0.0.1", nil) })
		f.looked(t, "with a handshake towards generation 1 in progress")
		if b := <-f.first; b != (Backlog{Handshakes: 1}) {
			t.Errorf("first reading %+v, want one handshake", b)
		}
		if _, err := slow.Write([]byte("GET / HTTP/1.0\r\n\r\n")); err != nil {
			t.Fatal(err)
		}
		// Complete, it waits in generation 1's queue: still not drained.
		f.looked(t, "with the completed connection in generation 1's queue")
		acceptOne(t, f.socks[1])
		f.ends(t)
	})
}

// acceptKept accepts one connection on f and returns its descriptor,
// closed at the end of the test.
func acceptKept(t *testing.T, f *os.File) int {
	t.Helper()
	nfd, _, err := unix.Accept4(int(f.Fd()), unix.SOCK_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(nfd) })
	return nfd
}

func TestWaitDrainedWaitsForTheOldGenerationToReadWhatItAccepted(t *testing.T) {
	eachLook(t, func(t *testing.T, newFixture fixtureMaker) {
		request := []byte("GET / HTTP/1.0\r\n\r\n")
		var server int
		f := newFixture(t, false, func(g *Group) {
			if _, err := dialTo(t, g, "127.0.0.1", nil).Write(request); err != nil {
				t.Fatal(err)
			}
			server = acceptKept(t, f1(t, g))
		})
		// Accepted, its request unread: a server stopped now could drop it.
		f.looked(t, "with generation 1's accepted request unread")
		if b := <-f.first; b != (Backlog{Unread: 1}) {
			t.Errorf("first reading %+v, want one connection unread", b)
		}
		if n, err := unix.Read(server, make([]byte, 2*len(request))); err != nil || n != len(request) {
			t.Fatalf("reading the request: %d, %v", n, err)
		}
		f.ends(t)
	})
}

func TestWaitDrainedWaitsForTheFirstBytesOfAConnection(t *testing.T) {
	f := newDrainFixture(t, false, func(g *Group) {
		dialTo(t, g, "127.0.0.1", nil) // sends nothing yet
		acceptKept(t, f1(t, g))
	})
	if b := <-f.first; b != (Backlog{Unread: 1}) {
		t.Errorf("first reading %+v, want one connection unread", b)
	}
	// Its client never sends: the drain ends drainFirstByte after the
	// connection was made.
	f.ends(t)
}

// f1 is generation 1's socket in g.
func f1(t *testing.T, g *Group) *os.File {
	t.Helper()
	g.mu.Lock()
	defer g.mu.Unlock()
	m := g.copyLocked(1, 0)
	if m == nil {
		t.Fatal("generation 1 has no socket")
	}
	return m.file
}

type fixtureMaker func(t *testing.T, deferAccept bool, before func(*Group)) *drainFixture

// eachLook runs test with an observer that looks for the watched sockets
// one by one, and with one that walks the table each time.
func eachLook(t *testing.T, test func(*testing.T, fixtureMaker)) {
	t.Run("lookup", func(t *testing.T) { test(t, newDrainFixture) })
	t.Run("walk", func(t *testing.T) { test(t, newDrainFixtureWalking) })
}

func TestWaitDrainedIgnoresTheNewGenerationsConnections(t *testing.T) {
	f := newDrainFixture(t, false, nil)
	for range 3 {
		dialTo(t, f.g, "127.0.0.1", nil) // to generation 2, never accepted
	}
	if n, err := f.g.Queued(2); err != nil || n != 3 {
		t.Fatalf("generation 2's queue: %d, %v; want 3", n, err)
	}
	f.ends(t)
	select {
	case b := <-f.first:
		t.Errorf("the first reading found %+v on its way to generation 1, want nothing", b)
	default:
	}
}

func TestWaitDrainedEndsWithItsContext(t *testing.T) {
	orig := listen(t, "127.0.0.1:0", true)
	g, err := New(orig, Options{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	o, err := NewObserver()
	if err != nil {
		t.Skipf("no socket diagnostics here: %v", err)
	}
	defer o.Close()
	socks := map[int]*os.File{}
	take(t, g, 1, socks)
	take(t, g, 2, socks)
	dialTo(t, g, "127.0.0.1", nil)
	if err := g.Switch(2); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := o.WaitDrained(ctx, []*Group{g}, 1, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("WaitDrained after its context ended: %v", err)
	}
}
