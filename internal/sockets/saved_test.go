package sockets

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockets/steer/steertest"
	"github.com/relaysh/relay/internal/unixpath"
)

// crossed returns saved with every fd in fds replaced by a duplicate, as
// if it had crossed an exec (through JSON): the same sockets and lock
// under other numbers, so that the set that saved it keeps its own open.
func crossed(t *testing.T, saved Saved, fds []int) Saved {
	t.Helper()
	to := map[int]int{-1: -1}
	for _, fd := range fds {
		if _, dup := to[fd]; dup {
			t.Fatalf("Save names fd %d twice", fd)
		}
		nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 3)
		if err != nil {
			t.Fatal(err)
		}
		to[fd] = nfd
	}
	b, err := json.Marshal(saved)
	if err != nil {
		t.Fatal(err)
	}
	var out Saved
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	remap := func(fd *int) {
		nfd, ok := to[*fd]
		if !ok {
			t.Fatalf("fd %d is not among those Save says must cross", *fd)
		}
		*fd = nfd
	}
	for i := range out.Listeners {
		l := &out.Listeners[i]
		remap(&l.FD)
		remap(&l.LockFD)
		if g := l.Group; g != nil {
			for j := range g.Members {
				remap(&g.Members[j].FD)
			}
			for j := range g.Evicted {
				remap(&g.Evicted[j].FD)
			}
		}
	}
	return out
}

// restoreSet restores what set saves, crossed. closeSet closes it, once;
// the test's end does if it has not.
func restoreSet(t *testing.T, set *Set) (r *Set, closeSet func() error) {
	t.Helper()
	saved, fds, err := set.Save()
	if err != nil {
		t.Fatal(err)
	}
	r, err = Restore(crossed(t, saved, fds), Options{})
	if err != nil {
		t.Fatal(err)
	}
	closeSet = sync.OnceValue(r.Close)
	t.Cleanup(func() { closeSet() })
	return r, closeSet
}

func fileInode(t *testing.T, f *os.File) uint64 {
	t.Helper()
	fd, err := fileFD(f)
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func fileFlags(t *testing.T, f *os.File) int {
	t.Helper()
	fd, err := fileFD(f)
	if err != nil {
		t.Fatal(err)
	}
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fl
}

// acceptsOn checks that a connection to the TCP listener's port is
// queued on socket f.
func acceptsOn(t *testing.T, tcp uint16, f *os.File, line string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", tcp), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := fmt.Fprintln(c, line); err != nil {
		t.Fatal(err)
	}
	fd, err := fileFD(f)
	if err != nil {
		t.Fatal(err)
	}
	if got := steertest.AcceptLine(t, fd); got != line {
		t.Fatalf("accepted %q, want %q", got, line)
	}
}

