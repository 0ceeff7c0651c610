package supervisor

import (
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/relaysh/relay/health"
)

// workersHarness runs a supervisor whose generations are n copies of a
// command that names its copy ({worker}).
func workersHarness(t *testing.T, n int) *harness {
	t.Helper()
	return newHarness(t, func(c *Config) {
		c.Workers = n
		c.Command = Command{Path: "/srv/server", Args: []string{"server", "-worker", "{worker}"}}
	})
}

// copiesStart waits for the n copies of a generation to start and for
// their readiness checks, and returns them by worker.
func (h *harness) copiesStart(gen, n int) ([]*fakeProc, []*fakeCheck) {
	h.t.Helper()
	procs := make([]*fakeProc, n)
	checks := make([]*fakeCheck, n)
	for w := range n {
		procs[w] = h.started()
	}
	for range n {
		c := h.check(gen)
		checks[c.worker] = c
	}
	for w, c := range checks {
		if c == nil || c.pid != procs[w].id {
			h.t.Fatalf("generation %d: the checks %v do not match the copies started", gen, checks)
		}
	}
	return procs, checks
}

// servingCopies runs the supervisor and makes its first generation, of n
// copies, ready.
func (h *harness) servingCopies(n int) []*fakeProc {
	h.t.Helper()
	h.run()
	procs, checks := h.copiesStart(1, n)
	for _, c := range checks {
		c.pass()
	}
	h.waitLine("gen 1 pid 1001 serving")
	return procs
}

// A generation of two copies starts both, each knowing which it is by
// {worker} and RELAY_WORKER, and serves once both are ready, not at the
// first.
func TestCopiesStartAndServeTogether(t *testing.T) {
	t.Parallel()
	h := workersHarness(t, 2)
	h.run()
	procs, checks := h.copiesStart(1, 2)
	for w, p := range procs {
		if want := []string{"server", "-worker", fmt.Sprint(w)}; !slices.Equal(p.argv[len(p.argv)-3:], want) {
			t.Errorf("copy %d runs %q, want it to end with %q", w, p.argv, want)
		}
		h.mu.Lock()
		env := h.attrs[w].Env
		h.mu.Unlock()
		if !slices.Contains(env, fmt.Sprintf("RELAY_WORKER=%d", w)) || !slices.Contains(env, "RELAY_GENERATION=1") {
			t.Errorf("copy %d's environment lacks RELAY_WORKER=%d or RELAY_GENERATION=1: %q", w, w, env)
		}
	}
	checks[1].pass()
	h.waitLog("copy ready; waiting for the others")
	h.wantGens("1:starting")
	checks[0].pass()
	h.waitLine("gen 1 pid 1001 serving")
	st := h.wantGens("1:serving")
	if cs := st.Generations[0].Copies; len(cs) != 2 || cs[0].Pid != 1001 || cs[1].Pid != 1002 || cs[0].State != "ready" || cs[1].State != "ready" {
		t.Errorf("copies in the status: %+v", cs)
	}
}

// A copy of a new generation that exits before it is ready fails the
// restart: its sibling is killed, the restart rolls back naming the copy,
// and the serving generation's copies never hear of it.
func TestCopyFailingItsStartRollsBack(t *testing.T) {
	t.Parallel()
	h := workersHarness(t, 2)
	old := h.servingCopies(2)
	h.mu.Lock()
	h.holdStderr = true
	h.mu.Unlock()
	events := h.restart(RestartRequest{})
	procs, checks := h.copiesStart(2, 2)
	checks[0].pass()
	procs[1].writeStderr(t, "copy 1 cannot open its log\n")
	procs[1].closeStderr()
	procs[1].exit(exited(3), false)
	procs[0].waitSignals(t, "group KILL")
	procs[0].closeStderr()
	procs[0].exit(killed(9), false)
	res := result(t, all(t, events))
	if res.Outcome != RestartRolledBack || !strings.Contains(res.Reason, "copy 1 (pid 1004) exited before it was ready: exit status 3") {
		t.Errorf("result %+v, want a rollback naming copy 1", res)
	}
	if !strings.Contains(res.StderrTail, "copy 1 cannot open its log") {
		t.Errorf("stderr tail %q, want copy 1's", res.StderrTail)
	}
	h.wantGens("1:serving")
	for _, p := range old {
		if got := p.got(); len(got) != 0 {
			t.Errorf("serving copy pid %d got %q", p.id, got)
		}
	}
}

