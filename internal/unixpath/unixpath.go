// Package unixpath decides which process owns the path of a unix socket:
// a lock on PATH.lock, held for the owner's life (Unlock removes the file
// at its end), and the removal of a socket file that a process that is
// gone left behind. relay's unix listeners and its control socket both use
// it, so two relays on one path never remove each other's socket.
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

// The lock is the flock on the file linked at PATH.lock, and nothing
// else: a process holds it only while it holds the flock on the very
// inode the path names. Unlock removes the file, so that nothing is left
// behind once relay exits; it unlinks the path while it still holds the
// flock, and only then closes the file, which releases it. That order is
// not enough on its own: another process may have opened the old file
// just before the unlink and take the flock on it just after the close,
// on an inode no path names any more, while a third creates a new
// PATH.lock and locks that: two holders. So Lock, once it has the flock,
// checks that the path still names the file it locked (device and inode),
// and if not, lets it go and starts again. As only a holder unlinks the
// path, a file that is still linked after the flock stays linked for as
// long as the flock is held. (A lock file removed by hand under a live
// relay, or a relay older than this check, can still be fooled; the
// socket's own liveness check, RemoveStale, is the second guard.)

// lockAttempts bounds Lock's retries when the file it locked was unlinked
// meanwhile: each is one holder letting go, so a few are plenty.
const lockAttempts = 100

// Lock takes an exclusive, non-blocking flock on path, creating it (0600,
// never through a symlink) if needed. The lock lasts until the file is
// closed or the process exits; Unlock also removes the file.
func Lock(path string) (*os.File, error) {
	for range lockAttempts {
		f, err := lockOnce(path)
		if err != nil || f != nil {
			return f, err
		}
	}
	return nil, fmt.Errorf("locking %s: the file was replaced %d times while relay locked it; try again", path, lockAttempts)
}

// afterOpen runs between lockOnce's open and its flock: a test's way in
// to the race that Lock guards against.
var afterOpen = func() {}

// lockOnce is one attempt of Lock: nil and no error if the file it locked
// is no longer the one at path.
func lockOnce(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening lock file: %w", err)
	}
	afterOpen()
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
	var locked, linked unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &locked); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	err = unix.Lstat(path, &linked)
	if errors.Is(err, unix.ENOENT) || err == nil && (linked.Dev != locked.Dev || linked.Ino != locked.Ino) {
		f.Close() // its holder unlinked it: lock the one at path now
		return nil, nil
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	return f, nil
}

// Unlock removes the lock file at path, if it is still the file f that
// Lock returned for path, and then closes f, which releases the lock: in
// that order, so that the file is never removed once another process may
// hold it (see Lock). A second Unlock of f does nothing.
func Unlock(f *os.File, path string) error {
	var locked, linked unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &locked); err != nil {
		return f.Close() // closed already
	}
	var rmErr error
	if unix.Lstat(path, &linked) == nil && linked.Dev == locked.Dev && linked.Ino == locked.Ino {
		if err := unix.Unlink(path); err != nil && !errors.Is(err, unix.ENOENT) {
			rmErr = fmt.Errorf("removing lock file %s: %w", path, err)
		}
	}
	if err := f.Close(); err != nil && rmErr == nil {
		return err
	}
	return rmErr
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
