package supervisor

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/reaper"
	"github.com/relaysh/relay/signals"
)

// Containment: where relay has cgroups (Config.Cgroups), a generation is
// all the processes of its cgroup, whatever they do with sessions and
// process groups (cgroupContainment). Elsewhere it is its process group,
// and the orphans of it that relay, their subreaper, adopted with its
// RELAY_GENERATION in their environment (env.adopted): a setsid daemon is
// found once its parent has exited (groupContainment). Which of the two a
// generation has is chosen once, at its start (start, then containmentOf),
// and kept in g.contain: the state machine asks it, never which kind it is.

// containment is what a generation is made of, as the state machine sees
// it. Its methods run on the loop's goroutine and log what fails.
type containment interface {
	// signalMain sends sig to the main process alone: each copy's.
	signalMain(sig syscall.Signal)
	// add adds a copy's main process, started since.
	add(p process)
	// signal sends sig to every process of it.
	signal(sig syscall.Signal)
	// kill sends SIGKILL to every process of it.
	kill()
	// killAdopted sends SIGKILL to the orphans adopted into it since
	// kill, which kill did not reach; a cgroup has none.
	killAdopted()
	// alive reports whether any process of it is alive, the main
	// process or another.
	alive() bool
	// count counts its processes, for the status.
	count() int
	// watch calls emptied, once, on a goroutine of its own, when it has
	// no process left, unless done is closed first; nothing for a process
	// group, whose last process relay (the subreaper) reaps, and the
	// orphans event says so.
	watch(done <-chan struct{}, emptied func())
	// remove forgets it, once it has no process left.
	remove()
	// logKill says that it is killed after the stop timeout d; logGone,
	// that it has no process left.
	logKill(d time.Duration)
	logGone()
}

// start starts a copy of generation g, in g's cgroup where relay has
// cgroups: born in it (CLONE_INTO_CGROUP), or moved in at once on a kernel
// without that. The first copy's start creates the cgroup, and returns it;
// it returns nil where the process groups contain the generation instead,
// and for later copies, which join what the first has.
func (s *Supervisor) start(g *generation, path string, argv []string, attr reaper.Attr) (process, container, error) {
	var join container
	if g.contain != nil {
		cc, ok := g.contain.(*cgroupContainment)
		if !ok {
			p, err := s.env.start(path, argv, attr) // its process group contains it
			return p, nil, err
		}
		join = cc.cg
	}
	if s.env.contain == nil {
		p, err := s.env.start(path, argv, attr)
		return p, nil, err
	}
	cg := join
	var err error
	if join == nil {
		cg, err = s.env.contain(g.n)
	} else {
		err = join.Open()
	}
	if err != nil {
		return nil, nil, err
	}
	defer cg.CloseFD()
	attr.UseCgroupFD, attr.CgroupFD = true, cg.FD()
	p, err := s.env.start(path, argv, attr)
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.E2BIG) {
		// Linux before 5.7 has no CLONE_INTO_CGROUP (clone3).
		attr.UseCgroupFD, attr.CgroupFD = false, 0
		if p, err = s.env.start(path, argv, attr); err == nil {
			if aerr := cg.Add(p.pid()); aerr != nil {
				if join != nil {
					// Its siblings are in the cgroup: one outside
					// it would escape their stop.
					p.SignalGroup(syscall.SIGKILL)
					return nil, nil, fmt.Errorf("moving a copy into its generation's cgroup: %w", aerr)
				}
				// Contained by its process group instead: a
				// cgroup without it would kill nothing.
				s.cfg.Log.Warn("generation left outside its cgroup; its process group contains it", "gen", g.n, "pid", p.pid(), "err", aerr)
				cg.Remove()
				return p, nil, nil
			}
		}
	}
	if join != nil {
		return p, nil, err
	}
	if err != nil {
		cg.Remove()
		return nil, nil, err
	}
	return p, cg, nil
}

// containmentOf is the containment of g, whose first copy c has just
// started: cg, its cgroup, or where it has none its copies' process groups
// and the orphans of it that relay adopts (none where env.adopted is nil:
// relay has cgroups, and g's did not take it).
func (s *Supervisor) containmentOf(g *generation, c *copyProc, cg container) containment {
	main := &leaders{procs: []process{c.proc}, log: c.log}
	if cg != nil {
		return &cgroupContainment{leaders: main, cg: cg}
	}
	pg := &groupContainment{leaders: main}
	if s.env.adopted != nil {
		n := g.n
		pg.adopted = func() []int { return s.env.adopted(n, main.groups()) }
		pg.signalPid = s.env.signalPid
	}
	return pg
}

// leaders are the main processes of a generation's copies, each the
// leader of its process group: what both kinds of containment signal by
// pid. A copy replaced while its generation served stays listed: its
// process group may outlive it.
type leaders struct {
	procs []process
	log   *slog.Logger
}

func (l *leaders) add(p process) { l.procs = append(l.procs, p) }

// groups are the process groups' ids: their leaders' pids.
func (l *leaders) groups() []int {
	ids := make([]int, len(l.procs))
	for i, p := range l.procs {
		ids[i] = p.pid()
	}
	return ids
}

func (l *leaders) signalMain(sig syscall.Signal) {
	for _, p := range l.procs {
		if err := p.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
			l.log.Warn("signalling the main process", "signal", signals.Name(sig), "main_pid", p.pid(), "err", err)
		}
	}
}

