package unixpath

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
