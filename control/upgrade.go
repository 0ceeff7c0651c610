package control

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// relay upgrade over the control socket: the server hands the request to
// an Upgrader (relay run wires one), which answers with UpgradeEvents.
// When relay execs its next image, the requester's connection crosses the
// exec with the rest of relay's state, and the new image sends the last
// event on it (FinishUpgrade): the client hears from the relay that took
// over, or from the one that came back.

// The phases of an upgrade, in UpgradeEvent.Phase.
const (
	// UpgradeChecked: the new binary says it takes this relay's state.
	UpgradeChecked = "checked"
	// UpgradeHandingOver: relay is about to exec it.
	UpgradeHandingOver = "handing_over"
	// UpgradeDone: the new relay serves (the last event).
	UpgradeDone = "done"
	// UpgradeReturned: the new relay could not take the state, and the
	// one it replaced serves again (the last event).
	UpgradeReturned = "returned"
	// UpgradeRefused: nothing was executed (the last event).
	UpgradeRefused = "refused"
)

// UpgradeEvent is one phase of relay upgrade.
type UpgradeEvent struct {
	Phase string `json:"phase"`
	// Path is the binary relay runs (or would have).
	Path string `json:"path,omitempty"`
	// From and To are the version lines of the relay that serves before
	// and of the one that takes over.
	From string `json:"from,omitempty"`
	To   string `json:"to,omitempty"`
	// GapMs is, with done and returned, how long relay answered nothing:
	// from the exec to the new image serving.
	GapMs float64 `json:"gap_ms,omitempty"`
	// Reason says, with refused and returned, why.
	Reason string `json:"reason,omitempty"`
	// Busy: refused because relay was not quiet; try again later.
	Busy bool `json:"busy,omitempty"`
}

// Upgrader carries out relay upgrade.
type Upgrader interface {
	// Upgrade runs the relay binary at path ("" for relay's own path)
	// with relay's state. It returns only if relay did not exec it: the
	// event to end the request with (refused, or returned when the exec
	// failed). u reports the phases on the way, and crosses the exec.
	Upgrade(path string, u *UpgradeConn) UpgradeEvent
}

// UpgradeConn is the connection of an upgrade request.
type UpgradeConn struct {
	conn *net.UnixConn
}

// Send reports a phase to the requester. Errors are ignored: the upgrade
// goes on without a listener.
func (u *UpgradeConn) Send(ev UpgradeEvent) {
	writeResponse(u.conn, Response{Type: TypeUpgrade, Upgrade: &ev})
}

// FD is the connection's fd, for the exec to carry; its flags are left
// alone.
func (u *UpgradeConn) FD() (int, error) { return connFD(u.conn) }

// FinishUpgrade sends the last event of an upgrade request on fd, the
// connection an earlier image carried over, and closes it.
func FinishUpgrade(fd int, ev UpgradeEvent) error {
	f := os.NewFile(uintptr(fd), "relay-upgrade-request")
	defer f.Close()
	b, err := json.Marshal(Response{V: Version, Type: TypeUpgrade, Upgrade: &ev})
	if err != nil {
		return err
	}
	f.SetWriteDeadline(time.Now().Add(writeTimeout))
	if _, err := f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("answering the upgrade request: %w", err)
	}
	return nil
}

// SetUpgrader makes the server take upgrade requests; without one, they
// are answered unknown_op.
func (s *Server) SetUpgrader(u Upgrader) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.upgrader = u
}

// upgrade answers an upgrade request.
func (s *Server) upgrade(conn *net.UnixConn, req Request) {
	s.mu.Lock()
	u := s.upgrader
	s.mu.Unlock()
	if u == nil {
		writeError(conn, errorf(CodeUnknownOp, "this relay cannot upgrade in place"))
		return
	}
	if !s.upgrading.TryLock() {
		ev := UpgradeEvent{Phase: UpgradeRefused, Busy: true, Reason: "another upgrade is under way"}
		writeResponse(conn, Response{Type: TypeUpgrade, Upgrade: &ev})
		return
	}
	defer s.upgrading.Unlock()
	ev := u.Upgrade(req.Path, &UpgradeConn{conn: conn})
	writeResponse(conn, Response{Type: TypeUpgrade, Upgrade: &ev})
}

// pauseState is the server's pause for an upgrade.
type pauseState struct {
	mu      sync.Mutex
	paused  bool
	resumeC chan struct{}
}

