package supervisor

import (
	"errors"
	"os"
	"slices"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/signals"
)

// Containment: where relay has cgroups (Config.Cgroups), a generation is
// all the processes of its cgroup, whatever they do with sessions and
// process groups. Elsewhere it is its process group, and the orphans of it
// that relay, their subreaper, adopted with its RELAY_GENERATION in their
// environment (env.adopted): a setsid daemon is found once its parent has
// exited. lingers, signalLeft, processes, watchEmpty and forget are the
// two kinds' one interface to the state machine; signalGroup's SIGKILL
// kills the whole cgroup, or the group and the adopted orphans.

// lingers reports whether any process of g is alive: in its cgroup, or in
// its process group or adopted.
func lingers(g *generation) bool {
	if g.cg != nil {
		return g.cg.Populated()
	}
	return g.proc.GroupAlive() || len(adopted(g)) > 0
}

// adopted lists the orphans of g that left its process group and were
// reparented to relay; none with a cgroup.
func adopted(g *generation) []int {
	if g.adopted == nil {
		return nil
	}
	return g.adopted()
}

// signalAdopted sends sig to the orphans of g outside its process group;
// SIGKILL only to those not sent it before, which may be listed still,
// dead but not yet reaped.
func signalAdopted(g *generation, sig syscall.Signal) {
	pids := adopted(g)
	if sig == syscall.SIGKILL {
		if g.orphansKilled == nil {
			g.orphansKilled = map[int]bool{}
		}
		pids = slices.DeleteFunc(pids, func(pid int) bool { return g.orphansKilled[pid] })
		for _, pid := range pids {
			g.orphansKilled[pid] = true
		}
	}
	if len(pids) == 0 {
		return
	}
	g.log.Info("signalling processes that left the generation's process group", "signal", signals.Name(sig), "pids", pids)
	for _, pid := range pids {
		if err := g.signalPid(pid, sig); err != nil && !errors.Is(err, unix.ESRCH) {
			g.log.Warn("signalling an orphan of the generation", "signal", signals.Name(sig), "orphan_pid", pid, "err", err)
		}
	}
}

// sendStop asks g to stop, by --kill-mode: the stop signal to its main
// process alone (mixed), or to every process of it (control-group); then
// SIGCONT to every process of it, as systemd does: a stopped process
// (SIGSTOP) could otherwise not act on the signal and would wait for
// SIGKILL. What is left of a generation whose main process has exited
// gets both signals: nothing else would pass them on.
func (s *Supervisor) sendStop(g *generation) {
	sig := s.cfg.StopSignal
	switch {
	case g.state == Exited || s.cfg.KillMode == KillControlGroup:
		signalLeft(g, sig)
	default:
		if err := g.proc.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
			g.log.Warn("signalling the main process", "signal", signals.Name(sig), "err", err)
		}
	}
	if sig != syscall.SIGCONT {
		signalLeft(g, syscall.SIGCONT)
	}
}

// signalLeft signals what is left of a generation whose main process has
// exited: every process of its cgroup, or its process group.
func signalLeft(g *generation, sig syscall.Signal) {
	if g.cg == nil {
		signalGroup(g, sig)
		if sig != syscall.SIGKILL { // signalGroup's KILL took them
			signalAdopted(g, sig)
		}
		return
	}
	if err := g.cg.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		g.log.Warn("signalling cgroup", "signal", signals.Name(sig), "cgroup", g.cg.Path(), "err", err)
	}
}

// watchEmpty posts an emptiedEvent once the cgroup of lingering g has no
// process left. Orphans reaped say the same for a process group, whose
// last process relay (the subreaper) always reaps.
func (s *Supervisor) watchEmpty(g *generation) {
	if g.cg == nil || g.watching {
		return
	}
	g.watching = true
	cg := g.cg
	go func() {
		cg.WaitEmpty(s.doneC)
		s.post(emptiedEvent{})
	}()
}

// processes counts the processes of g, for the status.
func processes(g *generation) int {
	if g.cg != nil {
		return g.cg.Count()
	}
	return g.proc.GroupSize() + len(adopted(g))
}

// forget removes the cgroup of g, which has no process left.
func forget(g *generation) {
	if g.cg == nil {
		return
	}
	if err := g.cg.Remove(); err != nil {
		g.log.Warn("removing cgroup", "cgroup", g.cg.Path(), "err", err)
	}
}
