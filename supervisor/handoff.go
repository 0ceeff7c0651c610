package supervisor

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/internal/reaper"
	"github.com/relaysh/relay/internal/takeover"
)

// The handoff is the supervisor's part in relay upgrade, where relay
// replaces its own image with execve(2) and its children live on: Handoff
// stops reading the serving generation's fds and gives its state to the
// exec, and Restore, in the new image, takes it back before Run.
//
// Only a quiet relay hands over: a generation serving, no restart but one
// in its drain window that nobody follows, none queued, no stop or
// shutdown delay, no crash or liveness replacement pending. Old
// generations may be draining (the restart crosses, with the time left of
// its window), stopping (they got their stop signal and finish their
// requests, SIGKILL due at the stop timeout) or lingering (processes of
// them outlived their main process): they cross, with the time left
// before their SIGKILL. A generation that has just exited and whose exit
// is not yet handled, or a restart or an old generation a client follows
// (relay restart without --no-wait), makes relay busy: Handoff refuses
// with ErrBusy, and the caller tries again a moment later.

// ErrBusy is returned by Handoff when relay is not quiet.
var ErrBusy = errors.New("busy")

// Saved is the supervisor's state as it crosses the exec.
type Saved struct {
	Next           int             `json:"next"`
	Command        Command         `json:"command"`
	EverReady      bool            `json:"ever_ready"`
	SpeaksNotify   bool            `json:"speaks_notify"`
	TakeoverWarned bool            `json:"takeover_warned"`
	Counts         RestartCounts   `json:"counts"`
	Last           *LastRestart    `json:"last,omitempty"`
	Serving        SavedGeneration `json:"serving"`
	// Old are the stopping and lingering generations, oldest first.
	Old []SavedGeneration `json:"old,omitempty"`
	// At is when the state was saved: the kill deadlines count from it.
	At time.Time `json:"at"`
	// Crashes and LivenessInRow are the failures in a row that set the
	// backoff of the next crash or liveness replacement.
	Crashes       int `json:"crashes,omitempty"`
	LivenessInRow int `json:"liveness_in_row,omitempty"`
	// Drain is the restart whose old generation drains, if one does.
	Drain *SavedDrain `json:"drain,omitempty"`
}

// SavedDrain is a restart in its drain window as it crosses the exec:
// the old generation (Prev) drains, the new one (the serving one) serves.
type SavedDrain struct {
	Reason string    `json:"reason"`
	Begun  time.Time `json:"begun"`
	Prev   int       `json:"prev"`
	// Began is when the window began; Left, the time left of --drain.
	Began time.Time     `json:"began"`
	Left  time.Duration `json:"left"`
}

// SavedGeneration is a generation as it crosses the exec. An fd of -1 is
// none: a lingering generation's notify socket is closed, and its stderr
// may have ended.
type SavedGeneration struct {
	N     int              `json:"n"`
	Cmd   Command          `json:"cmd"`
	State State            `json:"state"`
	Proc  reaper.SavedProc `json:"proc"`
	// Status is how its main process exited, if it has (lingering).
	Status *reaper.Status `json:"status,omitempty"`
	// KillIn is the time left before its SIGKILL, if one is due; Killed,
	// it had it.
	KillIn     *time.Duration     `json:"kill_in,omitempty"`
	Killed     bool               `json:"killed,omitempty"`
	Started    time.Time          `json:"started"`
	ReadyAt    time.Time          `json:"ready_at"`
	HealthAddr string             `json:"health_addr"`
	Notify     health.SavedNotify `json:"notify"`
	// StderrFD is relay's end of its stderr pipe; StderrTail what relay
	// kept of it for reports, and StderrPartial the start of a line not
	// yet passed on.
	StderrFD      int    `json:"stderr_fd"`
	StderrTail    []byte `json:"stderr_tail,omitempty"`
	StderrPartial []byte `json:"stderr_partial,omitempty"`
	// Takeover is the filter's notification fd, where the bind takeover
	// is active; How says how it took each listener.
	Takeover *takeover.SavedNotifier `json:"takeover,omitempty"`
	How      []string                `json:"how,omitempty"`
	// Cgroup: its cgroup contains it (else its process group).
	Cgroup bool `json:"cgroup"`
	Spoke  bool `json:"spoke"` // it sent an sd_notify message
	Pinged bool `json:"pinged"`
}

