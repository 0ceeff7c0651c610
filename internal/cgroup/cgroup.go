// Package cgroup contains relay's generations in cgroup v2: a cgroup of
// relay's own, relay-NAME.PID, made in the cgroup relay was started in, with
// relay itself in its leaf "supervisor" and each generation in a sibling
// "gen-N". A generation's processes are its cgroup's, whatever they do
// with sessions and process groups; killing the cgroup kills them all.
//
// The name carries relay's --name and pid, so that a relay started after
// one that was killed with SIGKILL knows the stale cgroup for its own (same
// name, a pid that is gone) and kills and removes it.
package cgroup

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Tree is relay's cgroup: Dir holds the supervisor leaf, where relay runs,
// and a cgroup per generation.
type Tree struct {
	// Dir is relay-NAME.PID, in the cgroup relay started in.
	Dir string
	// parent is that cgroup, where relay goes back at Close.
	parent string
	log    *slog.Logger
	// guard is relay's end of the guard's pipe (guard.go).
	guard *os.File
}

// supervisorLeaf is the cgroup under Tree.Dir that relay itself moves to:
// a cgroup with processes may not have children that have controllers
// enabled, so relay keeps out of the generations' parent.
const supervisorLeaf = "supervisor"

// staleKillTimeout bounds how long Setup waits for a stale cgroup to empty.
const staleKillTimeout = 5 * time.Second

// Setup makes relay's cgroup for --name name and moves relay into its
// supervisor leaf, after killing and removing stale cgroups of earlier
// relays of that name whose pid is gone (logged). Where no cgroup can be
// had it returns nil and why, and the caller falls back to process groups.
func Setup(name string, log *slog.Logger) (*Tree, error) {
	return setup(name, log)
}

// Announce logs the one line that says which containment is in force:
// "containment cgroup" with the path of t, or "containment process-group"
// with why not (Setup's error).
func Announce(log *slog.Logger, t *Tree, why error) {
	if t == nil {
		log.Warn("containment process-group", "reason", why.Error(),
			"note", "processes of a generation that leave its process group (setsid) are contained only once relay adopts them")
		return
	}
	log.Info("containment cgroup", "path", t.Dir)
}

func setup(name string, log *slog.Logger) (*Tree, error) {
	parent, err := selfDir()
	if err != nil {
		return nil, err
	}
	removeStale(parent, name, log)
	t := &Tree{Dir: filepath.Join(parent, "relay-"+name+"."+strconv.Itoa(os.Getpid())), parent: parent, log: log}
	if err := os.Mkdir(t.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating relay's cgroup: %w", err)
	}
	leaf := filepath.Join(t.Dir, supervisorLeaf)
	if err := os.Mkdir(leaf, 0o755); err != nil {
		os.Remove(t.Dir)
		return nil, fmt.Errorf("creating relay's cgroup: %w", err)
	}
	if err := writeFile(filepath.Join(leaf, "cgroup.procs"), strconv.Itoa(os.Getpid())); err != nil {
		os.Remove(leaf)
		os.Remove(t.Dir)
		return nil, fmt.Errorf("moving relay into %s: %w", leaf, err)
	}
	if err := t.startGuard(); err != nil {
		t.Close()
		return nil, err
	}
	return t, nil
}

// selfDir is the directory of relay's own cgroup v2.
func selfDir() (string, error) {
	mnt, root, err := mount()
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", fmt.Errorf("reading relay's cgroup: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			rel, ok := strings.CutPrefix(p, root)
			if !ok {
				return "", fmt.Errorf("relay's cgroup %s is outside the cgroup2 mount's root %s", p, root)
			}
			return filepath.Join(mnt, rel), nil
		}
	}
	return "", errors.New("relay is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")
}

