package reaper

import (
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Thread is the one OS thread that forks every process relay starts, and
// the one that replaces relay's image when relay upgrades itself.
//
// Both must be the same thread. A child's parent-death signal (Pdeathsig)
// fires when the thread that forked it ends, not the process; execve(2)
// ends every thread of the process but the caller, which goes on as the
// new image's main thread. So children forked from any other thread than
// the one that execs get their parent-death signal at the exec, and die.
// And after an exec, the children carried over belong to the new image's
// main thread: for a second exec to keep them, and the new image's own
// children, that image must fork from its main thread too. relay therefore
// forks and execs from its main thread (main locks it, then serves the
// Thread there: see Serve).
type Thread struct {
	reqC chan func()
	// main: Serve runs on the process's main thread (its tid is the
	// pid), where an exec keeps every child.
	main chan bool
}

// NewThread makes a Thread; nothing runs on it until Serve is called.
func NewThread() *Thread {
	return &Thread{reqC: make(chan func()), main: make(chan bool, 1)}
}

// Serve runs what Do is given, one at a time, on the calling goroutine's
// OS thread, which it locks, until stop is closed (nil: for ever). main
// calls it on the main goroutine, locked to the main thread from its
// first line; a goroutine that calls it instead gets a thread of its own,
// on which an exec would not keep children forked before an earlier exec
// (Exec refuses there).
func (t *Thread) Serve(stop <-chan struct{}) {
	runtime.LockOSThread()
	// Not unlocked: a thread that has forked children must not run other
	// goroutines' work that could end it (LockOSThread in a goroutine
	// that then exits), and Go ends a thread whose goroutine exits
	// locked, which is what happens here if stop is closed on a thread
	// of a goroutine's own.
	t.main <- unix.Gettid() == unix.Getpid()
	for {
		select {
		case f := <-t.reqC:
			f()
		case <-stop:
			return
		}
	}
}

// Do runs f on the thread and returns once it has run.
func (t *Thread) Do(f func()) {
	done := make(chan struct{})
	t.reqC <- func() { defer close(done); f() }
	<-done
}

// IsMain reports whether the thread is the process's main thread, once
// Serve runs. Only there can an exec keep every child.
func (t *Thread) IsMain() bool {
	m := <-t.main
	t.main <- m
	return m
}

// ErrNotMainThread is returned by Exec where Serve does not run on the
// process's main thread.
var ErrNotMainThread = errors.New("relay's processes are not forked from its main thread, so an exec would kill children started before an earlier exec")

// Exec replaces relay's image with path, run with argv and env, on the
// thread that forked relay's children, so that they live on. It returns
// only if the exec failed, and then nothing has changed. The caller has
// cleared close-on-exec on the fds that must cross.
func (t *Thread) Exec(path string, argv, env []string) error {
	if !t.IsMain() {
		return ErrNotMainThread
	}
	var err error
	t.Do(func() {
		restore, ierr := ignoreAcrossExec()
		if ierr != nil {
			err = ierr
			return
		}
		err = unix.Exec(path, argv, env)
		restore()
	})
	return fmt.Errorf("executing %s: %w", path, err)
}

// gapSignals are the signals relay acts on that would kill it, or its
// next image, between the exec and that image's signal.Notify: execve
// resets a handled signal to its default action, which for these ends the
// process (and so, through their parent-death signal, its children). An
// ignored signal stays ignored across execve; the Go runtime of the next
// image then leaves SIGHUP and SIGINT ignored until Notify, so that one
// sent meanwhile is lost instead of fatal, and installs its own handler for
// the others, from which a SIGTERM or SIGQUIT is still fatal for the few
// milliseconds until Notify (docs/upgrade.md).
func gapSignals() []unix.Signal {
	return []unix.Signal{unix.SIGHUP, unix.SIGINT, unix.SIGQUIT, unix.SIGTERM, unix.SIGUSR1, unix.SIGUSR2}
}

// sigaction is the kernel's struct sigaction on amd64 and arm64.
type sigaction struct {
	handler  uintptr
	flags    uint64
	restorer uintptr
	mask     uint64
}

// sigIgn is SIG_IGN.
const sigIgn = 1

// ignoreAcrossExec ignores gapSignals, with rt_sigaction itself: Go's
// signal.Ignore clears the runtime's own handling first, and a signal that
// comes in between kills the process. restore puts back the handlers the
// runtime had, after a failed exec.
func ignoreAcrossExec() (restore func(), err error) {
	sigs := gapSignals()
	old := make([]sigaction, len(sigs))
	restore = func() {
		for i := range sigs {
			rtSigaction(sigs[i], &old[i], nil)
		}
	}
	ign := sigaction{handler: sigIgn}
	for i, sig := range sigs {
		if err := rtSigaction(sig, &ign, &old[i]); err != nil {
			for j := range i {
				rtSigaction(sigs[j], &old[j], nil)
			}
			return nil, fmt.Errorf("ignoring %s across the exec: %w", unix.SignalName(sig), err)
		}
	}
	return restore, nil
}

func rtSigaction(sig unix.Signal, act, old *sigaction) error {
	_, _, errno := unix.RawSyscall6(unix.SYS_RT_SIGACTION, uintptr(sig), uintptr(unsafe.Pointer(act)), uintptr(unsafe.Pointer(old)), 8, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}
