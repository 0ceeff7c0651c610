package takeover

import (
	"fmt"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// A Notifier crosses relay's exec of its next image (relay upgrade) as its
// fd: Pause stops Serve with the fd left open, Save says what the next
// image needs, and Adopt, there, makes the Notifier again. The child tree's
// binds and listens that come meanwhile wait in the kernel for an answer.

// SavedNotifier is what Adopt needs to serve a Notifier's child tree in
// relay's next image.
type SavedNotifier struct {
	// FD is the notification fd's number; it must cross the exec.
	FD         int  `json:"fd"`
	Killable   bool `json:"killable"`
	NoNewPrivs bool `json:"no_new_privs"`
}

// Pause stops Serve without closing the notification fd: a Serve that
// handles a notification answers it first, then returns nil; one waiting
// for the next returns nil at once, and so does a Serve called later, until
// Resume. Notifications that come meanwhile wait in the kernel, their
// callers blocked, for the next Serve, in this image or the next (Adopt).
//
// Pause returns once no Serve runs. It must not be called from Config's
// Claim or Event, which run on Serve's goroutine.
func (n *Notifier) Pause() {
	n.pauseMu.Lock()
	n.paused.Store(true)
	// Wakes a wait in the poller: it fails with os.ErrDeadlineExceeded,
	// which next takes for the pause. A wait that starts later fails at
	// once. An error means the file is closed: Serve is ending anyway.
	n.file.SetReadDeadline(time.Now())
	n.pauseMu.Unlock()
	n.serving.Lock() // waits for Serve to return
	n.serving.Unlock()
}

// Resume undoes Pause, after a failed exec: Serve may be called again.
func (n *Notifier) Resume() {
	n.pauseMu.Lock()
	defer n.pauseMu.Unlock()
	// The deadline goes first: a wait that fails for it once paused is
	// false again waits anew.
	n.file.SetReadDeadline(time.Time{})
	n.paused.Store(false)
}

// Paused reports whether Pause was called and Resume not since: a Serve
// that returned nil then returned for the pause, not because the child
// tree exited.
func (n *Notifier) Paused() bool { return n.paused.Load() }

// Save returns what Adopt needs in relay's next image. The fd stays the
// Notifier's: the caller makes it cross the exec (clears its close-on-exec
// flag) and Close closes it.
func (n *Notifier) Save() (SavedNotifier, error) {
	s := SavedNotifier{FD: -1, Killable: n.Killable, NoNewPrivs: n.NoNewPrivs}
	if err := n.rc.Control(func(fd uintptr) { s.FD = int(fd) }); err != nil {
		return SavedNotifier{}, fmt.Errorf("saving the notification fd: %w", err)
	}
	return s, nil
}

// Adopt is the Notifier whose fd crossed relay's exec, as Save described
// it. It takes the fd, at its number, and sets its close-on-exec flag
// again, so that no child inherits it; Close closes it. If Adopt fails, the
// fd is left open, for the return to the earlier image.
func Adopt(s SavedNotifier) (*Notifier, error) {
	if s.FD < 0 {
		return nil, fmt.Errorf("adopting the notification fd: %d is not an fd", s.FD)
	}
	if err := isNotifyFD(s.FD); err != nil {
		return nil, fmt.Errorf("adopting the notification fd %d: %w", s.FD, err)
	}
	if _, err := unix.FcntlInt(uintptr(s.FD), unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
		return nil, fmt.Errorf("adopting the notification fd %d: setting close-on-exec: %w", s.FD, err)
	}
	var flags []string
	if s.Killable {
		flags = append(flags, flagKillable)
	}
	if s.NoNewPrivs {
		flags = append(flags, flagNoNewPriv)
	}
	n, err := wrapNotifier(s.FD, flags)
	if err != nil {
		return nil, fmt.Errorf("adopting the notification fd %d: %w", s.FD, err)
	}
	return n, nil
}

// notifyLink is what /proc/self/fd/N links to for a seccomp listener.
const notifyLink = "anon_inode:seccomp notify"

// isNotifyFD refuses an fd that is not a seccomp notification listener.
func isNotifyFD(fd int) error {
	link, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return fmt.Errorf("looking at it: %w", err)
	}
	if link != notifyLink {
		return fmt.Errorf("it is %s, not a seccomp notification listener", link)
	}
	return nil
}