// mount finds the cgroup2 mount point and the cgroup its root is.
func mount() (point, root string, err error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", "", fmt.Errorf("finding the cgroup2 mount: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT POINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || sep+1 >= len(fields) || fields[sep+1] != "cgroup2" {
			continue
		}
		return unescape(fields[4]), unescape(fields[3]), nil
	}
	if err := sc.Err(); err != nil {
		return "", "", fmt.Errorf("finding the cgroup2 mount: %w", err)
	}
	return "", "", errors.New("no cgroup2 file system is mounted")
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// removeStale kills and removes parent's relay-NAME.PID cgroups whose pid
// is gone: what a relay killed with SIGKILL left behind.
func removeStale(parent, name string, log *slog.Logger) {
	ents, err := os.ReadDir(parent)
	if err != nil {
		return
	}
	prefix := "relay-" + name + "."
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), prefix)
		if !e.IsDir() || !ok {
			continue
		}
		pid, err := strconv.Atoi(rest)
		if err != nil || pid <= 0 {
			continue
		}
		// One with relay's own pid is an earlier relay's (this one has
		// not made its own yet): a container's PID 1, restarted.
		if err := unix.Kill(pid, 0); pid != os.Getpid() && !errors.Is(err, unix.ESRCH) {
			continue // its relay may still run
		}
		dir := filepath.Join(parent, e.Name())
		g := &Group{Dir: dir}
		procs := g.Count()
		if err := g.Kill(); err != nil {
			log.Warn("killing stale cgroup", "path", dir, "err", err)
			continue
		}
		if !g.waitEmptyFor(staleKillTimeout) {
			log.Warn("stale cgroup still has processes after SIGKILL", "path", dir, "timeout", staleKillTimeout)
			continue
		}
		if err := removeAll(dir); err != nil {
			log.Warn("removing stale cgroup", "path", dir, "err", err)
			continue
		}
		log.Warn("killed and removed the stale cgroup of an earlier relay of this name", "path", dir, "processes", procs, "stale_pid", pid)
	}
}