// A readiness check one copy fails fails the restart too.
func TestCopyFailingItsCheckRollsBack(t *testing.T) {
	t.Parallel()
	h := workersHarness(t, 2)
	h.servingCopies(2)
	events := h.restart(RestartRequest{})
	procs, checks := h.copiesStart(2, 2)
	checks[1].fail(fmt.Errorf("no answer"))
	for _, p := range procs {
		p.waitSignals(t, "group KILL")
		p.exit(killed(9), false)
	}
	if res := result(t, all(t, events)); res.Outcome != RestartRolledBack || !strings.Contains(res.Reason, "copy 1 (pid 1004): no answer") {
		t.Errorf("result %+v, want a rollback naming copy 1's check", res)
	}
	h.wantGens("1:serving")
}

// A copy that exits while its generation serves is replaced alone, after
// the crash backoff, with the same worker number; its sibling is left
// alone, and the generation serves throughout.
func TestServingCopyIsReplacedAlone(t *testing.T) {
	t.Parallel()
	h := workersHarness(t, 2)
	procs := h.servingCopies(2)
	procs[1].exit(exited(2), false)
	h.waitLog("copy exited on its own")
	h.clock.waitTimer(t, testRestartBackoff)
	h.noStart()
	h.clock.advance(testRestartBackoff)
	p := h.started()
	if want := []string{"server", "-worker", "1"}; !slices.Equal(p.argv[len(p.argv)-3:], want) {
		t.Errorf("the replacement runs %q, want copy 1's arguments", p.argv)
	}
	c := h.check(1)
	if c.worker != 1 || c.pid != p.id {
		t.Fatalf("the replacement's check is of copy %d pid %d, want copy 1 pid %d", c.worker, c.pid, p.id)
	}
	st := h.wantGens("1:serving")
	if cs := st.Generations[0].Copies; cs[1].State != "starting" || cs[1].Replaced != 1 {
		t.Errorf("copy 1 in the status: %+v, want starting, replaced once", cs[1])
	}
	c.pass()
	h.waitLog("copy replaced and serving")
	st = h.wantGens("1:serving")
	if st.Restarts.CopyReplacements != 1 || st.Restarts.Replacements != 0 {
		t.Errorf("restart counts %+v, want one copy replacement and no generation replaced", st.Restarts)
	}
	if got := procs[0].got(); len(got) != 0 {
		t.Errorf("the sibling got %q", got)
	}
	// A replacement that fails its check is killed and replaced again,
	// after a longer backoff.
	p.exit(exited(2), false)
	h.clock.waitTimer(t, 2*testRestartBackoff)
	h.clock.advance(2 * testRestartBackoff)
	p2 := h.started()
	h.check(1).fail(fmt.Errorf("not listening"))
	p2.waitSignals(t, "group KILL")
}

// The stop signal goes to the main process of every copy, and relay's
// outcome is the status of the copy that failed.
func TestStopSignalsEveryCopy(t *testing.T) {
	t.Parallel()
	h := workersHarness(t, 3)
	procs := h.servingCopies(3)
	h.sup.Stop(false)
	for _, p := range procs {
		p.waitSignals(t, "TERM")
	}
	procs[0].exit(exited(0), false)
	procs[2].exit(exited(0), false)
	procs[1].exit(exited(4), false)
	out, err := h.wait()
	if err != nil || out.Child == nil || out.Child.ExitCode() != 4 {
		t.Errorf("outcome %+v, %v: want copy 1's exit status 4", out, err)
	}
}

// rollingHarness runs n copies per generation with restarts k at a time.
func rollingHarness(t *testing.T, n, k int) *harness {
	t.Helper()
	return newHarness(t, func(c *Config) {
		c.Workers, c.Rolling = n, k
		c.Command = Command{Path: "/srv/server", Args: []string{"server", "-worker", "{worker}"}}
	})
}

// alive counts the fake children not exited.
func (h *harness) alive() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, p := range h.procs {
		if !p.exitedNow() {
			n++
		}
	}
	return n
}

