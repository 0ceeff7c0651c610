package cgroup

import (
	"bytes"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// These tests make real cgroups, as root where cgroup v2 is writable, and
// skip elsewhere. They do not run in parallel: Setup moves the test binary
// itself.

const waitLimit = 10 * time.Second

// TestMain lets the test binary, as /proc/self/exe, play the guard that
// Setup starts.
func TestMain(m *testing.M) {
	if IsGuard(os.Args) {
		if err := RunGuard(os.Args); err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		`/sys/fs/cgroup`:        "/sys/fs/cgroup",
		`/mnt/with\040space`:    "/mnt/with space",
		`/a\134b`:               `/a\b`,
		`/short\04`:             `/short\04`,
		`/not\999octal\040tail`: `/not\999octal tail`,
	} {
		if got := unescape(in); got != want {
			t.Errorf("unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

// setupOrSkip makes a Tree for name, or skips saying why relay would fall
// back to process groups here.
func setupOrSkip(t *testing.T, name string, log *slog.Logger) *Tree {
	t.Helper()
	tr, err := setup(name, log)
	if err != nil {
		t.Skipf("no writable cgroup v2 here (relay falls back to process groups): %v", err)
	}
	t.Cleanup(tr.Close)
	return tr
}

// startIn starts sleep in g, born there (CLONE_INTO_CGROUP).
func startIn(t *testing.T, g *Group) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("/bin/sleep", "1000")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: g.FD()}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func waitEmpty(t *testing.T, g *Group) {
	t.Helper()
	done := make(chan struct{})
	timer := time.AfterFunc(waitLimit, func() { close(done) })
	defer timer.Stop()
	if !g.WaitEmpty(done) {
		t.Fatalf("%s still has processes %v after %s", g.Dir, g.Procs(), waitLimit)
	}
}

// A generation's cgroup holds what it starts, whatever its session; Kill
// empties it, and Remove removes it; Close takes relay's cgroup away.
func TestGroupKillRemove(t *testing.T) {
	tr := setupOrSkip(t, "test-"+strconv.Itoa(os.Getpid()), slog.New(slog.DiscardHandler))
	self, _ := os.ReadFile("/proc/self/cgroup")
	if !strings.Contains(string(self), "/"+filepath.Base(tr.Dir)+"/"+supervisorLeaf+"\n") {
		t.Errorf("the test binary is in %q, want %s/%s", self, tr.Dir, supervisorLeaf)
	}
	g, err := tr.NewGroup(1)
	if err != nil {
		t.Fatal(err)
	}
	a := startIn(t, g)
	g.CloseFD()
	// A second process that leaves its session is still in the cgroup.
	b := exec.Command("/bin/sh", "-c", "exec sleep 1000")
	b.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Process.Kill(); b.Wait() })
	if err := g.Add(b.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if n := g.Count(); n != 2 || !g.Populated() {
		t.Fatalf("Count %d, Populated %v; want 2 processes", n, g.Populated())
	}
	if err := g.Remove(); err == nil {
		t.Fatalf("Remove of a cgroup with processes succeeded")
	}
	if err := g.Kill(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*exec.Cmd{a, b} {
		c.Wait()
		if ws := c.ProcessState.Sys().(syscall.WaitStatus); ws.Signal() != syscall.SIGKILL {
			t.Errorf("pid %d: %v, want killed by SIGKILL", c.Process.Pid, c.ProcessState)
		}
	}
	waitEmpty(t, g)
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(g.Dir); !os.IsNotExist(err) {
		t.Errorf("%s is still there after Remove: %v", g.Dir, err)
	}
	tr.Close()
	if _, err := os.Stat(tr.Dir); !os.IsNotExist(err) {
		t.Errorf("%s is still there after Close: %v", tr.Dir, err)
	}
}

// Setup kills and removes the cgroup a relay of the same name left when
// it was killed (its pid is gone), and leaves alone that of a relay that
// runs and those of other names.
func TestSetupRemovesStale(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	name := "stale-" + strconv.Itoa(os.Getpid())
	probe := setupOrSkip(t, "probe-"+name, log)
	probe.Close()
	parent := probe.parent

	// A pid that is gone: a process that ran and was reaped.
	gone := exec.Command("/bin/true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	stale := &Tree{Dir: filepath.Join(parent, "relay-"+name+"."+strconv.Itoa(gone.Process.Pid)), parent: parent, log: log}
	live := &Tree{Dir: filepath.Join(parent, "relay-"+name+"."+strconv.Itoa(os.Getppid())), parent: parent, log: log}
	other := &Tree{Dir: filepath.Join(parent, "relay-other"+name+"."+strconv.Itoa(gone.Process.Pid)), parent: parent, log: log}
	var left *exec.Cmd
	for _, tr := range []*Tree{stale, live, other} {
		if err := os.Mkdir(tr.Dir, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { (&Group{Dir: tr.Dir}).Kill(); waitEmpty(t, &Group{Dir: tr.Dir}); removeAll(tr.Dir) })
		g, err := tr.NewGroup(1)
		if err != nil {
			t.Fatal(err)
		}
		if tr == stale {
			left = startIn(t, g)
		}
		g.CloseFD()
	}

	tr := setupOrSkip(t, name, log)
	if _, err := os.Stat(stale.Dir); !os.IsNotExist(err) {
		t.Errorf("the stale cgroup %s is still there: %v", stale.Dir, err)
	}
	left.Wait()
	if ws := left.ProcessState.Sys().(syscall.WaitStatus); ws.Signal() != syscall.SIGKILL {
		t.Errorf("the stale cgroup's process: %v, want killed by SIGKILL", left.ProcessState)
	}
	for _, keep := range []string{live.Dir, other.Dir, tr.Dir} {
		if _, err := os.Stat(keep); err != nil {
			t.Errorf("%s was removed: %v", keep, err)
		}
	}
	if !strings.Contains(logs.String(), "killed and removed the stale cgroup") || !strings.Contains(logs.String(), stale.Dir) {
		t.Errorf("no log line names the stale cgroup %s:\n%s", stale.Dir, logs.String())
	}
}

// When relay dies without Close (SIGKILL), the guard kills what its
// generations left, setsid daemons and all.
func TestGuardKillsGenerationsWhenRelayDies(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	tr := setupOrSkip(t, "guard-"+strconv.Itoa(os.Getpid()), log)
	g, err := tr.NewGroup(1)
	if err != nil {
		t.Fatal(err)
	}
	cmd := startIn(t, g)
	g.CloseFD()
	if !g.Populated() {
		t.Fatalf("pid %d is not in %s", cmd.Process.Pid, g.Dir)
	}
	// What relay's death does to the guard: its end of the pipe closes.
	tr.guard.Close()
	tr.guard = nil
	waitEmpty(t, g)
	// The guard exits once it has removed what it killed.
	waitEmpty(t, &Group{Dir: filepath.Join(tr.Dir, guardLeaf)})
	if g.exists() {
		t.Errorf("the guard left %s in place", g.Dir)
	}
}
