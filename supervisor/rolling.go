package supervisor

import (
	"context"
	"fmt"
	"slices"
	"syscall"

	"github.com/relaysh/relay/internal/sockets/steer"
	"github.com/relaysh/relay/signals"
)

// A rolling restart (Config.Rolling K, with Workers N above K) bounds the
// copies alive during a restart to N+K, instead of the 2N of a restart that
// starts every new copy at once. The new generation starts K copies at a
// time, each batch in the place of the serving generation's copies of the
// same numbers:
//
//  1. K new copies start, each proven ready on its own socket.
//  2. Once the batch is ready, one program swap spreads the new
//     connections over the new generation's ready copies and the old
//     generation's copies that are not leaving (Sockets.Spread): the old
//     copies of the batch's numbers leave the spread.
//  3. Each leaving copy drains (its socket's queue and the handshakes on
//     their way), then gets the stop signal (its main process), and
//     SIGKILL to its process group after the stop timeout.
//  4. Once they have exited, the next batch starts.
//
// The last batch ends as any restart does: once it is ready, the switch
// sends every new connection to the new generation, and the old one,
// whose last K copies are left, drains and stops. At every moment at most
// N+K copies are alive (a crashed copy's replacement aside).
//
// A new copy that fails half-way (exits, or fails its readiness check,
// ready or not) fails the restart, which falls back: the new connections go
// to the old generation's copies that are still there, the new
// generation's copies that never got ready are killed, and the ready ones
// drain and stop as a generation; the old generation's copies that left are
// started again, one for each new copy that exits (refill), so the bound
// holds. The restart is rolled back once the new generation has exited,
// with the failure and its copy's stderr.

// rolling is the state of a rolling restart.
type rolling struct {
	k int
	// batch are the new copies of the step under way.
	batch []*copyProc
	// leaving are the old copies the step takes out: drained, then
	// stopped. The next step starts once they have exited.
	leaving []*copyProc
	// back: a new copy failed, and the restart falls back (fallBack).
	back bool
	// drainCancel ends the drain of the new generation when it falls
	// back; nil before.
	drainCancel context.CancelFunc
}

// rollingNow reports whether a rolling restart is moving forward: the old
// generation's copies that left are not to be started again meanwhile.
func (s *Supervisor) rollingNow() bool {
	run := s.restarts.current
	return run != nil && run.roll != nil && !run.roll.back
}

// rolls reports whether run's new generation is to roll in: a restart of a
// serving generation of every copy, with Rolling below Workers.
func (s *Supervisor) rolls(run *restartRun) bool {
	sv := s.gens.serving
	return s.cfg.Rolling > 0 && s.cfg.Rolling < s.cfg.Workers && sv != nil && len(sv.copies) == s.cfg.Workers &&
		run.reason != reasonStart && run.reason != reasonReplace
}

// onRollCheck ends the readiness check of copy c of the rolling restart's
// batch.
func (s *Supervisor) onRollCheck(run *restartRun, c *copyProc, err error) {
	roll, g := run.roll, run.gen
	if roll.back || g.failure != nil {
		return
	}
	if err != nil {
		s.fallBack(run, c, fmt.Errorf("copy %d (pid %d): %w", c.worker, c.pid(), err))
		return
	}
	c.ready = true
	for _, b := range roll.batch {
		if !b.ready {
			c.log.Debug("copy ready; waiting for the rest of its batch")
			return
		}
	}
	if len(g.copies) == s.cfg.Workers {
		// The last batch: the switch, and the old generation, its last
		// copies left, drains and stops as after any restart.
		g.log.Info("rolling restart: the last batch is ready", "batch", workers(roll.batch))
		s.readyToServe(g)
		return
	}
	old := s.gens.serving
	if old == nil {
		return // gone: rollRest started every copy
	}
	var targets []steer.Copy
	for _, x := range g.copies {
		if x.ready && !x.exited {
			targets = append(targets, steer.Copy{Gen: g.n, Worker: x.worker})
		}
	}
	var leaving []*copyProc
	for _, x := range old.copies {
		switch {
		case x.exited || x.leaving:
		case x.worker < len(g.copies):
			leaving = append(leaving, x)
		case x.ready:
			targets = append(targets, steer.Copy{Gen: old.n, Worker: x.worker})
		}
	}
	if err := s.cfg.Sockets.Spread(targets); err != nil {
		s.fallBack(run, c, fmt.Errorf("cannot spread new connections over the copies: %w", err))
		return
	}
	g.log.Info("rolling restart: a batch is ready and takes its share; the old copies it replaces drain",
		"batch", workers(roll.batch), "leaving_pids", pidsOf(leaving), "serving_copies", len(targets))
	for _, x := range old.copies {
		if x.worker < len(g.copies) && x.exited && !x.leaving {
			// A crashed old copy is not replaced: the new one took
			// its place. It left, as far as a fall back goes.
			if x.replaceTimer != nil {
				x.replaceTimer.Stop()
				x.replaceTimer = nil
			}
			x.leaving = true
		}
	}
	roll.leaving = leaving
	for _, x := range leaving {
		s.leave(x)
	}
	s.rollOn(run)
}