// A rolling restart of 4 copies, 1 at a time: each new copy, once ready,
// takes the place of the old copy of its number, which drains (here for
// --drain), gets the stop signal and exits before the next new copy
// starts; the last one ends with the old generation's drain and stop. At
// no point are more than 5 copies alive.
func TestRollingRestart(t *testing.T) {
	t.Parallel()
	h := rollingHarness(t, 4, 1)
	old := h.servingCopies(4)
	events := h.restart(RestartRequest{})
	most := 0
	for w := range 4 {
		p := h.started()
		c := h.check(2)
		if c.worker != w || c.pid != p.id {
			t.Fatalf("batch %d: the check of copy %d pid %d, want copy %d pid %d", w, c.worker, c.pid, w, p.id)
		}
		h.noStart()
		most = max(most, h.alive())
		c.pass()
		if w == 3 {
			break
		}
		h.waitLog(fmt.Sprintf("leaving_pids=[%d]", old[w].id))
		h.clock.waitTimer(t, testDrain)
		h.clock.advance(testDrain)
		old[w].waitSignals(t, "TERM")
		h.noStart() // not before the old copy has exited
		old[w].exit(killed(15), false)
	}
	until(t, events, PhaseDraining)
	h.clock.waitTimer(t, testDrain)
	h.clock.advance(testDrain)
	old[3].waitSignals(t, "TERM")
	old[3].exit(killed(15), false)
	evs := all(t, events)
	if res := result(t, evs); res.Outcome != RestartOK || res.Generation != 2 {
		t.Errorf("result %+v, want generation 2 serving", res)
	}
	h.wantGens("2:serving")
	if most > 5 {
		t.Errorf("%d copies alive at once, want at most 5", most)
	}
	for _, p := range old[:3] {
		if got := p.got(); !slices.Equal(got, []string{"TERM"}) {
			t.Errorf("old copy pid %d got %q, want its own TERM alone", p.id, got)
		}
	}
}

// rollFirstBatch serves n copies, begins a rolling restart (K=1) whose
// first new copy becomes ready, lets the old copy 0 it replaces drain,
// stop and exit, and returns the old copies, the restart's events, the
// first new copy and the second, just started.
func (h *harness) rollFirstBatch(n int) (old []*fakeProc, events <-chan Event, first, second *fakeProc) {
	h.t.Helper()
	old = h.servingCopies(n)
	events = h.restart(RestartRequest{})
	first = h.started()
	h.check(2).pass()
	h.clock.waitTimer(h.t, testDrain)
	h.clock.advance(testDrain)
	old[0].waitSignals(h.t, "TERM")
	old[0].exit(killed(15), false)
	return old, events, first, h.started()
}

// A rolling restart whose second new copy fails its check falls back: the
// failing copy is killed, the first new copy, which served, drains and
// stops, the old copy it replaced is started again, and the restart is
// rolled back with the failure.
func TestRollingRestartFallsBack(t *testing.T) {
	t.Parallel()
	h := rollingHarness(t, 4, 1)
	old, events, first, second := h.rollFirstBatch(4)
	h.check(2).fail(fmt.Errorf("no answer"))
	second.waitSignals(t, "group KILL")
	second.exit(killed(9), false)
	// The old copy 0 again, while the first new copy drains.
	again := h.started()
	c := h.check(1)
	if c.worker != 0 || c.pid != again.id {
		t.Fatalf("the check of copy %d pid %d, want the old copy 0 started again, pid %d", c.worker, c.pid, again.id)
	}
	if n := h.alive(); n > 5 {
		t.Errorf("%d copies alive at once, want at most 5", n)
	}
	c.pass()
	h.clock.waitTimer(t, testDrain)
	h.clock.advance(testDrain)
	first.waitSignals(t, "TERM")
	first.exit(killed(15), false)
	res := result(t, all(t, events))
	if res.Outcome != RestartRolledBack || !strings.Contains(res.Reason, "copy 1 (pid 1006): no answer") {
		t.Errorf("result %+v, want a rollback naming copy 1's check", res)
	}
	st := h.wantGens("1:serving")
	var pids []int
	for _, cp := range st.Generations[0].Copies {
		pids = append(pids, cp.Pid)
	}
	if want := []int{again.id, old[1].id, old[2].id, old[3].id}; !slices.Equal(pids, want) {
		t.Errorf("generation 1's copies %v, want %v", pids, want)
	}
	for _, p := range old[1:] {
		if got := p.got(); len(got) != 0 {
			t.Errorf("old copy pid %d got %q", p.id, got)
		}
	}
}

