package cgroup

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// crossed is fd as it is in the next image: the same pipe at a number
// without close-on-exec (a copy here, where the Tree that saved it lives
// on).
func crossed(t *testing.T, fd int) int {
	t.Helper()
	d, err := unix.Dup(fd)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// Save and restore of a Tree value, without cgroups: the guard's pipe is
// the fd that crosses, Restore keeps it open and close-on-exec, and the
// pipe ends only when the restored Tree's end closes.
func TestSaveRestoreKeepsTheGuardsPipe(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "relay-test."+strconv.Itoa(os.Getpid()))
	if err := os.MkdirAll(filepath.Join(dir, supervisorLeaf), 0o755); err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	log := slog.New(slog.DiscardHandler)
	tr := &Tree{Dir: dir, parent: parent, log: log, guard: w}
	saved, fds := tr.Save()
	if saved.Dir != dir || saved.Parent != parent || len(fds) != 1 || fds[0] != saved.GuardFD || saved.GuardFD < 0 {
		t.Fatalf("Save: %+v, fds %v; want %s in %s and the guard's fd", saved, fds, dir, parent)
	}
	saved.GuardFD = crossed(t, saved.GuardFD)
	b, _ := json.Marshal(saved)
	if !strings.Contains(string(b), `"guard_fd":`) {
		t.Errorf("Saved as JSON: %s, want snake_case names", b)
	}
	var back Saved
	if err := json.Unmarshal(b, &back); err != nil || back != saved {
		t.Fatalf("Saved through JSON: %+v, %v; want %+v", back, err, saved)
	}

	self := filepath.Join(dir, supervisorLeaf)
	got, err := restore(back, log, self)
	if err != nil {
		t.Fatal(err)
	}
	if got.Dir != dir || got.parent != parent || got.guard == nil {
		t.Fatalf("restored %+v", got)
	}
	if fl, err := unix.FcntlInt(uintptr(back.GuardFD), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
		t.Errorf("the restored guard fd's flags: %#x, %v; want close-on-exec", fl, err)
	}
	if again, fds := got.Save(); again != back || len(fds) != 1 || fds[0] != back.GuardFD {
		t.Errorf("Save of the restored Tree: %+v %v, want %+v", again, fds, back)
	}

	// The old image's end goes; the pipe holds while the restored one
	// is open.
	w.Close()
	r.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if _, err := r.Read(make([]byte, 1)); !os.IsTimeout(err) {
		t.Fatalf("the guard's pipe after the old end closed: %v, want it still open", err)
	}
	got.guard.Close()
	r.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := r.Read(make([]byte, 1)); err == nil || os.IsTimeout(err) {
		t.Fatalf("the guard's pipe after the restored end closed: %v, want its end", err)
	}

	// No guard: nothing crosses.
	if s, fds := (&Tree{Dir: dir, parent: parent, log: log}).Save(); s.GuardFD != -1 || fds != nil {
		t.Errorf("Save without a guard: %+v %v", s, fds)
	}
	if got, err := restore(Saved{Dir: dir, Parent: parent, GuardFD: -1}, log, self); err != nil || got.guard != nil {
		t.Errorf("restore without a guard: %+v, %v", got, err)
	}
}

// Restore refuses what is not the Tree relay is in, and never closes the
// fd it was given.
func TestRestoreRefuses(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "relay-test.1")
	if err := os.MkdirAll(filepath.Join(dir, supervisorLeaf), 0o755); err != nil {
		t.Fatal(err)
	}
	self := filepath.Join(dir, supervisorLeaf)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	var rfd, wfd int
	control(t, r, &rfd)
	control(t, w, &wfd)
	log := slog.New(slog.DiscardHandler)
	for _, c := range []struct {
		name string
		s    Saved
		self string
		want string
	}{
		{"gone", Saved{Dir: filepath.Join(parent, "relay-test.2"), Parent: parent, GuardFD: wfd}, self, "it is gone"},
		{"not under its parent", Saved{Dir: dir, Parent: "/elsewhere", GuardFD: wfd}, self, "is not a cgroup under"},
		{"relay elsewhere", Saved{Dir: dir, Parent: parent, GuardFD: wfd}, parent, "relay is in"},
		{"a read end", Saved{Dir: dir, Parent: parent, GuardFD: rfd}, self, "not a pipe's write end"},
		{"no pipe", Saved{Dir: dir, Parent: parent, GuardFD: 0}, self, ""},
	} {
		if c.name == "no pipe" {
			if st, err := os.Stdin.Stat(); err == nil && st.Mode()&os.ModeNamedPipe != 0 {
				continue // stdin is a pipe's read end: "a read end" covers it
			}
		}
		got, err := restore(c.s, log, c.self)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %+v, %v; want an error saying %q", c.name, got, err, c.want)
		}
	}
	for _, fd := range []int{rfd, wfd} {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			t.Errorf("fd %d was closed: %v", fd, err)
		}
	}
}

func control(t *testing.T, f *os.File, fd *int) {
	t.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(u uintptr) { *fd = int(u) })
}

// With real cgroups: Restore of the Tree relay is in keeps its
// generations, their processes and its guard, where Setup would have
// killed them all as a stale relay's; the restored Tree's Close works as
// Setup's.
func TestRestoreKeepsGenerations(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	tr := setupOrSkip(t, "restore-"+strconv.Itoa(os.Getpid()), log)
	g, err := tr.NewGroup(1)
	if err != nil {
		t.Fatal(err)
	}
	cmd := startIn(t, g)
	g.CloseFD()
	saved, _ := tr.Save()
	saved.GuardFD = crossed(t, saved.GuardFD)
	// The old image's Tree is gone, and its end of the pipe with it.
	tr.guard.Close()
	tr.guard = nil
	got, err := Restore(saved, log)
	if err != nil {
		t.Fatal(err)
	}
	if ag := got.Group(1); ag.Dir != g.Dir || ag.FD() != 0 || ag.Count() != 1 {
		t.Errorf("the restored Tree's generation 1: %s, fd %d, %d processes; want %s, 0, 1", ag.Dir, ag.FD(), ag.Count(), g.Dir)
	}
	// The guard acts only once every write end of its pipe is closed: it
	// cannot have, nor can it later, while the restored Tree holds one.
	// Its fd 3 is the pipe whose write end the restored Tree has.
	guard := &Group{Dir: filepath.Join(tr.Dir, guardLeaf)}
	procs := guard.Procs()
	if len(procs) != 1 {
		t.Fatalf("the guard's cgroup holds %v across the restore, want the guard alone", procs)
	}
	link, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", procs[0], guardFD))
	if err != nil {
		t.Fatalf("the guard's pipe: %v", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(saved.GuardFD, &st); err != nil {
		t.Fatalf("the restored Tree's end of the guard's pipe (fd %d): %v", saved.GuardFD, err)
	}
	if want := fmt.Sprintf("pipe:[%d]", st.Ino); link != want {
		t.Fatalf("the guard reads %s, the restored Tree holds the write end of %s", link, want)
	}
	if !g.Populated() || unix.Kill(cmd.Process.Pid, 0) != nil {
		t.Fatalf("generation 1 (pid %d) was killed across the restore", cmd.Process.Pid)
	}
	if err := g.Kill(); err != nil {
		t.Fatal(err)
	}
	waitEmpty(t, g)
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
	got.Close()
	if _, err := os.Stat(tr.Dir); !os.IsNotExist(err) {
		t.Errorf("%s is still there after the restored Tree's Close: %v", tr.Dir, err)
	}
}
