package supervisor

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/internal/reaper"
	"github.com/relaysh/relay/internal/sdnotify"
	"github.com/relaysh/relay/socketpass"
)

// State is where a generation is in its life.
type State string

// The states of a generation.
const (
	Starting State = "starting" // started, not yet proven ready
	Serving  State = "serving"  // ready, and the newest ready generation
	Draining State = "draining" // replaced, still serving for the drain window
	Warm     State = "warm"     // replaced, kept ready to serve again in the confirmation window
	Stopping State = "stopping" // sent its stop signal
	Exited   State = "exited"   // its main process is gone
)

const (
	stderrTailBytes = 4096
	stderrTailLines = 10
	// stderrGrace bounds how long an exit report waits for the last of the
	// child's stderr, which a process it left behind may keep open.
	stderrGrace = 250 * time.Millisecond
)

// generation is one start of the command: one copy of it, or with
// --workers N, N copies, each a process (tree) of its own with its own
// socket on every steered TCP listener. The copies start, are proven ready,
// get their stop signal and are killed together; one that exits while its
// generation serves is replaced alone (workers.go). The supervisor's loop
// owns every field but the ones its helper goroutines set before they post
// an event.
type generation struct {
	n       int
	cmd     Command
	log     *slog.Logger // its number and its first copy's pid
	state   State
	started time.Time
	readyAt time.Time
	// copies are its copies, by worker number: copies[w] is the last
	// start of copy w.
	copies []*copyProc

	// failure is why a starting generation was killed, if it was;
	// culprit is the copy that failed it, whose stderr the report quotes.
	failure error
	culprit *copyProc
	// killTimer sends SIGKILL to the group after the stop timeout, at
	// killAt.
	killTimer timer
	killAt    time.Time
	// killed: the stop timeout passed and it got SIGKILL.
	killed bool
	// contain is what it is made of: its cgroup, or its copies' process
	// groups and adopted orphans (contain.go).
	contain containment
	// status is how its main process exited; with several copies, the
	// first that failed, or else the last.
	status reaper.Status
	// gone: no process of it is left, its main process nor any other.
	gone bool
	// exitWatchers follow the restart that retired this generation, and
	// are told when it is gone.
	exitWatchers []*waiter
	// failedLiveness: it failed its liveness check or watchdog while it
	// served; no confirmation window keeps it warm.
	failedLiveness bool
}

// copyProc is one copy of a generation's command: its main process and
// what relay keeps for it.
type copyProc struct {
	g          *generation
	worker     int // which copy, from 0
	proc       process
	log        *slog.Logger // its generation, worker (with several) and pid
	started    time.Time
	healthAddr string
	notify     *health.NotifySocket
	stderr     *tailBuffer
	copier     *stderrCopier
	// takeover answers the child tree's binds; nil with --takeover off.
	takeover    *bindTakeover
	cancelCheck context.CancelFunc
	// ready: it passed its readiness check.
	ready bool
	// exited: its main process exited; status says how.
	exited bool
	status reaper.Status
	// replaced counts the replacements of this copy before it, while its
	// generation served; crashes, its failures in a row, for the backoff;
	// replaceTimer, its pending replacement.
	replaced     int
	crashes      int
	replaceTimer timer
	// A rolling restart's old copy (rolling.go): leaving, it is out of
	// the spread and drains (drainCancel ends the watch, drainTimer is
	// --drain); stopSent, it had the stop signal, and killTimer kills it
	// after the stop timeout; refilled, it was started again after the
	// restart fell back.
	leaving, stopSent, refilled bool
	// Liveness of a copy of several (liveness.go, workers.go):
	// probing, a probe of it runs; liveFailures, its probes failed in a
	// row; failedLiveness, it failed its check or watchdog and is
	// stopped, to be replaced once it exits.
	probing               bool
	liveFailures          int
	failedLiveness        bool
	drainCancel           context.CancelFunc
	drainTimer, killTimer timer
	// pidForNotify is the pid, for the notify socket's goroutine.
	pidForNotify atomic.Int64
	// notified is closed at the child's first sd_notify message.
	notified     chan struct{}
	notifiedOnce sync.Once
	// pingPosted: a watchdogPing of this copy is on its way to the loop;
	// the notify goroutine posts no other meanwhile.
	pingPosted atomic.Bool
	// pinged: the child sent WATCHDOG=1 at least once; lastPing is when
	// the loop heard the last one.
	pinged   bool
	lastPing time.Time
	// stoppingPosted: a stoppingNotice of this copy was posted; the
	// notify goroutine posts no other (only the first matters).
	stoppingPosted atomic.Bool
}

