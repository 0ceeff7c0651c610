package supervisor

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/reaper"
	"github.com/relaysh/relay/socketpass"
	"github.com/relaysh/relay/steer"
)

// State is where a generation is in its life.
type State string

// The states of a generation.
const (
	Starting State = "starting" // started, not yet proven ready
	Serving  State = "serving"  // ready, and the newest ready generation
	Draining State = "draining" // replaced, still serving for the drain window
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
	proc       *reaper.Process
	log        *slog.Logger
	state      State
	started    time.Time
	readyAt    time.Time
	healthAddr string
	notify     *health.NotifySocket
	stderr     *tailBuffer

	cancelCheck context.CancelFunc
	// failure is why a starting generation was killed, if it was.
	failure error
	// killTimer sends SIGKILL to the group after the stop timeout.
	killTimer *time.Timer
	status    reaper.Status
	// exitWatchers follow the restart that retired this generation, and
	// are told when it exits.
	exitWatchers []*waiter
	// pidForNotify is the pid, for the notify socket's goroutine.
	pidForNotify atomic.Int64
}

func (g *generation) pid() int { return g.proc.Pid }

// spawn starts generation n of cmd. The returned generation is Starting;
// its exit is posted to the supervisor as an exitEvent.
func (s *Supervisor) spawn(n int, cmd Command) (*generation, error) {
	g := &generation{n: n, cmd: cmd, state: Starting, stderr: newTailBuffer(stderrTailBytes)}
	var err error
	if g.healthAddr, err = health.PickHealthAddr(); err != nil {
		return nil, err
	}
	vars := health.Vars{Generation: n, HealthAddr: g.healthAddr}
	notifyPath := filepath.Join(s.cfg.RuntimeDir, "gen-"+strconv.Itoa(n)+".notify")
	if g.notify, err = health.ListenNotify(notifyPath, func(m health.NotifyMessage) { s.onNotify(g, m) }); err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			g.notify.Close()
		}
	}()

	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("creating the child's stderr pipe: %w", err)
	}
	defer pw.Close()

	args := make([]string, len(cmd.Args))
	for i, a := range cmd.Args {
		args[i] = health.Expand(a, vars)
	}
	_, port, _ := net.SplitHostPort(g.healthAddr)
	env := socketpass.ChildEnv(s.cfg.Env, s.cfg.Listeners,
		socketpass.EnvNotifySocket+"="+notifyPath,
		health.EnvGeneration+"="+strconv.Itoa(n),
		health.EnvHealthAddr+"="+g.healthAddr,
		health.EnvHealthPort+"="+port,
	)
	files := []*os.File{s.cfg.Stdin, s.cfg.Stdout, pw}
	defer func() {
		if !ok {
			s.releaseSockets(n)
		}
	}()
	for i, l := range s.cfg.Listeners {
		f := l.File()
		if grp := s.cfg.Steer[i]; grp != nil {
			if f, err = grp.Take(n); err != nil {
				pr.Close()
				return nil, fmt.Errorf("giving generation %d a socket of its own: %w", n, err)
			}
		}
		files = append(files, f)
	}
	path, argv := socketpass.ShimArgv(cmd.Path, args, socketpass.Takeover{})
	g.started = time.Now()
	g.proc, err = s.cfg.Reaper.Start(path, argv, reaper.Attr{Dir: s.cfg.Dir, Env: env, Files: files, NewGroup: true})
	if err != nil {
		pr.Close()
		return nil, fmt.Errorf("starting %s: %w", cmd.Path, err)
	}
	ok = true
	g.log = s.cfg.Log.With("gen", n, "pid", g.proc.Pid)
	g.pidForNotify.Store(int64(g.proc.Pid))

	copied := make(chan struct{})
	go func() {
		defer close(copied)
		defer pr.Close()
		// Pass the bytes on untouched, and keep the tail for reports.
		// Keep reading even when relay's own stderr fails: closing
		// the pipe would kill the child with SIGPIPE.
		io.Copy(passThrough{s.cfg.Stderr, g.stderr}, pr)
	}()
	go func() {
		<-g.proc.Done()
		t := time.NewTimer(stderrGrace)
		select {
		case <-copied:
		case <-t.C:
		}
		t.Stop()
		s.post(exitEvent{g: g, status: g.proc.Status()})
	}()
	return g, nil
}

// startCheck runs the readiness check of a starting generation and posts
// its result as a checkEvent.
func (s *Supervisor) startCheck(g *generation) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.HealthTimeout)
	g.cancelCheck = cancel
	child := health.Child{
		Vars:        health.Vars{Pid: g.pid(), Generation: g.n, HealthAddr: g.healthAddr},
		NotifyReady: g.notify.Ready(),
		Control:     steer.ProbeControl(s.cfg.Steer, g.n),
	}
	go func() {
		err := s.checker.Wait(ctx, child)
		if err != nil && ctx.Err() == context.DeadlineExceeded {
			err = fmt.Errorf("not ready within --health-timeout %s: %w", s.cfg.HealthTimeout, err)
		}
		s.post(checkEvent{g: g, err: err})
	}()
}

func (s *Supervisor) onNotify(g *generation, m health.NotifyMessage) {
	// Runs on the notify socket's goroutine: only read immutable fields.
	l := s.cfg.Log.With("gen", g.n, "pid", g.pidForNotify.Load())
	if st, ok := m.Vars["STATUS"]; ok {
		l.Info("child status", "status", st)
	}
	if m.Vars["READY"] == "1" {
		l.Debug("child sent READY=1")
	}
	// The rest (STOPPING=1, MAINPID=, RELOADING=1, WATCHDOG=1, FDSTORE=1,
	// ...) stays here: relay is the service's main process, and speaks to
	// the service manager for itself.
	var kept []string
	for k := range m.Vars {
		if k != "READY" && k != "STATUS" {
			kept = append(kept, k)
		}
	}
	if len(kept) > 0 {
		slices.Sort(kept)
		l.Debug("child notify message not passed on to the service manager", "fields", kept)
	}
}

// passThrough writes to out, ignoring its errors, and to tail.
type passThrough struct {
	out  io.Writer
	tail *tailBuffer
}

func (p passThrough) Write(b []byte) (int, error) {
	p.out.Write(b) // a closed or full log reader must not stop the copy
	return p.tail.Write(b)
}

// steerTo sends the new connections of every steered listener to g. If one
// listener refuses, those already switched go back to the serving
// generation, so that no listener is left pointing at g alone.
func (s *Supervisor) steerTo(g *generation) error {
	var done []*steer.Group
	for _, grp := range s.cfg.Steer {
		if grp == nil {
			continue
		}
		if err := grp.Switch(g.n); err != nil {
			if back := s.serving; back != nil && back != g {
				for _, d := range done {
					if berr := d.Switch(back.n); berr != nil {
						back.log.Error("steering new connections back", "err", berr)
					}
				}
			}
			return fmt.Errorf("steering new connections to generation %d: %w", g.n, err)
		}
		done = append(done, grp)
	}
	return nil
}

// releaseSockets gives back the sockets of generation n, which has exited.
func (s *Supervisor) releaseSockets(n int) {
	for _, grp := range s.cfg.Steer {
		if grp != nil {
			grp.Release(n)
		}
	}
}
