package takeover

import (
	"errors"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The kernel's structures (include/uapi/linux/seccomp.h).

// seccompData is struct seccomp_data.
type seccompData struct {
	Nr                 int32
	Arch               uint32
	InstructionPointer uint64
	Args               [6]uint64
}

// notif is struct seccomp_notif.
type notif struct {
	ID    uint64
	Pid   uint32 // the notifying thread's id, not its process id
	Flags uint32
	Data  seccompData
}

// notifResp is struct seccomp_notif_resp.
type notifResp struct {
	ID    uint64
	Val   int64
	Error int32
	Flags uint32
}

// notifAddfd is struct seccomp_notif_addfd.
type notifAddfd struct {
	ID         uint64
	Flags      uint32
	Srcfd      uint32
	Newfd      uint32
	NewfdFlags uint32
}

// Offsets into seccomp_data for the filter's loads.
const (
	offsetNr   = uint32(unsafe.Offsetof(seccompData{}.Nr))
	offsetArch = uint32(unsafe.Offsetof(seccompData{}.Arch))
)

func ioctl(fd int, req uint, arg unsafe.Pointer) error {
	for {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(arg))
		if e == 0 {
			return nil
		}
		if e != unix.EINTR {
			return e
		}
	}
}

// recv reads the next notification. ENOENT means the one that woke us
// is gone (its thread was interrupted or killed).
func recv(fd int, n *notif) error {
	*n = notif{} // the kernel wants it zeroed
	return ioctl(fd, unix.SECCOMP_IOCTL_NOTIF_RECV, unsafe.Pointer(n))
}

// idValid reports whether notification id is still pending: its thread has
// not been interrupted, and so its memory and fds are still the ones it
// made the call with.
func idValid(fd int, id uint64) bool {
	return ioctl(fd, unix.SECCOMP_IOCTL_NOTIF_ID_VALID, unsafe.Pointer(&id)) == nil
}

// answer makes the notified system call return 0, or fail with errno.
func answer(fd int, id uint64, errno unix.Errno) error {
	r := notifResp{ID: id, Error: -int32(errno)}
	return ioctl(fd, unix.SECCOMP_IOCTL_NOTIF_SEND, unsafe.Pointer(&r))
}

// proceed lets the notified system call run as if the filter had allowed
// it.
func proceed(fd int, id uint64) error {
	r := notifResp{ID: id, Flags: unix.SECCOMP_USER_NOTIF_FLAG_CONTINUE}
	return ioctl(fd, unix.SECCOMP_IOCTL_NOTIF_SEND, unsafe.Pointer(&r))
}

// addFD puts a copy of src at fd number target in the notifying process,
// replacing what was there. No SECCOMP_ADDFD_FLAG_SEND: that would make the
// bind return the fd number, which C code checking bind()'s result for
// non-zero takes for a failure.
func addFD(fd int, id uint64, src, target int, cloexec bool) error {
	a := notifAddfd{ID: id, Flags: unix.SECCOMP_ADDFD_FLAG_SETFD, Srcfd: uint32(src), Newfd: uint32(target)}
	if cloexec {
		a.NewfdFlags = unix.O_CLOEXEC
	}
	return ioctl(fd, unix.SECCOMP_IOCTL_NOTIF_ADDFD, unsafe.Pointer(&a))
}

// errGone is returned when the notifying thread went away or was
// interrupted while relay looked at its request.
var errGone = errors.New("the calling thread was interrupted or has exited")
