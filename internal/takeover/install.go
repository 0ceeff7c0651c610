package takeover

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"unsafe"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// ErrUnavailable is wrapped by the errors that say the filter could not be
// installed: the kernel, the architecture or a seccomp policy refused it.
var ErrUnavailable = errors.New("bind takeover unavailable")

// The handshake's messages, shim to relay, one SOCK_SEQPACKET datagram:
// "ok FLAG..." with the notification fd attached, or "err REASON".
const (
	msgOK         = "ok"
	msgErr        = "err"
	flagKillable  = "killable"
	flagNoNewPriv = "no_new_privs"
	maxMsg        = 1024
)

// Options tune Install.
type Options struct {
	// Unlink also hands relay the child's unlink(2) and unlinkat(2), so
	// that Serve can keep relay's unix socket paths in place (see
	// Config.Paths). Set it when relay has unix listeners.
	Unlink bool
	// IOURing lets the child tree set up io_uring rings. The filter
	// cannot see the operations of a ring (IORING_OP_BIND and
	// IORING_OP_LISTEN, Linux 6.11+, among them), so a bind made through
	// one would bypass relay: by default io_uring_setup(2) goes to relay
	// too, which refuses it with EPERM, as container runtimes' default
	// seccomp profiles do. Servers fall back to plain system calls.
	IOURing bool
}

// filter returns the program the shim installs: bind(2) and listen(2)
// (with Unlink the unlink calls, and without IOURing io_uring_setup(2)) of
// the native architecture go to relay, everything else runs.
func filter(opts Options) ([]bpf.Instruction, error) {
	if !archSupported {
		return nil, fmt.Errorf("%w: relay has no filter for this architecture", ErrUnavailable)
	}
	calls := []uint32{unix.SYS_BIND, unix.SYS_LISTEN}
	if opts.Unlink {
		calls = append(calls, unlinkCalls()...)
	}
	if !opts.IOURing {
		calls = append(calls, unix.SYS_IO_URING_SETUP)
	}
	// arch check, load nr, one test per call, allow, notify.
	prog := []bpf.Instruction{
		bpf.LoadAbsolute{Off: offsetArch, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: auditArch, SkipFalse: uint8(len(calls) + 1)},
		bpf.LoadAbsolute{Off: offsetNr, Size: 4},
	}
	for i, nr := range calls {
		prog = append(prog, bpf.JumpIf{Cond: bpf.JumpEqual, Val: nr, SkipTrue: uint8(len(calls) - i)})
	}
	return append(prog,
		bpf.RetConstant{Val: unix.SECCOMP_RET_ALLOW},
		bpf.RetConstant{Val: unix.SECCOMP_RET_USER_NOTIF},
	), nil
}

// Install installs the filter on the calling thread and sends its
// notification fd to relay over conn, the shim's end of the handshake
// (NewHandshake). The caller must have locked its goroutine to its thread
// and must execve from that thread: the filter and no_new_privs belong to
// the thread, and execve keeps them for the new program.
//
// If the filter cannot be installed, Install tells relay why and returns an
// error wrapping ErrUnavailable; the caller may exec without it. conn is
// left open (it is close-on-exec).
func Install(conn int, opts Options) error {
	lfd, flags, err := installFilter(opts)
	if err != nil {
		if serr := unix.Sendmsg(conn, []byte(msgErr+" "+err.Error()), nil, nil, 0); serr != nil {
			return errors.Join(err, fmt.Errorf("telling relay: %w", serr))
		}
		return err
	}
	defer unix.Close(lfd)
	msg := strings.Join(append([]string{msgOK}, flags...), " ")
	if err := unix.Sendmsg(conn, []byte(msg), unix.UnixRights(lfd), nil, 0); err != nil {
		// The filter is in place with nobody to answer it: every bind
		// would fail with ENOSYS. Not ErrUnavailable: the caller must
		// not exec.
		return fmt.Errorf("the filter is installed but relay could not be given its fd: %w", err)
	}
	return nil
}

func installFilter(opts Options) (int, []string, error) {
	if err := kernelSupports(); err != nil {
		return -1, nil, err
	}
	prog, err := filter(opts)
	if err != nil {
		return -1, nil, err
	}
	raw, err := bpf.Assemble(prog)
	if err != nil {
		return -1, nil, fmt.Errorf("assembling the filter: %w", err)
	}
	ins := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		ins[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	var flags []string
	if !hasCapSysAdmin() {
		// Without CAP_SYS_ADMIN the kernel accepts a filter only from
		// a thread that can gain no privileges through execve.
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return -1, nil, fmt.Errorf("%w: setting no_new_privs: %w", ErrUnavailable, err)
		}
		flags = append(flags, flagNoNewPriv)
	}
	nnp := ""
	if len(flags) > 0 {
		// It cannot be undone: the child keeps it without the filter.
		nnp = "; the child runs with no_new_privs all the same"
	}
	fprog := unix.SockFprog{Len: uint16(len(ins)), Filter: &ins[0]}
	mode := uintptr(unix.SECCOMP_FILTER_FLAG_NEW_LISTENER | unix.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV)
	lfd, errno := seccomp(mode, &fprog)
	if errno == unix.EINVAL {
		// Before 5.19 there is no WAIT_KILLABLE_RECV.
		lfd, errno = seccomp(unix.SECCOMP_FILTER_FLAG_NEW_LISTENER, &fprog)
	} else if errno == 0 {
		flags = append(flags, flagKillable)
	}
	if errno != 0 {
		return -1, nil, fmt.Errorf("%w: installing the seccomp filter: %w%s%s", ErrUnavailable, errno, hint(errno), nnp)
	}
	return lfd, flags, nil
}

