package health

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// notifyClient is the child's end: datagrams to path.
func notifyClient(t *testing.T, path string) func(string) {
	t.Helper()
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return func(msg string) {
		t.Helper()
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatalf("sending %q: %v", msg, err)
		}
	}
}

func expectMsg(t *testing.T, got <-chan NotifyMessage, want string) {
	t.Helper()
	select {
	case m := <-got:
		if m.Raw != want {
			t.Errorf("got %q, want %q", m.Raw, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%q never came", want)
	}
}

func expectNone(t *testing.T, got <-chan NotifyMessage, when string) {
	t.Helper()
	select {
	case m := <-got:
		t.Errorf("%q was read %s", m.Raw, when)
	case <-time.After(100 * time.Millisecond):
	}
}

// A datagram sent while paused waits in the socket: it is read after
// Resume, or by the NotifySocket adopted from a copy of the fd, as in the
// next image, with the same path and READY=1 remembered.
func TestNotifyPauseResumeAdopt(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gen-1.notify")
	got := make(chan NotifyMessage, 16)
	n, err := ListenNotify(path, func(m NotifyMessage) { got <- m })
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	send := notifyClient(t, path)
	send("STATUS=starting")
	expectMsg(t, got, "STATUS=starting")

	n.Pause()
	select {
	case <-n.doneC:
	default:
		t.Fatal("the reader still runs after Pause")
	}
	send("READY=1")
	expectNone(t, got, "while paused")
	if isClosed(n.Ready()) {
		t.Error("Ready while the READY=1 waits in the socket")
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("the socket's path after Pause: %v", err)
	}
	n.Resume()
	expectMsg(t, got, "READY=1")
	if !isClosed(n.Ready()) {
		t.Error("not Ready after READY=1")
	}

	n.Pause()
	send("STATUS=handed over")
	saved, err := n.Save()
	if err != nil {
		t.Fatal(err)
	}
	if saved.Path != path || !saved.Ready || saved.FD < 0 {
		t.Fatalf("Save: %+v, want %s, ready", saved, path)
	}
	// As across the exec: a copy without close-on-exec, named in JSON.
	if saved.FD, err = unix.Dup(saved.FD); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(saved)
	var back SavedNotify
	if err := json.Unmarshal(b, &back); err != nil || back != saved {
		t.Fatalf("SavedNotify through JSON (%s): %+v, %v", b, back, err)
	}
	got2 := make(chan NotifyMessage, 16)
	a, err := AdoptNotify(back, func(m NotifyMessage) { got2 <- m })
	if err != nil {
		t.Fatal(err)
	}
	expectMsg(t, got2, "STATUS=handed over")
	send("STATUS=new image")
	expectMsg(t, got2, "STATUS=new image")
	expectNone(t, got, "by the paused socket")
	if a.Path != path || !isClosed(a.Ready()) {
		t.Errorf("adopted: path %s, ready %v; want %s, ready", a.Path, isClosed(a.Ready()), path)
	}
	// The fd that crossed stays open at its number, close-on-exec, and
	// is the one the next handoff names.
	if fl, err := unix.FcntlInt(uintptr(back.FD), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
		t.Errorf("the adopted fd's flags: %#x, %v; want open, close-on-exec", fl, err)
	}
	a.Pause()
	if again, err := a.Save(); err != nil || again != back {
		t.Errorf("Save of the adopted socket: %+v, %v; want %+v", again, err, back)
	}
	a.Resume()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("the path after Close: %v, want it removed", err)
	}
}

// AdoptNotify refuses a socket bound elsewhere, and leaves its fd open, for
// the return to the earlier image.
func TestAdoptNotifyRefusesAnotherSocket(t *testing.T) {
	dir := t.TempDir()
	n, err := ListenNotify(filepath.Join(dir, "gen-1.notify"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	n.Pause()
	saved, err := n.Save()
	if err != nil {
		t.Fatal(err)
	}
	saved.Path = filepath.Join(dir, "gen-2.notify")
	if _, err := AdoptNotify(saved, nil); err == nil {
		t.Fatal("AdoptNotify of a socket bound to another path succeeded")
	}
	if _, err := unix.FcntlInt(uintptr(saved.FD), unix.F_GETFD, 0); err != nil {
		t.Errorf("the refused fd was closed: %v", err)
	}
	if _, err := AdoptNotify(SavedNotify{Path: saved.Path, FD: -1}, nil); err == nil {
		t.Error("AdoptNotify of fd -1 succeeded")
	}
}
