package integration

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/relaysh/relay/internal/procfs"
)

// The containment tests: a generation is its cgroup (docs/containment.md).
// They need cgroup v2 that relay may write (root on the host here); they
// skip, saying why, where relay fell back to process groups.

// daemonizing is a command line for relay that starts a setsid daemon
// holding the listening socket (fd 3) and writing its pid to
// dir/daemon-GEN, then execs hello in the shell's place (so that
// LISTEN_PID, the shell's pid, is hello's).
func daemonizing(dir string) []string {
	script := fmt.Sprintf(`setsid sleep 1000 </dev/null & echo $! > %s/daemon-{generation}.tmp && mv %s/daemon-{generation}.tmp %s/daemon-{generation}; exec %s`,
		dir, dir, dir, built.hello)
	return []string{"/bin/sh", "-c", script}
}

// requireCgroup skips the test unless relay contains its generations in
// cgroups, and returns relay's cgroup directory.
func requireCgroup(t *testing.T, r *relayProc) string {
	t.Helper()
	l, _ := r.waitFor(0, 30*time.Second, "the containment line", func(l logLine) bool {
		return strings.HasPrefix(l.str("msg"), "containment ")
	})
	if l.str("msg") != "containment cgroup" {
		t.Skipf("relay has no cgroup here (%s: %s); the process-group fallback is documented in docs/containment.md",
			l.str("msg"), l.str("reason"))
	}
	return l.str("path")
}

// daemonPid waits for generation gen's daemon to write its pid.
func daemonPid(t *testing.T, dir string, gen int) int {
	t.Helper()
	path := filepath.Join(dir, "daemon-"+strconv.Itoa(gen))
	waitUntil(t, 30*time.Second, "the daemon's pid file "+path, func() bool { _, err := os.Stat(path); return err == nil })
	pid := readPid(t, path)
	// A failed test must not leave it behind (relay's cleanup ends only
	// process groups); the pid is killed only while it is still the daemon.
	t.Cleanup(func() {
		if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); string(b) == "sleep\x001000\x00" {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	return pid
}

// cgroupOf is the cgroup v2 path of pid, as /proc/PID/cgroup says.
func cgroupOf(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return p
		}
	}
	return ""
}

// dead reports whether pid has exited: gone, or a zombie its new parent
// (init, after relay died) has not reaped yet.
func dead(pid int) bool { return processGone(pid) || isZombie(pid) }

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// portFree reports whether addr can be bound: nothing holds it any more.
func portFree(addr string) bool {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	l.Close()
	return true
}

