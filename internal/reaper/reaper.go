// Package reaper starts relay's processes and reaps every child relay has,
// including orphans that the kernel hands to relay as a child subreaper.
//
// One wait4(-1) loop reaps everything, so no other code in relay may wait
// for a process: os/exec's Cmd.Wait would race it. Start processes through
// Reaper.Start instead.
package reaper

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/procfs"
)

// Reaper starts processes and collects the exit status of every child.
type Reaper struct {
	log *slog.Logger

	mu      sync.Mutex // held across start+register and wait4+dispatch
	waiters map[int]*Process

	// thread forks every process (see Thread).
	thread  *Thread
	sigC    chan os.Signal
	orphanC chan struct{}
	stopC   chan struct{}
	doneC   chan struct{}
	once    sync.Once
	begin   sync.Once
	// adopted are the children New adopted, exited or not (Process).
	adopted map[int]*Process
}

// New makes relay a child subreaper (so orphaned descendants are reparented
// to it and reaped here, never left as zombies) and starts the reaping loop.
// Every process it starts is forked on thread; with a nil thread, on one
// of its own (an exec would then refuse: see Thread). adopt are children
// an earlier image of relay started (relay upgrade): they are waited for
// as if started here, from before the first reaping, so that an exit
// during the exec is reported as theirs. Call Close when done.
func New(log *slog.Logger, thread *Thread, adopt ...SavedProc) (*Reaper, error) {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return nil, fmt.Errorf("becoming a child subreaper: %w", err)
	}
	r := &Reaper{
		log:     log,
		waiters: make(map[int]*Process),
		adopted: make(map[int]*Process),
		thread:  thread,
		sigC:    make(chan os.Signal, 1),
		orphanC: make(chan struct{}, 1),
		stopC:   make(chan struct{}),
		doneC:   make(chan struct{}),
	}
	if r.thread == nil {
		r.thread = NewThread()
		go r.thread.Serve(nil)
	}
	for _, sp := range adopt {
		p, err := adoptProcess(sp)
		if err != nil {
			return nil, err
		}
		r.waiters[sp.Pid] = p
		r.adopted[sp.Pid] = p
	}
	signal.Notify(r.sigC, syscall.SIGCHLD)
	if len(adopt) == 0 {
		r.Begin()
	}
	return r, nil
}

// Begin starts the reaping, where New adopted children and left it to
// the caller: once relay is sure to stay this image, since an exit reaped
// here is lost to an image it would return to. Exits meanwhile wait as
// zombies. Begin may be called more than once.
func (r *Reaper) Begin() {
	r.begin.Do(func() { go r.loop() })
}

