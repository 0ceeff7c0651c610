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
// Only a quiet relay hands over: one generation, serving, and nothing
// under way (no restart, queued or running; no stop or shutdown delay; no
// crash replacement or liveness replacement pending). Anything else is
// refused with ErrBusy, and the caller tries again later.

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
}

// SavedGeneration is a serving generation as it crosses the exec.
type SavedGeneration struct {
	N          int                `json:"n"`
	Cmd        Command            `json:"cmd"`
	Proc       reaper.SavedProc   `json:"proc"`
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

// FDs are the fds that must cross the exec for s.
func (s Saved) FDs() []int {
	g := s.Serving
	fds := []int{g.Notify.FD, g.StderrFD}
	if g.Takeover != nil {
		fds = append(fds, g.Takeover.FD)
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
		return fmt.Errorf("%w: %s; try again once relay status shows one generation, serving", ErrBusy, why)
	}
	switch {
	case s.stop.begun || !s.stop.delayUntil.IsZero():
		return fmt.Errorf("%w: relay is stopping", ErrStopping)
	case gs.serving == nil:
		return busy("no generation is serving")
	case gs.starting != nil || s.restarts.current != nil || len(s.restarts.queued) > 0:
		return busy("a restart is under way")
	case len(gs.old) > 0 || len(gs.lingering) > 0:
		return busy(fmt.Sprintf("%d old generation(s) still draining or stopping", len(gs.old)+len(gs.lingering)))
	case s.crash.timer != nil || s.live.pending != nil:
		return busy("a replacement is pending")
	}
	return nil
}

func (s *Supervisor) handoff(exec func(Saved) error) error {
	if err := s.quiet(); err != nil {
		return err
	}
	if s.env.holdReaps != nil {
		release := s.env.holdReaps()
		defer release()
	}
	g := s.gens.serving
	select {
	case <-g.proc.Done():
		return fmt.Errorf("%w: the serving generation has just exited", ErrBusy)
	default:
	}
	if !g.pause() {
		g.resume()
		return fmt.Errorf("%w: the serving generation is exiting", ErrBusy)
	}
	saved, err := s.save(g)
	if err == nil {
		err = exec(saved)
	}
	g.resume()
	return err
}

// pause stops the goroutines that read g's fds: its stderr, its notify
// socket and its binds. It reports false if its stderr has ended: it is
// exiting. resume undoes it, whatever pause reported.
func (g *generation) pause() bool {
	ok := g.copier.pause()
	g.notify.Pause()
	if t := g.takeover; t != nil && t.nt != nil {
		t.nt.Pause()
		<-t.served
	}
	return ok
}

func (g *generation) resume() {
	g.notify.Resume()
	if t := g.takeover; t != nil && t.nt != nil {
		t.served = make(chan struct{})
		t.nt.Resume()
		go t.serveBinds()
	}
	g.copier.resume()
}

// save is g's state and the supervisor's, once g is paused.
func (s *Supervisor) save(g *generation) (Saved, error) {
	sg := SavedGeneration{
		N: g.n, Cmd: g.cmd, Started: g.started, ReadyAt: g.readyAt, HealthAddr: g.healthAddr,
		StderrTail: g.stderr.bytes(), StderrPartial: g.copier.partial(),
		Spoke: isClosed(g.notified), Pinged: g.pinged,
	}
	_, sg.Cgroup = g.contain.(*cgroupContainment)
	if p, ok := g.proc.(reaperProcess); ok {
		sg.Proc = p.Saved()
	} else {
		sg.Proc = reaper.SavedProc{Pid: g.pid(), Group: true}
	}
	var err error
	if sg.Notify, err = g.notify.Save(); err != nil {
		return Saved{}, fmt.Errorf("handing over generation %d's notify socket: %w", g.n, err)
	}
	if sg.StderrFD, err = g.copier.fd(); err != nil {
		return Saved{}, fmt.Errorf("handing over generation %d's stderr: %w", g.n, err)
	}
	if t := g.takeover; t != nil && t.nt != nil {
		sn, err := t.nt.Save()
		if err != nil {
			return Saved{}, fmt.Errorf("handing over generation %d's bind takeover: %w", g.n, err)
		}
		sg.Takeover, sg.How = &sn, t.took()
	}
	return Saved{
		Next: s.gens.next, Command: s.gens.command, EverReady: s.gens.everReady,
		SpeaksNotify: s.speaksNotify.Load(), TakeoverWarned: s.takeoverWarned.Load(),
		Counts: s.counts, Last: s.last, Serving: sg,
	}, nil
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// Restore takes over the state an earlier image handed over: its serving
// generation, as if this supervisor had started it. Call it before Run,
// which then starts no generation. The fds Saved names are taken: a
// failed Restore leaves them open, for the return to the earlier image.
func (s *Supervisor) Restore(sv Saved) error {
	if s.env.adopt == nil {
		return errors.New("restoring the supervisor: nothing to adopt processes with")
	}
	sg := sv.Serving
	proc := s.env.adopt(sg.Proc)
	if proc == nil {
		return fmt.Errorf("restoring generation %d: pid %d is not relay's child", sg.N, sg.Proc.Pid)
	}
	g := &generation{n: sg.N, cmd: sg.Cmd, proc: proc, state: Starting, started: sg.Started, readyAt: sg.ReadyAt,
		healthAddr: sg.HealthAddr, stderr: newTailBuffer(stderrTailBytes), notified: make(chan struct{}), pinged: sg.Pinged}
	g.stderr.Write(sg.StderrTail)
	if sg.Spoke {
		close(g.notified)
	}
	g.log = s.cfg.Log.With("gen", g.n, "pid", g.pid())
	g.pidForNotify.Store(int64(g.pid()))
	notify, err := health.AdoptNotify(sg.Notify, func(m health.NotifyMessage) { s.onNotify(g, m) })
	if err != nil {
		return fmt.Errorf("restoring generation %d: %w", g.n, err)
	}
	g.notify = notify
	var cg container
	if sg.Cgroup && s.env.adoptContainer != nil {
		cg = s.env.adoptContainer(g.n)
	}
	g.contain = s.containmentOf(g, cg)
	if sg.Takeover != nil {
		if err := s.restoreTakeover(g, sg); err != nil {
			return err
		}
	}
	s.watchExit(g, os.NewFile(uintptr(sg.StderrFD), "stderr of generation "+fmt.Sprint(g.n)), sg.StderrPartial)
	s.gens.next, s.gens.command, s.gens.everReady = sv.Next, sv.Command, sv.EverReady
	s.speaksNotify.Store(sv.SpeaksNotify)
	s.takeoverWarned.Store(sv.TakeoverWarned)
	s.counts, s.last = sv.Counts, sv.Last
	s.gens.move(g, Serving)
	g.log.Info("generation adopted", "state", g.state, "ready_after", g.readyAt.Sub(g.started).Round(time.Millisecond))
	return nil
}

// restoreTakeover answers the binds of adopted generation g again, on its
// sockets, from the notification fd of sg.
func (s *Supervisor) restoreTakeover(g *generation, sg SavedGeneration) error {
	nt, err := takeover.Adopt(*sg.Takeover)
	if err != nil {
		return fmt.Errorf("restoring generation %d's bind takeover: %w", g.n, err)
	}
	socks, err := s.cfg.Sockets.Held(g.n)
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
	g.takeover = t
	t.serveBinds = func() { s.serveBinds(g, socks) }
	go t.serveBinds()
	return nil
}

// Settle closes the fds Restore took that an earlier image handed over
// and that relay keeps copies of, once relay will not return to that
// image. Call it before Run.
func (s *Supervisor) Settle() {
	if g := s.gens.serving; g != nil {
		g.notify.Settle()
	}
}
