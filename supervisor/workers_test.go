package supervisor

import (
	"fmt"
	"slices"
	"strings"
	"testing"
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
