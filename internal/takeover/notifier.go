package takeover

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Notifier is relay's end of one child tree's filter: every bind(2) and
// listen(2) of every process in that tree waits here for an answer.
type Notifier struct {
	file *os.File
	rc   syscall.RawConn
	// closed is set by Close before it closes file: a wait in the poller
	// that Close ends fails with "use of closed file", which is not
	// os.ErrClosed.
	closed atomic.Bool
	// paused is set by Pause and cleared by Resume (handoff.go), each
	// under pauseMu together with the read deadline that wakes Serve.
	paused  atomic.Bool
	pauseMu sync.Mutex
	// serving is held by Serve while it runs, so that Pause can wait
	// for it to return.
	serving sync.Mutex
	// Killable: the filter has WAIT_KILLABLE_RECV (Linux 5.19+).
	Killable bool
	// NoNewPrivs: the shim set no_new_privs for the child's tree.
	NoNewPrivs bool
}

// newNotifier is the Notifier of fd, which it closes on error.
func newNotifier(fd int, flags []string) (*Notifier, error) {
	n, err := wrapNotifier(fd, flags)
	if err != nil {
		unix.Close(fd)
	}
	return n, err
}

// wrapNotifier is the Notifier of fd, which it leaves open on error.
func wrapNotifier(fd int, flags []string) (*Notifier, error) {
	// Non-blocking, so that Go's poller waits for notifications and
	// Close wakes the reader; nothing else uses this fd.
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("setting up the notification fd: %w", err)
	}
	n := &Notifier{file: os.NewFile(uintptr(fd), "seccomp-notify")}
	rc, err := n.file.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("setting up the notification fd: %w", err)
	}
	n.rc = rc
	for _, f := range flags {
		switch f {
		case flagKillable:
			n.Killable = true
		case flagNoNewPriv:
			n.NoNewPrivs = true
		}
	}
	return n, nil
}

// Close stops Serve. Binds and listens of the child tree that come later
// fail with ENOSYS, so close it only once the generation is finished with.
func (n *Notifier) Close() error {
	n.closed.Store(true)
	return n.file.Close()
}

// next waits for the next notification. It returns false when every
// process of the child tree has exited (the listener hangs up), the
// Notifier was closed or it is paused.
func (n *Notifier) next(msg *notif) (bool, error) {
	for {
		var got, hup bool
		var rerr error
		err := n.rc.Read(func(fd uintptr) bool {
			revents, err := pollNow(int(fd))
			if err != nil {
				rerr = err
				return true
			}
			switch {
			case revents&unix.POLLIN != 0:
				rerr = recv(int(fd), msg)
				got = true
				return true
			case revents&(unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0:
				hup = true
				return true
			}
			return false // wait for the poller
		})
		switch {
		case err != nil && (errors.Is(err, os.ErrClosed) || n.closed.Load()):
			return false, nil
		case errors.Is(err, os.ErrDeadlineExceeded) && n.paused.Load():
			return false, nil
		case errors.Is(err, os.ErrDeadlineExceeded):
			continue // Resume came first and cleared the deadline
		case err != nil:
			return false, fmt.Errorf("waiting for the child's notifications: %w", err)
		case hup:
			return false, nil
		case got && errors.Is(rerr, unix.ENOENT):
			continue // interrupted before relay picked it up
		case rerr != nil:
			return false, fmt.Errorf("reading a notification: %w", rerr)
		case got:
			return true, nil
		}
	}
}

// pollNow reports fd's poll events without waiting.
func pollNow(fd int) (int16, error) {
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		_, err := unix.Poll(pfd, 0)
		if err == nil {
			return pfd[0].Revents, nil
		}
		if !errors.Is(err, unix.EINTR) {
			return 0, fmt.Errorf("polling the notification fd: %w", err)
		}
	}
}
