package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// relay upgrade that cannot happen, or whose new relay cannot take over,
// leaves relay as it was; and an upgrade keeps the bind takeover of the
// generation it carries, and of those started after it.

// upgradeQuietStatus checks, through relay status --json, that relay still
// runs as pid relayPid with one generation, gen, serving as pid child.
func upgradeQuietStatus(t *testing.T, r *relayProc, relayPid, gen, child int, when string) {
	t.Helper()
	select {
	case <-r.exited:
		t.Fatalf("%s: relay exited (%v)", when, r.waitErr)
	default:
	}
	out, errOut, code := r.client("status", "--json")
	if code != 0 {
		t.Fatalf("%s: relay status --json: exit %d\n%s%s", when, code, out, errOut)
	}
	var doc struct {
		Pid         int `json:"pid"`
		Generations []struct {
			Generation int    `json:"generation"`
			Pid        int    `json:"pid"`
			State      string `json:"state"`
		} `json:"generations"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("%s: relay status --json is not JSON: %v\n%s", when, err, out)
	}
	if doc.Pid != relayPid {
		t.Errorf("%s: relay says its pid is %d, want %d", when, doc.Pid, relayPid)
	}
	if len(doc.Generations) != 1 || doc.Generations[0].Generation != gen || doc.Generations[0].Pid != child ||
		doc.Generations[0].State != "serving" {
		t.Errorf("%s: relay's generations are %+v, want generation %d alone, serving as pid %d", when, doc.Generations, gen, child)
	}
}

// upgradeFDsBackTo waits, at most 10 s, until pid has at most want fds
// open, and returns how many it has then: relay may close its end of a
// control connection just answered a moment after the client has its
// answer. The caller judges the count.
func upgradeFDsBackTo(t *testing.T, pid, want int) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := fdCount(t, pid)
		if n <= want || time.Now().After(deadline) {
			return n
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// upgradeReasonLine returns the one line of out that begins with prefix,
// failing the test unless exactly one does and it says more than prefix.
func upgradeReasonLine(t *testing.T, out, prefix, what string) string {
	t.Helper()
	var found []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, prefix) {
			found = append(found, l)
		}
	}
	if len(found) == 0 || len(strings.TrimSpace(strings.TrimPrefix(found[0], prefix))) == 0 {
		t.Errorf("%s: no line %q with a reason in relay upgrade's output:\n%s", what, prefix+"...", out)
		return ""
	}
	for _, l := range found[1:] {
		if l != found[0] {
			t.Errorf("%s: relay upgrade says two different things:\n%s", what, out)
		}
	}
	if strings.Contains(out, "goroutine ") || strings.Contains(out, "panic:") {
		t.Errorf("%s: relay upgrade's output holds a stack trace:\n%s", what, out)
	}
	return found[0]
}

// TestUpgradeFailuresLeaveRelayServing: under load on new connections,
// relay upgrade is refused, exit 3 with a line that says why, for a path
// that does not exist, for a program that is not a relay, and for a relay
// that cannot read this relay's state version; and a new relay that
// panics while it takes the state over returns to the old one, exit 3,
// after which the next upgrade succeeds. Through it all relay's pid and
// the serving child's stay the same, the child answers, no request fails,
// and the failed attempts leave relay no more fds than it had.
func TestUpgradeFailuresLeaveRelayServing(t *testing.T) {
	other := relayOtherBuild(t)
	otherVersion := versionOf(t, other)
	// Only the new image reads the switch: relay starts as ever, and the
	// refusals before any exec do not see it.
	r := startRelay(t, []string{"RELAY_TEST_FAIL_RESTORE=panic"}, "--listen", "127.0.0.1:0", "--", built.hello)
	addr := r.listenAddrs(1)[0].str("addr")
	ready, _ := r.waitMsg(0, "generation ready", 1)
	child, relayPid := ready.num("pid"), r.pid()
	ld := startLoad(httpURL(addr), 4, 5*time.Minute)
	stopLoad := sync.OnceFunc(ld.stop)
	defer stopLoad()
	waitUntil(t, 30*time.Second, "the child to answer", func() bool { n, _ := ld.served(child); return n > 0 })
	fdsBefore := fdCount(t, relayPid)

	// attempt runs relay upgrade with bin, checks that it exits 3 with a
	// line beginning with prefix, that relay and the child are the same
	// and the child answers after it, and returns that line.
	attempt := func(r *relayProc, ld *load, relayPid, child int, bin, prefix, what string) string {
		t.Helper()
		before, _ := ld.served(child)
		out, code := r.upgrade(bin)
		t.Logf("%s: relay upgrade exit %d:\n%s", what, code, strings.TrimRight(out, "\n"))
		if code != 3 {
			t.Errorf("%s: relay upgrade exited %d, want 3", what, code)
		}
		line := upgradeReasonLine(t, out, prefix, what)
		upgradeQuietStatus(t, r, relayPid, 1, child, what)
		waitUntil(t, 30*time.Second, "the child to answer after "+what, func() bool { n, _ := ld.served(child); return n > before })
		if pid, err := get(newConnClient(), httpURL(r.listenAddrs(1)[0].str("addr"))); err != nil || pid != child {
			t.Errorf("%s: a request after it: pid %d, %v; want the child %d", what, pid, err, child)
		}
		return line
	}
	// refusedLog checks relay's log line for the refusal that follows
	// index from, and returns the index after it.
	refusedLog := func(r *relayProc, from int, path, what string) int {
		t.Helper()
		l, next := r.waitMsg(from, "upgrade refused; relay serves on unchanged", 0)
		if l.str("path") != path || l.str("reason") == "" || l.str("level") != "WARN" {
			t.Errorf("%s: relay logged %v; want a WARN with path %s and a reason", what, l, path)
		}
		return next
	}
	from := 0

	// (a) No file at PATH.
	missing := filepath.Join(t.TempDir(), "no-such-relay")
	line := attempt(r, ld, relayPid, child, missing, "upgrade refused: ", "(a) a path that does not exist")
	if !strings.Contains(line, missing) || !strings.Contains(line, "no such file") {
		t.Errorf("(a): %q does not name %s and say it does not exist", line, missing)
	}
	from = refusedLog(r, from, missing, "(a)")
	if n := upgradeFDsBackTo(t, relayPid, fdsBefore); n != fdsBefore {
		t.Errorf("(a): relay has %d fds after the refusal, %d before", n, fdsBefore)
	}

	// (b) A program that is not a relay: /bin/true answers the check
	// with nothing.
	notRelay := "/bin/true"
	if _, err := os.Stat(notRelay); err != nil {
		notRelay = "/usr/bin/true"
	}
	line = attempt(r, ld, relayPid, child, notRelay, "upgrade refused: ", "(b) a program that is not a relay")
	if !strings.Contains(line, notRelay) || !strings.Contains(line, "not a relay") {
		t.Errorf("(b): %q does not name %s and say it is not a relay", line, notRelay)
	}
	from = refusedLog(r, from, notRelay, "(b)")
	if n := upgradeFDsBackTo(t, relayPid, fdsBefore); n != fdsBefore {
		t.Errorf("(b): relay has %d fds after the refusal, %d before", n, fdsBefore)
	}

	// (c) A relay that reads only state version 99: a second relay,
	// whose candidates answer so (RELAY_TEST_HANDOFF_ACCEPTS), under a
	// load of its own.
	{
		r2 := startRelay(t, []string{"RELAY_TEST_HANDOFF_ACCEPTS=99"}, "--listen", "127.0.0.1:0", "--", built.hello)
		addr2 := r2.listenAddrs(1)[0].str("addr")
		ready2, _ := r2.waitMsg(0, "generation ready", 1)
		child2 := ready2.num("pid")
		ld2 := startLoad(httpURL(addr2), 2, 5*time.Minute)
		stopLoad2 := sync.OnceFunc(ld2.stop)
		defer stopLoad2()
		waitUntil(t, 30*time.Second, "the second relay's child to answer", func() bool { n, _ := ld2.served(child2); return n > 0 })
		fds2 := fdCount(t, r2.pid())
		line := attempt(r2, ld2, r2.pid(), child2, other, "upgrade refused: ", "(c) a relay that reads another state version")
		if !strings.Contains(line, "99") || !strings.Contains(line, "version") || !strings.Contains(line, other) {
			t.Errorf("(c): %q does not name %s and the version it reads, 99", line, other)
		}
		refusedLog(r2, 0, other, "(c)")
		if n := upgradeFDsBackTo(t, r2.pid(), fds2); n != fds2 {
			t.Errorf("(c): relay has %d fds after the refusal, %d before", n, fds2)
		}
		if n := r2.count("upgrading relay in place"); n != 0 {
			t.Errorf("(c): relay began %d upgrades it had refused", n)
		}
		stopLoad2()
		requests, failures := ld2.summary()
		noFailures(t, failures, requests)
		t.Logf("(c): %d requests to the second relay, %d failed", requests, len(failures))
	}

	// (d) The new relay panics while it takes relay's state over
	// (RELAY_TEST_FAIL_RESTORE=panic): it returns to the old one, which
	// serves on.
	line = attempt(r, ld, relayPid, child, other, "upgrade failed: ", "(d) a new relay that panics in its restore")
	if !strings.Contains(line, "could not take over") || !strings.Contains(line, "panic") {
		t.Errorf("(d): %q does not say the new relay could not take over, and that it panicked", line)
	}
	_, from = r.waitMsg(from, "upgrading relay in place", 0)
	cannot, from := r.waitMsg(from, "this relay cannot take over; returning to the one it replaced", 0)
	back, from := r.waitMsg(from, "back on this relay: the new one could not take over", 0)
	if !strings.Contains(cannot.str("reason"), "panic") || back.str("reason") != cannot.str("reason") {
		t.Errorf("(d): the new relay logged %v, the old one %v; want the same reason, naming the panic", cannot, back)
	}
	if n := r.count("relay upgraded in place"); n != 0 {
		t.Errorf("(d): relay says it was upgraded %d times", n)
	}
	// The return is an exec too, so it may shed an fd the first image
	// kept; none may be added.
	fdsReturned := upgradeFDsBackTo(t, relayPid, fdsBefore)
	if fdsReturned > fdsBefore {
		t.Errorf("(d): relay has %d fds after its return, %d before", fdsReturned, fdsBefore)
	}

	// The switch went with the return: the next upgrade succeeds.
	before, _ := ld.served(child)
	out, code := r.upgrade(other)
	t.Logf("(d) again: relay upgrade exit %d:\n%s", code, strings.TrimRight(out, "\n"))
	if code != 0 || !strings.Contains(out, "upgrade done") {
		t.Fatalf("(d): the upgrade after the return exited %d, want 0 and upgrade done", code)
	}
	up, _ := r.waitMsg(from, "relay upgraded in place", 0)
	if up.str("to") != otherVersion || up.num("upgrades") != 1 {
		t.Errorf("(d): %v; want to %q, and 1 upgrade: the failed one does not count", up, otherVersion)
	}
	upgradeQuietStatus(t, r, relayPid, 1, child, "(d) the upgrade after the return")
	waitUntil(t, 30*time.Second, "the child to answer after the upgrade", func() bool { n, _ := ld.served(child); return n > before })
	// Both images came of an exec of the same state: the return left
	// relay as many fds as an upgrade does, no more (a leak of the failed
	// attempt) and no fewer.
	fdsUpgraded := upgradeFDsBackTo(t, relayPid, fdsReturned)
	if fdsUpgraded != fdsReturned {
		t.Errorf("relay has %d fds after the upgrade, %d after the return before it", fdsUpgraded, fdsReturned)
	}
	t.Logf("relay's fds: %d before, %d after the return, %d after the upgrade", fdsBefore, fdsReturned, fdsUpgraded)

	stopLoad()
	requests, failures := ld.summary()
	noFailures(t, failures, requests)
	t.Logf("%d requests, %d failed, answered by %v", requests, len(failures), ld.answered())
	for _, pid := range ld.answered() {
		if pid != child {
			t.Errorf("pid %d answered: the serving child %d should have been the only one", pid, child)
		}
	}
	if n := r.count("generation starting"); n != 1 {
		t.Errorf("%d generations started, want 1: no upgrade, failed or not, may restart the server", n)
	}
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exited %d, want 0", code)
	}
}

// TestUpgradeKeepsBindTakeover: relay upgraded under load keeps taking
// binds over. A server that binds its own port, started before the
// upgrade, is restarted after it, and the new generation's bind is taken
// over by the new relay and serves. And a bind that the generation serving
// through the upgrade makes after it lands on relay's socket too: the new
// relay answers it through the filter's notification fd it was handed.
func TestUpgradeKeepsBindTakeover(t *testing.T) {
	other := relayOtherBuild(t)

	t.Run("restart", func(t *testing.T) {
		port := freeLoopbackPort(t)
		p := strconv.Itoa(port)
		// ":PORT" is one dual-stack IPv6 socket, given relay's
		// 127.0.0.1 listener.
		asked := "[::]:" + p
		r := startRelay(t, nil, "--listen", "127.0.0.1:"+p, "--", built.plainserver, "-port", p)
		listener := r.listenAddrs(1)[0]
		addr, name := listener.str("addr"), listener.str("name")
		first, _ := r.waitMsg(0, "generation ready", 1)
		checkTakenOver(t, r, first, name, port, asked)
		pid1 := first.num("pid")
		ld := startLoad(httpURL(addr), 4, 5*time.Minute)
		stopLoad := sync.OnceFunc(ld.stop)
		defer stopLoad()
		waitUntil(t, 30*time.Second, "generation 1 to answer", func() bool { n, _ := ld.served(pid1); return n > 0 })

		out, code := r.upgrade(other)
		if code != 0 || !strings.Contains(out, "upgrade done") {
			t.Fatalf("relay upgrade: exit %d, want 0:\n%s", code, out)
		}
		_, from := r.waitMsg(0, "relay upgraded in place", 0)
		upgradeQuietStatus(t, r, r.pid(), 1, pid1, "after the upgrade")
		n, _ := ld.served(pid1)
		waitUntil(t, 30*time.Second, "generation 1 to answer after the upgrade", func() bool { m, _ := ld.served(pid1); return m > n })

		if out, errOut, code := r.client("restart"); code != 0 {
			t.Fatalf("relay restart after the upgrade: exit %d\n%s%s", code, out, errOut)
		}
		r.waitMsg(from, msgTakenOver, 2)
		second, next := r.waitMsg(from, "generation ready", 2)
		checkTakenOver(t, r, second, name, port, asked)
		pid2 := second.num("pid")
		waitUntil(t, 30*time.Second, "generation 2 to answer", func() bool { n, _ := ld.served(pid2); return n > 0 })
		r.waitMsg(next, "old generation exited", 1)
		checkListeners(t, r, port, 1, "after the restart")
		if state, took := r.genStatus(t, 2); state != "serving" || took[name] != "bind" {
			t.Errorf("relay status: generation 2 is %s and took %s by %q, want serving, by bind", state, name, took[name])
		}

		stopLoad()
		requests, failures := ld.summary()
		noFailures(t, failures, requests)
		t.Logf("an upgrade and a restart: %d requests, %d failed, answered by %v", requests, len(failures), ld.answered())
		for _, pid := range ld.answered() {
			if pid != pid1 && pid != pid2 {
				t.Errorf("pid %d answered; only generations 1 (%d) and 2 (%d) serve", pid, pid1, pid2)
			}
		}
		r.signal(syscall.SIGTERM)
		if code := r.wait(30 * time.Second); code != 0 {
			t.Errorf("relay exited %d, want 0", code)
		}
	})

	t.Run("old generation binds", func(t *testing.T) {
		port := freeLoopbackPort(t)
		addr := "127.0.0.1:" + strconv.Itoa(port)
		// The child serves on the passed socket, and binds addr itself
		// only on SIGUSR1, which relay passes on to it.
		r := startRelay(t, nil, "--listen", addr, "--", built.testchild, "-bind-on-usr1", addr)
		name := r.listenAddrs(1)[0].str("name")
		first, _ := r.waitMsg(0, "generation ready", 1)
		child := first.num("pid")
		onSeccomp(t, r, first)
		ld := startLoad(httpURL(addr), 4, 5*time.Minute)
		stopLoad := sync.OnceFunc(ld.stop)
		defer stopLoad()
		waitUntil(t, 30*time.Second, "the child to answer", func() bool { n, _ := ld.served(child); return n > 0 })

		out, code := r.upgrade(other)
		if code != 0 || !strings.Contains(out, "upgrade done") {
			t.Fatalf("relay upgrade: exit %d, want 0:\n%s", code, out)
		}
		_, from := r.waitMsg(0, "relay upgraded in place", 0)
		if n := len(r.lines(msgTakenOver, 0)); n != 0 {
			t.Fatalf("%d binds taken over before the child bound anything", n)
		}
		n, _ := ld.served(child)
		waitUntil(t, 30*time.Second, "the child to answer after the upgrade", func() bool { m, _ := ld.served(child); return m > n })

		r.signal(syscall.SIGUSR1)
		// After the upgrade's line: the new relay answered the bind.
		taken, _ := r.waitMsg(from, msgTakenOver, 1)
		r.waitRaw("testchild: on SIGUSR1: ")
		if strings.Contains(r.output(), "testchild: on SIGUSR1: bind failed") {
			t.Fatalf("the child's bind of %s failed after the upgrade", addr)
		}
		r.waitRaw(fmt.Sprintf("testchild: on SIGUSR1: bound gen=1 pid=%d on %s", child, addr))
		if taken.num("bind_pid") != child || taken.str("listener") != name || taken.str("socket") != "own" ||
			taken.str("addr") != addr || taken.num("fd") < 3 {
			t.Errorf("%v; want bind_pid %d, listener %s, socket own, addr %s and an fd above 2", taken, child, name, addr)
		}
		// The fd the child bound is relay's socket, the one listening
		// on the port, and the port has no other.
		inode := fdInode(t, child, taken.num("fd"))
		if socketInodes(t, r.pid())[inode] == nil {
			t.Errorf("the child's fd %d is socket %s, which relay does not hold", taken.num("fd"), inode)
		}
		if socks := checkListeners(t, r, port, 1, "after the child's bind"); len(socks) == 1 && socks[0].inode != inode {
			t.Errorf("the child bound socket %s, but the one listening is %s", inode, socks[0].inode)
		}
		if _, took := r.genStatus(t, 1); took[name] != "bind" {
			t.Errorf("relay status: generation 1 took %s by %q, want by bind", name, took[name])
		}
		n, _ = ld.served(child)
		waitUntil(t, 30*time.Second, "the child to answer after its bind", func() bool { m, _ := ld.served(child); return m > n })
		if pid, err := get(newConnClient(), httpURL(addr)); err != nil || pid != child {
			t.Errorf("a request to %s after the bind: pid %d, %v; want %d", addr, pid, err, child)
		}

		stopLoad()
		requests, failures := ld.summary()
		noFailures(t, failures, requests)
		t.Logf("an upgrade and a late bind: %d requests, %d failed, answered by %v", requests, len(failures), ld.answered())
		upgradeQuietStatus(t, r, r.pid(), 1, child, "at the end")
		r.signal(syscall.SIGTERM)
		if code := r.wait(30 * time.Second); code != 0 {
			t.Errorf("relay exited %d, want 0", code)
		}
	})
}