// readyToServe switches every new connection to g, ready, and promotes
// it; a switch that fails kills it.
func (s *Supervisor) readyToServe(g *generation) {
	if err := s.steerTo(g); err != nil {
		g.failure = err
		g.log.Error("cannot send new connections to the new generation; killing it", "err", err)
		g.contain.kill()
		return
	}
	s.promote(g)
}

// leave drains old copy c, out of the spread, then sends it the stop
// signal (copyDrainedEvent). Its socket is marked absent: should its
// generation get all its copies' share again (a fall back), c's is not
// among them until it is started again.
func (s *Supervisor) leave(c *copyProc) {
	c.leaving = true
	if c.cancelCheck != nil && !c.ready {
		c.cancelCheck() // a replacement still starting: it leaves as it is
	}
	if err := s.cfg.Sockets.Absent(c.g.n, c.worker, true); err != nil {
		c.log.Warn("marking the leaving copy's socket absent", "err", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c.drainCancel = cancel
	if s.env.copyDrained != nil {
		go func() {
			err := s.env.copyDrained(ctx, c.g.n, c.worker)
			if ctx.Err() == nil {
				s.post(copyDrainedEvent{c: c, err: err})
			}
		}()
	}
	c.drainTimer = s.env.afterFunc(s.cfg.Drain, func() { s.post(copyDrainedEvent{c: c, atMax: true}) })
}

// onCopyDrained sends leaving copy c its stop signal: its socket drained,
// or --drain passed. A watch that failed leaves it to --drain.
func (s *Supervisor) onCopyDrained(c *copyProc, atMax bool, err error) {
	if c.exited || c.stopSent || s.stop.begun {
		return // relay's stop signals every copy
	}
	if err != nil && !atMax {
		c.log.Warn("cannot see the leaving copy's socket empty; it drains for the whole --drain", "drain", s.cfg.Drain, "err", err)
		return
	}
	c.drainCancel()
	if c.drainTimer != nil {
		c.drainTimer.Stop()
	}
	ended := "empty"
	if atMax {
		ended = "max"
	}
	c.log.Info("leaving copy drained; stopping it", "signal", signals.Name(s.cfg.StopSignal), "ended", ended, "stop_timeout", s.cfg.StopTimeout)
	s.stopCopy(c)
}

// onCopyKillTimeout kills copy c's process group: stopped alone (it left
// in a rolling restart, or failed its liveness check), it did not exit
// within the stop timeout.
func (s *Supervisor) onCopyKillTimeout(c *copyProc) {
	if c.exited {
		return
	}
	c.log.Warn("copy did not stop within the stop timeout; killing its process group", "stop_timeout", s.cfg.StopTimeout, "signal", "KILL")
	c.proc.SignalGroup(syscall.SIGKILL)
}

// copyLeft ends the part of old copy c, which left in a rolling restart:
// once the step's leaving copies have all exited, the next batch starts.
func (s *Supervisor) copyLeft(c *copyProc) {
	if c.killTimer != nil {
		c.killTimer.Stop()
	}
	if c.drainCancel != nil {
		c.drainCancel()
	}
	if c.drainTimer != nil {
		c.drainTimer.Stop()
	}
	c.log.Info("leaving copy exited", "status", c.status.String())
	if run := s.restarts.current; run != nil && run.roll != nil && slices.Contains(run.roll.leaving, c) {
		s.rollOn(run)
	}
}

// rollOn starts the rolling restart's next batch once the old copies of
// the step have all exited.
func (s *Supervisor) rollOn(run *restartRun) {
	roll, g := run.roll, run.gen
	if roll.back || s.stop.begun || g.failure != nil || len(g.copies) == s.cfg.Workers {
		return
	}
	for _, x := range roll.leaving {
		if !x.exited {
			return
		}
	}
	for _, b := range roll.batch {
		if !b.ready {
			return // the batch under way is not ready yet
		}
	}
	roll.leaving = nil
	roll.batch = nil
	if started, ok := s.addRollCopies(run, len(g.copies)+roll.k); ok {
		g.log.Info("rolling restart: next batch starting", "batch", workers(started), "pids", pidsOf(started))
		for _, c := range started {
			s.startCopyCheck(c)
		}
	}
}

// addRollCopies starts the copies of the rolling restart's new generation
// from the next not started up to to (at most Workers), into the batch. If
// one cannot start, the restart falls back and ok is false.
func (s *Supervisor) addRollCopies(run *restartRun, to int) (started []*copyProc, ok bool) {
	g := run.gen
	for w := len(g.copies); w < min(to, s.cfg.Workers); w++ {
		c, err := s.launchCopy(g, w, nil)
		if err != nil {
			s.fallBack(run, nil, err)
			return nil, false
		}
		g.copies = append(g.copies, c)
		run.roll.batch = append(run.roll.batch, c)
		started = append(started, c)
	}
	return started, true
}

// rollRest starts at once every copy of the rolling restart's new
// generation not yet started: the old generation is gone (its last copies
// exited), so nothing bounds the roll, and nothing else serves. The
// restart then ends as one that started every copy at once.
func (s *Supervisor) rollRest(run *restartRun) {
	roll, g := run.roll, run.gen
	if roll.back || g.failure != nil || s.stop.begun {
		return
	}
	roll.leaving = nil
	if started, ok := s.addRollCopies(run, s.cfg.Workers); ok {
		g.log.Warn("the old generation is gone in the middle of the rolling restart; starting the rest of the new copies at once",
			"started", workers(started))
		for _, c := range started {
			s.startCopyCheck(c)
		}
	}
}

// fallBack fails a rolling restart half-way: copy c (nil for none) of the
// new generation failed with why. See the top of this file.
func (s *Supervisor) fallBack(run *restartRun, c *copyProc, why error) {
	roll, g, old := run.roll, run.gen, s.gens.serving
	if roll.back || g.failure != nil {
		return
	}
	roll.back = true
	g.failure, g.culprit = why, c
	var targets []steer.Copy
	if old != nil {
		for _, x := range old.copies {
			if !x.exited && !x.leaving && x.ready {
				targets = append(targets, steer.Copy{Gen: old.n, Worker: x.worker})
			}
		}
	}
	if len(targets) > 0 {
		if err := s.cfg.Sockets.Spread(targets); err != nil {
			g.log.Error("cannot send the new connections back to the old generation's copies", "err", err)
		}
	}
	g.log.Error("rolling restart failed half-way; the old generation's copies take every new connection again, and the new generation's ready copies drain and stop",
		"err", why.Error(), "old_copies_serving", len(targets))
	ready := false
	for _, x := range g.copies {
		switch {
		case x.exited:
		case x.ready:
			ready = true
		default:
			x.proc.SignalGroup(syscall.SIGKILL)
		}
	}
	if !ready {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	roll.drainCancel = cancel
	if s.env.drained != nil {
		go func() {
			s.env.drained(ctx, g.n, nil)
			if ctx.Err() == nil {
				s.post(fallBackDrainedEvent{run: run})
			}
		}()
	}
	t := s.env.afterFunc(s.cfg.Drain, func() { s.post(fallBackDrainedEvent{run: run}) })
	go func() { <-ctx.Done(); t.Stop() }()
}

// onFallBackDrained stops the new generation of a rolling restart that
// fell back, once its ready copies' sockets have drained.
func (s *Supervisor) onFallBackDrained(run *restartRun) {
	g := run.gen
	if run.roll.drainCancel != nil {
		run.roll.drainCancel()
	}
	if g.state != Starting || s.stop.begun {
		return
	}
	s.stopGen(g)
}

// refill starts again the serving generation's copies that left in a
// rolling restart that fell back, one for each place below N+K copies
// alive.
func (s *Supervisor) refill() {
	sv := s.gens.serving
	if sv == nil || s.stop.begun || s.rollingNow() || s.cfg.Rolling == 0 {
		return
	}
	alive := 0
	for _, g := range append(s.gens.alive(), s.gens.lingering...) {
		for _, c := range g.copies {
			if !c.exited {
				alive++
			}
		}
	}
	for _, c := range sv.copies {
		if alive >= s.cfg.Workers+s.cfg.Rolling {
			return
		}
		if !c.exited || !c.leaving || c.refilled {
			continue
		}
		c.refilled = true
		nc, err := s.launchCopy(sv, c.worker, c)
		if err != nil {
			c.log.Error("cannot start the old generation's copy again; it is replaced as a crashed one", "err", err)
			c.leaving = false
			s.scheduleCopyReplace(c)
			continue
		}
		sv.copies[c.worker] = nc
		s.counts.CopyReplacements++
		alive++
		nc.log.Info("the old generation's copy started again after the rolling restart failed", "replaces_pid", c.pid())
		s.startCopyCheck(nc)
	}
}

// workers lists the worker numbers of copies.
func workers(cs []*copyProc) []int {
	out := make([]int, len(cs))
	for i, c := range cs {
		out[i] = c.worker
	}
	return out
}

// pidsOf lists the pids of copies.
func pidsOf(cs []*copyProc) []int {
	out := make([]int, len(cs))
	for i, c := range cs {
		out[i] = c.pid()
	}
	return out
}
