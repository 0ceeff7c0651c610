package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/relaysh/relay/internal/procfs"
)

// pid1 is a relay run as PID 1 of a PID namespace of its own, as in a
// container: unshare --pid --fork --mount-proc, whose child relay is.
type pid1 struct {
	*relayProc
	host int    // relay's pid on the host
	ns   string // its PID namespace, as /proc/PID/ns/pid names it
}

// startPID1 starts relay with args as PID 1 of a new PID namespace; its
// stdout goes to the file stdout. unshare exits with relay's status, and
// kills it (so the namespace) if it dies first.
func startPID1(t *testing.T, stdout string, args ...string) *pid1 {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("a PID namespace of its own needs root")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("util-linux's unshare is not installed")
	}
	wrap := []string{"sh", "-c", `exec "$0" --pid --fork --mount-proc --kill-child "$@" >"$RELAY_TEST_STDOUT"`, unshare}
	r := startRelayWrapped(t, wrap, built.relay, []string{"RELAY_TEST_STDOUT=" + stdout}, nil, args...)
	r.nsPids = true
	p := &pid1{relayProc: r}
	r.listenAddrs(1)
	children, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", r.pid(), r.pid()))
	if err != nil {
		t.Fatal(err)
	}
	if p.host, err = strconv.Atoi(strings.TrimSpace(string(children))); err != nil {
		t.Fatalf("unshare's children %q: want relay alone", children)
	}
	if p.ns, err = os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", p.host)); err != nil {
		t.Fatal(err)
	}
	if self, _ := os.Readlink("/proc/self/ns/pid"); self == p.ns {
		t.Fatalf("relay runs in the test's PID namespace %s, want one of its own", p.ns)
	}
	return p
}

// procs lists the processes of the namespace, by host pid, with their
// state ('Z' for a zombie).
func (p *pid1) procs() map[int]byte {
	out := map[int]byte{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ns, err := os.Readlink(filepath.Join("/proc", e.Name(), "ns", "pid")); err != nil || ns != p.ns {
			continue
		}
		if st, err := procfs.ReadStat(pid); err == nil {
			out[pid] = st.State
		}
	}
	return out
}

// describe lists procs: "1234 relay S, 1240 testchild Z".
func describe(procs map[int]byte) string {
	var parts []string
	for pid, state := range procs {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		parts = append(parts, fmt.Sprintf("%d %s %c", pid, strings.TrimSpace(string(comm)), state))
	}
	return strings.Join(parts, ", ")
}

// orphansLeft counts the testchild -orphan and -orphan-parent processes
// among procs.
func orphansLeft(procs map[int]byte) int {
	n := 0
	for pid := range procs {
		cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if c := string(cmd); strings.Contains(c, "\x00-orphan\x00") || strings.Contains(c, "\x00-orphan-parent\x00") {
			n++
		}
	}
	return n
}

func zombies(procs map[int]byte) int {
	n := 0
	for _, s := range procs {
		if s == 'Z' {
			n++
		}
	}
	return n
}

// As PID 1, relay reaps every orphan of its namespace: the server leaves
// 100, each adopted by relay while alive, and once they have exited
// nothing in the namespace is a zombie or an orphan. The server's stdout and stderr reach relay's.
func TestPID1ReapsOrphans(t *testing.T) {
	stdout := filepath.Join(t.TempDir(), "stdout")
	p := startPID1(t, stdout, "--name", "pid1-orphans", "--listen", "127.0.0.1:0", "--", built.testchild, "-orphans", "100")
	p.waitMsg(0, "generation ready", 1)
	from := 0
	for range 100 {
		_, from = p.waitMsg(from, "reaped orphan", 0)
	}
	var procs map[int]byte
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if procs = p.procs(); zombies(procs) == 0 && orphansLeft(procs) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the namespace holds %s; want no zombie and no orphan left", describe(procs))
		}
	}
	t.Logf("orphans reaped by relay: %d; left in the namespace: %s; zombies: %d", p.count("reaped orphan"), describe(procs), zombies(procs))
	p.waitRaw("testchild: pid ") // its stderr, as relay's
	if err := syscall.Kill(p.host, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p.wait(30 * time.Second); code != 0 {
		t.Errorf("exit status %d, want the server's 0", code)
	}
	if b, err := os.ReadFile(stdout); err != nil || !strings.Contains(string(b), " left 100 orphans\n") {
		t.Errorf("relay's stdout %q (%v), want the server's line", b, err)
	}
}

// SIGTERM from the host to relay, PID 1 of its namespace, stops it
// cleanly: relay exits with the serving child's status, as does the
// container (unshare).
func TestPID1SIGTERMExitsWithTheChildsStatus(t *testing.T) {
	p := startPID1(t, os.DevNull, "--name", "pid1-term", "--listen", "127.0.0.1:0", "--", built.testchild, "-exit-on-term", "7")
	p.waitMsg(0, "generation ready", 1)
	if err := syscall.Kill(p.host, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p.wait(30 * time.Second); code != 7 {
		t.Errorf("exit status %d, want the child's 7", code)
	}
	p.waitMsg(0, "relay exiting", 0)
	if p.count("killing generation now") != 0 {
		t.Error("the stop killed the generation; want it stopped by its stop signal")
	}
}

// A restart of relay as PID 1 under load, a new connection per request,
// fails no request.
func TestPID1RestartUnderLoad(t *testing.T) {
	p := startPID1(t, os.DevNull, "--name", "pid1-restart", "--listen", "127.0.0.1:0", "--", built.hello, "-lame-duck", "100ms")
	addr := p.listenAddrs(1)[0].str("addr")
	first, _ := p.waitMsg(0, "generation ready", 1)
	ld := startLoad(httpURL(addr), 4, time.Minute)
	waitUntil(t, 30*time.Second, "the first generation to answer the load", func() bool { n, _ := ld.served(first.num("pid")); return n > 0 })
	if out, errOut, code := p.client("restart"); code != 0 {
		t.Fatalf("relay restart: exit %d\n%s%s", code, out, errOut)
	}
	second, _ := p.waitMsg(0, "generation ready", 2)
	p.waitMsg(0, "old generation exited", 1)
	waitUntil(t, 30*time.Second, "the second generation to answer the load", func() bool { n, _ := ld.served(second.num("pid")); return n > 0 })
	ld.stop()
	requests, failures := ld.summary()
	n1, _ := ld.served(first.num("pid"))
	n2, _ := ld.served(second.num("pid"))
	t.Logf("requests %d, failed %d (generation 1 answered %d, generation 2 %d)", requests, len(failures), n1, n2)
	noFailures(t, failures, requests)
	if err := syscall.Kill(p.host, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p.wait(30 * time.Second); code != 0 {
		t.Errorf("exit status %d, want hello's 0", code)
	}
}