// pid is the generation's first copy's pid: the one events, results and
// relay status name for the generation.
func (g *generation) pid() int { return g.copies[0].pid() }

func (c *copyProc) pid() int { return c.proc.pid() }

// first is the generation's first copy.
func (g *generation) first() *copyProc { return g.copies[0] }

// stderrTail is the tail of the stderr of the copy that failed g, or of
// its first copy.
func (g *generation) stderrTail() string {
	c := g.culprit
	if c == nil {
		c = g.first()
	}
	return c.stderr.Lines(stderrTailLines)
}

// pids lists the pids of g's copies, by worker.
func (g *generation) pids() []int {
	pids := make([]int, len(g.copies))
	for i, c := range g.copies {
		pids[i] = c.pid()
	}
	return pids
}

// allExited reports whether every copy's main process has exited: of the
// copies started, for a generation a rolling restart starts in batches.
func (g *generation) allExited() bool {
	for _, c := range g.copies {
		if !c.exited {
			return false
		}
	}
	return true
}

// spawn starts generation n of cmd: its first count copies of
// Config.Workers (a rolling restart starts the rest later). The returned
// generation is Starting; each copy's exit is posted to the supervisor as
// an exitEvent. Every copy takes its sockets before the first starts, so
// that a copy's bind finds its siblings holding the sockets they share (a
// rolling restart's later batches take theirs when they start). If
// a copy after the first cannot start, the generation is returned with
// those that did, killed, and its failure says why.
func (s *Supervisor) spawn(n int, cmd Command, count int) (*generation, error) {
	g := &generation{n: n, cmd: cmd, state: Starting}
	launches := make([]*launch, count)
	var err error
	for w := range launches {
		g.copies = append(g.copies, s.newCopy(g, w))
		if launches[w], err = s.prepare(g.copies[w]); err != nil {
			for _, l := range launches[:w] {
				l.done(err)
			}
			return nil, err
		}
	}
	g.started = s.env.now()
	for w, l := range launches {
		if err = s.startCopy(g.copies[w], l); err != nil {
			for _, l := range launches[w+1:] {
				l.done(err)
			}
			if w == 0 {
				return nil, err
			}
			g.copies = g.copies[:w]
			g.failure = err
			g.log.Error("cannot start every copy of the new generation; killing the others", "err", err)
			g.contain.kill()
			break
		}
		if w == 0 {
			g.log = s.cfg.Log.With("gen", n, "pid", g.pid())
		}
	}
	return g, nil
}

// newCopy is copy w of g, not yet started.
func (s *Supervisor) newCopy(g *generation, w int) *copyProc {
	return &copyProc{g: g, worker: w, stderr: newTailBuffer(stderrTailBytes), notified: make(chan struct{})}
}

// launchCopy makes ready and starts copy w of g on its own (a rolling
// restart's later batch, a replacement); old is the copy it takes the place
// of, nil for none, whose count of replacements and failures it carries on.
// Its check is the caller's to start.
func (s *Supervisor) launchCopy(g *generation, w int, old *copyProc) (*copyProc, error) {
	c := s.newCopy(g, w)
	if old != nil {
		c.replaced, c.crashes = old.replaced+1, old.crashes
	}
	l, err := s.prepare(c)
	if err != nil {
		return nil, err
	}
	if err := s.startCopy(c, l); err != nil {
		return nil, err
	}
	return c, nil
}

