package cgroup

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// The guard is what makes relay's death take every process of its
// generations with it, where a parent-death signal reaches only their main
// processes: a small process, relay itself re-executed, that lives in its
// own leaf of relay's cgroup, holds the read end of a pipe whose write end
// only relay has, and kills every generation's cgroup when that pipe ends:
// relay exited, whatever killed it. After a clean exit there is nothing left
// to kill.

// guardCommand is the argument that makes relay run as the guard.
const guardCommand = "__relay_cgroup_guard"

// guardLeaf is the guard's cgroup under Tree.Dir.
const guardLeaf = "guard"

// guardFD is the pipe's read end in the guard.
const guardFD = 3

// IsGuard reports whether args (os.Args) ask relay to run as the guard.
func IsGuard(args []string) bool { return len(args) > 1 && args[1] == guardCommand }

// RunGuard is the guard: args is [argv0, guardCommand, DIR]. It waits for
// the pipe at fd 3 to end, then kills and removes the cgroup of every
// generation under DIR. It ignores the signals a terminal or a service
// manager sends to relay's group, so that it outlives relay.
func RunGuard(args []string) error {
	if !IsGuard(args) || len(args) != 3 {
		return errors.New("cgroup guard: usage: relay " + guardCommand + " DIR")
	}
	dir := args[2]
	signal.Ignore(syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT, syscall.SIGPIPE)
	pipe := os.NewFile(guardFD, "relay")
	io.Copy(io.Discard, pipe) // returns when relay's end is closed
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil // relay removed its cgroup: a clean exit
	}
	for _, e := range ents {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), "gen-") {
			continue
		}
		g := &Group{Dir: filepath.Join(dir, e.Name())}
		g.Kill()
		if g.waitEmptyFor(staleKillTimeout) {
			removeAll(g.Dir)
		}
	}
	// relay's cgroup itself, with the guard's leaf, goes when the next
	// relay of this name starts (removeStale).
	return nil
}

// startGuard starts the guard of t, born in its own leaf.
func (t *Tree) startGuard() error {
	leaf := filepath.Join(t.Dir, guardLeaf)
	if err := os.Mkdir(leaf, 0o755); err != nil {
		return fmt.Errorf("creating the guard's cgroup: %w", err)
	}
	r, w, err := os.Pipe() // both ends close-on-exec: no child inherits w
	if err != nil {
		return fmt.Errorf("creating the guard's pipe: %w", err)
	}
	defer r.Close()
	fd, err := syscall.Open(leaf, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
	if err != nil {
		w.Close()
		return fmt.Errorf("opening the guard's cgroup: %w", err)
	}
	defer syscall.Close(fd)
	// No parent-death signal: the guard must outlive relay. A session of
	// its own keeps it out of the terminal's signals to relay's group.
	p, err := os.StartProcess("/proc/self/exe", []string{"relay", guardCommand, t.Dir}, &os.ProcAttr{
		Files: []*os.File{nil, nil, nil, r},
		Sys:   &syscall.SysProcAttr{Setsid: true, UseCgroupFD: true, CgroupFD: fd},
	})
	if err != nil {
		w.Close()
		return fmt.Errorf("starting the guard: %w", err)
	}
	// relay's reaper reaps it (relay never waits for a process itself).
	p.Release()
	t.guard = w
	return nil
}

// stopGuard ends the guard after a clean exit, once the generations'
// cgroups are gone and it has nothing left to do, and waits for its leaf to
// empty so that the tree can be removed.
func (t *Tree) stopGuard() {
	if t.guard == nil {
		return
	}
	t.guard.Close()
	t.guard = nil
	g := &Group{Dir: filepath.Join(t.Dir, guardLeaf)}
	if err := g.Kill(); err != nil {
		t.log.Warn("stopping the cgroup guard", "cgroup", g.Dir, "err", err)
	}
	if !g.waitEmptyFor(staleKillTimeout) {
		t.log.Warn("the cgroup guard did not exit", "cgroup", g.Dir, "timeout", staleKillTimeout, "pids", strconv.Itoa(g.Count()))
	}
}