// Procs are the processes the next image's reaper waits for: the main
// processes of the generations handed over, but those already reaped.
func (s Saved) Procs() []reaper.SavedProc {
	var procs []reaper.SavedProc
	for _, g := range append([]SavedGeneration{s.Serving}, s.Old...) {
		if g.Status == nil {
			procs = append(procs, g.Proc)
		}
	}
	return procs
}

// FDs are the fds that must cross the exec for s.
func (s Saved) FDs() []int {
	var fds []int
	for _, g := range append([]SavedGeneration{s.Serving}, s.Old...) {
		for _, fd := range []int{g.Notify.FD, g.StderrFD} {
			if fd >= 0 {
				fds = append(fds, fd)
			}
		}
		if g.Takeover != nil {
			fds = append(fds, g.Takeover.FD)
		}
	}
	return fds
}

// handoffReq asks Run's goroutine to hand over.
type handoffReq struct {
	exec  func(Saved) error
	reply chan error
}

func (r handoffReq) handleRequest(s *Supervisor) { r.reply <- s.handoff(r.exec) }

// Handoff calls exec with the supervisor's state, on Run's goroutine, once
// nothing reads the serving generation's fds any more and no child is
// reaped: exec returns only if the exec failed, and then everything is
// read again as before and Handoff returns exec's error. Where relay is not
// quiet, Handoff returns an error wrapping ErrBusy that says why, and
// exec is not called.
func (s *Supervisor) Handoff(exec func(Saved) error) error {
	reply := make(chan error, 1)
	if err := s.request(handoffReq{exec: exec, reply: reply}); err != nil {
		return err
	}
	return <-reply
}

// quiet says why relay cannot hand over now, or nil.
func (s *Supervisor) quiet() error {
	gs := &s.gens
	busy := func(why string) error {
		return fmt.Errorf("%w: %s; try again in a moment (relay status shows what is under way)", ErrBusy, why)
	}
	switch {
	case s.stop.begun || !s.stop.delayUntil.IsZero():
		return fmt.Errorf("%w: relay is stopping", ErrStopping)
	case s.cfg.Workers > 1:
		return fmt.Errorf("relay cannot hand generations of %d workers over to a new image of itself yet; restart relay itself instead (the children restart with it)", s.cfg.Workers)
	case gs.serving == nil:
		return busy("no generation is serving")
	case s.inWindow() != nil:
		run := s.inWindow()
		return fmt.Errorf("%w: generation %d is on trial in its confirmation window until %s, with generation %d warm; upgrade relay after it ends, or after relay rollback",
			ErrBusy, run.gen.n, run.confirm.until.Format(time.RFC3339), run.prev.n)
	case s.restarts.current != nil && s.restarts.current.back != nil:
		return busy("a restart rolled back after its switch is draining its new generation")
	case gs.starting != nil || len(s.restarts.queued) > 0 || !s.drainOnly():
		return busy("a restart is under way")
	case s.crash.timer != nil || s.live.pending != nil:
		return busy("a replacement is pending")
	}
	for _, g := range gs.retired() {
		switch {
		case g.state == Draining && (s.restarts.current == nil || s.restarts.current.prev != g):
			return busy(fmt.Sprintf("generation %d is draining", g.n))
		case len(g.exitWatchers) > 0:
			return busy(fmt.Sprintf("a relay restart follows generation %d until it is gone", g.n))
		}
	}
	return nil
}

// drainOnly reports whether the restart under way, if any, can cross: it
// is in its drain window, and nobody follows it.
func (s *Supervisor) drainOnly() bool {
	run := s.restarts.current
	return run == nil || (run.phase == PhaseDraining && run.prev != nil && run.gen == s.gens.serving && len(run.waiters) == 0)
}

// handedOver are the generations that cross the exec: the serving one,
// then the old ones, oldest first.
func (s *Supervisor) handedOver() []*generation {
	return append([]*generation{s.gens.serving}, s.gens.retired()...)
}

