package control

import (
	"bufio"
	"container/list"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/fdlimit"
	"github.com/relaysh/relay/internal/unixpath"
	"github.com/relaysh/relay/supervisor"
)

const (
	// maxReading bounds the connections whose request line is being
	// read. One more evicts the oldest of them: a client sends its line
	// as soon as it connects, so the oldest is the likeliest to be idle,
	// and idle connections, however many, never keep a new one out.
	maxReading = 64
	// maxStreams bounds the restarts followed at once over the socket.
	maxStreams = 256
	// readTimeout bounds how long a client may take to send its request
	// line; relay's own client sends it with the connect.
	readTimeout = 5 * time.Second
	// writeTimeout bounds each write to a client.
	writeTimeout = 10 * time.Second
	// evictLogEvery spaces the log lines about evicted connections: one
	// for the first, then one at most this often with the count.
	evictLogEvery = 10 * time.Second
)

// Supervisor is what the server controls: relay's supervisor, whose
// types the server converts to the protocol's (convert.go).
type Supervisor interface {
	// Restart asks for a restart and returns its events, closed after
	// the last.
	Restart(supervisor.RestartRequest) (<-chan supervisor.Event, error)
	Status() (supervisor.Status, error)
	// Stop asks for a graceful stop (now false) and returns at once.
	Stop(now bool)
	// Rollback sends traffic back to the generation kept warm in the
	// confirmation window.
	Rollback() (supervisor.Rolled, error)
}

// Info is what relay says of itself in status documents.
type Info struct {
	Name      string
	Started   time.Time
	Listeners []ListenerInfo
	// Version is relay's version line; Upgrades and LastUpgrade, its
	// in-place upgrades so far, and when the last was.
	Version     string
	Upgrades    int
	LastUpgrade time.Time
}

// Server answers control requests for one supervisor.
type Server struct {
	path string
	ln   *net.UnixListener
	lock *os.File
	sup  Supervisor
	info Info
	log  *slog.Logger

	maxReading int
	// answering holds a place for each connection from its accept until
	// it is closed, follows a restart (streams) or is held: twice
	// maxReading, so that evicted connections whose goroutines have not
	// closed them yet cannot pile up fds.
	answering chan struct{}
	streams   chan struct{}
	closing   chan struct{}
	closeOnce sync.Once

	mu sync.Mutex
	// reading holds the connections whose request is being read
	// (*reader), oldest first.
	reading list.List
	// evicted counts the evictions not logged yet, since lastEvictLog.
	evicted      int
	lastEvictLog time.Time
	// held keeps the connections of stop requests open until relay exits,
	// which is how their clients learn that it has.
	held []net.Conn

	// upgrader takes upgrade requests, one at a time (upgrading); pause
	// stops the accepts meanwhile, and released hears each place given
	// back in answering (upgrade.go).
	upgrader  Upgrader
	upgrading sync.Mutex
	pause     pauseState
	released  chan struct{}
	// carried is the fd an earlier image handed over, until Settle; -1
	// for none.
	carried int
}

// reader is a connection whose request line is being read.
type reader struct {
	conn *net.UnixConn
	elem *list.Element // in Server.reading; nil once out of it
	// evicted is set when a newer connection took its place.
	evicted bool
}

// Listen creates the control socket at path. Its directory must be private
// (it is created 0700 if missing), the socket is 0600, and a live relay on
// the same path is never displaced: the lock on PATH.lock decides.
func Listen(path string, sup Supervisor, info Info, log *slog.Logger) (*Server, error) {
	if err := unixpath.CheckLen(path); err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if err := ensurePrivateDir(filepath.Dir(path)); err != nil {
		return nil, err
	}
	lock, err := unixpath.Lock(path + ".lock")
	if errors.Is(err, unixpath.ErrLocked) {
		return nil, fmt.Errorf("control socket %s: another relay is running with it; give this one another --name or --control", path)
	}
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	// Holding the lock, a socket left there should be stale; check anyway,
	// in case the lock file was removed under a live relay.
	if err := unixpath.RemoveStale(path); err != nil {
		unixpath.Unlock(lock, path+".lock")
		if errors.Is(err, unixpath.ErrLive) {
			return nil, fmt.Errorf("control socket %s: another relay is running with it; give this one another --name or --control", path)
		}
		return nil, fmt.Errorf("control socket: %w", err)
	}
	old := unix.Umask(0o177) // the socket file is created 0600
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		unixpath.Unlock(lock, path+".lock")
		return nil, fmt.Errorf("creating control socket %s: %w", path, err)
	}
	return newServer(path, ln, lock, sup, info, log), nil
}

// newServer is the Server of a control socket made, or taken over.
func newServer(path string, ln *net.UnixListener, lock *os.File, sup Supervisor, info Info, log *slog.Logger) *Server {
	reading, streams := connLimits(fdlimit.Soft())
	return &Server{
		path: path, ln: ln, lock: lock, sup: sup, info: info, log: log,
		maxReading: reading, answering: make(chan struct{}, 2*reading),
		streams: make(chan struct{}, streams), closing: make(chan struct{}),
		released: make(chan struct{}, 1), carried: -1,
	}
}

