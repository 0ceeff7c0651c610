package cgroup

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// A Tree crosses relay's exec of its next image (relay upgrade): relay
// keeps its pid, and so its cgroup and its generations'; the guard's pipe
// must cross too, for the guard kills every generation when relay's end
// closes.

// Saved is what Restore needs to make the Tree again in relay's next image.
type Saved struct {
	// Dir is relay's cgroup, relay-NAME.PID; Parent the cgroup it was
	// made in.
	Dir    string `json:"dir"`
	Parent string `json:"parent"`
	// GuardFD is relay's end of the guard's pipe, or -1 if there is no
	// guard any more.
	GuardFD int `json:"guard_fd"`
}

// Save returns what Restore needs in relay's next image, and the fds that
// must cross the exec: the guard's pipe, which must never close while
// relay lives. The fds stay the Tree's: Close closes them.
func (t *Tree) Save() (Saved, []int) {
	s := Saved{Dir: t.Dir, Parent: t.parent, GuardFD: -1}
	if t.guard == nil {
		return s, nil
	}
	if rc, err := t.guard.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) { s.GuardFD = int(fd) })
	}
	if s.GuardFD < 0 {
		return s, nil // closed: nothing to keep
	}
	return s, []int{s.GuardFD}
}

// Restore is the Tree that an earlier image of relay made and saved. It
// makes and removes no cgroup and starts no guard: the cgroup named after
// relay's own pid is relay's, and Setup would take it for a stale one, and
// kill every generation. Restore takes the guard's fd, at its number, and
// sets its close-on-exec flag again, so that no child inherits it. If
// Restore fails, the fd is left open, for the return to the earlier image:
// were it closed, the guard would kill every generation.
func Restore(s Saved, log *slog.Logger) (*Tree, error) {
	self, err := selfDir()
	if err != nil {
		return nil, fmt.Errorf("restoring relay's cgroup %s: %w", s.Dir, err)
	}
	return restore(s, log, self)
}

// restore is Restore with relay's own cgroup given.
func restore(s Saved, log *slog.Logger, self string) (*Tree, error) {
	if s.Dir == "" || filepath.Dir(s.Dir) != filepath.Clean(s.Parent) {
		return nil, fmt.Errorf("restoring relay's cgroup: %q is not a cgroup under %q", s.Dir, s.Parent)
	}
	if st, err := os.Stat(s.Dir); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("restoring relay's cgroup %s: it is gone (%v)", s.Dir, err)
	}
	if leaf := filepath.Join(s.Dir, supervisorLeaf); self != leaf {
		return nil, fmt.Errorf("restoring relay's cgroup %s: relay is in %s, not in %s", s.Dir, self, leaf)
	}
	t := &Tree{Dir: s.Dir, parent: filepath.Clean(s.Parent), log: log}
	if s.GuardFD < 0 {
		return t, nil
	}
	if err := isGuardPipe(s.GuardFD); err != nil {
		return nil, fmt.Errorf("restoring relay's cgroup %s: the guard's fd %d: %w", s.Dir, s.GuardFD, err)
	}
	if _, err := unix.FcntlInt(uintptr(s.GuardFD), unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
		return nil, fmt.Errorf("restoring relay's cgroup %s: keeping the guard's fd %d from children: %w", s.Dir, s.GuardFD, err)
	}
	t.guard = os.NewFile(uintptr(s.GuardFD), "cgroup-guard")
	return t, nil
}

// Group is the cgroup of generation n as an earlier image of relay made
// it (NewGroup): for a generation that crossed the exec. It creates
// nothing and opens nothing: FD is 0.
func (t *Tree) Group(n int) *Group {
	return &Group{Dir: filepath.Join(t.Dir, "gen-"+strconv.Itoa(n))}
}

// isGuardPipe refuses an fd that is not the write end of a pipe.
func isGuardPipe(fd int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFIFO {
		return fmt.Errorf("it is not a pipe (mode %#o)", st.Mode)
	}
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return err
	}
	if fl&unix.O_ACCMODE != unix.O_WRONLY {
		return fmt.Errorf("it is not a pipe's write end (flags %#x)", fl)
	}
	return nil
}
