// Package unixpath decides which process owns the path of a unix socket:
// a lock on PATH.lock, held for the owner's life, and the removal of a
// socket file that a process that is gone left behind. relay's unix
// listeners and its control socket both use it, so two relays on one path
// never remove each other's socket.
package unixpath

import (
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// ErrLocked is returned by Lock when another process holds the lock.
var ErrLocked = errors.New("locked by another process")

// Lock takes an exclusive, non-blocking flock on path, creating it (0600,
// never through a symlink) if needed. The lock lasts until the file is
// closed or the process exits.
func Lock(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening lock file: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if errors.Is(err, unix.EWOULDBLOCK) {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, ErrLocked)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	return f, nil
}

// ErrLive is returned by RemoveStale for a socket something listens on.
var ErrLive = errors.New("a live process listens on it")

// RemoveStale removes the unix socket at path if nothing listens on it any
// more. A missing path is fine; a live socket (ErrLive) or a file that is
// not a socket is an error and is left alone.
func RemoveStale(path string) error {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); errors.Is(err, unix.ENOENT) {
		return nil
	} else if err != nil {
		return fmt.Errorf("checking existing path %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("%s exists and is not a socket; remove it or choose another path", path)
	}
	c, err := net.Dial("unix", path)
	if err == nil {
		c.Close()
		return fmt.Errorf("%s: %w", path, ErrLive)
	}
	if !errors.Is(err, unix.ECONNREFUSED) {
		return fmt.Errorf("probing existing socket %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("removing stale socket %s: %w", path, err)
	}
	return nil
}

// MaxLen is the longest path a unix socket address holds: sun_path is 108
// bytes, and the kernel wants a NUL at the end of a path that fills it.
const MaxLen = len(unix.RawSockaddrUnix{}.Path) - 1

// CheckLen refuses a socket path longer than MaxLen bytes, which bind(2)
// and connect(2) would refuse with a bare "invalid argument". Check it
// before anything is created for the path, such as its lock file.
func CheckLen(path string) error {
	if len(path) > MaxLen {
		return fmt.Errorf("the socket path is %d bytes, longer than the %d a unix socket address holds; choose a shorter path", len(path), MaxLen)
	}
	return nil
}