func (s *Supervisor) handoff(exec func(Saved) error) error {
	if err := s.quiet(); err != nil {
		return err
	}
	if s.env.holdReaps != nil {
		release := s.env.holdReaps()
		defer release()
	}
	gens := s.handedOver()
	for _, g := range gens {
		select {
		case <-g.first().proc.Done():
			if g.state != Exited {
				return fmt.Errorf("%w: generation %d has just exited", ErrBusy, g.n)
			}
		default:
		}
	}
	defer func() {
		for _, g := range gens {
			g.first().resume()
		}
	}()
	for _, g := range gens {
		g.first().pause() // a stderr that has ended has nothing to hand over
	}
	saved, err := s.save()
	if err != nil {
		return err
	}
	return exec(saved)
}

// pause stops the goroutines that read c's fds: its stderr, its notify
// socket and its binds. resume undoes it.
func (c *copyProc) pause() {
	c.copier.pause()
	if !c.exited { // else its notify socket is closed
		c.notify.Pause()
	}
	if t := c.answering(); t != nil {
		t.nt.Pause()
		<-t.served
	}
}

func (c *copyProc) resume() {
	if !c.exited {
		c.notify.Resume()
	}
	if t := c.answering(); t != nil && t.nt.Paused() {
		t.served = make(chan struct{})
		t.nt.Resume()
		go t.serveBinds()
	}
	c.copier.resume()
}