// Close stops the reaping loop.
func (r *Reaper) Close() {
	r.once.Do(func() {
		signal.Stop(r.sigC)
		close(r.stopC)
		r.Begin() // so that doneC closes
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
		st := Status{Pid: pid, WaitStatus: ws, Rusage: ru}
		if p != nil {
			// Under the lock: one that holds it (Hold) sees the
			// exit, or the process not yet reaped.
			p.finish(st)
		}
		r.mu.Unlock()
		if p == nil {
			r.log.Debug("reaped orphan", "pid", pid, "status", st.String())
			select {
			case r.orphanC <- struct{}{}:
			default:
			}
			continue
		}
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
	// NewSession puts it in a session of its own too, with no
	// controlling terminal (setsid): a process of another user must not
	// reach relay's terminal (TIOCSTI). Its group is its own, as with
	// NewGroup.
	NewSession bool
	// UseCgroupFD starts the process in the cgroup v2 whose directory
	// CgroupFD is open on (CLONE_INTO_CGROUP, Linux 5.7+).
	UseCgroupFD bool
	CgroupFD    int
}

// ParentDeathSignal is what every process relay starts gets when relay
// dies, however it dies: a generation does not outlive relay holding its
// port.
const ParentDeathSignal = syscall.SIGKILL

// Start starts a process whose exit the reaper will report.
func (r *Reaper) Start(path string, argv []string, attr Attr) (*Process, error) {
	pa := &os.ProcAttr{
		Dir:   attr.Dir,
		Env:   attr.Env,
		Files: attr.Files,
		Sys: &syscall.SysProcAttr{
			Setpgid:     attr.NewGroup && !attr.NewSession, // setsid makes a group too
			Setsid:      attr.NewSession,
			Pdeathsig:   ParentDeathSignal,
			UseCgroupFD: attr.UseCgroupFD,
			CgroupFD:    attr.CgroupFD,
		},
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var op *os.Process
	var err error
	r.thread.Do(func() { op, err = os.StartProcess(path, argv, pa) })
	if err != nil {
		return nil, err
	}
	p := &Process{Pid: op.Pid, proc: op, doneC: make(chan struct{}), group: attr.NewGroup || attr.NewSession}
	r.waiters[op.Pid] = p
	return p, nil
}

// SavedProc is a process the reaper waits for, as it crosses relay's exec
// of its next image.
type SavedProc struct {
	Pid   int  `json:"pid"`
	Group bool `json:"group"` // it leads a process group of its own
}

// Saved is what New needs to wait for p in the next image.
func (p *Process) Saved() SavedProc { return SavedProc{Pid: p.Pid, Group: p.group} }

// adoptProcess is the Process of a child started by an earlier image. Its
// pid cannot have been reused: relay has not reaped it.
func adoptProcess(sp SavedProc) (*Process, error) {
	op, err := os.FindProcess(sp.Pid)
	if err != nil {
		return nil, fmt.Errorf("adopting pid %d: %w", sp.Pid, err)
	}
	return &Process{Pid: sp.Pid, proc: op, doneC: make(chan struct{}), group: sp.Group}, nil
}

// Hold stops the reaping until release is called: while relay hands its
// state to its next image, no child's exit is collected by this one.
// Nothing may be started meanwhile.
func (r *Reaper) Hold() (release func()) {
	r.mu.Lock()
	var once sync.Once
	return func() { once.Do(r.mu.Unlock) }
}

// Exited is the Process of a child an earlier image started and reaped,
// whose status it handed over: its process group may outlive it.
func Exited(sp SavedProc, st Status) *Process {
	p := &Process{Pid: sp.Pid, doneC: make(chan struct{}), group: sp.Group, status: st}
	close(p.doneC)
	return p
}

// Process returns the Process New adopted for pid, exited or not, or the
// one Start started, if it has not exited.
func (r *Reaper) Process(pid int) *Process {
	r.mu.Lock()
	defer r.mu.Unlock()
	if p := r.adopted[pid]; p != nil {
		return p
	}
	return r.waiters[pid]
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

// GroupSize counts the processes of the group the process leads (1 or 0
// for a process that leads none), from /proc.
func (p *Process) GroupSize() int {
	if !p.group {
		if p.GroupAlive() {
			return 1
		}
		return 0
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil && pgid(pid) == p.Pid {
			n++
		}
	}
	return n
}

// pgid is pid's process group, from /proc/PID/stat; 0 if it is gone.
func pgid(pid int) int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// PID (COMM) STATE PPID PGRP ...; COMM may hold spaces and parens.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := bytes.Fields(b[i+1:])
	if len(f) < 3 {
		return 0
	}
	n, _ := strconv.Atoi(string(f[2]))
	return n
}

// Adopted lists relay's living children that it did not start itself
// (orphans of its children, reparented to relay as their subreaper) whose
// environment sets key to value, leaving out those in the process groups
// groups: what is left of a generation that escaped its process groups, by
// the RELAY_GENERATION its environment was given.
func (r *Reaper) Adopted(key, value string, groups ...int) []int {
	var out []int
	for _, pid := range procfs.Children(os.Getpid()) {
		r.mu.Lock()
		_, ours := r.waiters[pid]
		r.mu.Unlock()
		if ours || slices.Contains(groups, pgid(pid)) || !hasEnv(pid, key, value) {
			continue
		}
		out = append(out, pid)
	}
	return out
}

// hasEnv reports whether the last key= in pid's initial environment is
// key=value. A zombie's environment reads empty.
func hasEnv(pid int, key, value string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		return false
	}
	found := false
	for _, kv := range bytes.Split(b, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte(key+"=")); ok {
			found = string(v) == value
		}
	}
	return found
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