// startCopy starts copy c from its launch l, in its generation's cgroup.
func (s *Supervisor) startCopy(c *copyProc, l *launch) error {
	g := c.g
	c.started = s.env.now()
	var (
		cg  container
		err error
	)
	c.proc, cg, err = s.start(g, l.path, l.argv, l.attr)
	l.done(err)
	if err != nil {
		if s.cfg.Workers > 1 {
			return fmt.Errorf("starting copy %d of %s: %w", c.worker, g.cmd.Path, err)
		}
		return fmt.Errorf("starting %s: %w", g.cmd.Path, err)
	}
	c.log = s.copyLog(c)
	if g.contain == nil {
		g.contain = s.containmentOf(g, c, cg)
	} else {
		g.contain.add(c.proc)
	}
	c.pidForNotify.Store(int64(c.pid()))
	if c.takeover != nil {
		go s.serveTakeover(c, l.socks)
	}
	s.watchExit(c, l.stderr, nil)
	return nil
}

// copyLog is the logger of copy c: its generation, its worker number where
// there are several, and its pid.
func (s *Supervisor) copyLog(c *copyProc) *slog.Logger {
	if s.cfg.Workers > 1 {
		return s.cfg.Log.With("gen", c.g.n, "worker", c.worker, "pid", c.pid())
	}
	return s.cfg.Log.With("gen", c.g.n, "pid", c.pid())
}

// launch is a start of a generation made ready: the command line and
// attributes of its process, and what was opened for it, kept as two lists
// of closers (as os/exec keeps its files) that done closes.
type launch struct {
	path  string
	argv  []string
	attr  reaper.Attr
	socks []*os.File // its listening sockets
	// stderr is relay's end of its stderr pipe.
	stderr *os.File
	// childEnds are closed once it has its copies, started or not;
	// ours, only if it did not start.
	childEnds, ours []io.Closer
}

// done closes the child's ends, after the start; and relay's own too if
// the start failed with err.
func (l *launch) done(err error) {
	closeAll(l.childEnds)
	if err != nil {
		closeAll(l.ours)
	}
}

func closeAll(cs []io.Closer) {
	for _, c := range cs {
		c.Close()
	}
}

// closeFunc is a func as an io.Closer.
type closeFunc func()

func (f closeFunc) Close() error { f(); return nil }

// prepare makes ready the start of copy c: its health address and notify
// socket, its stderr pipe, its sockets, and with --takeover the handshake
// of its exec shim. What it opened is closed if it fails.
func (s *Supervisor) prepare(c *copyProc) (_ *launch, err error) {
	g := c.g
	l := &launch{}
	defer func() {
		if err != nil {
			l.done(err)
		}
	}()
	if c.healthAddr, err = health.PickHealthAddr(); err != nil {
		return nil, err
	}
	vars := health.Vars{Generation: g.n, Worker: c.worker, HealthAddr: c.healthAddr}
	notifyPath := filepath.Join(s.cfg.RuntimeDir, s.notifyName(c))
	if c.notify, err = health.ListenNotify(notifyPath, func(m health.NotifyMessage) { s.onNotify(c, m) }); err != nil {
		return nil, err
	}
	l.ours = append(l.ours, c.notify)
	if u := s.cfg.User; u != nil {
		if err := c.notify.Chown(int(u.UID), int(u.GID)); err != nil {
			return nil, err
		}
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("creating the child's stderr pipe: %w", err)
	}
	l.stderr = pr
	l.ours, l.childEnds = append(l.ours, pr), append(l.childEnds, pw)
	if l.socks, err = s.cfg.Sockets.Take(g.n, c.worker); err != nil {
		return nil, err
	}
	if c.worker == 0 && c.replaced == 0 {
		// A generation that never started gives its sockets back; a
		// copy's replacement that does not start leaves them to its
		// generation.
		l.ours = append(l.ours, closeFunc(func() { s.cfg.Sockets.Release(g.n) }))
	}
	files := append([]*os.File{s.cfg.Stdin, s.cfg.Stdout, pw}, l.socks...)
	var shim socketpass.Takeover
	if s.cfg.Takeover != TakeoverOff {
		var shimEnd *os.File
		if c.takeover, shimEnd, err = newBindTakeover(s.cfg.Sockets.Len()); err != nil {
			return nil, err
		}
		// Nothing serves the handshake until the child has started.
		l.ours, l.childEnds = append(l.ours, c.takeover.hs), append(l.childEnds, shimEnd)
		files = append(files, shimEnd)
		shim = socketpass.Takeover{FD: len(files) - 1, Required: s.cfg.Takeover == TakeoverOn, Unlink: len(s.unixPaths()) > 0, IOURing: s.cfg.IOURing}
	}
	args := make([]string, len(g.cmd.Args))
	for i, a := range g.cmd.Args {
		args[i] = health.Expand(a, vars)
	}
	l.path, l.argv = socketpass.ShimArgv(g.cmd.Path, args, shim, s.cfg.User)
	// Another user's server gets no controlling terminal: it must not
	// type into relay's.
	l.attr = reaper.Attr{Dir: s.cfg.Dir, Env: s.childEnv(notifyPath, vars), Files: files, NewGroup: true, NewSession: s.cfg.User != nil}
	return l, nil
}

