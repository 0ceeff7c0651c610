package unixpath

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.sock.lock")
	first, err := Lock(path)
	if err != nil {
		t.Fatal(err)
	}
	if second, err := Lock(path); !errors.Is(err, ErrLocked) {
		if second != nil {
			second.Close()
		}
		t.Fatalf("a second lock: %v, want ErrLocked", err)
	}
	first.Close()
	again, err := Lock(path)
	if err != nil {
		t.Fatalf("the lock after the first was closed: %v", err)
	}
	again.Close()
}

// Unlock removes the lock file it locked, and only that file, before it
// lets the lock go; a second Unlock does nothing.
func TestUnlock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.sock.lock")
	f, err := Lock(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := Unlock(f, path); err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the lock file is still there after Unlock: %v", err)
	}
	if err := Unlock(f, path); !errors.Is(err, os.ErrClosed) {
		t.Errorf("a second Unlock: %v, want only os.ErrClosed", err)
	}

	// A file that replaced the locked one at the path (removed by hand
	// under the holder) is not the holder's to remove.
	f, err = Lock(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	other, err := Lock(path)
	if err != nil {
		t.Fatalf("a lock on the new file: %v", err)
	}
	defer other.Close()
	if err := Unlock(f, path); err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	if _, err := os.Lstat(path); err != nil {
		t.Errorf("Unlock removed a lock file another holder holds: %v", err)
	}
}

// The race Unlock's order leaves open: a relay opens the lock file just
// before its holder unlinks it, and takes the flock just after the holder
// lets go, on a file no path names. Lock sees that and locks the file at
// the path instead, so that a third relay cannot lock it as well.
func TestLockAfterTheHolderUnlinked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.sock.lock")
	holder, err := Lock(path)
	if err != nil {
		t.Fatal(err)
	}
	released := false
	afterOpen = func() {
		if !released {
			released = true
			if err := Unlock(holder, path); err != nil {
				t.Errorf("Unlock: %v", err)
			}
		}
	}
	defer func() { afterOpen = func() {} }()
	second, err := Lock(path)
	if err != nil {
		t.Fatalf("Lock while the holder let go: %v", err)
	}
	defer second.Close()
	if !released {
		t.Fatal("the holder never let go: the test did not run the race")
	}
	var locked, linked unix.Stat_t
	if err := unix.Fstat(int(second.Fd()), &locked); err != nil {
		t.Fatal(err)
	}
	if err := unix.Lstat(path, &linked); err != nil {
		t.Fatalf("no lock file at the path: %v", err)
	}
	if locked.Dev != linked.Dev || locked.Ino != linked.Ino {
		t.Errorf("Lock holds inode %d, while the path names %d: another relay could lock that one too", locked.Ino, linked.Ino)
	}
	if third, err := Lock(path); !errors.Is(err, ErrLocked) {
		if third != nil {
			third.Close()
		}
		t.Errorf("a third lock: %v, want ErrLocked", err)
	}
}

func TestRemoveStale(t *testing.T) {
	dir := t.TempDir()
	if err := RemoveStale(filepath.Join(dir, "missing.sock")); err != nil {
		t.Errorf("a missing path: %v", err)
	}

	live := filepath.Join(dir, "live.sock")
	l, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := RemoveStale(live); !errors.Is(err, ErrLive) {
		t.Errorf("a live socket: %v, want ErrLive", err)
	}

	stale := filepath.Join(dir, "stale.sock")
	sl, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	sl.SetUnlinkOnClose(false)
	sl.Close()
	if err := RemoveStale(stale); err != nil {
		t.Errorf("a stale socket: %v", err)
	}
	if _, err := os.Lstat(stale); err == nil {
		t.Errorf("the stale socket is still there")
	}

	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := RemoveStale(file); err == nil {
		t.Errorf("a plain file was taken for a stale socket")
	}
	if _, err := os.Stat(file); err != nil {
		t.Errorf("the plain file is gone: %v", err)
	}
}

// A path of MaxLen bytes binds; one byte more is refused by CheckLen, as
// the kernel would refuse it.
func TestCheckLen(t *testing.T) {
	dir := t.TempDir()
	fill := func(n int) string { return filepath.Join(dir, strings.Repeat("s", n-len(dir)-1)) }
	longest := fill(MaxLen)
	if err := CheckLen(longest); err != nil {
		t.Fatalf("CheckLen of %d bytes: %v", len(longest), err)
	}
	ln, err := net.Listen("unix", longest)
	if err != nil {
		t.Fatalf("binding %d bytes: %v", len(longest), err)
	}
	ln.Close()
	over := fill(MaxLen + 1)
	if err := CheckLen(over); err == nil || !strings.Contains(err.Error(), "choose a shorter path") {
		t.Errorf("CheckLen of %d bytes: %v, want an error that says to choose a shorter path", len(over), err)
	}
	if ln, err := net.Listen("unix", over); err == nil {
		ln.Close()
		t.Errorf("the kernel bound %d bytes: MaxLen is wrong", len(over))
	}
}
