package takeover

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
)

// Bind is one bind(2) of a process in the child's tree.
type Bind struct {
	// Pid is the calling process (its thread group id).
	Pid int
	// FD is the socket's fd number in that process.
	FD int
	// Family is the address family of the address given.
	Family int
	// Addr is the IP address and port asked for (AF_INET, AF_INET6);
	// a v4-mapped IPv6 address is given as IPv4.
	Addr netip.AddrPort
	// Path is the unix socket path asked for, made absolute against the
	// caller's working directory; abstract names start with '@'.
	Path string
	// Dir identifies Path's directory as the caller sees it; zero when
	// relay could not look.
	Dir FileID

	// What relay found of the child's socket. Err says why it could not
	// look, and the rest is then zero.
	Network  sockaddr.Network
	Domain   int  // the socket's own family (SO_DOMAIN)
	V6Only   bool // IPV6_V6ONLY on an AF_INET6 socket
	Nonblock bool
	Err      error
}

// String formats the address asked for.
func (b Bind) String() string {
	if b.Family == unix.AF_UNIX {
		return b.Path
	}
	return b.Addr.String()
}

// Decision is the caller's answer to a Bind.
type Decision struct {
	// Socket is the index in Config.Sockets of the socket to put in
	// place of the child's, or -1 to let the bind proceed untouched.
	Socket int
	// Own says the socket is used by this child's generation alone, so
	// its O_NONBLOCK may be set to what the child's socket had. On a
	// shared socket, whose O_NONBLOCK every user shares, a different
	// mode is refused.
	Own bool
	// Refuse fails the bind with EADDRINUSE for this reason: the address
	// is relay's, but the bind cannot be taken over safely.
	Refuse error
	// Note, with Socket -1, says what the caller should know of a bind
	// it lets pass (Serve reports it as Passed).
	Note string
}

// Pass lets a bind proceed untouched.
var Pass = Decision{Socket: -1}

// EventKind says what happened to a child's call.
type EventKind int

// The events Serve reports.
const (
	// Bound: a bind was taken over: the child now holds Socket.
	Bound EventKind = iota
	// Refused: a bind of relay's address failed (Err says why).
	Refused
	// Listened: the child called listen(2) on one of Config.Sockets,
	// which relay answered without running, keeping its backlog.
	Listened
	// Kept: the child tried to unlink one of Config.Paths, which relay
	// answered with success without removing it (Path says which).
	Kept
	// RingRefused: the child called io_uring_setup(2), which relay
	// answered with EPERM (Options.IOURing).
	RingRefused
	// Passed: a bind relay let pass, with the Claim's Note in Err.
	Passed
	// Unreadable: relay was not allowed to read a bind's address (Err):
	// the bind went to the kernel untouched. Reading another user's
	// memory needs CAP_SYS_PTRACE (see CanInspect).
	Unreadable
)

// Event is one thing Serve did.
type Event struct {
	Kind   EventKind
	Socket int
	Bind   Bind // for Bound and Refused
	// Pid and FD of the caller (for Listened; Bind has them otherwise).
	Pid, FD int
	Path    string // for Kept
	Err     error
}

// Config is what Serve needs.
type Config struct {
	// Sockets are relay's sockets for this child, open while Serve runs.
	Sockets []*os.File
	// Claim decides each bind of an IP or unix address. It runs on
	// Serve's goroutine, with the child's call waiting.
	Claim func(Bind) Decision
	// Paths are relay's unix socket paths. A child that unlinks one
	// (Go's UnixListener.Close does, for a socket it thinks it bound)
	// is told it did, and the path stays for the next generation. It
	// needs the filter installed with Options.Unlink.
	Paths []string
	// Event, if set, hears every Bound, Refused, Listened and Kept, on
	// Serve's goroutine.
	Event func(Event)
}

// relaySocket is one of Config.Sockets.
type relaySocket struct {
	fd       int
	dev, ino uint64
}

// Serve answers the child tree's binds and listens until every process of
// the tree has exited, Close is called or Pause is (see Paused). It returns
// nil then.
func (n *Notifier) Serve(cfg Config) error {
	n.serving.Lock()
	defer n.serving.Unlock()
	socks := make([]relaySocket, len(cfg.Sockets))
	for i, f := range cfg.Sockets {
		if err := control(f, func(fd int) error {
			var st unix.Stat_t
			if err := unix.Fstat(fd, &st); err != nil {
				return err
			}
			socks[i] = relaySocket{fd: fd, dev: st.Dev, ino: st.Ino}
			return nil
		}); err != nil {
			return fmt.Errorf("reading relay's socket %d: %w", i, err)
		}
	}
	s := &session{n: n, cfg: cfg, socks: socks, pathDirs: make([]FileID, len(cfg.Paths))}
	for i, p := range cfg.Paths {
		s.pathDirs[i], _ = DirID(p) // zero: compare the path itself
	}
	var msg notif
	for {
		if n.paused.Load() {
			return nil // every notification received was answered
		}
		more, err := n.next(&msg)
		if err != nil || !more {
			return err
		}
		s.handle(&msg)
	}
}