// notifyName names the notify socket of copy c in the runtime directory:
// gen-N.notify for the one copy of generation N; gen-N.W.notify for copy W
// of several, with .R for its Rth replacement.
func (s *Supervisor) notifyName(c *copyProc) string {
	name := "gen-" + strconv.Itoa(c.g.n)
	if s.cfg.Workers > 1 || c.replaced > 0 {
		name += "." + strconv.Itoa(c.worker)
	}
	if c.replaced > 0 {
		name += "." + strconv.Itoa(c.replaced)
	}
	return name + ".notify"
}

// childEnv is the environment of a generation: relay's, its sockets', and
// its own (vars, its notify socket, the watchdog's).
func (s *Supervisor) childEnv(notifyPath string, vars health.Vars) []string {
	extra := append([]string{sdnotify.EnvNotifySocket + "=" + notifyPath}, vars.Env()...)
	if s.cfg.User != nil {
		extra = append(extra, s.cfg.User.Env()...)
	}
	if s.cfg.ChildWatchdog > 0 {
		// The exec shim adds WATCHDOG_PID, the child's own pid.
		extra = append(extra, socketpass.EnvWatchdogUsec+"="+strconv.FormatInt(s.cfg.ChildWatchdog.Microseconds(), 10))
	}
	return socketpass.ChildEnv(s.cfg.Env, s.cfg.Sockets.Names(), extra...)
}

// watchExit passes started copy c's stderr on from stderr, relay's end of
// its pipe, keeping its tail, and posts c's exit as an exitEvent once the
// last of its stderr was read, or stderrGrace after the exit. partial is
// the start of a line an earlier image of relay had read (handoff.go).
func (s *Supervisor) watchExit(c *copyProc, stderr *os.File, partial []byte) {
	s.copyStderr(c, stderr, partial)
	go func() {
		<-c.proc.Done()
		grace := make(chan struct{})
		t := s.env.afterFunc(stderrGrace, func() { close(grace) })
		select {
		case <-c.copier.done:
		case <-grace:
		}
		t.Stop()
		s.post(exitEvent{c: c, status: c.proc.Status()})
	}()
}

// copyStderr passes c's stderr on, from relay's end of its pipe (nil: it
// has ended), keeping its tail.
func (s *Supervisor) copyStderr(c *copyProc, stderr *os.File, partial []byte) {
	c.copier = newStderrCopier(stderr, &passThrough{out: s.cfg.Stderr, tail: c.stderr, partial: partial})
	if stderr == nil {
		close(c.copier.done)
		return
	}
	go c.copier.run()
}

// startCheck runs the readiness checks of a starting generation's copies,
// each proven on its own sockets.
func (s *Supervisor) startCheck(g *generation) {
	for _, c := range g.copies {
		s.startCopyCheck(c)
	}
}