// Pause stops accepting connections, which wait in the socket's backlog,
// and waits, at most d, until no connection is answered or follows a
// restart but the caller's own: held is 1 when an upgrade request asks
// (its connection holds a place), 0 when a signal does. It returns an
// error, and accepts again, if some still are.
func (s *Server) Pause(d time.Duration, held int) error {
	s.pause.mu.Lock()
	s.pause.paused, s.pause.resumeC = true, make(chan struct{})
	s.pause.mu.Unlock()
	s.ln.SetDeadline(time.Unix(1, 0)) // Serve's accept returns at once
	timeout := time.NewTimer(d)
	defer timeout.Stop()
	for len(s.answering) > held || len(s.streams) > 0 {
		select {
		case <-s.released:
		case <-timeout.C:
			s.Resume()
			return fmt.Errorf("%d control connection(s) still answered after %s", len(s.answering)-held+len(s.streams), d)
		}
	}
	return nil
}

// Resume accepts connections again after Pause.
func (s *Server) Resume() {
	s.pause.mu.Lock()
	defer s.pause.mu.Unlock()
	if !s.pause.paused {
		return
	}
	s.pause.paused = false
	s.ln.SetDeadline(time.Time{})
	close(s.pause.resumeC)
}

// waitResumed waits, where Serve's accept failed for a pause, until the
// pause ends; it reports false if there was no pause, or the server was
// closed meanwhile.
func (s *Server) waitResumed() bool {
	s.pause.mu.Lock()
	paused, c := s.pause.paused, s.pause.resumeC
	s.pause.mu.Unlock()
	if !paused {
		return false
	}
	select {
	case <-c:
		return true
	case <-s.closing:
		return false
	}
}

// Saved is the control socket as it crosses relay's exec of its next
// image: its path, its fd and its lock's, and when relay started.
type Saved struct {
	Path    string    `json:"path"`
	FD      int       `json:"fd"`
	LockFD  int       `json:"lock_fd"`
	Started time.Time `json:"started"`
}

// Save is the server's state, while paused.
func (s *Server) Save() (Saved, error) {
	fd, err := connFD(s.ln)
	if err != nil {
		return Saved{}, fmt.Errorf("handing over the control socket: %w", err)
	}
	lockFD, err := connFD(s.lock)
	if err != nil {
		return Saved{}, fmt.Errorf("handing over the control socket's lock: %w", err)
	}
	return Saved{Path: s.path, FD: fd, LockFD: lockFD, Started: s.info.Started}, nil
}

// Adopt is Listen for the socket an earlier image handed over, and its
// lock: info's Started is taken from sv. The fd at sv.FD stays open until
// Settle, for a return to that image; it is left open if Adopt fails.
func Adopt(sv Saved, sup Supervisor, info Info, log *slog.Logger) (*Server, error) {
	// The carried fd is not wrapped in an os.File, whose finalizer could
	// close it before a return to the earlier image: a copy is.
	dup, err := unix.FcntlInt(uintptr(sv.FD), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("taking over the control socket %s: %w", sv.Path, err)
	}
	f := os.NewFile(uintptr(dup), sv.Path)
	l, err := net.FileListener(f) // a copy of the copy, in Go's poller
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("taking over the control socket %s: %w", sv.Path, err)
	}
	ln, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, fmt.Errorf("taking over the control socket %s: fd %d is not a unix socket", sv.Path, sv.FD)
	}
	ln.SetUnlinkOnClose(true) // as Listen's: Close removes the socket file
	info.Started = sv.Started
	s := newServer(sv.Path, ln, os.NewFile(uintptr(sv.LockFD), sv.Path+".lock"), sup, info, log)
	s.carried = sv.FD
	return s, nil
}

// Settle closes the fd an earlier image handed over (Adopt), once relay
// will not return to that image: the socket stays open on the Server's
// own copy.
func (s *Server) Settle() {
	if s.carried >= 0 {
		unix.Close(s.carried)
		s.carried = -1
	}
}

// connFD is the fd of c, read without changing its flags (File.Fd would
// make it blocking).
func connFD(c interface {
	SyscallConn() (syscall.RawConn, error)
}) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := rc.Control(func(u uintptr) { fd = int(u) }); err != nil {
		return -1, err
	}
	return fd, nil
}
