package supervisor

import (
	"fmt"
	"slices"
	"sync"
	"syscall"
	"testing"

	"github.com/relaysh/relay/signals"
)

// fakeCgroup is a generation's cgroup: its members are the main process
// (while the fakeProc lives) and the others a test puts in.
type fakeCgroup struct {
	n    int
	main *fakeProc // set at the start

	mu       sync.Mutex
	others   int           // processes besides the main one
	signals  []string      // what Signal and Kill sent its members
	removedC chan struct{} // closed by Remove
	fdClosed bool
	emptyC   chan struct{} // closed once it has no process
}

func (h *harness) newCgroup(n int) (container, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	c := &fakeCgroup{n: n, emptyC: make(chan struct{}), removedC: make(chan struct{})}
	h.cgroups = append(h.cgroups, c)
	return c, nil
}

// cgroup is generation n's, once it started.
func (h *harness) cgroup(n int) *fakeCgroup {
	h.t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	if n > len(h.cgroups) {
		h.t.Fatalf("generation %d has no cgroup", n)
	}
	return h.cgroups[n-1]
}

const fakeCgroupFD = 99

func (c *fakeCgroup) FD() int           { return fakeCgroupFD }
func (c *fakeCgroup) Add(int) error     { return nil }
func (c *fakeCgroup) Path() string      { return fmt.Sprintf("/cg/gen-%d", c.n) }
func (c *fakeCgroup) Populated() bool   { return c.Count() > 0 }
func (c *fakeCgroup) CloseFD()          { c.mu.Lock(); c.fdClosed = true; c.mu.Unlock() }
func (c *fakeCgroup) Open() error       { c.mu.Lock(); c.fdClosed = false; c.mu.Unlock(); return nil }
func (c *fakeCgroup) mainAlive() bool   { return c.main != nil && !c.main.exitedNow() }
func (c *fakeCgroup) got() []string     { c.mu.Lock(); defer c.mu.Unlock(); return slices.Clone(c.signals) }
func (c *fakeCgroup) fdWasClosed() bool { c.mu.Lock(); defer c.mu.Unlock(); return c.fdClosed }

func (c *fakeCgroup) Count() int {
	c.mu.Lock()
	n := c.others
	c.mu.Unlock()
	if c.mainAlive() {
		n++
	}
	return n
}

func (c *fakeCgroup) Signal(sig syscall.Signal) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.signals = append(c.signals, signals.Name(sig))
	return nil
}

// Kill empties the cgroup; the main process, if alive, is killed too.
func (c *fakeCgroup) Kill() error {
	c.mu.Lock()
	c.signals = append(c.signals, "kill")
	c.mu.Unlock()
	if c.mainAlive() {
		c.main.exit(killed(syscall.SIGKILL), false)
	}
	c.setOthers(0)
	return nil
}

func (c *fakeCgroup) setOthers(n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.others = n
	if n == 0 && (c.main == nil || c.main.exitedNow()) {
		select {
		case <-c.emptyC:
		default:
			close(c.emptyC)
		}
	}
}

func (c *fakeCgroup) WaitEmpty(done <-chan struct{}) bool {
	select {
	case <-c.emptyC:
		return true
	case <-done:
		return false
	}
}

func (c *fakeCgroup) Remove() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.others > 0 || c.mainAlive() {
		return fmt.Errorf("cgroup %d busy", c.n)
	}
	close(c.removedC)
	return nil
}

func (c *fakeCgroup) wasRemoved() bool {
	select {
	case <-c.removedC:
		return true
	default:
		return false
	}
}

// The stop signal is followed by SIGCONT, so that a stopped (SIGSTOP)
// child can act on it: at relay's stop, and to the old generation of a
// restart.
func TestStopSignalThenCont(t *testing.T) {
	t.Parallel()
	h := newHarness(t, func(c *Config) { c.StopSignal = syscall.SIGQUIT })
	p1, p2, _, _ := h.draining(RestartRequest{})
	h.clock.waitTimer(t, testDrain) // armed after the draining event
	h.clock.advance(testDrain)
	p1.waitSeq(t, "QUIT", "group CONT")
	p1.exit(exited(0), false)
	h.sup.Stop(false)
	p2.waitSeq(t, "QUIT", "group CONT")
	p2.exit(exited(0), false)
	h.wait()
}

// With a cgroup, a generation starts in it, and the state machine treats
// the cgroup as the generation: a process that left the process group
// (setsid) keeps it lingering after its main process exits; the leftovers
// get the stop signal and SIGCONT, then a kill of the whole cgroup after
// the stop timeout; the cgroup is removed once empty, and Run returns only
// then.
func TestCgroupIsTheGeneration(t *testing.T) {
	t.Parallel()
	h := newHarnessContained(t, nil, true)
	p1 := h.serving()
	cg := h.cgroup(1)
	if a := h.attrs[0]; !a.UseCgroupFD || a.CgroupFD != fakeCgroupFD {
		t.Errorf("started with UseCgroupFD %v CgroupFD %d, want its cgroup's fd %d", a.UseCgroupFD, a.CgroupFD, fakeCgroupFD)
	}
	if !cg.fdWasClosed() {
		t.Errorf("the cgroup's fd was not closed after the start")
	}
	cg.setOthers(2) // a setsid daemon and its child
	if st := h.wantGens("1:serving"); st.Generations[0].Processes != 3 {
		t.Errorf("status says %d processes, want 3", st.Generations[0].Processes)
	}
	h.sup.Stop(false)
	p1.waitSignals(t, "TERM")
	p1.exit(exited(0), false)
	h.waitLine("stopping; gen 1 pid 1001 exited, processes left") // the main process is gone; the cgroup lingers
	if got := cg.got(); !slices.Equal(got, []string{"CONT"}) {
		t.Errorf("the leftovers of a generation told to stop got %q, want only the SIGCONT after the stop signal", got)
	}
	if cg.wasRemoved() {
		t.Fatalf("the cgroup was removed while it had processes")
	}
	select {
	case <-h.sup.Done():
		t.Fatalf("Run returned while the generation's cgroup had processes")
	default:
	}
	h.clock.advance(testStopTimeout)
	h.wait()
	if got := cg.got(); !slices.Equal(got, []string{"CONT", "kill"}) {
		t.Errorf("the cgroup got %q, want the SIGCONT after the stop signal, then one kill", got)
	}
	if !cg.wasRemoved() {
		t.Errorf("the empty cgroup was not removed")
	}
}

