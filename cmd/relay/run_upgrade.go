package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/control"
	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/internal/admin"
	"github.com/relaysh/relay/internal/cgroup"
	"github.com/relaysh/relay/internal/handoff"
	"github.com/relaysh/relay/internal/reaper"
	"github.com/relaysh/relay/internal/sdnotify"
	"github.com/relaysh/relay/internal/sockets"
	"github.com/relaysh/relay/supervisor"
)

// relay upgrade, on relay run's side: the upgrader hands relay's state to
// the exec of the new binary (package handoff carries it), and
// restoreRun, in the new image, takes it back and runs relay on it. See
// docs/upgrade.md.

// upgradeState is relay's state as it crosses the exec, the handoff
// document's State.
type upgradeState struct {
	// ExePath is the binary relay was first started from: the default of
	// every later upgrade.
	ExePath   string `json:"exe_path"`
	NotifyDir string `json:"notify_dir"`
	// Requester is the connection of relay upgrade, answered by the new
	// image; -1 when a signal asked.
	Requester  int              `json:"requester_fd"`
	Sockets    sockets.Saved    `json:"sockets"`
	Cgroup     *cgroup.Saved    `json:"cgroup,omitempty"`
	Supervisor supervisor.Saved `json:"supervisor"`
	Control    control.Saved    `json:"control"`
	// AdminFD is the --metrics listener; -1 without one.
	AdminFD int `json:"admin_fd"`
	// Upgrades counts the upgrades since relay started; LastUpgrade is
	// when the last one happened (this one's count and time are added by
	// the image that takes the state over).
	Upgrades    int       `json:"upgrades"`
	LastUpgrade time.Time `json:"last_upgrade"`
}

// controlPauseTimeout bounds the wait for control connections in flight
// before a handoff.
const controlPauseTimeout = 2 * time.Second

// upgrader carries out relay upgrade for one relay run.
type upgrader struct {
	thread    *reaper.Thread
	rp        *reaper.Reaper
	log       *slog.Logger
	version   string
	exePath   string
	notifyDir string
	sup       *supervisor.Supervisor
	set       *sockets.Set
	cg        *cgroup.Tree
	ctl       *control.Server
	adm       *admin.Server
	upgrades  int
	last      time.Time
	// busy: an upgrade is under way (asked by a signal or a client).
	busy sync.Mutex
}

// thisVersion is this image's version line.
func thisVersion() string {
	bi, ok := debug.ReadBuildInfo()
	return versionLine(bi, ok)
}

// Upgrade runs the relay at path ("" for relay's own), on relay's state.
// It returns only if relay did not exec it, with the event that says why.
func (u *upgrader) Upgrade(path string, req *control.UpgradeConn) control.UpgradeEvent {
	if path == "" {
		path = u.exePath
	}
	ev := control.UpgradeEvent{Path: path, From: u.version}
	refuse := func(err error) control.UpgradeEvent {
		ev.Phase, ev.Reason, ev.Busy = control.UpgradeRefused, err.Error(), errors.Is(err, supervisor.ErrBusy)
		u.log.Warn("upgrade refused; relay serves on unchanged", "path", path, "reason", ev.Reason)
		return ev
	}
	if !u.busy.TryLock() {
		return refuse(fmt.Errorf("%w: another upgrade is under way", supervisor.ErrBusy))
	}
	defer u.busy.Unlock()
	if !u.thread.IsMain() {
		return refuse(reaper.ErrNotMainThread)
	}
	cand, err := u.checkCandidate(path)
	if err != nil {
		return refuse(err)
	}
	ev.To = cand.Relay
	send(req, control.UpgradeEvent{Phase: control.UpgradeChecked, Path: path, From: ev.From, To: ev.To})
	u.log.Info("upgrading relay in place", "path", path, "from", ev.From, "to", ev.To)
	held := 0 // a signal asked
	if req != nil {
		held = 1 // the request's own connection
	}
	if err := u.ctl.Pause(controlPauseTimeout, held); err != nil {
		return refuse(fmt.Errorf("%w: %w", supervisor.ErrBusy, err))
	}
	defer u.ctl.Resume()
	admFD := -1
	if u.adm != nil {
		if admFD, err = u.adm.Pause(); err != nil {
			return refuse(fmt.Errorf("pausing the admin listener: %w", err))
		}
		defer func() {
			if err := u.adm.Resume(); err != nil {
				u.log.Error("the admin listener did not come back after the upgrade failed; /metrics, /healthz and /readyz are gone until relay restarts", "err", err)
			}
		}()
	}
	err = u.sup.Handoff(func(saved supervisor.Saved) error {
		return u.exec(path, saved, req, admFD)
	})
	return refuse(err)
}

// send reports a phase to the requester, if a client asked.
func send(req *control.UpgradeConn, ev control.UpgradeEvent) {
	if req != nil {
		req.Send(ev)
	}
}

// checkTimeout bounds the run of the new binary that says what it takes.
const checkTimeout = 5 * time.Second