// With several copies, every ready copy is probed each round on its own;
// one that fails --liveness-failures probes in a row gets the stop signal
// alone and is replaced once it exits, while its sibling serves on. A
// copy that pinged its watchdog and fell silent is stopped the same way.
func TestCopyFailingLivenessIsReplacedAlone(t *testing.T) {
	t.Parallel()
	h := newHarness(t, func(c *Config) {
		c.Workers = 2
		c.Liveness = health.Spec{Kind: health.Accept, Raw: "accept"}
		c.LivenessInterval = 6 * time.Second // a probe's timeout is 5 s: its timer is another
		c.LivenessFailures = 2
	})
	procs := h.servingCopies(2)
	pids := []int{procs[0].id, procs[1].id}
	round := func() map[int]*fakeCheck {
		h.clock.waitTimer(t, 6*time.Second)
		h.clock.advance(6 * time.Second)
		got := map[int]*fakeCheck{}
		for range 2 {
			c := recv(t, h.probeC, "a liveness probe")
			got[c.worker] = c
		}
		if got[0] == nil || got[1] == nil || got[0].pid != pids[0] || got[1].pid != pids[1] {
			t.Fatalf("a round probed %+v, want each copy once: pids %v", got, pids)
		}
		return got
	}
	for i := range 2 {
		r := round()
		r[0].pass()
		r[1].fail(fmt.Errorf("refused %d", i))
	}
	procs[1].waitSignals(t, "TERM")
	h.waitLog("copy failed its liveness check; stopping it")
	if got := procs[0].got(); len(got) != 0 {
		t.Errorf("the healthy copy got %q", got)
	}
	procs[1].exit(killed(15), false)
	h.clock.waitTimer(t, testRestartBackoff)
	h.clock.advance(testRestartBackoff)
	p := h.started()
	c := h.check(1)
	if c.worker != 1 {
		t.Fatalf("the replacement's check is of copy %d", c.worker)
	}
	c.pass()
	h.waitLog("copy replaced and serving")
	h.wantGens("1:serving")
	// The next round probes the replacement too.
	pids[1] = p.id
	round()
}

// A copy that pinged WATCHDOG=1 and then stays silent for
// --child-watchdog is stopped alone; its sibling, which never pinged, is
// not watched.
func TestCopyWatchdogSilenceStopsTheCopy(t *testing.T) {
	t.Parallel()
	h := newHarness(t, func(c *Config) {
		c.Workers = 2
		c.ChildWatchdog = testChildWatchdog
	})
	procs := h.servingCopies(2)
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: filepath.Join(h.sup.cfg.RuntimeDir, "gen-1.0.notify"), Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("WATCHDOG=1")); err != nil {
		t.Fatal(err)
	}
	h.waitLog("child pings its watchdog")
	h.clock.waitTimer(t, testChildWatchdog)
	h.clock.advance(testChildWatchdog)
	procs[0].waitSignals(t, "TERM")
	h.waitLog("no WATCHDOG=1 for")
	if got := procs[1].got(); len(got) != 0 {
		t.Errorf("the copy that never pinged got %q", got)
	}
}

// The old generation's copies all die in the middle of a rolling restart:
// the rest of the new copies start at once, and the restart ends with the
// new generation serving.
func TestRollingRestartOldGenerationDies(t *testing.T) {
	t.Parallel()
	h := rollingHarness(t, 2, 1)
	old := h.servingCopies(2)
	events := h.restart(RestartRequest{})
	first := h.started()
	c0 := h.check(2)
	old[0].exit(exited(2), false)
	old[1].exit(exited(2), false)
	h.waitLog("starting the rest of the new copies at once")
	second := h.started()
	c1 := h.check(2)
	if c0.pid != first.id || c1.pid != second.id || c1.worker != 1 {
		t.Fatalf("checks of pids %d and %d (copy %d), want %d and %d (copy 1)", c0.pid, c1.pid, c1.worker, first.id, second.id)
	}
	c0.pass()
	c1.pass()
	if res := result(t, all(t, events)); res.Outcome != RestartOK || res.Generation != 2 {
		t.Errorf("result %+v, want generation 2 serving", res)
	}
	h.wantGens("2:serving")
}

// The only new copy of a rolling restart's first batch (K=1) exits after
// its batch took its share: the restart falls back, the old copy that left
// starts again, and the restart is rolled back.
func TestRollingRestartLastNewCopyExits(t *testing.T) {
	t.Parallel()
	h := rollingHarness(t, 2, 1)
	old, events, first, second := h.rollFirstBatch(2)
	h.check(2) // copy 1 of generation 2, checking
	first.exit(exited(5), false)
	h.waitLog("rolling restart failed half-way")
	second.waitSignals(t, "group KILL")
	second.exit(killed(9), false)
	again := h.started()
	h.check(1).pass()
	res := result(t, all(t, events))
	if res.Outcome != RestartRolledBack || !strings.Contains(res.Reason, fmt.Sprintf("copy 0 (pid %d) exited: exit status 5", first.id)) {
		t.Errorf("result %+v, want a rollback naming copy 0's exit", res)
	}
	h.waitLog("copy replaced and serving")
	st := h.wantGens("1:serving")
	if cs := st.Generations[0].Copies; cs[0].Pid != again.id || cs[1].Pid != old[1].id {
		t.Errorf("generation 1's copies %+v, want pids %d and %d", cs, again.id, old[1].id)
	}
}
