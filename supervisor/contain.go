package supervisor

import (
	"errors"
	"os"
	"syscall"

	"github.com/relaysh/relay/signals"
)

// Containment: where relay has cgroups (Config.Cgroups), a generation is
// all the processes of its cgroup, whatever they do with sessions and
// process groups; elsewhere it is its process group. lingers, signalLeft,
// watchEmpty and forget are the two kinds' one interface to the state
// machine; signalGroup's SIGKILL kills the whole cgroup.

// lingers reports whether any process of g is alive: in its cgroup, or in
// its process group.
func lingers(g *generation) bool {
	if g.cg != nil {
		return g.cg.Populated()
	}
	return g.proc.GroupAlive()
}

// sendStop sends the stop signal through send, then SIGCONT, as systemd
// does: a stopped process (SIGSTOP) could otherwise not act on it and
// would wait for SIGKILL.
func (s *Supervisor) sendStop(g *generation, send func(*generation, syscall.Signal)) {
	send(g, s.cfg.StopSignal)
	if s.cfg.StopSignal != syscall.SIGCONT {
		send(g, syscall.SIGCONT)
	}
}

// signalLeft signals what is left of a generation whose main process has
// exited: every process of its cgroup, or its process group.
func signalLeft(g *generation, sig syscall.Signal) {
	if g.cg == nil {
		signalGroup(g, sig)
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
	return g.proc.GroupSize()
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