// A restored set is the saved one: the same sockets, holders and
// addresses, and the same flags on each; a new generation takes and
// switches on it, and its Close removes the unix socket it would have.
func TestSaveRestore(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.sock")
	set := openSet(t, SteerAuto, "127.0.0.1:0", "udp:127.0.0.1:0", "unix:"+path)
	if !set.Steered() {
		t.Skip("steering unavailable here")
	}
	gen1, err := set.Take(1, 0)
	if err != nil {
		t.Fatal(err)
	}
	// A bind takeover may have made generation 1's sockets non-blocking.
	for _, f := range gen1[:2] {
		fd, _ := fileFD(f)
		if err := unix.SetNonblock(fd, true); err != nil {
			t.Fatal(err)
		}
	}
	flags := make([]int, len(gen1))
	for i, f := range gen1 {
		flags[i] = fileFlags(t, f)
	}
	info := set.Info()

	r, closeSet := restoreSet(t, set)
	if got := r.Info(); !reflect.DeepEqual(got, info) {
		t.Fatalf("Info after the restore:\n%+v\nwant\n%+v", got, info)
	}
	if r.Migrates() != set.Migrates() || r.DrainObservable() != set.DrainObservable() {
		t.Fatal("the restored set migrates or observes otherwise")
	}
	held, err := r.Held(1, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := range gen1 {
		if fileInode(t, held[i]) != fileInode(t, gen1[i]) {
			t.Fatalf("Held(1)[%d] is not the socket generation 1 took", i)
		}
		if got := fileFlags(t, held[i]); got != flags[i] {
			t.Fatalf("socket %d's flags: %#x, were %#x", i, got, flags[i])
		}
	}
	if _, err := r.Held(2, 0); err == nil {
		t.Fatal("Held of a generation that took nothing")
	}
	tcp := port(t, r, 0)
	acceptsOn(t, tcp, held[0], "to generation 1")

	gen2, err := r.Take(2, 0)
	if err != nil {
		t.Fatal(err)
	}
	// TCP and UDP steered (a socket of its own each), unix shared.
	if fileInode(t, gen2[0]) == fileInode(t, gen1[0]) || fileInode(t, gen2[1]) == fileInode(t, gen1[1]) || gen2[2] != held[2] {
		t.Fatal("generation 2 did not get sockets of its own on the TCP and UDP listeners and the shared unix one")
	}
	if err := r.Switch(2, 1); err != nil {
		t.Fatal(err)
	}
	acceptsOn(t, tcp, gen2[0], "to generation 2")
	r.Release(1)

	set.entries[2].Listener.lock.Close() // the restored set's copy holds it
	if _, err := unixpath.Lock(path + ".lock"); !errors.Is(err, unixpath.ErrLocked) {
		t.Fatalf("the lock of %s did not cross: %v", path, err)
	}
	if err := closeSet(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("the restored set's Close left %s: %v", path, err)
	}
	lock, err := unixpath.Lock(path + ".lock")
	if err != nil {
		t.Fatalf("the restored set's Close kept the lock of %s: %v", path, err)
	}
	lock.Close()
}

// A steered listener whose socket has left its group crosses without it.
func TestSaveRestoreWithoutTheOriginal(t *testing.T) {
	set := openSet(t, SteerAuto, "127.0.0.1:0")
	if !set.Steered() {
		t.Skip("steering unavailable here")
	}
	for gen := 1; gen <= 2; gen++ {
		if _, err := set.Take(gen, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := set.Switch(2, 1); err != nil {
		t.Fatal(err)
	}
	set.Release(1) // the original socket leaves the group
	saved, _, err := set.Save()
	if err != nil {
		t.Fatal(err)
	}
	if saved.Listeners[0].FD != -1 {
		t.Fatalf("the listener's retired socket is saved as fd %d", saved.Listeners[0].FD)
	}
	r, closeSet := restoreSet(t, set)
	held, err := r.Held(2, 0)
	if err != nil {
		t.Fatal(err)
	}
	acceptsOn(t, port(t, r, 0), held[0], "to generation 2")
	if err := closeSet(); err != nil {
		t.Fatal(err)
	}
}

// Restore refuses a document whose fds are not what it says, and leaves
// them open.
func TestRestoreRefuses(t *testing.T) {
	set := openSet(t, SteerAuto, "127.0.0.1:0", "udp:127.0.0.1:0")
	saved, fds, err := set.Save()
	if err != nil {
		t.Fatal(err)
	}
	swapped := crossed(t, saved, fds)
	tcpDup, err := unix.FcntlInt(uintptr(swapped.Listeners[0].FD), unix.F_DUPFD_CLOEXEC, 3)
	if err != nil {
		t.Fatal(err)
	}
	swapped.Listeners[1].FD, swapped.Listeners[1].Addr = tcpDup, swapped.Listeners[0].Addr
	twice := crossed(t, saved, fds)
	twice.Listeners = append(twice.Listeners, twice.Listeners[1])
	moved := crossed(t, saved, fds)
	moved.Listeners[1].Addr = "127.0.0.1:1"
	for name, bad := range map[string]Saved{"a TCP socket as UDP": swapped, "one fd twice": twice, "another address": moved} {
		if _, err := Restore(bad, Options{}); err == nil {
			t.Errorf("%s: restored", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
		for _, l := range bad.Listeners {
			if _, err := unix.FcntlInt(uintptr(l.FD), unix.F_GETFD, 0); err != nil {
				t.Fatalf("%s: fd %d closed: %v", name, l.FD, err)
			}
		}
	}
}
