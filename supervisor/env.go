package supervisor

import (
	"context"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/internal/cgroup"
	"github.com/relaysh/relay/internal/reaper"
	"github.com/relaysh/relay/internal/sockets"
	"github.com/relaysh/relay/internal/sockets/steer"
	"github.com/relaysh/relay/socketpass"
)

// env is everything the state machine needs from outside its goroutine:
// starting processes, hearing of orphans, the clock and the two kinds of
// check. New wires the real ones (reaper, package time, package health);
// the tests wire fakes driven by channels, so that a transition runs in
// microseconds with no child process and no sleep.
type env struct {
	// start starts a process whose exit its Done reports.
	start func(path string, argv []string, attr reaper.Attr) (process, error)
	// orphans receives a value after processes relay did not start
	// itself were reaped: a lingering group may have emptied.
	orphans <-chan struct{}
	// contain makes the cgroup of generation n; nil where relay has no
	// cgroup, and generations are contained by process group only.
	contain func(n int) (container, error)
	// adopted lists the orphans of generation n reparented to relay
	// that left the process groups of its copies (groups); nil for none.
	// Only without cgroups, where it is how relay finds what escaped the
	// groups.
	adopted func(n int, groups []int) []int
	// signalPid sends sig to an adopted orphan: unix.Kill.
	signalPid func(pid int, sig syscall.Signal) error
	// ready is the readiness check of a starting child: nil once it is
	// ready, or an error that wraps ctx's error once ctx ends.
	ready func(ctx context.Context, ch health.Child) error
	// probe is one liveness probe of a serving child: nil if it passed.
	probe func(ctx context.Context, ch health.Child) error
	// preflight runs a pre-flight command with childEnv; nil if it
	// exited 0.
	preflight func(ctx context.Context, argv, childEnv []string) error
	// drained returns nil once nothing more can reach generation n's
	// steered sockets, n having just been replaced, or ctx's error; nil
	// (the func) where that cannot be seen, and drains last --drain.
	// waiting hears, once, what was still on its way at the first look.
	drained func(ctx context.Context, n int, waiting func(steer.Backlog)) error
	// stalled returns nil once generation n, switched away from, has
	// connections queued on a steered socket and has accepted none of
	// them for quiet, or ctx's error. handOver then takes n's steered
	// sockets out of their groups at once, so that the kernel moves what
	// is queued on them to the other sockets of the groups; it returns
	// how many connections were queued. Both nil where the kernel would
	// reset them instead (net.ipv4.tcp_migrate_req off) or nothing is
	// steered.
	stalled func(ctx context.Context, n int, quiet time.Duration) error
	// copyDrained returns once nothing more can reach the steered
	// sockets of copy worker of generation n, taken out of the spread;
	// nil where that cannot be seen (a leaving copy then drains for
	// --drain).
	copyDrained func(ctx context.Context, n, worker int) error
	handOver    func(n int) (int, error)

	// adopt is the process of a child an earlier image of relay started
	// (Restore), or, given its status, that it reaped; nil if it is not
	// relay's. adoptContainer is the cgroup
	// of generation n that such an image made. holdReaps stops the
	// reaping of children until release is called, while the state is
	// handed over (Handoff); nil where nothing reaps.
	adopt          func(reaper.SavedProc, *reaper.Status) process
	adoptContainer func(n int) container
	holdReaps      func() (release func())

	// now, afterFunc and withTimeout are the clock: time.Now,
	// time.AfterFunc and context.WithTimeout.
	now         func() time.Time
	afterFunc   func(d time.Duration, f func()) timer
	withTimeout func(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc)

	// stepped, if not nil, is called on Run's goroutine with what it
	// handled (the first start, a request, an event, the orphans reaped)
	// once it has: the tests check the invariants of the state there.
	// Nil in production.
	stepped func(handled any)
}

// timer is a pending call of env.afterFunc; *time.Timer is one.
type timer interface {
	// Stop prevents the call if it has not happened, and reports
	// whether it did.
	Stop() bool
}

