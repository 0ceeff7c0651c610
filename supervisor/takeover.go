package supervisor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/relaysh/relay/internal/sockets"
	"github.com/relaysh/relay/internal/takeover"
)

// How a generation took a listener's socket, in logs and status.
const (
	TookFD   = "fd"   // as an inherited fd (or not at all)
	TookBind = "bind" // by a bind of its own that relay took over
)

// bindTakeover is one generation's side of the bind takeover: the
// handshake with its exec shim, then the answers to its tree's binds.
// Its fields are shared by the supervisor's loop and the goroutine that
// serves the child.
type bindTakeover struct {
	mu      sync.Mutex
	hs      *takeover.Handshake
	nt      *takeover.Notifier
	stopped bool
	served  chan struct{} // closed when serveBinds returns
	// serveBinds answers the binds again after a pause (handoff.go).
	serveBinds func()
	// handshook is closed once the shim has said whether the filter is
	// in place; active says it is.
	handshook chan struct{}
	active    bool
	how       []string // per listener: TookFD or TookBind
	// claimed[i] is closed once the child bound listener i (UDP) or
	// listened on it (streams): a sign only this generation can give.
	claimed []chan struct{}
	// failed is closed, with failure set, when a covered bind was
	// refused or the filter was refused under --takeover on.
	failed  chan struct{}
	failure error
	// ringRefused: an io_uring_setup of the child tree was refused, and
	// logged; later ones are not.
	ringRefused atomic.Bool
	// unreadable: a bind whose address relay could not read was logged.
	unreadable atomic.Bool
	// noted are the notes of binds let pass that were logged, under mu.
	noted map[string]bool
}

func newBindTakeover(listeners int) (*bindTakeover, *os.File, error) {
	hs, shimEnd, err := takeover.NewHandshake()
	if err != nil {
		return nil, nil, err
	}
	t := &bindTakeover{hs: hs, how: make([]string, listeners), claimed: make([]chan struct{}, listeners),
		failed: make(chan struct{}), served: make(chan struct{}), handshook: make(chan struct{})}
	for i := range t.how {
		t.how[i] = TookFD
		t.claimed[i] = make(chan struct{})
	}
	return t, shimEnd, nil
}

// claims returns, once the shim has spoken (or ctx ends), the channels
// that close when the child claims each listener; nil where the filter is
// not in place, since nothing could be seen then.
func (t *bindTakeover) claims(ctx context.Context) []chan struct{} {
	select {
	case <-t.handshook:
	case <-ctx.Done():
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.active {
		return nil
	}
	return t.claimed
}

// fail records the first reason the generation cannot serve.
func (t *bindTakeover) fail(err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.failure == nil {
		t.failure = err
		close(t.failed)
	}
}

func (t *bindTakeover) failedErr() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.failure
}

func (t *bindTakeover) claim(i int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	select {
	case <-t.claimed[i]:
	default:
		close(t.claimed[i])
	}
}

// took says how the child took each listener, by index.
func (t *bindTakeover) took() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string(nil), t.how...)
}

// tookSockets says how copy c took each listener, by name.
func (s *Supervisor) tookSockets(c *copyProc) map[string]string {
	infos := s.cfg.Sockets.Info()
	out := make(map[string]string, len(infos))
	var how []string
	if c.takeover != nil {
		how = c.takeover.took()
	}
	for i, in := range infos {
		out[in.Name] = TookFD
		if i < len(how) {
			out[in.Name] = how[i]
		}
	}
	return out
}

// socketsTaken formats tookSockets for a log line: "tcp-8080=bind,...".
func (s *Supervisor) socketsTaken(c *copyProc) string {
	took := s.tookSockets(c)
	var parts []string
	for _, in := range s.cfg.Sockets.Info() {
		parts = append(parts, in.Name+"="+took[in.Name])
	}
	return strings.Join(parts, ",")
}

// stop ends the takeover and waits until nothing answers the child's
// binds any more, so that its sockets can go back to the set.
func (t *bindTakeover) stop() {
	t.mu.Lock()
	t.stopped = true
	nt := t.nt
	t.mu.Unlock()
	if t.hs != nil { // nil for a generation adopted from an earlier image
		t.hs.Close()
	}
	if nt != nil {
		nt.Close()
	}
	<-t.served
}

// serveTakeover waits for the shim's handshake, then answers the child
// tree's binds until it has exited or the takeover is stopped.
func (s *Supervisor) serveTakeover(c *copyProc, socks []*os.File) {
	t := c.takeover
	if !s.handshake(c) {
		close(t.served)
		return
	}
	t.serveBinds = func() { s.serveBinds(c, socks) }
	s.serveBinds(c, socks)
}