// A serving generation whose main process exits on its own, leaving
// processes in its cgroup: they get the stop signal and SIGCONT, then the
// kill after the stop timeout, while a replacement starts.
func TestCgroupLeftoversOfACrash(t *testing.T) {
	t.Parallel()
	h := newHarnessContained(t, nil, true)
	h.serving()
	cg := h.cgroup(1)
	cg.setOthers(1)
	cg.main.exit(exited(3), false)
	h.waitLine("no generation serving; gen 1 pid 1001 exited, processes left; replacement pending")
	h.clock.waitTimer(t, testStopTimeout)
	if got := cg.got(); !slices.Equal(got, []string{"TERM", "CONT"}) {
		t.Errorf("the leftovers got %q, want TERM then CONT", got)
	}
	h.clock.advance(testRestartBackoff)
	h.started()
	h.clock.advance(testStopTimeout)
	recv(t, cg.removedC, "the cgroup's removal")
	if got := cg.got(); !slices.Equal(got, []string{"TERM", "CONT", "kill"}) {
		t.Errorf("the leftovers got %q, want TERM, CONT, then the kill", got)
	}
}

// adopted is env.adopted: the orphans a test put in generation n.
func (h *harness) adopted(n int, _ []int) []int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.orphans[n])
}

// adopt makes pids orphans of generation n that left its group, or none.
func (h *harness) adopt(n int, pids ...int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.orphans == nil {
		h.orphans = map[int][]int{}
	}
	h.orphans[n] = pids
}

func (h *harness) signalPid(pid int, sig syscall.Signal) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.orphanSigs = append(h.orphanSigs, fmt.Sprintf("%d %s", pid, signals.Name(sig)))
	return nil
}

func (h *harness) orphanSignals() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.orphanSigs)
}

// stopPastTimeout stops relay and lets the stop timeout of p, which does
// not exit, pass: p gets its stop signal, then SIGKILL.
func (h *harness) stopPastTimeout(p *fakeProc) {
	h.t.Helper()
	h.sup.Stop(false)
	p.waitSignals(h.t, "TERM")
	h.clock.waitTimer(h.t, testStopTimeout)
	h.clock.advance(testStopTimeout)
	p.waitSignals(h.t, "TERM", "group KILL")
}

// Without cgroups, an orphan of a generation adopted outside its process
// group keeps it lingering; one adopted after the stop timeout's SIGKILL
// (its parent was still alive then) is killed at once when the main
// process exits, and the generation is forgotten once it is gone.
func TestAdoptedOrphanAfterTheKill(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	h.stopPastTimeout(p1)
	if got := h.orphanSignals(); len(got) != 0 {
		t.Errorf("before any orphan was adopted, orphans got %q", got)
	}
	h.adopt(1, 4242) // the daemon, reparented as its parent died
	p1.exit(killed(syscall.SIGKILL), false)
	h.waitLine("stopping; gen 1 pid 1001 exited, processes left")
	if got := h.orphanSignals(); !slices.Equal(got, []string{"4242 KILL"}) {
		t.Errorf("the adopted orphan got %q, want KILL", got)
	}
	select {
	case <-h.sup.Done():
		t.Fatalf("Run returned while an orphan of the generation was alive")
	default:
	}
	h.adopt(1)
	h.orphaned()
	h.wait()
}

// Without cgroups, an orphan adopted while the generation lingers after
// its kill (a daemon's child, reparented once the daemon was killed) is
// killed as soon as relay hears of it, so the stop ends.
func TestOrphanAdoptedWhileLingeringAfterTheKill(t *testing.T) {
	t.Parallel()
	h := newHarness(t, nil)
	p1 := h.serving()
	h.stopPastTimeout(p1)
	h.adopt(1, 4242)
	p1.exit(killed(syscall.SIGKILL), false)
	h.waitLine("stopping; gen 1 pid 1001 exited, processes left")
	want := []string{"4242 KILL"}
	if got := h.orphanSignals(); !slices.Equal(got, want) {
		t.Fatalf("the first orphan got %q, want %q", got, want)
	}
	h.adopt(1, 4243) // the daemon's child, reparented after its parent was killed
	h.orphaned()
	want = append(want, "4243 KILL")
	// Each status request is a round trip through the loop, which
	// takes the orphan notice sooner or later.
	for i := 0; !slices.Equal(h.orphanSignals(), want); i++ {
		if _, err := h.sup.Status(); err != nil || i == 10000 {
			t.Fatalf("orphans got %q, want %q (status: %v)", h.orphanSignals(), want, err)
		}
	}
	h.adopt(1)
	h.orphaned()
	h.wait()
}