// checkCandidate asks the binary at path what it is and which state
// versions it takes (handoff.CheckArg).
func (u *upgrader) checkCandidate(path string) (handoff.Candidate, error) {
	st, err := os.Stat(path)
	switch {
	case err != nil:
		return handoff.Candidate{}, fmt.Errorf("the new relay binary: %w", err)
	case !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0:
		return handoff.Candidate{}, fmt.Errorf("the new relay binary %s is not an executable file", path)
	}
	ctx, cancel := context.WithTimeout(context.Background(), checkTimeout)
	defer cancel()
	// The candidate parses relay's command line as it will after the
	// exec: one that does not take it would exit at once, with relay.
	out, err := health.CommandOutput(ctx, u.rp, append([]string{path, handoff.CheckArg}, os.Args[1:]...), os.Environ())
	if err != nil {
		return handoff.Candidate{}, fmt.Errorf("%s cannot take over from this relay: %w", path, err)
	}
	return handoff.ParseCandidate(path, out)
}

// exec execs the relay at path with saved and the rest of relay's state.
// It returns only if the exec failed, with every fd as it was.
func (u *upgrader) exec(path string, saved supervisor.Saved, req *control.UpgradeConn, admFD int) error {
	st := upgradeState{ExePath: u.exePath, NotifyDir: u.notifyDir, Requester: -1, Supervisor: saved,
		AdminFD: admFD, Upgrades: u.upgrades, LastUpgrade: u.last}
	fds := saved.FDs()
	var err error
	var more []int
	if st.Sockets, more, err = u.set.Save(); err != nil {
		return err
	}
	fds = append(fds, more...)
	if u.cg != nil {
		cs, more := u.cg.Save()
		st.Cgroup, fds = &cs, append(fds, more...)
	}
	if st.Control, err = u.ctl.Save(); err != nil {
		return err
	}
	fds = append(fds, st.Control.FD, st.Control.LockFD)
	if admFD >= 0 {
		fds = append(fds, admFD)
	}
	if req != nil {
		if st.Requester, err = req.FD(); err != nil {
			return fmt.Errorf("handing over the upgrade request: %w", err)
		}
		fds = append(fds, st.Requester)
	}
	// The way back, should the new image fail: this image, even once a
	// package has replaced the file at its path.
	image, err := unix.Open("/proc/self/exe", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("keeping relay's own binary for the way back: %w", err)
	}
	defer unix.Close(image)
	state, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("writing relay's state: %w", err)
	}
	doc := handoff.Doc{From: u.version, Written: time.Now(), Image: image, FDs: fds, State: state}
	send(req, control.UpgradeEvent{Phase: control.UpgradeHandingOver, Path: path, From: u.version})
	u.log.Info("handing over to the new relay", "path", path, "fds", len(fds))
	return execImage(u.thread, path, doc, nil)
}

// execImage writes doc, makes its fds and itself cross, and execs path
// with relay's arguments and environment (without drop), on thread. It
// returns only if the exec failed, with every fd as it was.
func execImage(thread *reaper.Thread, path string, doc handoff.Doc, extraEnv []string, drop ...string) error {
	mf, err := handoff.Write(doc)
	if err != nil {
		return err
	}
	defer mf.Close()
	mfd := int(mf.Fd()) // a memfd only relay has: its flags are relay's
	crossing := append([]int{mfd, doc.Image}, doc.FDs...)
	if err := handoff.Cross(crossing); err != nil {
		return err
	}
	defer handoff.Keep(crossing) // reached only if the exec failed
	env := []string{handoff.EnvFD + "=" + strconv.Itoa(mfd)}
	drop = append(drop, handoff.EnvFD, handoff.EnvReturn)
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if !slices.Contains(drop, k) {
			env = append(env, kv)
		}
	}
	return thread.Exec(path, os.Args, append(env, extraEnv...))
}

// returnTo execs the image that wrote doc again, with doc, after this
// image failed to take it over (why). It returns only if that exec failed
// too: relay then exits, and its children with it.
func returnTo(thread *reaper.Thread, log *slog.Logger, doc handoff.Doc, why error) error {
	reason := strings.ReplaceAll(why.Error(), "\n", " ")
	log.Error("this relay cannot take over; returning to the one it replaced", "from", doc.From, "reason", reason)
	err := execImage(thread, "/proc/self/fd/"+strconv.Itoa(doc.Image), doc,
		[]string{handoff.EnvReturn + "=" + reason}, dropOnReturn()...)
	return fmt.Errorf("returning to the relay this one replaced: %w (after: %w)", err, why)
}

// restored is what restore rebuilt of relay from an earlier image's state.
type restored struct {
	set      *sockets.Set
	cg       *cgroup.Tree
	notifier *sdnotify.Notifier
	rp       *reaper.Reaper
	sup      *supervisor.Supervisor
	mem      *memoryReturner
	adm      *admin.Server
	ctl      *control.Server
}

