package sockets

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
	"github.com/relaysh/relay/internal/sockopt"
	"github.com/relaysh/relay/internal/unixpath"
)

// listenBacklog is passed to listen(2); the kernel caps it at
// net.core.somaxconn.
const listenBacklog = 65535

// Listener is one socket relay holds for its whole life.
//
// The socket is created in blocking mode and wrapped in an *os.File at once,
// so the os package never registers it with Go's network poller (relay
// never accepts on it and must not wake on its traffic), and File.Fd never
// has a reason to change its file status flags, which every generation
// shares.
type Listener struct {
	Spec Spec
	// Addr is the bound address: host:port, or the unix socket path.
	Addr string
	// Origin says whether relay bound the socket or was passed it.
	Origin Origin
	// PassedName is the name a passed socket came with in
	// LISTEN_FDNAMES; empty for a socket relay bound.
	PassedName string

	file *os.File
	// For a unix socket relay created: the inode, so that only that file
	// is removed at exit, and the lock on path.lock held until then.
	dev, ino uint64
	lock     *os.File
}

// File returns the socket. It stays owned by the Listener: do not close it.
// For a steered listener whose socket has left its group, it is closed, or
// nil after Restore.
func (l *Listener) File() *os.File { return l.file }

// KeepPath makes Close leave a unix socket's file in place, for a socket
// that outlives relay in systemd's fd store.
func (l *Listener) KeepPath() { l.dev, l.ino = 0, 0 }

// Close closes relay's copy of the socket (if a steering group has not
// closed it already) and, for a unix socket, removes
// the path if it is still the socket relay created.
func (l *Listener) Close() error {
	var err error
	if l.file != nil { // nil: Restore found it retired already
		err = l.file.Close()
	}
	if errors.Is(err, os.ErrClosed) {
		err = nil // a steering group retired it already
	}
	if l.Spec.Network == sockaddr.Unix && l.ino != 0 {
		var st unix.Stat_t
		if unix.Lstat(l.Addr, &st) == nil && st.Dev == l.dev && st.Ino == l.ino {
			if rmErr := os.Remove(l.Addr); rmErr != nil && err == nil {
				err = fmt.Errorf("removing unix socket %s: %w", l.Addr, rmErr)
			}
		}
	}
	if l.lock != nil {
		// Removed while still locked, if it is still the file relay
		// locked; Lock checks that the file it locked is the one at
		// the path, so two relays never hold different files for it.
		if uerr := unixpath.Unlock(l.lock, l.Addr+".lock"); uerr != nil && err == nil && !errors.Is(uerr, os.ErrClosed) {
			err = uerr
		}
	}
	return err
}

// BindOptions tune how Open binds a spec no passed socket serves.
type BindOptions struct {
	// UnixMode is the permission given to unix socket files.
	UnixMode os.FileMode
	// ReusePort binds TCP sockets with SO_REUSEPORT, so that relay can
	// add a socket per generation to each (see package steer). The
	// address is first checked with a plain bind, so a port something
	// else holds is still an error rather than a shared port.
	ReusePort bool
	// UDPReusePort does the same for UDP sockets, where package udpsteer
	// can steer them (see Open).
	UDPReusePort bool
}