// handshake receives the notification fd from c's exec shim, and reports
// whether the takeover is active.
func (s *Supervisor) handshake(c *copyProc) bool {
	t := c.takeover
	nt, err := t.hs.Receive()
	t.hs.Close()
	t.mu.Lock()
	t.active = err == nil && !t.stopped
	t.mu.Unlock()
	close(t.handshook)
	switch {
	case err == nil:
	case errors.Is(err, takeover.ErrUnavailable) && s.cfg.Takeover == TakeoverOn:
		c.log.Error("bind takeover unavailable, and --takeover on requires it", "reason", err)
		t.fail(fmt.Errorf("%w; --takeover on requires it (use --takeover auto to pass the sockets as inherited fds only)", err))
		return false
	case errors.Is(err, takeover.ErrUnavailable):
		if s.takeoverWarned.CompareAndSwap(false, true) {
			c.log.Warn("bind takeover unavailable; children get relay's sockets as inherited fds only (LISTEN_FDS)", "reason", err)
		}
		return false
	default:
		c.log.Debug("no bind takeover for this generation", "reason", err)
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		nt.Close()
		return false
	}
	t.nt = nt
	c.log.Debug("bind takeover ready", "wait_killable", nt.Killable, "no_new_privs", nt.NoNewPrivs)
	return true
}

// serveBinds answers the child tree's binds until it has exited, or the
// takeover is stopped or paused; it closes t.served then.
func (s *Supervisor) serveBinds(c *copyProc, socks []*os.File) {
	t := c.takeover
	defer close(t.served)
	err := t.nt.Serve(takeover.Config{
		Sockets: socks,
		Paths:   s.unixPaths(),
		Claim:   func(b takeover.Bind) takeover.Decision { return s.cfg.Sockets.Claim(c.g.n, c.worker, b) },
		Event:   func(e takeover.Event) { s.onTakeover(c, e) },
	})
	if err != nil {
		c.log.Error("answering the child's binds", "err", err)
	}
}

// unixPaths are the paths of relay's unix listeners, which no child may
// remove.
func (s *Supervisor) unixPaths() []string {
	var paths []string
	for _, in := range s.cfg.Sockets.Info() {
		if in.Network == "unix" {
			paths = append(paths, in.Addr)
		}
	}
	return paths
}

// onTakeover runs on the takeover goroutine for each thing it did.
func (s *Supervisor) onTakeover(c *copyProc, e takeover.Event) {
	t := c.takeover
	infos := s.cfg.Sockets.Info()
	name := func(i int) string {
		if i >= 0 && i < len(infos) {
			return infos[i].Name
		}
		return ""
	}
	switch e.Kind {
	case takeover.Bound:
		t.mu.Lock()
		t.how[e.Socket] = TookBind
		t.mu.Unlock()
		socket := "shared"
		if infos[e.Socket].Sharing == sockets.Steered {
			socket = "own"
		}
		c.log.Info("bind taken over", "listener", name(e.Socket), "addr", e.Bind.String(), "fd", e.Bind.FD,
			"bind_pid", e.Bind.Pid, "socket", socket)
		if infos[e.Socket].Network == "udp" {
			t.claim(e.Socket) // datagram sockets do not listen
		}
	case takeover.Listened:
		c.log.Debug("listen on relay's socket answered without running it; relay keeps its backlog",
			"listener", name(e.Socket), "fd", e.FD, "listen_pid", e.Pid)
		t.claim(e.Socket)
	case takeover.Passed:
		t.mu.Lock()
		first := !t.noted[e.Err.Error()]
		if t.noted == nil {
			t.noted = map[string]bool{}
		}
		t.noted[e.Err.Error()] = true
		t.mu.Unlock()
		if first {
			c.log.Warn(e.Err.Error(), "bind_pid", e.Bind.Pid)
		}
	case takeover.Unreadable:
		if t.unreadable.CompareAndSwap(false, true) {
			c.log.Warn("cannot read the child's bind: it went to the kernel untouched; across users relay needs CAP_SYS_PTRACE (docs/takeover.md)",
				"bind_pid", e.Pid, "fd", e.FD, "err", e.Err)
		}
	case takeover.RingRefused:
		if t.ringRefused.CompareAndSwap(false, true) {
			c.log.Warn("io_uring_setup refused (EPERM): a bind made through io_uring would bypass the takeover and put the child's own socket on the port; the server must use bind(2), or relay must run with --allow-io-uring (docs/takeover.md)",
				"caller_pid", e.Pid)
		}
	case takeover.Kept:
		c.log.Info("kept relay's unix socket path: the child's unlink of it was answered without removing it", "path", e.Path, "unlink_pid", e.Pid)
	case takeover.Refused:
		c.log.Error("bind refused", "listener", name(e.Socket), "addr", e.Bind.String(), "fd", e.Bind.FD,
			"bind_pid", e.Bind.Pid, "reason", e.Err)
		t.fail(fmt.Errorf("its bind of %s was refused: %w", e.Bind.String(), e.Err))
	}
}