// connLimits are the connections read and the restarts followed at once
// for a process that may have nofile fds open: at most a sixteenth and an
// eighth of them, so that a flood of clients leaves relay the fds it needs
// to accept, and to start generations.
func connLimits(nofile uint64) (reading, streams int) {
	return int(min(max(nofile/16, 4), maxReading)), int(min(max(nofile/8, 4), maxStreams))
}

// Path is the socket's path.
func (s *Server) Path() string { return s.path }

// Serve answers connections until Close.
func (s *Server) Serve() error {
	for {
		if !s.reserve() {
			return nil
		}
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			s.release()
		}
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				s.waitResumed()
				continue
			}
			// EMFILE and the like: free what relay can, say so, and keep
			// serving after a pause, as the connection waits in the
			// backlog.
			if errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) {
				s.mu.Lock()
				s.evictOldestLocked()
				s.mu.Unlock()
			}
			s.log.Warn("accepting a control connection", "err", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		// Set before anyone can evict it, so an eviction's deadline is
		// never overwritten.
		conn.SetReadDeadline(time.Now().Add(readTimeout))
		r := &reader{conn: conn}
		s.mu.Lock()
		if s.reading.Len() >= s.maxReading {
			s.evictOldestLocked()
		}
		r.elem = s.reading.PushBack(r)
		s.mu.Unlock()
		go s.serveConn(r)
	}
}

// reserve takes a place in answering for the next connection. With none
// free, it evicts the oldest connection being read and waits for a place:
// each connection gives its place back within writeTimeout. It returns
// false once the server is closed.
func (s *Server) reserve() bool {
	select {
	case s.answering <- struct{}{}:
		return true
	default:
	}
	s.mu.Lock()
	s.evictOldestLocked()
	s.mu.Unlock()
	select {
	case s.answering <- struct{}{}:
		return true
	case <-s.closing:
		return false
	}
}

// release gives back a place in answering, and says so to a Pause that
// waits for them.
func (s *Server) release() {
	<-s.answering
	s.notifyReleased()
}

// notifyReleased tells a Pause that waits that a place in answering or
// streams was given back.
func (s *Server) notifyReleased() {
	select {
	case s.released <- struct{}{}:
	default:
	}
}

// evictOldestLocked ends the read of the oldest connection still being
// read: its read fails at once, and it is answered busy and closed by its
// own goroutine.
func (s *Server) evictOldestLocked() {
	front := s.reading.Front()
	if front == nil {
		return
	}
	r := front.Value.(*reader)
	s.reading.Remove(front)
	r.elem, r.evicted = nil, true
	r.conn.SetReadDeadline(time.Unix(1, 0))
	s.evicted++
	if now := time.Now(); s.lastEvictLog.IsZero() || now.Sub(s.lastEvictLog) >= evictLogEvery {
		s.log.Warn("control connections that sent no request closed to make room for new ones",
			"closed", s.evicted, "reading_max", s.maxReading)
		s.evicted, s.lastEvictLog = 0, now
	}
}

// doneReading takes r out of the connections being read, unless it was
// evicted, and reports whether it was.
func (s *Server) doneReading(r *reader) (evicted bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.elem != nil {
		s.reading.Remove(r.elem)
		r.elem = nil
	}
	return r.evicted
}

// Close stops accepting and removes the socket, then its lock file.
// Connections of stop requests stay open until the process exits.
func (s *Server) Close() error {
	s.closeOnce.Do(func() { close(s.closing) })
	err := s.ln.Close() // removes the socket file
	// Under the lock still, so that no other relay's socket or lock file
	// is ever removed: PATH.lock goes only if it is still the file this
	// relay locked, and the lock is let go after (unixpath.Lock says why
	// a relay that then locks the file unlinked meanwhile starts again).
	if lerr := unixpath.Unlock(s.lock, s.path+".lock"); lerr != nil && err == nil && !errors.Is(lerr, os.ErrClosed) {
		err = lerr
	}
	return err
}