// answering is c's bind takeover while it answers the child's binds; nil
// if it has none, or it was stopped.
func (c *copyProc) answering() *bindTakeover {
	t := c.takeover
	if t == nil {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.nt == nil || t.stopped {
		return nil
	}
	return t
}

// save is the supervisor's state, once every generation handed over is
// paused.
func (s *Supervisor) save() (Saved, error) {
	sv := Saved{
		Next: s.gens.next, Command: s.gens.command, EverReady: s.gens.everReady,
		SpeaksNotify: s.speaksNotify.Load(), TakeoverWarned: s.takeoverWarned.Load(),
		Counts: s.counts, Last: s.last, At: time.Now(), Crashes: s.crash.crashes, LivenessInRow: s.live.inRow,
	}
	if run := s.restarts.current; run != nil {
		d := run.drain
		left := s.cfg.Drain - s.env.now().Sub(d.began)
		sv.Drain = &SavedDrain{Reason: run.reason, Begun: run.begun, Prev: run.prev.n, Began: d.began, Left: max(left, 0)}
	}
	for i, g := range s.handedOver() {
		sg, err := s.saveGen(g)
		if err != nil {
			return Saved{}, err
		}
		if i == 0 {
			sv.Serving = sg
		} else {
			sv.Old = append(sv.Old, sg)
		}
	}
	return sv, nil
}

// saveGen is g's state, once paused.
func (s *Supervisor) saveGen(g *generation) (SavedGeneration, error) {
	c := g.first() // its one copy: quiet refuses more
	sg := SavedGeneration{
		N: g.n, Cmd: g.cmd, State: g.state, Started: g.started, ReadyAt: g.readyAt, HealthAddr: c.healthAddr,
		StderrTail: c.stderr.bytes(), StderrPartial: c.copier.partial(), Killed: g.killed,
		Spoke: isClosed(c.notified), Pinged: c.pinged, Notify: health.SavedNotify{FD: -1}, StderrFD: -1,
	}
	_, sg.Cgroup = g.contain.(*cgroupContainment)
	if p, ok := c.proc.(reaperProcess); ok {
		sg.Proc = p.Saved()
	} else {
		sg.Proc = reaper.SavedProc{Pid: g.pid(), Group: true}
	}
	if g.state == Exited {
		st := g.status
		sg.Status = &st
	}
	if g.killTimer != nil && !g.killed {
		left := max(g.killAt.Sub(s.env.now()), 0)
		sg.KillIn = &left
	}
	var err error
	if !c.exited {
		if sg.Notify, err = c.notify.Save(); err != nil {
			return sg, fmt.Errorf("handing over generation %d's notify socket: %w", g.n, err)
		}
	}
	if !isClosed(c.copier.done) {
		if sg.StderrFD, err = c.copier.fd(); err != nil {
			return sg, fmt.Errorf("handing over generation %d's stderr: %w", g.n, err)
		}
	}
	if t := c.answering(); t != nil {
		sn, err := t.nt.Save()
		if err != nil {
			return sg, fmt.Errorf("handing over generation %d's bind takeover: %w", g.n, err)
		}
		sg.Takeover, sg.How = &sn, t.took()
	}
	return sg, nil
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// Restore takes over the state an earlier image handed over: its
// generations, as if this supervisor had started them, with the SIGKILL
// of an old one due when it was. Call it before Run, which then starts no
// generation. The fds Saved names are taken: a failed Restore leaves them
// open, for the return to the earlier image.
func (s *Supervisor) Restore(sv Saved) error {
	if s.env.adopt == nil {
		return errors.New("restoring the supervisor: nothing to adopt processes with")
	}
	saved := append([]SavedGeneration{sv.Serving}, sv.Old...)
	// What can fail first, for every generation; nothing reads a
	// generation's fds before all of them are taken, so that a failed
	// Restore leaves every message and bind to the earlier image. The
	// generations are kept (restoring) until relay stays or goes back:
	// what holds their fds must not be collected, and close them.
	for _, sg := range saved {
		g, err := s.adoptGen(sg)
		if err != nil {
			return err
		}
		s.restoring = append(s.restoring, g)
	}
	for i, g := range s.restoring {
		if err := s.listenGen(g, saved[i]); err != nil {
			return err
		}
	}
	s.gens.next, s.gens.command, s.gens.everReady = sv.Next, sv.Command, sv.EverReady
	s.speaksNotify.Store(sv.SpeaksNotify)
	s.takeoverWarned.Store(sv.TakeoverWarned)
	s.counts, s.last = sv.Counts, sv.Last
	if s.counts.AfterSwitch == nil {
		s.counts.AfterSwitch = map[RollbackCause]int{} // from an image that had none
	}
	s.crash.crashes, s.live.inRow = sv.Crashes, sv.LivenessInRow
	// The time since the save, the exec's gap, counts against the kill
	// deadlines.
	elapsed := max(time.Since(sv.At), 0)
	if sv.At.IsZero() {
		elapsed = 0
	}
	for _, o := range sv.Old {
		if o.State == Warm {
			// quiet() never hands over a confirmation window.
			return fmt.Errorf("restoring the supervisor: generation %d is warm, and no confirmation window can cross an upgrade", o.N)
		}
	}
	for i, g := range s.restoring {
		state := Serving
		if i > 0 {
			state = sv.Old[i-1].State
		}
		s.gens.move(g, state)
		s.startGen(g, saved[i])
		s.resumeOld(g, saved[i], i > 0, elapsed)
		g.log.Info("generation adopted", "state", g.state)
	}
	if d := sv.Drain; d != nil {
		if err := s.resumeDrain(*d, elapsed); err != nil {
			return err
		}
	}
	s.restoring = nil
	return nil
}

// resumeDrain takes over the restart whose old generation drains: its
// window ends as it would have, at --drain, or sooner where relay sees
// nothing more can reach the old sockets (the watch begins again).
func (s *Supervisor) resumeDrain(d SavedDrain, elapsed time.Duration) error {
	var prev *generation
	for _, g := range s.gens.old {
		if g.n == d.Prev && g.state == Draining {
			prev = g
		}
	}
	if prev == nil {
		return fmt.Errorf("restoring the drain of generation %d: it is not draining", d.Prev)
	}
	run := &restartRun{reason: d.Reason, begun: d.Begun, gen: s.gens.serving, prev: prev, phase: PhaseDraining}
	s.restarts.current = run
	s.watchDrain(run, prev, max(d.Left-elapsed, 0))
	run.drain.began = d.Began
	prev.log.Info("old generation draining on", "left", max(d.Left-elapsed, 0).Round(time.Millisecond))
	return nil
}

// resumeOld arms again what an old generation waited for: its SIGKILL,
// elapsed later than its time left said, and the emptying of a lingering
// one's cgroup.
func (s *Supervisor) resumeOld(g *generation, sg SavedGeneration, old bool, elapsed time.Duration) {
	if !old {
		return
	}
	g.killed = sg.Killed
	if sg.KillIn != nil {
		s.armKillIn(g, max(*sg.KillIn-elapsed, 0))
	}
	if g.state == Exited {
		g.contain.watch(s.doneC, func() { s.post(emptiedEvent{}) })
	}
}

// adoptGen is the generation sg describes, in no slot yet, with what of
// it can fail: its process, its cgroup, its sockets and its bind
// takeover's notification fd, checked. Nothing reads its fds yet.
func (s *Supervisor) adoptGen(sg SavedGeneration) (*generation, error) {
	proc := s.env.adopt(sg.Proc, sg.Status)
	if proc == nil {
		return nil, fmt.Errorf("restoring generation %d: pid %d is not relay's child", sg.N, sg.Proc.Pid)
	}
	g := &generation{n: sg.N, cmd: sg.Cmd, state: Starting, started: sg.Started, readyAt: sg.ReadyAt}
	c := s.newCopy(g, 0)
	g.copies = []*copyProc{c}
	c.proc, c.started, c.healthAddr, c.pinged, c.ready = proc, sg.Started, sg.HealthAddr, sg.Pinged, !sg.ReadyAt.IsZero()
	if sg.Status != nil {
		g.status = *sg.Status
		c.exited, c.status = true, *sg.Status
	}
	c.stderr.Write(sg.StderrTail)
	if sg.Spoke {
		close(c.notified)
	}
	g.log = s.cfg.Log.With("gen", g.n, "pid", g.pid())
	c.log = s.copyLog(c)
	c.pidForNotify.Store(int64(c.pid()))
	var cg container
	if sg.Cgroup && s.env.adoptContainer != nil {
		cg = s.env.adoptContainer(g.n)
	}
	g.contain = s.containmentOf(g, c, cg)
	if sg.Takeover != nil {
		if err := s.adoptTakeover(c, sg); err != nil {
			return nil, err
		}
	}
	return g, nil
}

// listenGen adopts g's notify socket, which starts reading it.
func (s *Supervisor) listenGen(g *generation, sg SavedGeneration) error {
	if sg.Notify.FD < 0 {
		return nil
	}
	c := g.first()
	notify, err := health.AdoptNotify(sg.Notify, func(m health.NotifyMessage) { s.onNotify(c, m) })
	if err != nil {
		return fmt.Errorf("restoring generation %d: %w", g.n, err)
	}
	c.notify = notify
	return nil
}

// startGen starts reading adopted g's stderr, and its binds, and watching
// its exit, unless relay had seen it already.
func (s *Supervisor) startGen(g *generation, sg SavedGeneration) {
	c := g.first()
	if t := c.takeover; t != nil {
		go t.serveBinds()
	}
	var stderr *os.File
	if sg.StderrFD >= 0 {
		stderr = os.NewFile(uintptr(sg.StderrFD), "stderr of generation "+fmt.Sprint(g.n))
	}
	if sg.Status != nil { // its exit was handled: only its stderr is left
		s.copyStderr(c, stderr, sg.StderrPartial)
	} else {
		s.watchExit(c, stderr, sg.StderrPartial)
	}
}

// adoptTakeover makes c's bind takeover again, from the notification fd
// of sg, on its sockets; startGen answers its binds.
func (s *Supervisor) adoptTakeover(c *copyProc, sg SavedGeneration) error {
	g := c.g
	socks, err := s.cfg.Sockets.Held(g.n, c.worker)
	if err != nil {
		return fmt.Errorf("restoring generation %d's bind takeover: %w", g.n, err)
	}
	nt, err := takeover.Adopt(*sg.Takeover)
	if err != nil {
		return fmt.Errorf("restoring generation %d's bind takeover: %w", g.n, err)
	}
	t := &bindTakeover{nt: nt, active: true, how: append([]string(nil), sg.How...), served: make(chan struct{}),
		handshook: make(chan struct{}), failed: make(chan struct{}), claimed: make([]chan struct{}, len(sg.How))}
	close(t.handshook)
	for i := range t.claimed {
		t.claimed[i] = make(chan struct{})
		close(t.claimed[i]) // it served: it claimed what it needed
	}
	t.serveBinds = func() { s.serveBinds(c, socks) }
	c.takeover = t
	return nil
}

// Settle closes the fds Restore took that an earlier image handed over
// and that relay keeps copies of, once relay will not return to that
// image. Call it before Run.
func (s *Supervisor) Settle() {
	for _, g := range s.gens.alive() {
		for _, c := range g.copies {
			if c.notify != nil {
				c.notify.Settle()
			}
		}
	}
}