// restore rebuilds relay from st, which an earlier image handed over,
// without binding, creating or starting anything: every socket, process,
// cgroup and connection is the one that image had. A panic in it is
// returned as an error, for the way back to that image.
func restore(thread *reaper.Thread, opts runOptions, st upgradeState, stderr *lineWriter, log *slog.Logger) (r restored, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic while taking over relay's state: %v", p)
		}
	}()
	if err := failRestore("start"); err != nil {
		return r, err
	}
	r.notifier = sdnotify.New(log)
	if r.set, err = sockets.Restore(st.Sockets, sockets.Options{Specs: opts.listens, UnixMode: opts.socketMode,
		Steer: opts.steer, Notifier: r.notifier, Log: log}); err != nil {
		return r, err
	}
	if err := failRestore("sockets"); err != nil {
		return r, err
	}
	if st.Cgroup != nil {
		if r.cg, err = cgroup.Restore(*st.Cgroup, log); err != nil {
			return r, err
		}
	}
	if r.rp, err = reaper.New(log, thread, st.Supervisor.Procs()...); err != nil {
		return r, err
	}
	r.mem = newMemoryReturner(r.notifier)
	rec := newRecorder(opts)
	if r.sup, err = newSupervisor(opts, r.set, st.NotifyDir, r.rp, r.cg, log, stderr, r.mem, supervisorRecorder(rec)); err != nil {
		return r, err
	}
	// The listeners first, which start nothing; the generations last,
	// whose readers start as they are adopted.
	if st.AdminFD >= 0 {
		build := buildInfo()
		build.Upgrades, build.LastUpgrade = st.Upgrades, st.LastUpgrade
		if r.adm, err = admin.ListenFD(st.AdminFD, admin.Options{Status: r.sup, Recorder: rec, Build: build, Log: log}); err != nil {
			return r, err
		}
	}
	info := controlInfo(opts, r.set)
	info.Upgrades, info.LastUpgrade = st.Upgrades, st.LastUpgrade
	if r.ctl, err = control.Adopt(st.Control, r.sup, info, log); err != nil {
		return r, err
	}
	return r, r.sup.Restore(st.Supervisor)
}

// restoreRun is relay run in an image that an earlier one execed with its
// state (doc): it takes the state over and runs relay on it, or, if it
// cannot, returns to that image.
func restoreRun(thread *reaper.Thread, opts runOptions, doc handoff.Doc, sigC <-chan os.Signal, stderr *lineWriter, log *slog.Logger) error {
	returned := os.Getenv(handoff.EnvReturn)
	os.Unsetenv(handoff.EnvReturn) // no child inherits it
	var st upgradeState
	if err := json.Unmarshal(doc.State, &st); err != nil {
		return returnTo(thread, log, doc, fmt.Errorf("reading relay's state: %w", err))
	}
	if returned == "" { // an upgrade, not the way back from a failed one
		st.Upgrades, st.LastUpgrade = st.Upgrades+1, doc.Written
	}
	r, err := restore(thread, opts, st, stderr, log)
	if err != nil && returned != "" {
		// This image came back because the new one failed; it cannot
		// take its own state either: there is nowhere left to go.
		return fmt.Errorf("taking back relay's state after a failed upgrade (%s): %w", returned, err)
	}
	if err != nil {
		err = returnTo(thread, log, doc, err)
		// Until the exec, nothing r holds may be closed by the garbage
		// collector: the cgroup guard's pipe among them.
		runtime.KeepAlive(r)
		return err
	}
	// From here on, relay stays this image.
	r.sup.Settle()
	r.set.Settle()
	r.ctl.Settle()
	r.adm.Settle()
	unix.Close(doc.Image)
	r.rp.Begin()
	defer r.notifier.Close(notifyFlushTimeout)
	defer r.set.Close()
	if r.cg != nil {
		defer r.cg.Close()
	}
	defer os.RemoveAll(st.NotifyDir)
	defer r.rp.Close()
	gap := time.Since(doc.Written)
	version := thisVersion()
	ev := control.UpgradeEvent{Phase: control.UpgradeDone, From: doc.From, To: version, GapMs: float64(gap) / float64(time.Millisecond)}
	if returned != "" {
		ev = control.UpgradeEvent{Phase: control.UpgradeReturned, From: version, Reason: returned, GapMs: ev.GapMs}
		log.Warn("back on this relay: the new one could not take over", "version", version, "reason", returned, "gap", gap.Round(time.Microsecond))
	} else {
		log.Info("relay upgraded in place", "from", doc.From, "to", version, "gap", gap.Round(time.Microsecond),
			"upgrades", st.Upgrades)
	}
	if st.Requester >= 0 {
		if err := control.FinishUpgrade(st.Requester, ev); err != nil {
			log.Warn("answering relay upgrade", "err", err)
		}
	}
	up := &upgrader{thread: thread, rp: r.rp, log: log, version: version, exePath: st.ExePath, notifyDir: st.NotifyDir,
		sup: r.sup, set: r.set, cg: r.cg, ctl: r.ctl, adm: r.adm, upgrades: st.Upgrades, last: st.LastUpgrade}
	r.ctl.SetUpgrader(up)
	return runActors(actors{log: log, sigC: sigC, shutdownDelay: opts.shutdownDelay, sup: r.sup, ctl: r.ctl, adm: r.adm,
		notifier: r.notifier, mem: r.mem, up: up})
}
