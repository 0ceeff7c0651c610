package reaper

import (
	"errors"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// These tests start real processes (/bin/sh, /bin/sleep, /bin/cat). They
// do not run in parallel: each Reaper reaps every child of the test
// binary.

// waitLimit bounds every wait for something that should happen.
const waitLimit = 10 * time.Second

func newReaper(t *testing.T) *Reaper {
	t.Helper()
	r, err := New(slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}

// start starts argv with /dev/null at fds 0-2 and extra at fds 3...
func start(t *testing.T, r *Reaper, group bool, argv []string, extra ...*os.File) *Process {
	t.Helper()
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	p, err := r.Start(argv[0], argv, Attr{Files: append([]*os.File{devnull, devnull, devnull}, extra...), NewGroup: group})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.SignalGroup(syscall.SIGKILL)
		waitDone(t, p)
	})
	return p
}

func waitDone(t *testing.T, p *Process) Status {
	t.Helper()
	select {
	case <-p.Done():
		return p.Status()
	case <-time.After(waitLimit):
		t.Fatalf("pid %d did not exit", p.Pid)
		return Status{}
	}
}

func TestExitStatus(t *testing.T) {
	r := newReaper(t)
	p := start(t, r, false, []string{"/bin/sh", "-c", "exit 3"})
	st := waitDone(t, p)
	if st.Pid != p.Pid || st.ExitCode() != 3 || st.String() != "exit status 3" {
		t.Errorf("status pid %d %q code %d, want pid %d exit status 3", st.Pid, st, st.ExitCode(), p.Pid)
	}
	if err := p.Signal(syscall.SIGTERM); !errors.Is(err, os.ErrProcessDone) {
		t.Errorf("Signal after the exit: %v, want os.ErrProcessDone", err)
	}
	if p.GroupAlive() {
		t.Errorf("GroupAlive after the exit of a process with no group of its own")
	}
}

func TestSignalledStatus(t *testing.T) {
	r := newReaper(t)
	p := start(t, r, false, []string{"/bin/sleep", "1000"})
	if !p.GroupAlive() {
		t.Errorf("GroupAlive is false for a running process")
	}
	if err := p.SignalGroup(syscall.SIGTERM); err != nil { // no group: the process alone
		t.Fatal(err)
	}
	st := waitDone(t, p)
	if st.ExitCode() != 128+int(syscall.SIGTERM) || st.String() != "killed by signal 15 (SIGTERM)" {
		t.Errorf("status %q code %d, want killed by SIGTERM, 143", st, st.ExitCode())
	}
	if err := p.SignalGroup(syscall.SIGTERM); !errors.Is(err, os.ErrProcessDone) {
		t.Errorf("SignalGroup after the exit: %v, want os.ErrProcessDone", err)
	}
}

func TestStartFailure(t *testing.T) {
	r := newReaper(t)
	if _, err := r.Start("/nonexistent/server", []string{"server"}, Attr{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Start of a missing binary: %v, want os.ErrNotExist", err)
	}
}

// SignalGroup reaches every process of the group, not only its leader.
func TestSignalGroupReachesTheGroup(t *testing.T) {
	r := newReaper(t)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	// The leader tells the member's pid on fd 3, then waits for it.
	p := start(t, r, true, []string{"/bin/sh", "-c", "sleep 1000 & echo $! >&3; wait"}, pw)
	pw.Close()
	b := make([]byte, 32)
	n, err := pr.Read(b)
	if err != nil {
		t.Fatal(err)
	}
	member, err := strconv.Atoi(strings.TrimSpace(string(b[:n])))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.SignalGroup(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if st := waitDone(t, p); st.String() != "killed by signal 15 (SIGTERM)" {
		t.Errorf("leader %q, want killed by SIGTERM", st)
	}
	waitUntil(t, r, "the group to be gone", func() bool { return !p.GroupAlive() })
	if err := syscall.Kill(member, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("member %d after SIGTERM to its group: %v, want it gone", member, err)
	}
	if err := p.SignalGroup(syscall.SIGTERM); !errors.Is(err, os.ErrProcessDone) {
		t.Errorf("SignalGroup to an empty group: %v, want os.ErrProcessDone", err)
	}
}

// A group outlives its leader while a member lives, and the member,
// orphaned, is reaped by relay as a subreaper, which Orphans announces.
func TestOrphanedMemberIsReaped(t *testing.T) {
	r := newReaper(t)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pw.Close()
	// The member reads fd 3 until relay closes its write end.
	p := start(t, r, true, []string{"/bin/sh", "-c", "cat <&3 >/dev/null & exit 0"}, pr)
	pr.Close()
	if st := waitDone(t, p); st.ExitCode() != 0 {
		t.Fatalf("leader %q, want exit status 0", st)
	}
	if !p.GroupAlive() {
		t.Fatalf("GroupAlive is false while the member reads its pipe")
	}
	pw.Close()
	select {
	case <-r.Orphans():
	case <-time.After(waitLimit):
		t.Fatalf("no orphan was reaped")
	}
	if p.GroupAlive() {
		t.Errorf("GroupAlive after the orphaned member was reaped")
	}
}

// waitUntil waits until cond holds, looking again after each reap of an
// orphan and every few milliseconds, for waitLimit at most.
func waitUntil(t *testing.T, r *Reaper, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(waitLimit)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-r.Orphans():
		case <-tick.C:
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// A child's parent-death signal is tied to the thread that forked it: the
// reaper forks from a thread of its own, so a child started from a
// goroutine whose thread then ends (a goroutine that exits locked to its
// thread takes the thread with it) lives on, and one is killed when relay
// dies (the integration tests kill relay).
func TestChildOutlivesTheCallersThread(t *testing.T) {
	r := newReaper(t)
	started := make(chan *Process, 1)
	threadGone := make(chan struct{})
	go func() {
		defer close(threadGone)
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		started <- start(t, r, true, []string{"/bin/sleep", "60"})
	}()
	p := <-started
	<-threadGone
	// The thread ends after the goroutine; a child tied to it would get
	// SIGKILL then. Whatever happens next to the child shows in its
	// state, so start a second child from the test's own goroutine,
	// whose reap proves the first's SIGKILL would have been delivered.
	q := start(t, r, false, []string{"/bin/true"})
	waitDone(t, q)
	select {
	case <-p.Done():
		t.Fatalf("the child exited (%s) when the thread that asked for it ended", p.Status())
	default:
	}
	if err := p.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if st := waitDone(t, p); !st.WaitStatus.Signaled() || st.WaitStatus.Signal() != syscall.SIGKILL {
		t.Errorf("status %s, want our SIGKILL", st)
	}
}
