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

// generation is one start of the command. The supervisor's loop owns every
// field but the ones its helper goroutines set before they post an event.
type generation struct {
	n          int
	cmd        Command
	proc       process
	log        *slog.Logger
	state      State
	started    time.Time
	readyAt    time.Time
	healthAddr string
	notify     *health.NotifySocket
	stderr     *tailBuffer
	copier     *stderrCopier

	cancelCheck context.CancelFunc
	// failure is why a starting generation was killed, if it was.
	failure error
	// killTimer sends SIGKILL to the group after the stop timeout, at
	// killAt.
	killTimer timer
	killAt    time.Time
	// killed: the stop timeout passed and it got SIGKILL.
	killed bool
	// contain is what it is made of: its cgroup, or its process group
	// and adopted orphans (contain.go).
	contain containment
	status  reaper.Status
	// gone: no process of it is left, its main process nor any other.
	gone bool
	// exitWatchers follow the restart that retired this generation, and
	// are told when it is gone.
	exitWatchers []*waiter
	// pidForNotify is the pid, for the notify socket's goroutine.
	pidForNotify atomic.Int64
	// takeover answers the child tree's binds; nil with --takeover off.
	takeover *bindTakeover
	// notified is closed at the child's first sd_notify message.
	notified     chan struct{}
	notifiedOnce sync.Once
	// pingPosted: a watchdogPing of this generation is on its way to the
	// loop; the notify goroutine posts no other meanwhile.
	pingPosted atomic.Bool
	// pinged: the child sent WATCHDOG=1 at least once; lastPing is when
	// the loop heard the last one.
	pinged   bool
	lastPing time.Time
	// failedLiveness: it failed its liveness check or watchdog while it
	// served; no confirmation window keeps it warm.
	failedLiveness bool
	// stoppingPosted: a stoppingNotice of this generation was posted;
	// the notify goroutine posts no other (only the first matters).
	stoppingPosted atomic.Bool
}

func (g *generation) pid() int { return g.proc.pid() }

