package supervisor

import (
	"context"
	"fmt"
	"time"

	"github.com/relaysh/relay/health"
)

// Liveness: relay watches the serving generation for as long as it serves
// and no restart is under way, with Config.Liveness every
// LivenessInterval and, for a child that pings WATCHDOG=1, with its
// watchdog. A generation that fails LivenessFailures probes in a row, or
// that pinged once and then stayed silent for ChildWatchdog, is replaced
// by a restart (reasonLiveness) with the usual readiness, switch, drain
// and rollback: it serves until its replacement is ready, and gets its
// stop signal (SIGKILL after the stop timeout) only then. Replacements in
// a row back off as crash replacements do, and the count starts again once
// a generation has passed its checks for stableAfter. A restart under way
// pauses the watch; it starts again, with no failure counted, for
// whatever serves when the restart has finished. The exception is the
// confirmation window (confirm.go): the new generation is watched on trial
// then, probed every Config.trialInterval, and a failure rolls its restart
// back at once instead of scheduling a replacement. With several copies
// (Workers above 1), each copy is probed and watched on its own, and one
// that fails is replaced alone (workers.go).

// livenessState is the watch of the serving generation.
type livenessState struct {
	gen   *generation // watched; nil while paused or off
	trial bool        // gen is on trial in its confirmation window
	since time.Time   // when the watch of gen began
	// seq names the events of one watch: those of an earlier one are
	// ignored.
	seq      int
	failures int       // probes failed in a row
	failedAt time.Time // the first failure of those
	probe    timer     // the next probe; nil while one runs
	cancel   context.CancelFunc
	watchdog timer // the end of the child's watchdog; nil if it never pinged

	// The replacement, once the watch failed.
	inRow   int         // replacements in a row, for the backoff
	pending *generation // the generation to replace after the backoff
	timer   timer
}

// livenessOn reports whether anything watches the serving generation.
func (s *Supervisor) livenessOn() bool {
	return s.cfg.Liveness.Kind != "" || s.cfg.ChildWatchdog > 0
}

// syncLiveness watches the serving generation when nothing else is under
// way, and pauses the watch otherwise. Run calls it after each request and
// event.
func (s *Supervisor) syncLiveness() {
	if !s.livenessOn() {
		return
	}
	lv, g := &s.live, s.gens.serving
	quiet := g != nil && s.restarts.current == nil && !s.stop.begun
	trial := g != nil && s.inWindow() != nil && !s.stop.begun
	if lv.pending != nil && (!quiet || lv.pending != g) {
		// A restart, a crash or the stop took the replacement's place.
		lv.timer.Stop()
		lv.pending, lv.timer = nil, nil
	}
	if lv.gen != nil && (!(quiet || trial) || lv.gen != g || lv.trial != trial) {
		s.pauseLiveness()
	}
	if (quiet || trial) && lv.gen == nil && lv.pending == nil {
		s.watch(g, trial)
	}
}

// watch begins the watch of g, the serving generation, on trial or not.
func (s *Supervisor) watch(g *generation, trial bool) {
	lv := &s.live
	lv.gen, lv.trial, lv.since, lv.failures = g, trial, s.env.now(), 0
	lv.seq++
	if s.cfg.Liveness.Kind != "" {
		s.armProbe()
	}
	pinged := false
	for _, c := range g.copies {
		if c.pinged {
			// Its watchdog counts from the watch's start: a restart
			// that paused the watch does not count against it.
			c.lastPing, pinged = lv.since, true
		}
	}
	if pinged {
		s.armWatchdog(s.cfg.ChildWatchdog)
	}
}

// pauseLiveness ends the watch: its timers stop and a probe under way is
// cut short, its outcome ignored.
func (s *Supervisor) pauseLiveness() {
	lv := &s.live
	for _, t := range []timer{lv.probe, lv.watchdog} {
		if t != nil {
			t.Stop()
		}
	}
	if lv.cancel != nil {
		lv.cancel()
	}
	lv.gen, lv.probe, lv.watchdog, lv.cancel = nil, nil, nil, nil
	lv.seq++
}

func (s *Supervisor) armProbe() {
	seq, every := s.live.seq, s.cfg.LivenessInterval
	if s.live.trial {
		every = s.cfg.trialInterval()
	}
	s.live.probe = s.env.afterFunc(every, func() { s.post(probeDue{seq: seq}) })
}

// livenessTimeout bounds one probe: the interval, and at most
// maxLivenessTimeout; on trial, Config.trialTimeout.
func (s *Supervisor) livenessTimeout() time.Duration {
	if s.live.trial {
		return s.cfg.trialTimeout()
	}
	return min(s.cfg.LivenessInterval, maxLivenessTimeout)
}

// maxLivenessTimeout bounds one probe of a long --liveness-interval.
const maxLivenessTimeout = 5 * time.Second

