package health

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// maxNotifyMsg bounds one datagram; sd_notify messages are short.
const maxNotifyMsg = 4096

// NotifySocket is one generation's private sd_notify socket. The child
// finds it in NOTIFY_SOCKET. Because the path is private to one child, a
// READY=1 that arrives on it proves that this child, and not an older
// generation sharing the listeners, is ready.
type NotifySocket struct {
	Path string

	conn  *net.UnixConn
	onMsg func(NotifyMessage)
	// carried is the socket's fd that crossed relay's exec (AdoptNotify),
	// kept open at its number until Close; -1 for none.
	carried int
	readyC  chan struct{}
	once    sync.Once

	// mu orders Pause, Resume and Close, and guards paused and doneC,
	// which the current reading goroutine closes when it returns.
	mu     sync.Mutex
	paused bool
	doneC  chan struct{}
}

// NotifyMessage is one datagram from the child, split into assignments.
type NotifyMessage struct {
	Vars map[string]string
	Raw  string
}

// MakeNotifyDir creates the private (0700) directory for the children's
// notify sockets: under $XDG_RUNTIME_DIR when set, else $TMPDIR or /tmp,
// whichever first leaves room for a socket path (108 bytes on Linux) such
// as DIR/gen-N.notify. The caller removes it.
func MakeNotifyDir() (string, error) { return makeNotifyDir(false) }

// MakeSharedNotifyDir is MakeNotifyDir for children that run as another
// user (relay run --user): every directory above it must let others pass
// (o+x), and it is 0711 itself, so that the child reaches the socket relay
// gives to its user alone (NotifySocket.Chown) without listing the
// directory or reaching anything else in it.
func MakeSharedNotifyDir() (string, error) { return makeNotifyDir(true) }

func makeNotifyDir(shared bool) (string, error) {
	const room = len("/relay-0123456789/gen-0123456789.notify")
	var tried []string
	for _, base := range []string{os.Getenv("XDG_RUNTIME_DIR"), os.TempDir(), "/tmp"} {
		if st, err := os.Stat(base); base == "" || err != nil || !st.IsDir() {
			continue
		}
		if shared && !passable(base) {
			tried = append(tried, base+" (not every directory on the way lets other users pass)")
			continue
		}
		if len(base)+room >= len(unix.RawSockaddrUnix{}.Path) {
			tried = append(tried, base+" (path too long for a unix socket)")
			continue
		}
		dir, err := os.MkdirTemp(base, "relay-")
		if err != nil {
			tried = append(tried, fmt.Sprintf("%s (%v)", base, err))
			continue
		}
		if shared {
			if err := os.Chmod(dir, 0o711); err != nil {
				os.Remove(dir)
				return "", fmt.Errorf("creating relay's runtime directory %s: %w", dir, err)
			}
		}
		return dir, nil
	}
	return "", fmt.Errorf("creating relay's runtime directory: no usable base among %s; set XDG_RUNTIME_DIR or TMPDIR to a short writable directory", strings.Join(tried, ", "))
}

// passable reports whether every directory from dir up to the root lets
// other users through (o+x), and none lets them replace what is in it
// (o+w without the sticky bit): the child's user must not be able to put
// a link where relay gives it its socket.
func passable(dir string) bool {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return false
	}
	for d := abs; ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil || st.Mode().Perm()&0o001 == 0 || st.Mode().Perm()&0o002 != 0 && st.Mode()&os.ModeSticky == 0 {
			return false
		}
		if d == "/" {
			return true
		}
	}
}

// Chown gives the socket to uid and gid, the user a child runs as (relay
// run --user): with its mode 0600, that user alone, and relay, may send to
// it.
func (n *NotifySocket) Chown(uid, gid int) error {
	if err := os.Lchown(n.Path, uid, gid); err != nil {
		return fmt.Errorf("giving notify socket %s to uid %d: %w", n.Path, uid, err)
	}
	return nil
}

// ListenNotify creates the socket at path (in a directory only relay may
// enter) and reads messages until Close. onMsg, if not nil, sees every
// message, from the reading goroutine.
func ListenNotify(path string, onMsg func(NotifyMessage)) (*NotifySocket, error) {
	// Created 0600: in a directory others may pass (MakeSharedNotifyDir)
	// nobody else may send to it even before the chmod below.
	old := unix.Umask(0o177)
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("creating notify socket %s: %w", path, err)
	}
	// The child may run under the same uid only; the directory is 0700.
	if err := os.Chmod(path, 0o600); err != nil {
		conn.Close()
		return nil, fmt.Errorf("setting mode of notify socket %s: %w", path, err)
	}
	n := &NotifySocket{Path: path, conn: conn, onMsg: onMsg, carried: -1, readyC: make(chan struct{}), doneC: make(chan struct{})}
	go n.read(n.doneC)
	return n, nil
}

// read reads and hands on datagrams until the socket is closed or Pause
// sets its read deadline. It closes done when it returns.
func (n *NotifySocket) read(done chan struct{}) {
	defer close(done)
	buf := make([]byte, maxNotifyMsg)
	for {
		nr, _, err := n.conn.ReadFromUnix(buf)
		switch {
		case errors.Is(err, net.ErrClosed):
			return
		case errors.Is(err, os.ErrDeadlineExceeded):
			// Only Pause sets a deadline: stop, and leave the
			// datagrams not read in the socket. (To go on would
			// fail again at once, in a loop.)
			return
		case err != nil:
			continue // a transient error on a datagram socket loses one message
		}
		msg := parseNotify(buf[:nr])
		if msg.Vars["READY"] == "1" {
			n.once.Do(func() { close(n.readyC) })
		}
		if n.onMsg != nil {
			n.onMsg(msg)
		}
	}
}