// CloseAll closes every listener and returns the first error.
func CloseAll(ls []*Listener) error {
	var first error
	for _, l := range ls {
		if err := l.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func bindOne(s Spec, opts BindOptions) (*Listener, error) {
	var (
		l   *Listener
		err error
	)
	switch s.Network {
	case sockaddr.Unix:
		l, err = bindUnix(s, opts.UnixMode)
	case sockaddr.TCP, sockaddr.UDP:
		reuse := opts.ReusePort && s.Network == sockaddr.TCP || opts.UDPReusePort && s.Network == sockaddr.UDP
		l, err = bindInet(s, reuse)
	default:
		err = fmt.Errorf("unknown network %q", s.Network)
	}
	if err != nil {
		return nil, err
	}
	if !s.NameGiven {
		l.Spec.Name = DefaultName(s.Network, l.Addr)
	}
	l.Origin = Bound
	return l, nil
}

func bindInet(s Spec, reusePort bool) (*Listener, error) {
	sotype := unix.SOCK_STREAM
	if s.Network == sockaddr.UDP {
		sotype = unix.SOCK_DGRAM
	}
	host, portStr, err := net.SplitHostPort(s.Address)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", s, err)
	}
	port, _ := strconv.Atoi(portStr)

	var (
		family int
		sa     unix.Sockaddr
		v6only = true
	)
	if host == "" {
		// All addresses: one dual-stack IPv6 socket, as Go's net package
		// does, or plain IPv4 where IPv6 is off.
		family, sa, v6only = unix.AF_INET6, &unix.SockaddrInet6{Port: port}, false
	} else {
		ip, err := sockaddr.Resolve(host)
		if err != nil {
			return nil, fmt.Errorf("listen %s: %w", s, err)
		}
		family, sa = sockaddr.FromIP(ip, port)
	}

	fd, err := unix.Socket(family, sotype|unix.SOCK_CLOEXEC, 0)
	if err != nil && family == unix.AF_INET6 && host == "" {
		family, sa = unix.AF_INET, &unix.SockaddrInet4{Port: port}
		fd, err = unix.Socket(family, sotype|unix.SOCK_CLOEXEC, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("listen %s: creating socket: %w", s, err)
	}
	if reusePort {
		// A socket with SO_REUSEPORT would join one that holds the port
		// already (same user, also with SO_REUSEPORT) instead of failing.
		// A plain bind first tells "in use" apart, and picks the port
		// for port 0; the real socket then binds that port.
		var checked unix.Sockaddr
		if checked, err = checkFree(fd, s, sa, v6only, family, sotype); err != nil {
			return nil, err
		}
		sa = checked
		if fd, err = unix.Socket(family, sotype|unix.SOCK_CLOEXEC, 0); err != nil {
			return nil, fmt.Errorf("listen %s: creating socket: %w", s, err)
		}
	}
	ok := false
	defer func() {
		if !ok {
			unix.Close(fd)
		}
	}()
	// SO_REUSEADDR lets relay bind while old connections sit in
	// TIME_WAIT; it is not SO_REUSEPORT: no second socket can join this
	// address unless reusePort asks for it.
	opts := sockopt.Options{ReuseAddr: sotype == unix.SOCK_STREAM, ReusePort: reusePort, V6Only: v6only}
	if err := sockopt.Set(fd, family, opts); err != nil {
		return nil, fmt.Errorf("listen %s: %w", s, err)
	}
	if err := unix.Bind(fd, sa); err != nil {
		return nil, bindError(s, err)
	}
	if sotype == unix.SOCK_STREAM {
		if err := unix.Listen(fd, listenBacklog); err != nil {
			return nil, fmt.Errorf("listen %s: %w", s, err)
		}
	}
	bound, err := unix.Getsockname(fd)
	if err != nil {
		return nil, fmt.Errorf("listen %s: reading bound address: %w", s, err)
	}
	ok = true
	return &Listener{
		Spec: s,
		Addr: sockaddr.String(bound),
		file: os.NewFile(uintptr(fd), s.String()),
	}, nil
}

// checkFree binds fd, a fresh socket without SO_REUSEPORT, to sa and
// closes it. It returns the address it got (with the port the kernel chose
// for port 0), or the bind error.
//
// A TCP check has SO_REUSEADDR, as the real socket does, so that old
// connections in TIME_WAIT do not fail it; a UDP one does not, since on UDP
// it would let the check share a port another socket with it holds.
func checkFree(fd int, s Spec, sa unix.Sockaddr, v6only bool, family, sotype int) (unix.Sockaddr, error) {
	defer unix.Close(fd)
	if err := sockopt.Set(fd, family, sockopt.Options{ReuseAddr: sotype == unix.SOCK_STREAM, V6Only: v6only}); err != nil {
		return nil, fmt.Errorf("listen %s: %w", s, err)
	}
	if err := unix.Bind(fd, sa); err != nil {
		return nil, bindError(s, err)
	}
	got, err := unix.Getsockname(fd)
	if err != nil {
		return nil, fmt.Errorf("listen %s: reading bound address: %w", s, err)
	}
	return got, nil
}

func bindUnix(s Spec, mode os.FileMode) (*Listener, error) {
	path := s.Address
	if err := unixpath.CheckLen(path); err != nil {
		return nil, fmt.Errorf("listen %s: %w", s, err)
	}
	dir := filepath.Dir(path)
	if st, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("listen %s: directory %s does not exist or is unreadable (%w); create it first", s, dir, err)
	} else if !st.IsDir() {
		return nil, fmt.Errorf("listen %s: %s is not a directory", s, dir)
	}
	// The lock, held for relay's life, makes the stale-socket check and
	// the bind one step for every relay: two relays on one path can
	// never remove each other's socket.
	lock, err := lockPath(s, path+".lock")
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			unixpath.Unlock(lock, path+".lock")
		}
	}()
	if err := removeStaleSocket(s, path); err != nil {
		return nil, err
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("listen %s: creating socket: %w", s, err)
	}
	defer func() {
		if !ok {
			unix.Close(fd)
		}
	}()
	// bind(2) creates the file with the mode the umask leaves, so set the
	// umask for it rather than chmod the path later, which would follow
	// a symlink swapped in meanwhile. relay binds before it starts any
	// other work, so no other file is created under this umask.
	old := unix.Umask(int(0o777 &^ mode.Perm()))
	err = unix.Bind(fd, &unix.SockaddrUnix{Name: path})
	unix.Umask(old)
	if err != nil {
		return nil, bindError(s, err)
	}
	defer func() {
		if !ok {
			os.Remove(path)
		}
	}()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return nil, fmt.Errorf("listen %s: checking the new socket file: %w", s, err)
	}
	if err := unix.Listen(fd, listenBacklog); err != nil {
		return nil, fmt.Errorf("listen %s: %w", s, err)
	}
	ok = true
	return &Listener{
		Spec: s,
		Addr: path,
		file: os.NewFile(uintptr(fd), s.String()),
		lock: lock,
		dev:  st.Dev,
		ino:  st.Ino,
	}, nil
}