func (s *Supervisor) onProbeDue(seq int) {
	lv := &s.live
	if seq != lv.seq || lv.gen == nil {
		return
	}
	lv.probe = nil
	g := lv.gen
	if s.cfg.Workers > 1 {
		s.probeCopies(g, seq)
		return
	}
	ctx, cancel := s.env.withTimeout(context.Background(), s.livenessTimeout())
	lv.cancel = cancel
	// The same view of the child as its readiness check: a probe of a
	// steered listener goes to this generation's own socket.
	child := health.Child{
		Vars:    health.Vars{Pid: g.pid(), Generation: g.n, HealthAddr: g.first().healthAddr},
		Control: s.cfg.Sockets.ProbeControl(g.n, 0),
	}
	for i, in := range s.cfg.Sockets.Info() {
		child.Listeners = append(child.Listeners, health.Listener{Name: in.Name, Probe: s.cfg.Sockets.Probe(i)})
	}
	go func() {
		err := s.env.probe(ctx, child)
		cancel()
		s.post(probeDone{seq: seq, err: err})
	}()
}

func (s *Supervisor) onProbeDone(seq int, c *copyProc, err error) {
	lv := &s.live
	if seq != lv.seq || lv.gen == nil {
		return // the watch ended meanwhile
	}
	if c != nil {
		s.onCopyProbeDone(c, err)
		return
	}
	lv.cancel = nil
	g := lv.gen
	if err == nil {
		if lv.failures > 0 {
			g.log.Info("liveness check passed again", "check", s.cfg.Liveness.String(), "failed_before", lv.failures)
		}
		lv.failures = 0
		s.armProbe()
		return
	}
	if lv.failures == 0 {
		lv.failedAt = s.env.now()
	}
	lv.failures++
	g.log.Warn("liveness check failed", "check", s.cfg.Liveness.String(), "failures_in_a_row", lv.failures,
		"of", s.cfg.LivenessFailures, "err", err)
	if lv.failures >= s.cfg.LivenessFailures {
		s.livenessFailed(g, fmt.Errorf("%d liveness checks failed in a row (--liveness %s), the last: %w", lv.failures, s.cfg.Liveness, err))
		return
	}
	s.armProbe()
}

// onWatchdogPing notes a WATCHDOG=1 of g's child, and starts its watchdog
// at its first while it is watched.
func (s *Supervisor) onWatchdogPing(c *copyProc) {
	g := c.g
	c.pingPosted.Store(false) // the next ping may be posted
	if c.exited {
		return
	}
	if !c.pinged {
		c.log.Info("child pings its watchdog; relay replaces it if it stays silent for --child-watchdog once serving",
			"child_watchdog", s.cfg.ChildWatchdog)
	}
	c.pinged, c.lastPing = true, s.env.now()
	if s.live.gen == g && s.live.watchdog == nil {
		s.armWatchdog(s.cfg.ChildWatchdog)
	}
}

func (s *Supervisor) armWatchdog(d time.Duration) {
	seq := s.live.seq
	s.live.watchdog = s.env.afterFunc(d, func() { s.post(watchdogDue{seq: seq}) })
}

// onWatchdogDue replaces the watched generation if its child has been
// silent for ChildWatchdog, and otherwise waits for the rest of it.
func (s *Supervisor) onWatchdogDue(seq int) {
	lv := &s.live
	if seq != lv.seq || lv.gen == nil {
		return
	}
	lv.watchdog = nil
	g := lv.gen
	if s.cfg.Workers > 1 {
		s.checkCopyWatchdogs(g)
		return
	}
	silent := s.env.now().Sub(g.first().lastPing)
	if silent < s.cfg.ChildWatchdog {
		s.armWatchdog(s.cfg.ChildWatchdog - silent)
		return
	}
	lv.failedAt = s.env.now()
	s.livenessFailed(g, fmt.Errorf("no WATCHDOG=1 for %s (--child-watchdog %s)", silent.Round(time.Millisecond), s.cfg.ChildWatchdog))
}

// livenessFailed ends the watch of g, which failed, and schedules its
// replacement after the backoff; or, on trial, rolls its restart back.
func (s *Supervisor) livenessFailed(g *generation, why error) {
	lv := &s.live
	g.failedLiveness = true
	if run := s.inWindow(); lv.trial && run != nil && run.gen == g {
		s.pauseLiveness()
		s.rollBack(run, RollbackLiveness, why.Error())
		return
	}
	if lv.failedAt.Sub(lv.since) >= stableAfter {
		lv.inRow = 0 // it passed its checks long enough: a fresh failure
	}
	delay := s.cfg.backoff(lv.inRow)
	lv.inRow++
	s.pauseLiveness()
	g.log.Error("serving generation failed its liveness check; replacing it with a restart", "err", why.Error(),
		"after", delay, "failures_in_a_row", lv.inRow)
	lv.pending = g
	lv.timer = s.env.afterFunc(delay, func() { s.post(livenessReplaceDue{g: g}) })
}

func (s *Supervisor) onLivenessReplaceDue(g *generation) {
	lv := &s.live
	if lv.pending != g {
		return // something else took its place
	}
	lv.pending, lv.timer = nil, nil
	if s.gens.serving != g || s.restarts.current != nil || s.stop.begun {
		return
	}
	s.counts.LivenessReplacements++
	s.beginRestart(&restartRun{reason: reasonLiveness})
}