// signalGroup sends sig to the process groups of the main processes.
func (l *leaders) signalGroup(sig syscall.Signal) {
	for _, p := range l.procs {
		if err := p.SignalGroup(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
			l.log.Warn("signalling process group", "signal", signals.Name(sig), "main_pid", p.pid(), "err", err)
		}
	}
}

// groupAlive reports whether any process is left in the groups.
func (l *leaders) groupAlive() bool {
	return slices.ContainsFunc(l.procs, func(p process) bool { return p.GroupAlive() })
}

// groupSize counts the processes of the groups.
func (l *leaders) groupSize() int {
	n := 0
	for _, p := range l.procs {
		n += p.GroupSize()
	}
	return n
}

// cgroupContainment is a generation contained by its cgroup.
type cgroupContainment struct {
	*leaders
	cg container
	// watching: a goroutine waits for cg to empty (watch).
	watching bool
}

func (c *cgroupContainment) signal(sig syscall.Signal) {
	if err := c.cg.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		c.log.Warn("signalling cgroup", "signal", signals.Name(sig), "cgroup", c.cg.Path(), "err", err)
	}
}

func (c *cgroupContainment) kill() {
	if err := c.cg.Kill(); err != nil {
		c.log.Warn("killing cgroup", "cgroup", c.cg.Path(), "err", err)
		// Whatever the cgroup could not take, its process group
		// still can.
		c.signalGroup(syscall.SIGKILL)
	}
}

func (c *cgroupContainment) killAdopted() {}
func (c *cgroupContainment) alive() bool  { return c.cg.Populated() }
func (c *cgroupContainment) count() int   { return c.cg.Count() }

func (c *cgroupContainment) watch(done <-chan struct{}, emptied func()) {
	if c.watching {
		return
	}
	c.watching = true
	cg := c.cg
	go func() {
		cg.WaitEmpty(done)
		emptied()
	}()
}

func (c *cgroupContainment) remove() {
	if err := c.cg.Remove(); err != nil {
		c.log.Warn("removing cgroup", "cgroup", c.cg.Path(), "err", err)
	}
}

func (c *cgroupContainment) logKill(d time.Duration) {
	c.log.Warn("did not stop within the stop timeout; killing its cgroup",
		"stop_timeout", d, "signal", "KILL", "cgroup", c.cg.Path(), "processes", c.cg.Count())
}

func (c *cgroupContainment) logGone() {
	c.log.Info("generation gone: its cgroup is empty", "cgroup", c.cg.Path())
}

// groupContainment is a generation contained by its process group and
// the orphans of it that left the group and were reparented to relay.
type groupContainment struct {
	*leaders
	// adopted lists its orphans outside its process group; nil for
	// none.
	adopted   func() []int
	signalPid func(pid int, sig syscall.Signal) error // env.signalPid
	// orphansKilled are the adopted orphans sent SIGKILL already, which
	// stay listed until they are reaped.
	orphansKilled map[int]bool
}

func (pg *groupContainment) signal(sig syscall.Signal) {
	pg.signalGroup(sig)
	pg.signalAdopted(sig)
}

func (pg *groupContainment) kill()        { pg.signal(syscall.SIGKILL) }
func (pg *groupContainment) killAdopted() { pg.signalAdopted(syscall.SIGKILL) }
func (pg *groupContainment) alive() bool  { return pg.groupAlive() || len(pg.orphans()) > 0 }
func (pg *groupContainment) count() int   { return pg.groupSize() + len(pg.orphans()) }

func (pg *groupContainment) watch(<-chan struct{}, func()) {}
func (pg *groupContainment) remove()                       {}

func (pg *groupContainment) logKill(d time.Duration) {
	pg.log.Warn("did not stop within the stop timeout; killing its process group",
		"stop_timeout", d, "signal", "KILL")
}

func (pg *groupContainment) logGone() {
	pg.log.Info("generation gone: no process of it is left")
}

// orphans lists its adopted orphans.
func (pg *groupContainment) orphans() []int {
	if pg.adopted == nil {
		return nil
	}
	return pg.adopted()
}

// signalAdopted sends sig to the orphans outside the process group;
// SIGKILL only to those not sent it before, which may be listed still,
// dead but not yet reaped.
func (pg *groupContainment) signalAdopted(sig syscall.Signal) {
	pids := pg.orphans()
	if sig == syscall.SIGKILL {
		if pg.orphansKilled == nil {
			pg.orphansKilled = map[int]bool{}
		}
		pids = slices.DeleteFunc(pids, func(pid int) bool { return pg.orphansKilled[pid] })
		for _, pid := range pids {
			pg.orphansKilled[pid] = true
		}
	}
	if len(pids) == 0 {
		return
	}
	pg.log.Info("signalling processes that left the generation's process group", "signal", signals.Name(sig), "pids", pids)
	for _, pid := range pids {
		if err := pg.signalPid(pid, sig); err != nil && !errors.Is(err, unix.ESRCH) {
			pg.log.Warn("signalling an orphan of the generation", "signal", signals.Name(sig), "orphan_pid", pid, "err", err)
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
		g.contain.signal(sig)
	default:
		g.contain.signalMain(sig)
	}
	if sig != syscall.SIGCONT {
		g.contain.signal(syscall.SIGCONT)
	}
}
