package takeover

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/procfs"
	"github.com/relaysh/relay/internal/sockaddr"
)

// sockaddrStorage is sizeof(struct sockaddr_storage).
const sockaddrStorage = 128

// errNotIP is returned by readAddr for addresses relay never owns.
var errNotIP = errors.New("not an IP or unix address")

// readAddr reads the sockaddr a thread passed to bind(2), from its memory.
func readAddr(tid int, ptr uintptr, size int) (Bind, error) {
	var b Bind
	// C servers often pass sizeof(struct sockaddr_storage), 128, which
	// the kernel accepts; it refuses more.
	if size < 2 || size > sockaddrStorage {
		return b, errNotIP
	}
	buf := make([]byte, size)
	local := []unix.Iovec{{Base: &buf[0]}}
	local[0].SetLen(size)
	remote := []unix.RemoteIovec{{Base: ptr, Len: size}}
	if n, err := unix.ProcessVMReadv(tid, local, remote, 0); err != nil {
		return b, fmt.Errorf("reading the address: %w", err)
	} else if n != size {
		return b, fmt.Errorf("reading the address: got %d of %d bytes", n, size)
	}
	b.Family = int(binary.NativeEndian.Uint16(buf))
	switch {
	case b.Family == unix.AF_INET && size >= unix.SizeofSockaddrInet4:
		port := binary.BigEndian.Uint16(buf[2:])
		b.Addr = netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port)
	case b.Family == unix.AF_INET6 && size >= unix.SizeofSockaddrInet6:
		port := binary.BigEndian.Uint16(buf[2:])
		b.Addr = netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])).Unmap(), port)
	case b.Family == unix.AF_UNIX:
		path := buf[2:]
		switch {
		case len(path) == 0:
			return b, errNotIP // autobind
		case path[0] == 0:
			b.Path = "@" + string(bytes.TrimRight(path[1:], "\x00"))
		default:
			if i := bytes.IndexByte(path, 0); i >= 0 {
				path = path[:i]
			}
			b.Path = string(path)
			if !filepath.IsAbs(b.Path) {
				cwd, err := os.Readlink("/proc/" + strconv.Itoa(tid) + "/cwd")
				if err != nil {
					return b, fmt.Errorf("reading the caller's working directory: %w", err)
				}
				b.Path = filepath.Join(cwd, b.Path)
			}
			b.Path = filepath.Clean(b.Path)
			b.Dir, _ = childDirID(tid, b.Path) // zero if it cannot tell
		}
	default:
		return b, errNotIP
	}
	return b, nil
}

// readPath reads the NUL-terminated path a thread passed to an *at call
// (or, with dirfd AT_FDCWD, a plain one) and makes it absolute.
func readPath(tid, dirfd int, ptr uintptr) (string, error) {
	buf := make([]byte, unix.PathMax)
	local := []unix.Iovec{{Base: &buf[0]}}
	local[0].SetLen(len(buf))
	// A read that runs into an unmapped page stops there, short.
	n, err := unix.ProcessVMReadv(tid, local, []unix.RemoteIovec{{Base: ptr, Len: len(buf)}}, 0)
	if err != nil {
		return "", fmt.Errorf("reading the path: %w", err)
	}
	end := bytes.IndexByte(buf[:n], 0)
	if end <= 0 {
		return "", errNotIP
	}
	path := string(buf[:end])
	if !filepath.IsAbs(path) {
		dir := "/proc/" + strconv.Itoa(tid) + "/cwd"
		if dirfd != unix.AT_FDCWD {
			dir = fmt.Sprintf("/proc/%d/fd/%d", tid, dirfd)
		}
		base, err := os.Readlink(dir)
		if err != nil {
			return "", fmt.Errorf("reading the caller's directory: %w", err)
		}
		path = filepath.Join(base, path)
	}
	return filepath.Clean(path), nil
}

// FileID names a file by device and inode: two paths to one directory
// have the same FileID, whatever symlinks or mounts they go through.
type FileID struct{ Dev, Ino uint64 }

// DirID is the FileID of the directory holding path, in relay's view.
func DirID(path string) (FileID, error) {
	return statID(filepath.Dir(path))
}

// childDirID is the FileID of the directory holding path, in the view of
// thread tid (its root directory).
func childDirID(tid int, path string) (FileID, error) {
	return statID("/proc/" + strconv.Itoa(tid) + "/root" + filepath.Dir(path))
}

func statID(path string) (FileID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return FileID{}, fmt.Errorf("looking at %s: %w", path, err)
	}
	return FileID{Dev: st.Dev, Ino: st.Ino}, nil
}

// inspect fills in what b says of the child's socket, from relay's copy
// of it.
func inspect(fd int, b *Bind) error {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return fmt.Errorf("reading the socket's type: %w", err)
	}
	if b.Domain, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN); err != nil {
		return fmt.Errorf("reading the socket's family: %w", err)
	}
	proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return fmt.Errorf("reading the socket's protocol: %w", err)
	}
	switch {
	case b.Domain == unix.AF_UNIX && typ == unix.SOCK_STREAM:
		b.Network = sockaddr.Unix
	case (b.Domain == unix.AF_INET || b.Domain == unix.AF_INET6) && typ == unix.SOCK_STREAM &&
		(proto == unix.IPPROTO_TCP || proto == unix.IPPROTO_MPTCP):
		// Go's listeners are MPTCP where the kernel allows; a plain
		// TCP socket in its place serves them the same.
		b.Network = sockaddr.TCP
	case (b.Domain == unix.AF_INET || b.Domain == unix.AF_INET6) && typ == unix.SOCK_DGRAM && proto == unix.IPPROTO_UDP:
		b.Network = sockaddr.UDP
	default:
		b.Network = sockaddr.Other
	}
	if b.Domain == unix.AF_INET6 {
		v, err := unix.GetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY)
		if err != nil {
			return fmt.Errorf("reading IPV6_V6ONLY: %w", err)
		}
		b.V6Only = v != 0
	}
	// O_NONBLOCK lives on the open file description, which relay's
	// copy shares with the child's fd.
	if b.Nonblock, err = isNonblock(fd); err != nil {
		return err
	}
	return nil
}

func isNonblock(fd int) (bool, error) {
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return false, fmt.Errorf("reading the socket's file status flags: %w", err)
	}
	return fl&unix.O_NONBLOCK != 0, nil
}

// fdCloexec reports whether the thread's fd is close-on-exec, a flag of
// the fd itself (nginx keeps its listeners across an exec, most servers
// do not), from /proc/TID/fdinfo/FD.
func fdCloexec(tid, fd int) (bool, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%d", tid, fd))
	if err != nil {
		return false, fmt.Errorf("reading the child's fd flags: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "flags:"); ok {
			fl, err := strconv.ParseUint(strings.TrimSpace(v), 8, 64)
			if err != nil {
				return false, fmt.Errorf("parsing the child's fd flags %q: %w", v, err)
			}
			return fl&unix.O_CLOEXEC != 0, nil
		}
	}
	return false, fmt.Errorf("no flags line in the child's fdinfo for fd %d", fd)
}

// tgid returns the process id of thread tid, or tid itself if it cannot
// tell (the thread is gone, and the answer no longer matters).
func tgid(tid int) int {
	if n, err := procfs.Tgid(tid); err == nil {
		return n
	}
	return tid
}
