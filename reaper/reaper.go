// Package reaper starts relay's processes and reaps every child relay has,
// including orphans that the kernel hands to relay as a child subreaper.
//
// One wait4(-1) loop reaps everything, so no other code in relay may wait
// for a process: os/exec's Cmd.Wait would race it. Start processes through
// Reaper.Start instead.
package reaper

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Reaper starts processes and collects the exit status of every child.
type Reaper struct {
	log *slog.Logger

	mu      sync.Mutex // held across start+register and wait4+dispatch
	waiters map[int]*Process

	sigC    chan os.Signal
	orphanC chan struct{}
	stopC   chan struct{}
	doneC   chan struct{}
	once    sync.Once
}

// New makes relay a child subreaper (so orphaned descendants are reparented
// to it and reaped here, never left as zombies) and starts the reaping loop.
// Call Close when done.
func New(log *slog.Logger) (*Reaper, error) {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return nil, fmt.Errorf("becoming a child subreaper: %w", err)
	}
	r := &Reaper{
		log:     log,
		waiters: make(map[int]*Process),
		sigC:    make(chan os.Signal, 1),
		orphanC: make(chan struct{}, 1),
		stopC:   make(chan struct{}),
		doneC:   make(chan struct{}),
	}
	signal.Notify(r.sigC, syscall.SIGCHLD)
	go r.loop()
	return r, nil
}

// Close stops the reaping loop.
func (r *Reaper) Close() {
	r.once.Do(func() {
		signal.Stop(r.sigC)
		close(r.stopC)
		<-r.doneC
	})
}

func (r *Reaper) loop() {
	defer close(r.doneC)
	r.reapAll() // anything that exited before Notify took effect
	for {
		select {
		case <-r.sigC:
			r.reapAll()
		case <-r.stopC:
			r.reapAll()
			return
		}
	}
}

// reapAll reaps every child that has exited. SIGCHLD is not queued, so
// one signal may stand for several exits.
func (r *Reaper) reapAll() {
	for {
		r.mu.Lock()
		var ws unix.WaitStatus
		var ru unix.Rusage
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, &ru)
		if errors.Is(err, unix.EINTR) {
			r.mu.Unlock()
			continue
		}
		if err != nil || pid <= 0 {
			r.mu.Unlock()
			return // ECHILD: no children; 0: none has exited
		}
		p := r.waiters[pid]
		delete(r.waiters, pid)
		r.mu.Unlock()

		st := Status{Pid: pid, WaitStatus: ws, Rusage: ru}
		if p == nil {
			r.log.Debug("reaped orphan", "pid", pid, "status", st.String())
			select {
			case r.orphanC <- struct{}{}:
			default:
			}
			continue
		}
		p.finish(st)
	}
}

// Orphans receives a value after one or more processes that relay did not
// start itself (orphans reparented to it) were reaped.
func (r *Reaper) Orphans() <-chan struct{} { return r.orphanC }

// Attr says how to start a process.
type Attr struct {
	Dir   string
	Env   []string
	Files []*os.File // fds 0, 1, 2, 3, ... in the child; nil means closed
	// NewGroup puts the process in a process group of its own, whose id is
	// its pid.
	NewGroup bool
}

// Start starts a process whose exit the reaper will report.
func (r *Reaper) Start(path string, argv []string, attr Attr) (*Process, error) {
	pa := &os.ProcAttr{
		Dir:   attr.Dir,
		Env:   attr.Env,
		Files: attr.Files,
		Sys:   &syscall.SysProcAttr{Setpgid: attr.NewGroup},
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	op, err := os.StartProcess(path, argv, pa)
	if err != nil {
		return nil, err
	}
	p := &Process{Pid: op.Pid, proc: op, doneC: make(chan struct{}), group: attr.NewGroup}
	r.waiters[op.Pid] = p
	return p, nil
}

// Process is a started process.
type Process struct {
	Pid   int
	proc  *os.Process
	group bool

	doneC  chan struct{}
	status Status
}

func (p *Process) finish(st Status) {
	p.status = st
	close(p.doneC)
	// The pidfd inside os.Process is no longer useful.
	p.proc.Release()
}

// Done is closed once the process has exited and been reaped.
func (p *Process) Done() <-chan struct{} { return p.doneC }

// Status returns the exit status. It is valid once Done is closed.
func (p *Process) Status() Status {
	<-p.doneC
	return p.status
}

// Signal sends sig to the process alone. It reports os.ErrProcessDone when
// the process has already exited.
func (p *Process) Signal(sig syscall.Signal) error {
	select {
	case <-p.doneC:
		return os.ErrProcessDone
	default:
	}
	return p.proc.Signal(sig)
}

// SignalGroup sends sig to the process group the process leads. Members of
// the group may outlive its leader; the group id cannot be reused while any
// of them is alive. It reports os.ErrProcessDone when the group is empty.
func (p *Process) SignalGroup(sig syscall.Signal) error {
	if !p.group {
		return p.Signal(sig)
	}
	err := unix.Kill(-p.Pid, sig)
	if errors.Is(err, unix.ESRCH) {
		return os.ErrProcessDone
	}
	return err
}

// GroupAlive reports whether any process of the group is still alive or not
// yet reaped.
func (p *Process) GroupAlive() bool {
	if !p.group {
		select {
		case <-p.doneC:
			return false
		default:
			return true
		}
	}
	err := unix.Kill(-p.Pid, 0)
	return err == nil || errors.Is(err, unix.EPERM)
}

// Status is how a process ended.
type Status struct {
	Pid        int
	WaitStatus unix.WaitStatus
	Rusage     unix.Rusage
}

// ExitCode is the shell's view of the status: the exit code, or 128 plus the
// signal number for a process killed by a signal.
func (s Status) ExitCode() int {
	if s.WaitStatus.Signaled() {
		return 128 + int(s.WaitStatus.Signal())
	}
	return s.WaitStatus.ExitStatus()
}

func (s Status) String() string {
	if s.WaitStatus.Signaled() {
		sig := s.WaitStatus.Signal()
		return fmt.Sprintf("killed by signal %d (%s)", int(sig), unix.SignalName(sig))
	}
	return fmt.Sprintf("exit status %d", s.WaitStatus.ExitStatus())
}