// do runs fn on the notification fd; Close waits until it returns.
func (n *Notifier) do(fn func(fd int) error) error {
	var inner error
	if err := n.rc.Control(func(fd uintptr) { inner = fn(int(fd)) }); err != nil {
		return err
	}
	return inner
}

// session is one Serve call's state.
type session struct {
	n        *Notifier
	cfg      Config
	socks    []relaySocket
	pathDirs []FileID // of cfg.Paths
}

func (s *session) event(e Event) {
	if s.cfg.Event != nil {
		s.cfg.Event(e)
	}
}

// reply sends an answer, ignoring a thread that is gone: nobody waits
// for it any more, and a restarted call comes back as a new notification.
func (s *session) reply(id uint64, errno unix.Errno) {
	s.n.do(func(fd int) error { return answer(fd, id, errno) })
}

func (s *session) proceed(id uint64) {
	s.n.do(func(fd int) error { return proceed(fd, id) })
}

func (s *session) valid(id uint64) bool {
	ok := false
	s.n.do(func(fd int) error { ok = idValid(fd, id); return nil })
	return ok
}

func (s *session) handle(m *notif) {
	switch uintptr(m.Data.Nr) {
	case unix.SYS_BIND:
		s.bind(m)
	case unix.SYS_LISTEN:
		s.listen(m)
	case unix.SYS_IO_URING_SETUP:
		// Only a filter without Options.IOURing sends it here.
		s.reply(m.ID, unix.EPERM)
		s.event(Event{Kind: RingRefused, Socket: -1, Pid: tgid(int(m.Pid))})
	default:
		if slices.Contains(unlinkCalls(), uint32(m.Data.Nr)) {
			s.unlink(m)
			return
		}
		s.proceed(m.ID)
	}
}

// relayPath reports whether the caller's path names one of relay's unix
// socket paths: the same name in the same directory, however reached.
func (s *session) relayPath(tid int, path string) bool {
	dir, err := childDirID(tid, path)
	for i, p := range s.cfg.Paths {
		if filepath.Base(p) != filepath.Base(path) {
			continue
		}
		if err != nil || s.pathDirs[i] == (FileID{}) {
			if p == path {
				return true
			}
			continue
		}
		if s.pathDirs[i] == dir {
			return true
		}
	}
	return false
}

// unlink keeps relay's unix socket paths: an unlink of one is answered
// success without running.
func (s *session) unlink(m *notif) {
	tid := int(m.Pid)
	dirfd, ptr, flags := unix.AT_FDCWD, uintptr(m.Data.Args[0]), uint64(0)
	if !plainUnlink(uint32(m.Data.Nr)) { // unlinkat(dirfd, path, flags)
		dirfd, ptr, flags = int(int32(m.Data.Args[0])), uintptr(m.Data.Args[1]), m.Data.Args[2]
	}
	if len(s.cfg.Paths) == 0 || flags&unix.AT_REMOVEDIR != 0 {
		s.proceed(m.ID)
		return
	}
	path, err := readPath(tid, dirfd, ptr)
	if err != nil || !s.relayPath(tid, path) || !s.valid(m.ID) {
		s.proceed(m.ID)
		return
	}
	s.reply(m.ID, 0)
	s.event(Event{Kind: Kept, Socket: -1, Pid: tgid(tid), Path: path})
}

// bind decides one bind(2).
func (s *session) bind(m *notif) {
	tid, fd := int(m.Pid), int(int32(m.Data.Args[0]))
	b, err := readAddr(tid, uintptr(m.Data.Args[1]), int(uint32(m.Data.Args[2])))
	if err != nil || !s.valid(m.ID) {
		// Not an address relay could own, or memory relay cannot
		// read: the kernel's own bind will judge it.
		s.proceed(m.ID)
		if errors.Is(err, unix.EPERM) {
			s.event(Event{Kind: Unreadable, Socket: -1, Pid: tgid(tid), FD: fd, Err: err})
		}
		return
	}
	b.FD = fd
	b.Pid = tgid(tid)
	child, err := s.childSocket(m.ID, tid, fd)
	if errors.Is(err, errGone) {
		return // interrupted: the call comes back restarted, or never
	}
	if err != nil {
		b.Err = err
	} else {
		// relay's copy is closed before any event: a caller that hears
		// one (readiness, through a claim) may count relay's fds.
		b.Err = inspect(child, &b)
		i := s.which(child)
		unix.Close(child)
		if i >= 0 {
			// A bind relay already answered, restarted by a signal
			// after the socket was put in place, or a bind of a
			// socket relay passed: it is done.
			s.reply(m.ID, 0)
			s.event(Event{Kind: Bound, Socket: i, Bind: b})
			return
		}
	}
	d := s.cfg.Claim(b)
	if d.Refuse == nil && d.Socket < 0 {
		s.proceed(m.ID)
		if d.Note != "" {
			s.event(Event{Kind: Passed, Socket: -1, Bind: b, Err: errors.New(d.Note)})
		}
		return
	}
	switch {
	case d.Refuse != nil:
	case b.Err != nil:
		d.Refuse = fmt.Errorf("the child's socket could not be inspected: %w", b.Err)
	case d.Socket >= len(s.socks):
		d.Refuse = fmt.Errorf("relay has no socket %d for this child", d.Socket)
	}
	if d.Refuse == nil {
		d.Refuse = s.install(m.ID, tid, d, b)
		if errors.Is(d.Refuse, errGone) {
			return // the bind comes back, restarted, or never
		}
	}
	if d.Refuse != nil {
		// Once the address is relay's, fail closed: a bind let through
		// would give the child a socket of its own beside relay's.
		s.reply(m.ID, unix.EADDRINUSE)
		s.event(Event{Kind: Refused, Socket: d.Socket, Bind: b, Err: d.Refuse})
		return
	}
	s.event(Event{Kind: Bound, Socket: d.Socket, Bind: b})
}

