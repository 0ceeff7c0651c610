package supervisor

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/internal/reaper"
)

// handoffExec is an exec for Handoff that records the state it was given
// and fails, as an exec that did not happen does.
func handoffExec(got *Saved) func(Saved) error {
	return func(s Saved) error {
		*got = s
		return errors.New("the exec failed")
	}
}

// handOverAndFail hands h's supervisor over to an exec that fails, and
// returns the state the exec was given.
func handOverAndFail(h *harness) Saved {
	h.t.Helper()
	var saved Saved
	if err := h.sup.Handoff(handoffExec(&saved)); err == nil || !strings.Contains(err.Error(), "the exec failed") {
		h.t.Fatalf("Handoff = %v, want the exec's error", err)
	}
	return saved
}

// replacedUnfollowed makes generation 1 serve, then replaces it by a
// restart nobody follows (SIGHUP), until generation 1 is in state.
func replacedUnfollowed(h *harness, state string) {
	h.t.Helper()
	h.holdStderr = true
	h.serving()
	if err := h.sup.RequestRestart("test"); err != nil {
		h.t.Fatal(err)
	}
	h.started()
	h.check(2).pass()
	h.waitLine("gen 1 pid 1001 " + state + "; gen 2 pid 1002 serving")
}

// A relay that is not quiet refuses to hand over, and calls no exec.
func TestHandoffRefusedUnlessQuiet(t *testing.T) {
	h := newHarness(t, nil)
	h.holdStderr = true
	h.serving()
	refused := func(when string) {
		t.Helper()
		err := h.sup.Handoff(func(Saved) error { t.Errorf("%s: exec called", when); return nil })
		if !errors.Is(err, ErrBusy) {
			t.Errorf("%s: Handoff = %v, want ErrBusy", when, err)
		}
	}
	events, _, c := h.starting(RestartRequest{}, 2)
	refused("while generation 2 starts")
	c.pass()
	until(t, events, PhaseDraining)
	refused("while generation 1 drains, its restart followed")
}

// A quiet relay gives the exec its state, and after a failed exec serves
// on as before: the serving generation's notify socket is read again, and
// a restart works.
func TestHandoffStateAndResumeAfterAFailedExec(t *testing.T) {
	h := newHarness(t, nil)
	h.holdStderr = true
	h.serving()
	saved := handOverAndFail(h)
	g := saved.Serving
	if saved.Next != 1 || g.N != 1 || g.Proc.Pid != 1001 || saved.Command.Path != testCommand.Path {
		t.Errorf("saved next %d, generation %d pid %d command %q", saved.Next, g.N, g.Proc.Pid, saved.Command.Path)
	}
	if filepath.Base(g.Notify.Path) != "gen-1.notify" || g.Notify.FD < 3 || g.StderrFD < 3 {
		t.Errorf("saved notify %+v, stderr fd %d", g.Notify, g.StderrFD)
	}
	if len(saved.FDs()) != 2 {
		t.Errorf("fds to cross %v, want the notify socket's and the stderr pipe's", saved.FDs())
	}
	// Read again after the pause: a message from the child is heard.
	conn, err := net.Dial("unixgram", g.Notify.Path)
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte("STATUS=after the failed exec"))
	conn.Close()
	h.waitLog("after the failed exec")
	events, _, c := h.starting(RestartRequest{}, 2)
	c.pass()
	until(t, events, PhaseDraining)
}

// savedServing is the state of generation 4, which an earlier image
// served, made of real fds (savedGen), and the write end of its stderr.
func savedServing(t *testing.T, dir string) (Saved, *os.File) {
	t.Helper()
	g, pw := savedGen(t, dir, 4, 4444)
	return Saved{Next: 4, Command: testCommand, EverReady: true, Counts: RestartCounts{OK: 3}, Serving: g}, pw
}

// savedGen is the state of generation n, main process pid, made of real
// fds: its notify socket at a path under dir, and the read end of a
// stderr pipe whose write end is returned.
func savedGen(t *testing.T, dir string, n, pid int) (SavedGeneration, *os.File) {
	t.Helper()
	ns, err := health.ListenNotify(filepath.Join(dir, fmt.Sprintf("gen-%d.notify", n)), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	ns.Pause()
	sn, err := ns.Save()
	if err != nil {
		t.Fatal(err)
	}
	// The next image's fds: copies, as an exec would leave them.
	if sn.FD, err = unix.FcntlInt(uintptr(sn.FD), unix.F_DUPFD_CLOEXEC, 0); err != nil {
		t.Fatal(err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pw.Close() })
	rc, err := pr.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	stderrFD := -1
	rc.Control(func(fd uintptr) { stderrFD, err = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) })
	if err != nil {
		t.Fatal(err)
	}
	pr.Close()
	return SavedGeneration{N: n, Cmd: testCommand, State: Serving, Proc: reaper.SavedProc{Pid: pid, Group: true},
		HealthAddr: "127.0.0.1:1", Notify: sn, StderrFD: stderrFD}, pw
}