// Ready is closed once the child has sent READY=1.
func (n *NotifySocket) Ready() <-chan struct{} { return n.readyC }

// Close stops reading and removes the socket file.
func (n *NotifySocket) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	err := n.conn.Close()
	<-n.doneC
	if n.carried >= 0 {
		unix.Close(n.carried)
		n.carried = -1
	}
	if rmErr := os.Remove(n.Path); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) && err == nil {
		err = rmErr
	}
	return err
}

// A NotifySocket crosses relay's exec of its next image (relay upgrade) as
// its fd: Pause stops the reading with the socket left open and its path in
// place, Save says what the next image needs, and AdoptNotify, there, makes
// the NotifySocket again. What the child sends meanwhile waits in the
// socket.

// SavedNotify is what AdoptNotify needs to go on reading a NotifySocket in
// relay's next image.
type SavedNotify struct {
	Path string `json:"path"`
	// FD is the socket's fd number; it must cross the exec.
	FD int `json:"fd"`
	// Ready says the child has sent READY=1.
	Ready bool `json:"ready"`
}

// Pause stops reading after the datagram in hand, if any, and returns once
// onMsg is done with it. The datagrams that come meanwhile wait in the
// socket for Resume, or for the next image (AdoptNotify). The socket stays
// open and its path in place. Pause must not be called from onMsg.
func (n *NotifySocket) Pause() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.paused {
		return
	}
	n.paused = true
	// Ends a wait in the poller, and fails the next read at once. An
	// error means the socket is closed, and the reader gone already.
	n.conn.SetReadDeadline(time.Now())
	<-n.doneC
}

// Resume reads again, with the same onMsg, after Pause: after a failed
// exec.
func (n *NotifySocket) Resume() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.paused {
		return
	}
	n.paused = false
	n.conn.SetReadDeadline(time.Time{})
	n.doneC = make(chan struct{})
	go n.read(n.doneC)
}

// Save returns what AdoptNotify needs in relay's next image; call it once
// paused, so that no READY=1 comes after it. The fd stays the
// NotifySocket's: the caller makes it cross the exec (clears its
// close-on-exec flag), and Close closes it.
func (n *NotifySocket) Save() (SavedNotify, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	s := SavedNotify{Path: n.Path, FD: n.carried}
	select {
	case <-n.readyC:
		s.Ready = true
	default:
	}
	if s.FD >= 0 {
		return s, nil // the same socket as conn's, at the same number as before
	}
	rc, err := n.conn.SyscallConn()
	if err == nil {
		err = rc.Control(func(fd uintptr) { s.FD = int(fd) })
	}
	if err != nil {
		return SavedNotify{}, fmt.Errorf("saving notify socket %s: %w", n.Path, err)
	}
	return s, nil
}

// AdoptNotify is the NotifySocket whose fd crossed relay's exec, as Save
// described it, reading as ListenNotify's does, with onMsg. The path
// stays: the child knows it. AdoptNotify takes the fd, at its number, and
// sets its close-on-exec flag again; Close closes it. If AdoptNotify
// fails, the fd is left open, for the return to the earlier image.
func AdoptNotify(s SavedNotify, onMsg func(NotifyMessage)) (*NotifySocket, error) {
	if err := isNotifySocket(s.FD, s.Path); err != nil {
		return nil, fmt.Errorf("adopting notify socket %s: %w", s.Path, err)
	}
	if _, err := unix.FcntlInt(uintptr(s.FD), unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
		return nil, fmt.Errorf("adopting notify socket %s: setting close-on-exec on fd %d: %w", s.Path, s.FD, err)
	}
	// net.FileConn makes a copy of the fd, for Go's poller; the fd
	// itself stays open at its number, for Save, and for the return to
	// the earlier image should this one fail to take over.
	dup, err := unix.FcntlInt(uintptr(s.FD), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("adopting notify socket %s: %w", s.Path, err)
	}
	f := os.NewFile(uintptr(dup), "notify")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("adopting notify socket %s: %w", s.Path, err)
	}
	conn, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("adopting notify socket %s: fd %d is a %T", s.Path, s.FD, c)
	}
	n := &NotifySocket{Path: s.Path, conn: conn, onMsg: onMsg, carried: s.FD, readyC: make(chan struct{}), doneC: make(chan struct{})}
	if s.Ready {
		n.once.Do(func() { close(n.readyC) })
	}
	go n.read(n.doneC)
	return n, nil
}

// isNotifySocket refuses an fd that is not a datagram socket bound to
// path.
func isNotifySocket(fd int, path string) error {
	if fd < 0 {
		return fmt.Errorf("%d is not an fd", fd)
	}
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return fmt.Errorf("looking at fd %d: %w", fd, err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return fmt.Errorf("looking at fd %d: %w", fd, err)
	}
	if ua, ok := sa.(*unix.SockaddrUnix); !ok || ua.Name != path || typ != unix.SOCK_DGRAM {
		return fmt.Errorf("fd %d is not the datagram socket bound there", fd)
	}
	return nil
}

// Settle closes the fd an earlier image handed over (AdoptNotify), once
// relay will not return to that image: the socket stays open on the
// NotifySocket's own copy, which Save gives from then on.
func (n *NotifySocket) Settle() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.carried >= 0 {
		unix.Close(n.carried)
		n.carried = -1
	}
}

// parseNotify splits an sd_notify datagram into its newline-separated
// KEY=VALUE assignments.
func parseNotify(b []byte) NotifyMessage {
	msg := NotifyMessage{Vars: make(map[string]string), Raw: string(bytes.TrimRight(b, "\n"))}
	for _, line := range strings.Split(msg.Raw, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && k != "" {
			msg.Vars[k] = v
		}
	}
	return msg
}