// removeAll removes the cgroup dir and the cgroups under it, deepest first.
// A cgroup directory is removed with rmdir only, its files with it.
func removeAll(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	for _, e := range ents {
		if e.IsDir() {
			if err := removeAll(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	if err := unix.Rmdir(dir); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("removing cgroup %s: %w", dir, err)
	}
	return nil
}

// NewGroup creates the cgroup of generation n and opens it for
// CLONE_INTO_CGROUP.
func (t *Tree) NewGroup(n int) (*Group, error) {
	g := &Group{Dir: filepath.Join(t.Dir, "gen-"+strconv.Itoa(n))}
	if err := os.Mkdir(g.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating the cgroup of generation %d: %w", n, err)
	}
	fd, err := unix.Open(g.Dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Rmdir(g.Dir)
		return nil, fmt.Errorf("opening the cgroup of generation %d: %w", n, err)
	}
	g.fd = fd
	return g, nil
}

// Close moves relay back to the cgroup it started in and removes its
// cgroup, if nothing else is left in it. Generations' cgroups are removed
// as they empty (Group.Remove); one still there is left, logged.
func (t *Tree) Close() {
	t.stopGuard()
	if err := writeFile(filepath.Join(t.parent, "cgroup.procs"), strconv.Itoa(os.Getpid())); err != nil {
		t.log.Warn("moving relay back to its cgroup; leaving relay's cgroup in place", "path", t.parent, "cgroup", t.Dir, "err", err)
		return
	}
	if err := removeAll(t.Dir); err != nil {
		t.log.Warn("removing relay's cgroup", "path", t.Dir, "err", err)
	}
}

// Group is the cgroup of one generation.
type Group struct {
	Dir string
	fd  int // open until CloseFD; 0 once closed
}

// FD is the cgroup directory's fd, for reaper.Attr.CgroupFD.
func (g *Group) FD() int { return g.fd }

// Open opens the group again for CLONE_INTO_CGROUP, for a process that
// joins it after CloseFD.
func (g *Group) Open() error {
	if g.fd > 0 {
		return nil
	}
	fd, err := unix.Open(g.Dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening the cgroup %s: %w", g.Dir, err)
	}
	g.fd = fd
	return nil
}

// CloseFD closes the fd once the generation has started.
func (g *Group) CloseFD() {
	if g.fd > 0 {
		unix.Close(g.fd)
		g.fd = 0
	}
}

// Add moves pid into the group: for kernels without CLONE_INTO_CGROUP.
func (g *Group) Add(pid int) error {
	if err := writeFile(filepath.Join(g.Dir, "cgroup.procs"), strconv.Itoa(pid)); err != nil {
		return fmt.Errorf("moving pid %d into %s: %w", pid, g.Dir, err)
	}
	return nil
}

// Procs lists the processes in the group and in cgroups under it.
func (g *Group) Procs() []int {
	var pids []int
	filepath.WalkDir(g.Dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		b, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
		if err != nil {
			return nil
		}
		for _, f := range bytes.Fields(b) {
			if pid, err := strconv.Atoi(string(f)); err == nil {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	return pids
}

// Count is the number of processes in the group.
func (g *Group) Count() int { return len(g.Procs()) }

// Populated reports whether any process is in the group or under it.
func (g *Group) Populated() bool {
	b, err := os.ReadFile(filepath.Join(g.Dir, "cgroup.events"))
	if errors.Is(err, os.ErrNotExist) {
		return false // gone
	}
	if err != nil {
		return true // unknown (EMFILE, ...): never forget a live generation
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "populated "); ok {
			return v != "0"
		}
	}
	return false
}

// Signal sends sig to every process in the group.
func (g *Group) Signal(sig syscall.Signal) error {
	var errs []error
	for _, pid := range g.Procs() {
		if err := unix.Kill(pid, sig); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("signalling pid %d: %w", pid, err))
		}
	}
	return errors.Join(errs...)
}

// killRounds bounds the SIGKILL rounds on kernels without cgroup.kill: a
// round catches what forked during the one before.
const killRounds = 10

// Kill kills every process in the group: with cgroup.kill (Linux 5.14+),
// which no fork escapes, or else with SIGKILL to each member, in rounds.
func (g *Group) Kill() error {
	err := writeFile(filepath.Join(g.Dir, "cgroup.kill"), "1")
	if err == nil || errors.Is(err, os.ErrNotExist) && !g.exists() {
		return nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("killing cgroup %s: %w", g.Dir, err)
	}
	for range killRounds {
		pids := g.Procs()
		if len(pids) == 0 {
			return nil
		}
		for _, pid := range pids {
			unix.Kill(pid, unix.SIGKILL)
		}
	}
	if n := g.Count(); n > 0 {
		return fmt.Errorf("killing cgroup %s: %d processes still in it after %d rounds of SIGKILL (a fork loop?)", g.Dir, n, killRounds)
	}
	return nil
}

func (g *Group) exists() bool {
	_, err := os.Stat(g.Dir)
	return err == nil
}

// WaitEmpty waits until the group has no process, watching its
// cgroup.events with inotify, or until done is closed. It reports whether
// the group emptied.
func (g *Group) WaitEmpty(done <-chan struct{}) bool {
	ifd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return g.pollEmpty(done)
	}
	f := os.NewFile(uintptr(ifd), "inotify")
	defer f.Close()
	if _, err := unix.InotifyAddWatch(ifd, filepath.Join(g.Dir, "cgroup.events"), unix.IN_MODIFY); err != nil {
		if !g.exists() {
			return true
		}
		return g.pollEmpty(done) // no watch to be had (ENOSPC, ...)
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-done:
			f.SetReadDeadline(time.Now()) // ends the Read below
		case <-stop:
		}
	}()
	buf := make([]byte, 4096)
	for g.Populated() {
		select {
		case <-done:
			return !g.Populated()
		default:
		}
		// kernfs can drop the notification of a cgroup removed right
		// after it emptied (by the guard, or another relay): look
		// again every recheckEvery whatever inotify says.
		f.SetReadDeadline(time.Now().Add(recheckEvery))
		if _, err := f.Read(buf); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			return !g.Populated()
		}
	}
	return true
}

// recheckEvery bounds how long WaitEmpty trusts inotify alone.
const recheckEvery = 200 * time.Millisecond

// waitEmptyFor is WaitEmpty bounded by d.
func (g *Group) waitEmptyFor(d time.Duration) bool {
	done := make(chan struct{})
	timer := time.AfterFunc(d, func() { close(done) })
	defer timer.Stop()
	return g.WaitEmpty(done)
}

// pollInterval paces pollEmpty, for a kernel without inotify.
const pollInterval = 20 * time.Millisecond

func (g *Group) pollEmpty(done <-chan struct{}) bool {
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for g.Populated() {
		select {
		case <-done:
			return !g.Populated()
		case <-tick.C:
		}
	}
	return true
}

// Remove removes the group's cgroup, once it is empty.
func (g *Group) Remove() error {
	g.CloseFD()
	return removeAll(g.Dir)
}

func writeFile(path, s string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(s)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Path is the group's directory.
func (g *Group) Path() string { return g.Dir }