// Restore adopts the serving generation: Run starts none, the status shows
// it, the counters go on, and the next restart starts the next number.
func TestRestoreAdoptsTheServingGeneration(t *testing.T) {
	h := newHarness(t, nil)
	saved, _ := savedServing(t, t.TempDir())
	if err := h.sup.Restore(saved); err != nil {
		t.Fatal(err)
	}
	h.sup.Settle()
	h.run()
	st := h.wantGens("4:serving")
	h.noStart()
	if st.Restarts.OK != 3 || st.Generations[0].Pid != 4444 {
		t.Errorf("status after the restore: %+v", st)
	}
	events, _, c := h.starting(RestartRequest{}, 5)
	c.pass()
	until(t, events, PhaseDraining)
	h.wantGens("4:draining 5:serving")
}

// Restore fails, and starts nothing, when the process is not relay's.
func TestRestoreRefusesAProcessNotRelays(t *testing.T) {
	h := newHarness(t, nil)
	h.sup.env.adopt = func(reaper.SavedProc, *reaper.Status) process { return nil }
	saved, _ := savedServing(t, t.TempDir())
	if err := h.sup.Restore(saved); err == nil || !strings.Contains(err.Error(), "not relay's child") {
		t.Fatalf("Restore = %v, want refused", err)
	}
	if h.sup.gens.serving != nil {
		t.Error("a generation serves after a failed Restore")
	}
	h.manual = true // Run never ran: cleanup ends what the test began
}

// An old generation that got its stop signal crosses too, with the time
// left before its SIGKILL.
func TestHandoffCarriesAStoppingGeneration(t *testing.T) {
	h := newHarness(t, noDrain)
	replacedUnfollowed(h, "stopping")
	h.clock.waitTimer(t, testStopTimeout)
	h.clock.advance(10 * time.Second)
	saved := handOverAndFail(h)
	if saved.Serving.N != 2 || len(saved.Old) != 1 {
		t.Fatalf("saved serving %d, old %+v", saved.Serving.N, saved.Old)
	}
	old := saved.Old[0]
	if old.N != 1 || old.State != Stopping || old.KillIn == nil || *old.KillIn != testStopTimeout-10*time.Second {
		t.Errorf("saved old generation %d %s, kill in %v; want 1 stopping, kill in %s", old.N, old.State, old.KillIn, testStopTimeout-10*time.Second)
	}
	if len(saved.FDs()) != 4 {
		t.Errorf("fds to cross %v, want both generations' notify sockets and stderr pipes", saved.FDs())
	}
}

// A relay restart that follows an old generation until it is gone makes
// relay busy: its connection could not cross.
func TestHandoffBusyWhileARestartFollowsTheOldGeneration(t *testing.T) {
	h := newHarness(t, noDrain)
	h.holdStderr = true
	retiring(h)
	err := h.sup.Handoff(func(Saved) error { t.Error("exec called while a restart is followed"); return nil })
	if !errors.Is(err, ErrBusy) {
		t.Errorf("Handoff while relay restart follows an old generation = %v, want ErrBusy", err)
	}
}

// Restore arms the SIGKILL of a stopping generation for the time it had
// left.
func TestRestoreKillsAStoppingGenerationOnTime(t *testing.T) {
	h := newHarness(t, nil)
	dir := t.TempDir()
	saved, _ := savedServing(t, dir)
	old, _ := savedGen(t, dir, 3, 3333)
	left := 7 * time.Second
	old.State, old.KillIn = Stopping, &left
	saved.Old = []SavedGeneration{old}
	if err := h.sup.Restore(saved); err != nil {
		t.Fatal(err)
	}
	h.sup.Settle()
	h.run()
	h.wantGens("3:stopping 4:serving")
	h.clock.waitTimer(t, left)
	h.clock.advance(left)
	h.mu.Lock()
	var p3 *fakeProc
	for _, p := range h.procs {
		if p.id == 3333 {
			p3 = p
		}
	}
	h.mu.Unlock()
	p3.waitSeq(t, "group KILL")
}

// A restart in its drain window crosses: the old generation drains on in
// the next image, and gets its stop signal when the window would have
// ended.
func TestHandoffCarriesADrainingRestart(t *testing.T) {
	h := newHarness(t, nil)
	replacedUnfollowed(h, "draining")
	h.clock.waitTimer(t, testDrain)
	h.clock.advance(500 * time.Millisecond)
	saved := handOverAndFail(h)
	if d := saved.Drain; d == nil || d.Prev != 1 || d.Left != testDrain-500*time.Millisecond || len(saved.Old) != 1 || saved.Old[0].State != Draining {
		t.Fatalf("saved drain %+v, old %+v", saved.Drain, saved.Old)
	}

	h2 := newHarness(t, nil)
	dir := t.TempDir()
	sv, _ := savedServing(t, dir)
	old, _ := savedGen(t, dir, 3, 3333)
	old.State = Draining
	sv.Old = []SavedGeneration{old}
	sv.Drain = &SavedDrain{Reason: "test", Prev: 3, Left: time.Second}
	if err := h2.sup.Restore(sv); err != nil {
		t.Fatal(err)
	}
	h2.run()
	h2.wantGens("3:draining 4:serving")
	h2.clock.waitTimer(t, time.Second)
	h2.clock.advance(time.Second)
	h2.waitLine("gen 3 pid 3333 stopping; gen 4 pid 4444 serving")
	if st := h2.wantGens("3:stopping 4:serving"); st.Restarts.OK != 4 {
		t.Errorf("restarts ok %d after the carried restart finished, want 4", st.Restarts.OK)
	}
}