func (s *Server) serveConn(r *reader) {
	conn := r.conn
	keep := false
	placed := true
	release := func() {
		if placed {
			placed = false
			s.release()
		}
	}
	defer func() {
		if !keep {
			conn.Close()
		}
		release()
	}()
	req, err := s.readRequest(conn)
	if s.doneReading(r) && err != nil {
		// Counted and logged by evictOldestLocked, not one line each.
		writeError(conn, errorf(CodeBusy, "closed: no request came while newer connections waited; send the request as soon as you connect, and try again"))
		return
	}
	if err != nil {
		if codeOf(err) != CodePermissionDenied {
			s.log.Warn("bad control request", "err", err)
		}
		writeError(conn, err)
		return
	}
	conn.SetReadDeadline(time.Time{})
	// What follows is bounded by its own limits.
	switch req.Op {
	case OpStatus:
		st, err := s.sup.Status()
		if errors.Is(err, supervisor.ErrStopping) {
			err = &codedError{code: CodeStopping, err: err}
		}
		if err != nil {
			writeError(conn, err)
			return
		}
		writeResponse(conn, Response{Type: TypeStatus, Status: statusDoc(s.info, s.path, os.Getpid(), st)})
	case OpStop:
		s.log.Info("stop requested over the control socket")
		writeResponse(conn, Response{Type: TypeStopping, Pid: os.Getpid()})
		s.sup.Stop(false)
		keep = true
		s.mu.Lock()
		s.held = append(s.held, conn)
		s.mu.Unlock()
	case OpRollback:
		s.rollback(conn)
	case OpRestart:
		s.restart(conn, req, release)
	case OpUpgrade:
		s.upgrade(conn, req)
	}
}

// rollback answers relay rollback.
func (s *Server) rollback(conn *net.UnixConn) {
	s.log.Info("rollback requested over the control socket")
	r, err := s.sup.Rollback()
	switch {
	case errors.Is(err, supervisor.ErrNothingWarm):
		writeError(conn, &codedError{code: CodeNothingWarm, err: err})
	case errors.Is(err, supervisor.ErrStopping):
		writeError(conn, &codedError{code: CodeStopping, err: err})
	case err != nil:
		writeError(conn, err)
	default:
		writeResponse(conn, Response{Type: TypeRollback, Rollback: &RollbackDoc{
			ServingGeneration: r.Serving, ServingPid: r.ServingPid, FailedGeneration: r.Failed, FailedPid: r.FailedPid}})
	}
}

// readRequest checks the peer and reads its request line.
func (s *Server) readRequest(conn *net.UnixConn) (Request, error) {
	uid, err := peerUID(conn)
	if err != nil {
		return Request{}, fmt.Errorf("reading peer credentials: %w", err)
	}
	if err := admit(uid, os.Getuid()); err != nil {
		s.log.Warn("control connection refused: wrong user", "peer_uid", uid)
		return Request{}, err
	}
	return decodeRequest(conn)
}

// restart asks for a restart and answers it. A restart followed gives
// back its place in answering (release) and holds one in streams instead.
func (s *Server) restart(conn *net.UnixConn, req Request, release func()) {
	refuse := func(reason string) {
		writeResponse(conn, Response{Type: TypeEvent, Event: &Event{Phase: PhaseDone, Result: &Result{Refused: true, Reason: reason}}})
	}
	rr := supervisor.RestartRequest{Reason: "control", Check: req.Check}
	if len(req.Command) > 0 {
		path, err := exec.LookPath(req.Command[0])
		if err != nil {
			refuse(fmt.Sprintf("command %q cannot be run: %v", req.Command[0], err))
			return
		}
		rr.Command = &supervisor.Command{Path: path, Args: req.Command}
	}
	if !req.NoWait {
		select {
		case s.streams <- struct{}{}:
			defer func() { <-s.streams; s.notifyReleased() }()
			release()
		default:
			writeError(conn, errorf(CodeBusy, "too many restarts being followed; try again, or use --no-wait"))
			return
		}
	}
	events, err := s.sup.Restart(rr)
	if err != nil {
		refuse(err.Error())
		return
	}
	if req.NoWait {
		writeResponse(conn, Response{Type: TypeAccepted})
		return // the events are dropped: sending them never blocks
	}
	// A client that goes away (Ctrl-C, a CI timeout) ends the stream at
	// once; the restart itself goes on.
	gone := make(chan struct{})
	go func() {
		io.Copy(io.Discard, conn)
		close(gone)
	}()
	w := bufio.NewWriter(conn)
	enc := json.NewEncoder(w)
	for {
		select {
		case <-gone:
			return
		case ev, ok := <-events:
			if !ok {
				return
			}
			conn.SetWriteDeadline(time.Now().Add(writeTimeout))
			wire := eventFrom(ev)
			if enc.Encode(Response{V: Version, Type: TypeEvent, Event: &wire}) != nil || w.Flush() != nil {
				return // the client stopped reading
			}
		}
	}
}

// admit refuses a peer that is neither relay's own user (self) nor root.
func admit(peer, self int) error {
	if peer == self || peer == 0 {
		return nil
	}
	return errorf(CodePermissionDenied, "permission denied: uid %d may not control this relay (uid %d)", peer, self)
}

// writeError answers with err, under its code.
func writeError(conn net.Conn, err error) {
	writeResponse(conn, Response{Type: TypeError, Error: err.Error(), Code: codeOf(err)})
}

func writeResponse(conn net.Conn, r Response) {
	r.V = Version
	b, err := json.Marshal(r)
	if err != nil {
		return
	}
	conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	conn.Write(append(b, '\n'))
}

func peerUID(conn *net.UnixConn) (int, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, credErr
	}
	return int(cred.Uid), nil
}
