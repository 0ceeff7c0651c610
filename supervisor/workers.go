package supervisor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/signals"
)

// Copies (--workers N): a generation is N copies of the command, each with
// its own socket on every steered TCP listener (sockets.Set.Take), over
// which the steering program spreads the generation's new connections. The
// generation is the unit of restarts: its copies start together, it is
// ready when every copy has passed its own readiness check (each probe
// reaches that copy's socket alone), one switch moves the traffic to all of
// them, and the stop signal goes to each copy's main process.
//
// One copy's exit, while others live, depends on its generation's state
// (copyExited):
//
//	Starting   the start failed: the others are killed, and the restart
//	           rolls back once they have exited (the generation's exit)
//	Serving    the copy is replaced alone after the crash backoff; its
//	           sockets are marked absent meanwhile, so new connections
//	           go to its siblings, and those queued on them wait for the
//	           replacement, which takes the same sockets
//	otherwise  it was stopping, or draining: nothing to do
//
// A replacement is a copy of its own (a new copyProc in the same slot),
// proven ready as at a start; one that fails its check is killed, and
// replaced in turn with a longer backoff.

// copyExited handles the exit of copy c while other copies of its
// generation live.
func (s *Supervisor) copyExited(c *copyProc) {
	g := c.g
	run := s.restarts.current
	switch {
	case c.leaving:
		s.copyLeft(c)
	case g.state == Starting && run != nil && run.roll != nil && run.gen == g:
		if g.failure == nil {
			s.fallBack(run, c, fmt.Errorf("copy %d (pid %d) exited: %s", c.worker, c.pid(), c.status))
		} else {
			c.log.Info("copy of the failed new generation exited", "status", c.status.String())
		}
	case g.state == Starting:
		if g.failure == nil {
			g.failure = fmt.Errorf("copy %d (pid %d) exited before it was ready: %s", c.worker, c.pid(), c.status)
		}
		c.log.Warn("a copy of the new generation exited before it was ready; killing the others", "status", c.status.String())
		g.contain.kill()
	case g.state == Serving && !s.stop.begun && g.copies[c.worker] == c:
		if c.killTimer != nil {
			c.killTimer.Stop()
		}
		if c.failedLiveness {
			c.log.Info("copy that failed its liveness check exited; its siblings serve its share until its replacement is ready", "status", c.status.String())
		} else {
			c.log.Error("copy exited on its own; its siblings serve its share until its replacement is ready",
				"status", c.status.String(), "stderr_tail", c.stderr.Lines(stderrTailLines))
		}
		s.leftAlone(c)
		if err := s.cfg.Sockets.Absent(g.n, c.worker, true); err != nil {
			c.log.Warn("cannot steer new connections away from the exited copy; they wait for its replacement", "err", err)
		}
		s.scheduleCopyReplace(c)
	default:
		c.log.Info("copy exited", "status", c.status.String(), "state", g.state)
	}
}

// leftAlone sends the stop signal to what copy c, whose main process has
// exited while its generation lives on, left in its process group: nothing
// else would pass it on. What ignores it is killed with its generation.
func (s *Supervisor) leftAlone(c *copyProc) {
	if !c.proc.GroupAlive() {
		return
	}
	if err := c.proc.SignalGroup(s.cfg.StopSignal); err != nil && !errors.Is(err, os.ErrProcessDone) {
		c.log.Warn("signalling what the exited copy left behind", "err", err)
	}
}

// scheduleCopyReplace replaces copy c, which exited while its generation
// served, after the crash backoff: doubled for each failure of this copy in
// a row, unless it had served for stableAfter.
func (s *Supervisor) scheduleCopyReplace(c *copyProc) {
	if c.ready && s.env.now().Sub(c.started) >= stableAfter {
		c.crashes = 0
	}
	delay := s.cfg.backoff(c.crashes)
	c.crashes++
	c.log.Warn("replacing the copy", "after", delay, "failures_in_a_row", c.crashes)
	c.replaceTimer = s.env.afterFunc(delay, func() { s.post(copyReplaceDue{c: c}) })
}

// onCopyReplaceDue starts the replacement of copy c, unless its generation
// no longer serves or relay stops.
func (s *Supervisor) onCopyReplaceDue(c *copyProc) {
	g := c.g
	c.replaceTimer = nil
	if g != s.gens.serving || s.stop.begun || g.copies[c.worker] != c {
		return
	}
	nc, err := s.launchCopy(g, c.worker, c)
	if err != nil {
		c.log.Error("cannot start the copy's replacement", "err", err)
		s.scheduleCopyReplace(c)
		return
	}
	g.copies[c.worker] = nc
	s.counts.CopyReplacements++
	nc.log.Info("copy replacement started", "replaces_pid", c.pid(), "replacement", nc.replaced)
	s.startCopyCheck(nc)
}

// cancelCopyReplaces stops the pending replacements of g's copies.
func (s *Supervisor) cancelCopyReplaces(g *generation) {
	for _, c := range g.copies {
		if c.replaceTimer != nil {
			c.replaceTimer.Stop()
			c.replaceTimer = nil
		}
	}
}

// onReplacementCheck ends the readiness check of replacement copy c of
// the serving generation: ready, it takes its share of the new connections
// again; not, it is killed, and its exit replaces it again.
func (s *Supervisor) onReplacementCheck(c *copyProc, err error) {
	g := c.g
	if c.leaving {
		return // a rolling restart's batch took its place
	}
	if err != nil {
		c.log.Warn("the copy's replacement failed its readiness check; killing it", "err", err)
		c.proc.SignalGroup(syscall.SIGKILL)
		return
	}
	c.ready = true
	if err := s.cfg.Sockets.Absent(g.n, c.worker, false); err != nil {
		c.log.Error("cannot steer new connections to the replaced copy", "err", err)
	}
	c.log.Info("copy replaced and serving", "ready_after", s.env.now().Sub(c.started).Round(time.Microsecond))
}

