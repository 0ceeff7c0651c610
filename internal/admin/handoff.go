package admin

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// The admin listener crosses relay's exec of its next image (relay
// upgrade) as its listening socket: Pause stops serving with an fd of the
// socket kept, which crosses, and ListenFD, in the next image, serves it
// again. Connections that come meanwhile wait in the socket's backlog.

// Pause stops serving and returns a close-on-exec fd of the listening
// socket, which stays open, its backlog with it: requests in flight get
// closeTimeout to finish, connections that come later wait. Serve does not
// return: it waits for Resume or Close. The fd stays the Server's: the
// caller makes it cross the exec (clears its close-on-exec flag), and
// Close closes it. Pausing a paused Server returns the same fd.
func (s *Server) Pause() (fd int, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.closed:
		return -1, errors.New("pausing the admin listener: it is closed")
	default:
	}
	if s.srv == nil {
		return s.kept, nil
	}
	if s.kept < 0 {
		if s.kept, err = listenerFD(s.ln); err != nil {
			return -1, fmt.Errorf("pausing the admin listener: keeping its socket: %w", err)
		}
	}
	s.shutdown() // ends srv.Serve; Serve waits
	s.srv, s.ln = nil, nil
	return s.kept, nil
}

// Resume serves again on the socket Pause kept: after a failed exec.
// Resuming a Server that is not paused does nothing.
func (s *Server) Resume() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.closed:
		return errors.New("resuming the admin listener: it is closed")
	default:
	}
	if s.srv != nil {
		return nil
	}
	ln, err := fileListener(s.kept)
	if err != nil {
		return fmt.Errorf("resuming the admin listener on %s: %w", s.addr, err)
	}
	s.ln, s.srv = ln, s.newHTTPServer()
	close(s.resumed) // wakes Serve
	s.resumed = make(chan struct{})
	return nil
}

// ListenFD is Listen for a listening socket that crossed relay's exec (the
// fd Pause returned). It takes the fd, at its number, and sets its
// close-on-exec flag again; Close closes it. If ListenFD fails, the fd is
// left open, for the return to the earlier image.
func ListenFD(fd int, o Options) (*Server, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.StatusTimeout <= 0 {
		o.StatusTimeout = statusTimeout
	}
	if fd < 0 {
		return nil, fmt.Errorf("taking over the admin listener: %d is not an fd", fd)
	}
	if on, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || on == 0 {
		return nil, fmt.Errorf("taking over the admin listener: fd %d is not a listening socket (%v)", fd, err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
		return nil, fmt.Errorf("taking over the admin listener: setting close-on-exec on fd %d: %w", fd, err)
	}
	ln, err := fileListener(fd)
	if err != nil {
		return nil, fmt.Errorf("taking over the admin listener at fd %d: %w", fd, err)
	}
	s := newServer(ln, o)
	s.kept = fd
	return s, nil
}

// listenerFD returns a close-on-exec copy of ln's fd.
func listenerFD(ln net.Listener) (int, error) {
	sc, ok := ln.(syscall.Conn)
	if !ok {
		return -1, fmt.Errorf("a %T has no fd", ln)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1, err
	}
	dup := -1
	var dupErr error
	if err := rc.Control(func(fd uintptr) { dup, dupErr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	return dup, dupErr
}

// fileListener is a net.Listener on a copy of fd, in Go's poller; fd
// stays open.
func fileListener(fd int) (net.Listener, error) {
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(dup), "admin")
	defer f.Close() // FileListener has a copy of its own
	return net.FileListener(f)
}

// Settle closes the fd an earlier image handed over (ListenFD), once relay
// will not return to that image: the socket stays open on the Server's
// own copy, and a later Pause keeps another.
func (s *Server) Settle() {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.kept >= 0 && s.srv != nil {
		unix.Close(s.kept)
		s.kept = -1
	}
}