// startCopyCheck runs the readiness check of copy c and posts its result
// as a checkEvent.
func (s *Supervisor) startCopyCheck(c *copyProc) {
	g := c.g
	ctx, cancel := s.env.withTimeout(context.Background(), s.cfg.HealthTimeout)
	c.cancelCheck = cancel
	child := health.Child{
		Vars:         health.Vars{Pid: c.pid(), Generation: g.n, Worker: c.worker, HealthAddr: c.healthAddr},
		NotifyReady:  c.notify.Ready(),
		Notified:     c.notified,
		SpeaksNotify: s.speaksNotify.Load,
		Control:      s.cfg.Sockets.ProbeControl(g.n, c.worker),
	}
	infos := s.cfg.Sockets.Info()
	probes := make([]string, len(infos))
	for i := range infos {
		probes[i] = s.cfg.Sockets.Probe(i)
	}
	var failed <-chan struct{} // stays nil without takeover
	if c.takeover != nil {
		failed = c.takeover.failed
	}
	go func() {
		// A bind relay had to refuse ends the check: the child
		// cannot serve that listener.
		wctx, stop := context.WithCancel(ctx)
		go func() {
			select {
			case <-failed:
				stop()
			case <-wctx.Done():
			}
		}()
		var claims []chan struct{}
		if c.takeover != nil {
			claims = c.takeover.claims(wctx)
		}
		for i, in := range infos {
			l := health.Listener{Name: in.Name, Probe: probes[i], QUIC: s.cfg.Sockets.QUICProbe(i, g.n)}
			if claims != nil {
				l.Claimed = claims[i]
			}
			child.Listeners = append(child.Listeners, l)
		}
		err := s.env.ready(wctx, child)
		stop()
		if c.takeover != nil && c.takeover.failedErr() != nil {
			err = c.takeover.failedErr()
		} else if err != nil && ctx.Err() == context.DeadlineExceeded {
			err = fmt.Errorf("not ready within --health-timeout %s: %w", s.cfg.HealthTimeout, err)
		}
		s.post(checkEvent{c: c, err: err})
	}()
}

func (s *Supervisor) onNotify(c *copyProc, m health.NotifyMessage) {
	// Runs on the notify socket's goroutine: only read immutable fields.
	l := s.cfg.Log.With("gen", c.g.n, "pid", c.pidForNotify.Load())
	if s.cfg.Workers > 1 {
		l = l.With("worker", c.worker)
	}
	// The server speaks sd_notify: from now on the default check waits
	// for READY=1 (see health.Auto).
	s.speaksNotify.Store(true)
	c.notifiedOnce.Do(func() { close(c.notified) })
	if st, ok := m.Vars["STATUS"]; ok {
		l.Info("child status", "status", st)
	}
	if m.Vars["READY"] == "1" {
		l.Debug("child sent READY=1")
	}
	watched := s.cfg.ChildWatchdog > 0
	if watched && m.Vars["WATCHDOG"] == "1" && c.pingPosted.CompareAndSwap(false, true) {
		// Never block the reading: at most one ping per copy is on
		// its way, and the loop takes its time as the last ping's.
		go s.post(watchdogPing{c: c})
	}
	if s.cfg.Confirm > 0 {
		// A generation on trial that says it stops or fails is rolled
		// back (confirm.go); the loop decides whether it is on trial.
		what := ""
		if m.Vars["STOPPING"] == "1" {
			what = "STOPPING=1"
		}
		if e, ok := m.Vars["ERRNO"]; ok {
			what = "ERRNO=" + e
		}
		if what != "" && c.stoppingPosted.CompareAndSwap(false, true) {
			go s.post(stoppingNotice{g: c.g, what: what})
		}
	}
	// The rest (STOPPING=1, MAINPID=, RELOADING=1, WATCHDOG=1 unless
	// --child-watchdog, FDSTORE=1, ...) stays here: relay is the
	// service's main process, and speaks to the service manager for
	// itself.
	var kept []string
	for k := range m.Vars {
		if k != "READY" && k != "STATUS" && !(watched && k == "WATCHDOG") {
			kept = append(kept, k)
		}
	}
	if len(kept) > 0 {
		slices.Sort(kept)
		l.Debug("child notify message not passed on to the service manager", "fields", kept)
	}
}

// steerTo sends the new connections of every steered listener to g. If one
// listener refuses, those already switched go back to the serving
// generation, so that no listener is left pointing at g alone.
func (s *Supervisor) steerTo(g *generation) error {
	back := 0
	if sv := s.gens.serving; sv != nil && sv != g {
		back = sv.n
	}
	return s.cfg.Sockets.Switch(g.n, back)
}

// releaseSockets gives back the sockets of generation g, whose copies have
// all exited, once relay has stopped answering their binds.
func (s *Supervisor) releaseSockets(g *generation) {
	for _, c := range g.copies {
		if c.takeover != nil {
			c.takeover.stop()
		}
	}
	s.cfg.Sockets.Release(g.n)
}