// kernelSupports refuses kernels before 5.9, which can notify relay of a
// bind but cannot put relay's socket in the child (no NOTIF_ADDFD): every
// covered bind would fail instead of falling back to the inherited fds.
func kernelSupports() error {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return fmt.Errorf("%w: reading the kernel version: %w", ErrUnavailable, err)
	}
	release := unix.ByteSliceToString(u.Release[:])
	if !atLeast(release, 5, 9) {
		return fmt.Errorf("%w: Linux %s is older than 5.9, which has SECCOMP_IOCTL_NOTIF_ADDFD", ErrUnavailable, release)
	}
	return nil
}

// atLeast reports whether a kernel release such as "6.1.0-18-amd64" is at
// least major.minor. A release it cannot read counts as new enough: the
// kernel's own answers decide then.
func atLeast(release string, major, minor int) bool {
	var ma, mi int
	if n, _ := fmt.Sscanf(release, "%d.%d", &ma, &mi); n < 2 {
		return true
	}
	return ma > major || ma == major && mi >= minor
}

func seccomp(flags uintptr, prog *unix.SockFprog) (int, unix.Errno) {
	r, _, e := unix.RawSyscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, flags, uintptr(unsafe.Pointer(prog)))
	return int(r), e
}

func hint(errno unix.Errno) string {
	switch errno {
	case unix.EINVAL:
		return " (the kernel has no seccomp user notification: Linux 5.0 or later is needed, 5.9 for relay)"
	case unix.ENOSYS:
		return " (this kernel has no seccomp)"
	case unix.EACCES, unix.EPERM:
		return " (a seccomp or security policy forbids it)"
	case unix.EBUSY:
		return " (another filter in this process tree already has a notification listener, e.g. a container runtime's)"
	}
	return ""
}

func hasCapSysAdmin() bool { return hasCap(unix.CAP_SYS_ADMIN) }

// CanInspect reports whether relay may read the binds of a child that runs
// as another user (relay run --user): the address in its memory and its
// socket take ptrace-level access, which across users needs
// CAP_SYS_PTRACE (a container runtime's default set may lack it).
func CanInspect() bool { return hasCap(unix.CAP_SYS_PTRACE) }

// hasCap reports whether the calling thread has capability c in effect.
func hasCap(c int) bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[c/32].Effective&(1<<(c%32)) != 0
}

// Handshake is relay's end of the socket pair over which the shim sends the
// notification fd.
type Handshake struct {
	conn *net.UnixConn
}

// NewHandshake makes the socket pair. Pass the returned file to the shim
// (at an fd it is told of) and close relay's copy of it once the child has
// started.
func NewHandshake() (*Handshake, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("creating the takeover handshake socket pair: %w", err)
	}
	own := os.NewFile(uintptr(fds[0]), "takeover-handshake")
	defer own.Close()
	c, err := net.FileConn(own)
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, fmt.Errorf("opening the takeover handshake socket: %w", err)
	}
	return &Handshake{conn: c.(*net.UnixConn)}, os.NewFile(uintptr(fds[1]), "takeover-shim"), nil
}

// Receive waits for the shim's message. It returns the notification
// listener, or an error wrapping ErrUnavailable with the shim's reason.
// It fails if the child exits before it says anything, or when Close is
// called.
func (h *Handshake) Receive() (*Notifier, error) {
	buf := make([]byte, maxMsg)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := h.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, fmt.Errorf("reading the exec shim's takeover message: %w", err)
	}
	if n == 0 {
		return nil, errors.New("the exec shim exited before it reported on the bind takeover")
	}
	var fds []int
	if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
		for _, m := range msgs {
			if got, err := unix.ParseUnixRights(&m); err == nil {
				fds = append(fds, got...)
			}
		}
	}
	words := strings.Fields(string(buf[:n]))
	if len(words) > 0 && words[0] == msgOK && len(fds) == 1 {
		return newNotifier(fds[0], words[1:]) // closes the fd on error
	}
	for _, fd := range fds {
		unix.Close(fd)
	}
	if len(words) > 0 && words[0] == msgErr {
		reason := strings.TrimSpace(strings.TrimPrefix(string(buf[:n]), msgErr))
		return nil, fmt.Errorf("%w: %s", ErrUnavailable, strings.TrimPrefix(reason, ErrUnavailable.Error()+": "))
	}
	return nil, fmt.Errorf("the exec shim sent a malformed takeover message %q", buf[:n])
}

// Close closes relay's end; a Receive in progress returns.
func (h *Handshake) Close() error { return h.conn.Close() }