// spawn starts generation n of cmd. The returned generation is Starting;
// its exit is posted to the supervisor as an exitEvent.
func (s *Supervisor) spawn(n int, cmd Command) (*generation, error) {
	g := &generation{n: n, cmd: cmd, state: Starting, stderr: newTailBuffer(stderrTailBytes), notified: make(chan struct{})}
	l, err := s.prepare(g)
	if err != nil {
		return nil, err
	}
	g.started = s.env.now()
	var cg container
	g.proc, cg, err = s.start(n, l.path, l.argv, l.attr)
	l.done(err)
	if err != nil {
		return nil, fmt.Errorf("starting %s: %w", cmd.Path, err)
	}
	g.log = s.cfg.Log.With("gen", n, "pid", g.pid())
	g.contain = s.containmentOf(g, cg)
	g.pidForNotify.Store(int64(g.pid()))
	if g.takeover != nil {
		go s.serveTakeover(g, l.socks)
	}
	s.watchExit(g, l.stderr, nil)
	return g, nil
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

// prepare makes ready the start of generation g: its health address and
// notify socket, its stderr pipe, its sockets, and with --takeover the
// handshake of its exec shim. What it opened is closed if it fails.
func (s *Supervisor) prepare(g *generation) (_ *launch, err error) {
	l := &launch{}
	defer func() {
		if err != nil {
			l.done(err)
		}
	}()
	if g.healthAddr, err = health.PickHealthAddr(); err != nil {
		return nil, err
	}
	vars := health.Vars{Generation: g.n, HealthAddr: g.healthAddr}
	notifyPath := filepath.Join(s.cfg.RuntimeDir, "gen-"+strconv.Itoa(g.n)+".notify")
	if g.notify, err = health.ListenNotify(notifyPath, func(m health.NotifyMessage) { s.onNotify(g, m) }); err != nil {
		return nil, err
	}
	l.ours = append(l.ours, g.notify)
	if u := s.cfg.User; u != nil {
		if err := g.notify.Chown(int(u.UID), int(u.GID)); err != nil {
			return nil, err
		}
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("creating the child's stderr pipe: %w", err)
	}
	l.stderr = pr
	l.ours, l.childEnds = append(l.ours, pr), append(l.childEnds, pw)
	if l.socks, err = s.cfg.Sockets.Take(g.n, 0); err != nil {
		return nil, err
	}
	l.ours = append(l.ours, closeFunc(func() { s.cfg.Sockets.Release(g.n) }))
	files := append([]*os.File{s.cfg.Stdin, s.cfg.Stdout, pw}, l.socks...)
	var shim socketpass.Takeover
	if s.cfg.Takeover != TakeoverOff {
		var shimEnd *os.File
		if g.takeover, shimEnd, err = newBindTakeover(s.cfg.Sockets.Len()); err != nil {
			return nil, err
		}
		// Nothing serves the handshake until the child has started.
		l.ours, l.childEnds = append(l.ours, g.takeover.hs), append(l.childEnds, shimEnd)
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

// watchExit passes started g's stderr on from stderr, relay's end of its
// pipe, keeping its tail, and posts g's exit as an exitEvent once the last
// of its stderr was read, or stderrGrace after the exit. partial is the
// start of a line an earlier image of relay had read (handoff.go).
func (s *Supervisor) watchExit(g *generation, stderr *os.File, partial []byte) {
	s.copyStderr(g, stderr, partial)
	go func() {
		<-g.proc.Done()
		grace := make(chan struct{})
		t := s.env.afterFunc(stderrGrace, func() { close(grace) })
		select {
		case <-g.copier.done:
		case <-grace:
		}
		t.Stop()
		s.post(exitEvent{g: g, status: g.proc.Status()})
	}()
}

// copyStderr passes g's stderr on, from relay's end of its pipe (nil: it
// has ended), keeping its tail.
func (s *Supervisor) copyStderr(g *generation, stderr *os.File, partial []byte) {
	g.copier = newStderrCopier(stderr, &passThrough{out: s.cfg.Stderr, tail: g.stderr, partial: partial})
	if stderr == nil {
		close(g.copier.done)
		return
	}
	go g.copier.run()
}

// startCheck runs the readiness check of a starting generation and posts
// its result as a checkEvent.
func (s *Supervisor) startCheck(g *generation) {
	ctx, cancel := s.env.withTimeout(context.Background(), s.cfg.HealthTimeout)
	g.cancelCheck = cancel
	child := health.Child{
		Vars:         health.Vars{Pid: g.pid(), Generation: g.n, HealthAddr: g.healthAddr},
		NotifyReady:  g.notify.Ready(),
		Notified:     g.notified,
		SpeaksNotify: s.speaksNotify.Load,
		Control:      s.cfg.Sockets.ProbeControl(g.n, 0),
	}
	infos := s.cfg.Sockets.Info()
	probes := make([]string, len(infos))
	for i := range infos {
		probes[i] = s.cfg.Sockets.Probe(i)
	}
	var failed <-chan struct{} // stays nil without takeover
	if g.takeover != nil {
		failed = g.takeover.failed
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
		if g.takeover != nil {
			claims = g.takeover.claims(wctx)
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
		if g.takeover != nil && g.takeover.failedErr() != nil {
			err = g.takeover.failedErr()
		} else if err != nil && ctx.Err() == context.DeadlineExceeded {
			err = fmt.Errorf("not ready within --health-timeout %s: %w", s.cfg.HealthTimeout, err)
		}
		s.post(checkEvent{g: g, err: err})
	}()
}

func (s *Supervisor) onNotify(g *generation, m health.NotifyMessage) {
	// Runs on the notify socket's goroutine: only read immutable fields.
	l := s.cfg.Log.With("gen", g.n, "pid", g.pidForNotify.Load())
	// The server speaks sd_notify: from now on the default check waits
	// for READY=1 (see health.Auto).
	s.speaksNotify.Store(true)
	g.notifiedOnce.Do(func() { close(g.notified) })
	if st, ok := m.Vars["STATUS"]; ok {
		l.Info("child status", "status", st)
	}
	if m.Vars["READY"] == "1" {
		l.Debug("child sent READY=1")
	}
	watched := s.cfg.ChildWatchdog > 0
	if watched && m.Vars["WATCHDOG"] == "1" && g.pingPosted.CompareAndSwap(false, true) {
		// Never block the reading: at most one ping per generation is
		// on its way, and the loop takes its time as the last ping's.
		go s.post(watchdogPing{g: g})
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
		if what != "" && g.stoppingPosted.CompareAndSwap(false, true) {
			go s.post(stoppingNotice{g: g, what: what})
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

// releaseSockets gives back the sockets of generation g, which has exited,
// once relay has stopped answering its binds.
func (s *Supervisor) releaseSockets(g *generation) {
	if g.takeover != nil {
		g.takeover.stop()
	}
	s.cfg.Sockets.Release(g.n)
}