// A generation that starts a setsid daemon holding the listening socket:
// the daemon is in the generation's cgroup, counted by relay status; after a
// restart the old generation's cgroup is killed whole and removed, and after
// relay stop nothing of the last one is left and the port is free.
func TestContainmentSetsidDaemon(t *testing.T) {
	dir := t.TempDir()
	r := startRelay(t, nil, append([]string{"--listen", "127.0.0.1:0", "--stop-timeout", "1s", "--"}, daemonizing(dir)...)...)
	tree := requireCgroup(t, r)
	addr := r.listenAddrs(1)[0].str("addr")
	first, from := r.waitMsg(0, "generation ready", 1)
	d1 := daemonPid(t, dir, 1)
	gen1 := filepath.Join(tree, "gen-1")
	if got := cgroupOf(d1); !strings.HasSuffix(gen1, got) || got == "" {
		t.Errorf("the daemon (pid %d) is in cgroup %q, want generation 1's %s", d1, got, gen1)
	}

	// relay status counts the daemon with the server.
	out, errOut, code := r.client("status", "--json")
	if code != 0 {
		t.Fatalf("relay status --json: exit %d: %s", code, errOut)
	}
	var doc struct {
		Generations []struct {
			Generation, Pid, Processes int
		} `json:"generations"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("relay status --json: %v: %s", err, out)
	}
	if len(doc.Generations) != 1 || doc.Generations[0].Processes != 2 {
		t.Errorf("relay status --json generations %+v, want generation 1 with 2 processes (hello and its daemon)", doc.Generations)
	}
	text, _, _ := r.client("status")
	if procs := column(text, "GEN", "1", "PROCS"); procs != "2" {
		t.Errorf("relay status shows %q in the PROCS column of generation 1, want 2:\n%s", procs, text)
	}
	if pid := column(text, "GEN", "1", "PID"); pid != strconv.Itoa(first.num("pid")) {
		t.Errorf("relay status shows pid %q for generation 1, want %d", pid, first.num("pid"))
	}

	// A restart: generation 1's cgroup, daemon included, is killed after
	// the stop timeout and removed.
	if _, errOut, code := r.client("restart"); code != 0 {
		t.Fatalf("relay restart: exit %d: %s", code, errOut)
	}
	r.waitMsg(from, "did not stop within the stop timeout; killing its cgroup", 1)
	waitUntil(t, 10*time.Second, "generation 1's daemon to be gone", func() bool { return processGone(d1) })
	waitUntil(t, 10*time.Second, "generation 1's cgroup to be removed", func() bool { return !exists(gen1) })
	d2 := daemonPid(t, dir, 2)
	if processGone(d2) {
		t.Fatalf("generation 2's daemon (pid %d) is gone while generation 2 serves", d2)
	}
	if _, err := get(newConnClient(), httpURL(addr)); err != nil {
		t.Errorf("after the restart: %v", err)
	}

	// relay stop: nothing of generation 2 is left, and the port is free.
	if _, errOut, code := r.client("stop"); code != 0 {
		t.Fatalf("relay stop: exit %d: %s", code, errOut)
	}
	r.wait(30 * time.Second)
	if !processGone(d2) {
		t.Errorf("generation 2's daemon (pid %d) outlived relay stop", d2)
	}
	if exists(tree) {
		t.Errorf("relay's cgroup %s is still there after relay stop", tree)
	}
	if !portFree(addr) {
		t.Errorf("%s is still held after relay stop", addr)
	}
}

// kill -9 of relay under load: its generation dies with it (the parent-death
// signal), and a new relay on the same port and --name removes the stale
// cgroup, with the setsid daemon that held the port, then starts and serves.
func TestKill9LeavesNoGeneration(t *testing.T) {
	dir := t.TempDir()
	l, addr := mustFreeTCPAddr(t)
	l.Close()
	name := "kill9-" + strconv.Itoa(os.Getpid())
	args := []string{"--name", name, "--listen", addr, "--"}
	args = append(args, daemonizing(dir)...)
	r := startRelay(t, nil, args...)
	tree := requireCgroup(t, r)
	ready, _ := r.waitMsg(0, "generation ready", 1)
	pid := ready.num("pid")
	daemon := daemonPid(t, dir, 1)
	// A short client timeout: requests caught in the killed socket's
	// queue fail fast.
	client := newConnClient()
	client.Timeout = 2 * time.Second
	ld := startLoadWith(client, httpURL(addr), 4, 2*time.Minute)
	waitUntil(t, 10*time.Second, "the generation to answer under load", func() bool { n, _ := ld.served(pid); return n >= 100 })

	killed := time.Now()
	r.signal(syscall.SIGKILL)
	waitUntil(t, 10*time.Second, "the generation's server to die with relay", func() bool { return dead(pid) })
	gone := time.Since(killed)
	ld.stop()
	requests, failures := ld.summary()
	// The daemon left the process group and ignores its parent's death:
	// relay's cgroup guard kills it with the generation's cgroup.
	waitUntil(t, 10*time.Second, "the generation's setsid daemon to die with relay", func() bool { return dead(daemon) })
	daemonGone := time.Since(killed)
	t.Logf("kill -9 to generation 1's server dead: %s, to its setsid daemon dead: %s; load: %d requests, %d failed after the kill",
		gone.Round(time.Microsecond), daemonGone.Round(time.Microsecond), requests, len(failures))

	started := time.Now()
	// The same control socket too: the dead relay's lock died with it,
	// and its socket file is stale. (A later --control wins over the
	// harness's own.)
	r2 := startRelay(t, nil, append([]string{"--control", r.control, "--name", name, "--listen", addr, "--"}, built.hello)...)
	r2.control = r.control
	stale, _ := r2.waitMsg(0, "killed and removed the stale cgroup of an earlier relay of this name", 0)
	if stale.str("path") != tree {
		t.Errorf("removed stale cgroup %s, want %s", stale.str("path"), tree)
	}
	ready2, _ := r2.waitMsg(0, "generation ready", 1)
	got, err := get(newConnClient(), httpURL(addr))
	if err != nil || got != ready2.num("pid") {
		t.Errorf("the new relay's generation: answered by %d (%v), want pid %d", got, err, ready2.num("pid"))
	}
	t.Logf("new relay on %s serving %s after its start", addr, time.Since(started).Round(time.Millisecond))
	if out, errOut, code := r2.client("status"); code != 0 || !strings.Contains(out, name) {
		t.Errorf("relay status on the dead relay's control socket: exit %d: %s%s", code, out, errOut)
	}
	r2.signal(syscall.SIGTERM)
	r2.wait(30 * time.Second)
}

// A stopped child (SIGSTOP) gets SIGCONT after its stop signal, so it stops
// gracefully rather than waiting for SIGKILL at --stop-timeout.
func TestStoppedChildGetsCont(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--stop-timeout", "2m", "--", built.hello)
	ready, _ := r.waitMsg(0, "generation ready", 1)
	pid := ready.num("pid")
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "the child to be stopped", func() bool {
		st, err := procfs.ReadStat(pid)
		return err == nil && st.State == 'T'
	})
	r.signal(syscall.SIGTERM)
	l, _ := r.waitMsg(0, "generation exited", 1)
	if l.str("status") != "exit status 0" {
		t.Errorf("the stopped child exited with %q, want exit status 0 (a graceful stop)", l.str("status"))
	}
	if n := r.count("did not stop within the stop timeout; killing its cgroup") + r.count("did not stop within the stop timeout; killing its process group"); n != 0 {
		t.Errorf("the child was killed at the stop timeout")
	}
	r.wait(30 * time.Second)
}

// column finds, in the table of text whose header starts with first, the
// row whose first field is key, and returns its field under header col.
func column(text, first, key, col string) string {
	var head []string
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 0:
		case f[0] == first:
			head = f
		case head != nil && f[0] == key:
			for i, h := range head {
				if h == col && i < len(f) {
					return f[i]
				}
			}
		}
	}
	return ""
}

// tempDirOf is a temporary directory owned by uid and gid, which they can
// reach: its parents are made 0711.
func tempDirOf(t *testing.T, uid, gid int) string {
	t.Helper()
	dir := t.TempDir()
	for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	return dir
}

// Without cgroups (relay as uid 65534 may not write the cgroup it runs in)
// relay says so, and finds the setsid daemon of a generation once it is
// reparented to relay, by the RELAY_GENERATION in its environment: after a
// restart and after relay stop, no daemon is left and the port is free.
func TestContainmentFallbackKillsAdoptedOrphans(t *testing.T) {
	const nobody = 65534
	dir := tempDirOf(t, nobody, nobody)
	r := startRelayAs(t, nobody, nobody, append([]string{"--listen", "127.0.0.1:0", "--stop-timeout", "1s", "--"}, daemonizing(dir)...)...)
	l, from := r.waitFor(0, 30*time.Second, "the containment line", func(l logLine) bool {
		return strings.HasPrefix(l.str("msg"), "containment ")
	})
	if l.str("msg") != "containment process-group" || l.str("reason") == "" {
		t.Fatalf("relay as uid %d logged %q (reason %q), want containment process-group with its reason", nobody, l.str("msg"), l.str("reason"))
	}
	addr := r.listenAddrs(1)[0].str("addr")
	r.waitMsg(from, "generation ready", 1)
	d1 := daemonPid(t, dir, 1)
	if _, errOut, code := r.client("restart"); code != 0 {
		t.Fatalf("relay restart: exit %d: %s", code, errOut)
	}
	waitUntil(t, 10*time.Second, "generation 1's daemon to be killed", func() bool { return processGone(d1) })
	d2 := daemonPid(t, dir, 2)
	if _, errOut, code := r.client("stop"); code != 0 {
		t.Fatalf("relay stop: exit %d: %s", code, errOut)
	}
	r.wait(30 * time.Second)
	if !dead(d2) {
		t.Errorf("generation 2's daemon (pid %d) outlived relay stop", d2)
	}
	if !portFree(addr) {
		t.Errorf("%s is still held after relay stop", addr)
	}
	if n := r.count("signalling processes that left the generation's process group"); n < 2 {
		t.Errorf("relay signalled the daemons that left their process group %d times, want one per generation", n)
	}
}