// install puts relay's socket at the child's fd and answers success.
func (s *session) install(id uint64, tid int, d Decision, b Bind) error {
	rs := s.socks[d.Socket]
	nb, err := isNonblock(rs.fd)
	if err != nil {
		return err
	}
	if nb != b.Nonblock {
		if !d.Own {
			return fmt.Errorf("the child's socket is %s, but relay's socket is %s, and other processes may hold it (it is shared, or an earlier generation had it), so relay will not change it; run a server that asks for the same mode, or give it the inherited fd (--takeover off)", blockMode(b.Nonblock), blockMode(nb))
		}
		if err := unix.SetNonblock(rs.fd, b.Nonblock); err != nil {
			return fmt.Errorf("matching the child's O_NONBLOCK: %w", err)
		}
	}
	cloexec, err := fdCloexec(tid, b.FD)
	if err != nil {
		return err
	}
	err = s.n.do(func(fd int) error { return addFD(fd, id, rs.fd, b.FD, cloexec) })
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
		// ESRCH: the thread was interrupted while relay put the socket
		// in place (before Linux 5.19 a signal can do that).
		return errGone
	}
	if err != nil {
		return fmt.Errorf("putting relay's socket in place: %w", err)
	}
	err = s.n.do(func(fd int) error { return answer(fd, id, 0) })
	if errors.Is(err, unix.ENOENT) {
		// Interrupted after the socket was put in place: the bind
		// restarts and finds relay's socket (see which).
		return errGone
	}
	if err != nil {
		return fmt.Errorf("answering the bind: %w", err)
	}
	return nil
}

// listen answers a listen(2) on one of relay's sockets without running it.
func (s *session) listen(m *notif) {
	tid, fd := int(m.Pid), int(int32(m.Data.Args[0]))
	child, err := s.childSocket(m.ID, tid, fd)
	if errors.Is(err, errGone) {
		return
	}
	if err != nil {
		s.proceed(m.ID)
		return
	}
	i := s.which(child)
	unix.Close(child) // before the event, as in bind
	if i < 0 {
		s.proceed(m.ID)
		return
	}
	s.reply(m.ID, 0)
	s.event(Event{Kind: Listened, Socket: i, Pid: tgid(tid), FD: fd})
}

// childSocket returns relay's own copy of the child's fd, checked to be
// the one the notification is about.
func (s *session) childSocket(id uint64, tid, fd int) (int, error) {
	pidfd, err := unix.PidfdOpen(tid, unix.PIDFD_THREAD)
	if errors.Is(err, unix.EINVAL) {
		// Before 6.9 only a thread group leader can be opened.
		pidfd, err = unix.PidfdOpen(tgid(tid), 0)
	}
	if err != nil {
		return -1, fmt.Errorf("opening the calling process: %w", err)
	}
	defer unix.Close(pidfd)
	child, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		return -1, fmt.Errorf("copying the child's fd %d: %w", fd, err)
	}
	if !s.valid(id) {
		// The thread went away; its id may now name another.
		unix.Close(child)
		return -1, errGone
	}
	return child, nil
}

// which returns the index of the relay socket fd refers to, or -1.
func (s *session) which(fd int) int {
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil {
		return -1
	}
	for i, rs := range s.socks {
		if rs.dev == st.Dev && rs.ino == st.Ino {
			return i
		}
	}
	return -1
}

func blockMode(nonblock bool) string {
	if nonblock {
		return "non-blocking"
	}
	return "blocking"
}

// control runs fn on f's descriptor without changing its blocking mode.
func control(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var inner error
	if err := rc.Control(func(fd uintptr) { inner = fn(int(fd)) }); err != nil {
		return err
	}
	return inner
}