// allReady reports whether every copy of g has started and passed its
// readiness check.
func (s *Supervisor) allReady(g *generation) bool {
	if len(g.copies) < s.cfg.Workers {
		return false
	}
	for _, c := range g.copies {
		if !c.ready {
			return false
		}
	}
	return true
}

// Liveness with several copies (Config.Workers above 1): each probe round
// probes every ready copy on its own sockets, and each copy's watchdog is
// its own. A copy that fails LivenessFailures probes in a row, or pinged
// WATCHDOG=1 and then stayed silent for ChildWatchdog, is replaced alone,
// as a copy that exits is: it leaves the spread, gets the stop signal
// (SIGKILL to its process group after the stop timeout), and its exit
// starts a replacement after the backoff, on the same sockets. Its
// siblings serve meanwhile.

// probeCopies probes every ready copy of g that is not failing already;
// the next round is armed once all have answered.
func (s *Supervisor) probeCopies(g *generation, seq int) {
	infos := s.cfg.Sockets.Info()
	running := 0
	for _, c := range g.copies {
		if !c.ready || c.exited || c.failedLiveness || c.probing {
			continue
		}
		c.probing = true
		running++
		ctx, cancel := s.env.withTimeout(context.Background(), s.livenessTimeout())
		child := health.Child{
			Vars:    health.Vars{Pid: c.pid(), Generation: g.n, Worker: c.worker, HealthAddr: c.healthAddr},
			Control: s.cfg.Sockets.ProbeControl(g.n, c.worker),
		}
		for i, in := range infos {
			child.Listeners = append(child.Listeners, health.Listener{Name: in.Name, Probe: s.cfg.Sockets.Probe(i)})
		}
		go func() {
			err := s.env.probe(ctx, child)
			cancel()
			s.post(probeDone{seq: seq, c: c, err: err})
		}()
	}
	if running == 0 {
		s.armProbe()
	}
}

// onCopyProbeDone counts the outcome of copy c's probe, and arms the next
// round once no probe of the round runs.
func (s *Supervisor) onCopyProbeDone(c *copyProc, err error) {
	c.probing = false
	switch {
	case c.exited || c.failedLiveness:
	case err == nil:
		if c.liveFailures > 0 {
			c.log.Info("liveness check passed again", "check", s.cfg.Liveness.String(), "failed_before", c.liveFailures)
		}
		c.liveFailures = 0
	default:
		c.liveFailures++
		c.log.Warn("liveness check failed", "check", s.cfg.Liveness.String(), "failures_in_a_row", c.liveFailures,
			"of", s.cfg.LivenessFailures, "err", err)
		if c.liveFailures >= s.cfg.LivenessFailures {
			s.copyFailedLiveness(c, fmt.Errorf("%d liveness checks failed in a row (--liveness %s), the last: %w", c.liveFailures, s.cfg.Liveness, err))
		}
	}
	for _, x := range c.g.copies {
		if x.probing {
			return
		}
	}
	s.armProbe()
}

// checkCopyWatchdogs fails the copies of g that pinged WATCHDOG=1 and have
// been silent for ChildWatchdog since, and arms the next look for the
// soonest of the others.
func (s *Supervisor) checkCopyWatchdogs(g *generation) {
	now := s.env.now()
	next := time.Duration(0)
	for _, c := range g.copies {
		if !c.pinged || c.exited || c.failedLiveness {
			continue
		}
		silent := now.Sub(c.lastPing)
		if silent >= s.cfg.ChildWatchdog {
			s.copyFailedLiveness(c, fmt.Errorf("no WATCHDOG=1 for %s (--child-watchdog %s)", silent.Round(time.Millisecond), s.cfg.ChildWatchdog))
			continue
		}
		if left := s.cfg.ChildWatchdog - silent; next == 0 || left < next {
			next = left
		}
	}
	if next > 0 {
		s.armWatchdog(next)
	}
}

// copyFailedLiveness stops copy c, which failed its liveness check or its
// watchdog: out of the spread, the stop signal, SIGKILL to its process
// group after the stop timeout. Its exit replaces it (copyExited).
func (s *Supervisor) copyFailedLiveness(c *copyProc, why error) {
	c.failedLiveness = true
	c.log.Error("copy failed its liveness check; stopping it, to replace it alone", "err", why.Error())
	if err := s.cfg.Sockets.Absent(c.g.n, c.worker, true); err != nil {
		c.log.Warn("cannot steer new connections away from the failing copy", "err", err)
	}
	s.stopCopy(c)
}

// stopCopy sends copy c alone the stop signal (its main process, or with
// --kill-mode control-group its process group), SIGCONT to its process
// group, and SIGKILL to it after the stop timeout (copyKillEvent).
func (s *Supervisor) stopCopy(c *copyProc) {
	c.stopSent = true
	sig := s.cfg.StopSignal
	var err error
	if s.cfg.KillMode == KillControlGroup {
		err = c.proc.SignalGroup(sig)
	} else {
		err = c.proc.Signal(sig)
	}
	if err != nil && !errors.Is(err, os.ErrProcessDone) {
		c.log.Warn("signalling the copy", "signal", signals.Name(sig), "err", err)
	}
	if sig != syscall.SIGCONT {
		c.proc.SignalGroup(syscall.SIGCONT)
	}
	c.killTimer = s.env.afterFunc(s.cfg.StopTimeout, func() { s.post(copyKillEvent{c: c}) })
}