// process is a started child as the state machine sees it.
// *reaper.Process is one.
type process interface {
	// Signal sends sig to the process alone; os.ErrProcessDone once it
	// has exited.
	Signal(sig syscall.Signal) error
	// SignalGroup sends sig to the process group it leads;
	// os.ErrProcessDone once the group is empty.
	SignalGroup(sig syscall.Signal) error
	// GroupAlive reports whether any process of its group is alive.
	GroupAlive() bool
	// GroupSize counts the processes of its group.
	GroupSize() int
	// Done is closed once the process has exited and been reaped.
	Done() <-chan struct{}
	// Status is how it exited, once Done is closed.
	Status() reaper.Status
	// pid is its process id.
	pid() int
}

// container is a generation's cgroup as the state machine sees it.
// *cgroup.Group is one.
type container interface {
	// FD is the cgroup's directory fd for the start, until CloseFD.
	FD() int
	CloseFD()
	// Add moves pid in: for kernels without CLONE_INTO_CGROUP.
	Add(pid int) error
	// Count is the number of processes in it.
	Count() int
	// Populated reports whether any process is in it.
	Populated() bool
	// Signal sends sig to every process in it.
	Signal(sig syscall.Signal) error
	// Kill kills every process in it.
	Kill() error
	// WaitEmpty returns once it has no process (true), or once done is
	// closed.
	WaitEmpty(done <-chan struct{}) bool
	// Remove removes it, once empty.
	Remove() error
	// Open opens the cgroup again for CLONE_INTO_CGROUP (FD), for a
	// copy that joins its generation's.
	Open() error
	// Path is its directory, for the logs.
	Path() string
}

// reaperProcess is a process started by the reaper.
type reaperProcess struct{ *reaper.Process }

func (p reaperProcess) pid() int { return p.Pid }

// reaperEnv is the production env: processes from rp, the real clock, and
// package health's checks of spec and of liveness; with tree, a cgroup per
// generation; the drain watch of set's steered sockets where it has one.
func reaperEnv(rp *reaper.Reaper, spec, liveness health.Spec, baseEnv []string, tree *cgroup.Tree, set *sockets.Set) env {
	checker := health.NewChecker(spec, rp, socketpass.ChildEnv(baseEnv, nil))
	live := health.NewChecker(liveness, rp, socketpass.ChildEnv(baseEnv, nil))
	var contain func(int) (container, error)
	adopted := func(n int, groups []int) []int { return rp.Adopted(health.EnvGeneration, strconv.Itoa(n), groups...) }
	var adoptContainer func(int) container
	if tree != nil {
		contain = func(n int) (container, error) { return tree.NewGroup(n) }
		adoptContainer = func(n int) container { return tree.Group(n) }
		adopted = nil
	}
	var drained func(context.Context, int, func(steer.Backlog)) error
	var copyDrained func(context.Context, int, int) error
	if set.DrainObservable() {
		drained = set.WaitDrained
		copyDrained = func(ctx context.Context, n, worker int) error { return set.WaitCopyDrained(ctx, n, worker, nil) }
	}
	var stalled func(context.Context, int, time.Duration) error
	var handOver func(int) (int, error)
	if set.Migrates() { // only where a listener is steered
		stalled, handOver = set.WaitStalled, set.HandOver
	}
	return env{
		drained:     drained,
		copyDrained: copyDrained,
		stalled:     stalled,
		handOver:    handOver,
		contain:     contain,
		adopted:     adopted,
		signalPid:   unix.Kill,
		start: func(path string, argv []string, attr reaper.Attr) (process, error) {
			p, err := rp.Start(path, argv, attr)
			if err != nil {
				return nil, err
			}
			return reaperProcess{p}, nil
		},
		orphans: rp.Orphans(),
		adopt: func(sp reaper.SavedProc, exited *reaper.Status) process {
			if exited != nil {
				return reaperProcess{reaper.Exited(sp, *exited)}
			}
			if p := rp.Process(sp.Pid); p != nil {
				return reaperProcess{p}
			}
			return nil
		},
		adoptContainer: adoptContainer,
		holdReaps:      rp.Hold,
		ready:          checker.Wait,
		probe:          live.Probe,
		preflight: func(ctx context.Context, argv, childEnv []string) error {
			return health.RunCommand(ctx, rp, argv, childEnv)
		},
		now:         time.Now,
		afterFunc:   func(d time.Duration, f func()) timer { return time.AfterFunc(d, f) },
		withTimeout: context.WithTimeout,
	}
}