// lockPath takes the lock that guards a unix socket path.
func lockPath(s Spec, path string) (*os.File, error) {
	f, err := unixpath.Lock(path)
	if errors.Is(err, unixpath.ErrLocked) {
		return nil, fmt.Errorf("listen %s: address already in use: another relay holds %s; stop it or choose another path", s, s.Address)
	}
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", s, err)
	}
	return f, nil
}

// removeStaleSocket removes a socket file left behind by a process that is
// gone. A live socket, or a file that is not a socket, is an error.
func removeStaleSocket(s Spec, path string) error {
	err := unixpath.RemoveStale(path)
	if errors.Is(err, unixpath.ErrLive) {
		return fmt.Errorf("listen %s: address already in use: a live process listens on %s; stop it or choose another path", s, path)
	}
	if err != nil {
		return fmt.Errorf("listen %s: %w", s, err)
	}
	return nil
}

func bindError(s Spec, err error) error {
	switch {
	case errors.Is(err, unix.EADDRINUSE):
		return fmt.Errorf("listen %s: address already in use: another process holds %s; stop it or choose another address: %w", s, s.Address, err)
	case errors.Is(err, unix.EACCES) && s.Network != sockaddr.Unix:
		return fmt.Errorf("listen %s: permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE: %w", s, err)
	case errors.Is(err, unix.EADDRNOTAVAIL):
		return fmt.Errorf("listen %s: address not available on this machine: %w", s, err)
	case errors.Is(err, unix.ENOENT):
		return fmt.Errorf("listen %s: directory %s does not exist; create it first: %w", s, filepath.Dir(s.Address), err)
	}
	return fmt.Errorf("listen %s: binding: %w", s, err)
}
