package integration

// relay upgrade where relay's pid matters most: as the main process of a
// unit under a real systemd (nspawn_test.go boots it), with a watchdog, and
// as PID 1 of a PID namespace (pid1_test.go starts it). The upgrade keeps
// relay's pid, so systemd and the namespace see nothing change.

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// upgradeSysStatus is what these tests read of `relay status --json`.
type upgradeSysStatus struct {
	PID          int    `json:"pid"`
	RelayVersion string `json:"relay_version"`
	Upgrades     int    `json:"upgrades"`
	Generations  []struct {
		Generation int    `json:"generation"`
		PID        int    `json:"pid"`
		State      string `json:"state"`
	} `json:"generations"`
}

// checkUpgradeSysStatus decodes out (relay status --json) and checks that
// relay answers as pid relayPID, from the build version, after upgrades
// upgrades, with generation gen alone serving as pid child.
func checkUpgradeSysStatus(t *testing.T, out, when string, relayPID int, version string, upgrades, gen, child int) {
	t.Helper()
	var st upgradeSysStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("%s: relay status --json: %v\n%s", when, err, out)
	}
	if st.PID != relayPID || st.RelayVersion != version || st.Upgrades != upgrades {
		t.Errorf("%s: relay status says pid %d, relay_version %q, upgrades %d; want %d, %q, %d",
			when, st.PID, st.RelayVersion, st.Upgrades, relayPID, version, upgrades)
	}
	if len(st.Generations) != 1 || st.Generations[0].Generation != gen || st.Generations[0].PID != child || st.Generations[0].State != "serving" {
		t.Errorf("%s: relay's generations are %+v, want generation %d alone, serving as pid %d", when, st.Generations, gen, child)
	}
}

// waitWatchdogPing waits until systemd has taken a watchdog ping of unit
// (WatchdogTimestampMonotonic) at or after the monotonic time after (µs,
// monotonicUsec: the container has no time namespace, so its clock is the
// host's), checking on every look that
// the unit is active with relay (relayPID) its main process still; it
// returns that ping's time.
func waitWatchdogPing(t *testing.T, c *sdContainer, unit string, relayPID int, after int64, what string) int64 {
	t.Helper()
	var last int64
	waitUntil(t, 30*time.Second, what, func() bool {
		if a := c.show(unit, "ActiveState"); a != "active" {
			t.Fatalf("waiting for %s: %s is %s\n%s", what, unit, a, c.journal(unit))
		}
		if p := mainPID(t, c, unit); p != relayPID {
			t.Fatalf("waiting for %s: MainPID %d, want relay's %d still\n%s", what, p, relayPID, c.journal(unit))
		}
		s := c.show(unit, "WatchdogTimestampMonotonic")
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatalf("WatchdogTimestampMonotonic of %s: %q", unit, s)
		}
		last = n
		return n >= after
	})
	return last
}

// watchdogPings records, from a goroutine of its own, every watchdog ping
// systemd takes of a unit (WatchdogTimestampMonotonic, read in a loop;
// relay pings every half WatchdogSec, far apart enough that no ping goes
// unseen), so that the longest interval between two pings across an
// upgrade can be told.
type watchdogPings struct {
	mu    sync.Mutex
	pings []int64
	errs  []error
	stopC chan struct{}
	done  chan struct{}
}

func startWatchdogPings(c *sdContainer, unit string) *watchdogPings {
	w := &watchdogPings{stopC: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		// Bounded: stop ends it, or two minutes, should the test end
		// without calling stop.
		deadline := time.Now().Add(2 * time.Minute)
		for time.Now().Before(deadline) {
			select {
			case <-w.stopC:
				return
			default:
			}
			// Not c.show: it may fail the test, which only the test's
			// goroutine may do.
			out, err := c.systemctl("show", "-p", "WatchdogTimestampMonotonic", "--value", unit)
			n, perr := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
			w.mu.Lock()
			switch {
			case err != nil || perr != nil:
				if len(w.errs) < 5 {
					w.errs = append(w.errs, errors.Join(err, perr))
				}
			case len(w.pings) == 0 || n != w.pings[len(w.pings)-1]:
				w.pings = append(w.pings, n)
			}
			w.mu.Unlock()
		}
	}()
	return w
}

// stop ends the recording and returns the pings seen, the longest
// interval between two of them, and the first ping at or after from (µs,
// monotonic; 0 if none).
func (w *watchdogPings) stop(t *testing.T, from int64) (pings int, longest time.Duration, first int64) {
	t.Helper()
	close(w.stopC)
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, err := range w.errs {
		t.Errorf("reading the watchdog's last ping: %v", err)
	}
	for i, p := range w.pings {
		if i > 0 {
			longest = max(longest, time.Duration(p-w.pings[i-1])*time.Microsecond)
		}
		if first == 0 && p >= from {
			first = p
		}
	}
	return len(w.pings), longest, first
}

// upgradeGapField returns the value of gap= in a logfmt line of relay's.
func upgradeGapField(line string) string {
	for _, f := range strings.Fields(line) {
		if v, ok := strings.CutPrefix(f, "gap="); ok {
			return v
		}
	}
	return ""
}

// TestUpgradeUnderSystemd: relay.service as shipped (Type=notify-reload,
// the fd store), with WatchdogSec=2s in a drop-in, under load that opens a
// new connection per request from the host. `relay upgrade --name relay`
// run in the container, twice in a row (to another build, then back to
// the file relay was started from, so that the upgraded image upgrades
// again): each exits 0 once the new relay serves; MainPID, ActiveState,
// NRestarts and the socket in the fd store do not change; the new relay
// pings the watchdog, and systemd takes its pings for a whole WatchdogSec
// after the upgrade, with no watchdog timeout, no reload and no restart in
// the journal; the serving child is the same pid throughout, and no
// request fails.
func TestUpgradeUnderSystemd(t *testing.T) {
	other := relayOtherBuild(t)
	versionA, versionB := versionOf(t, built.relay), versionOf(t, other)
	c := bootSystemd(t)
	// The bin directory is bound at /usr/local/bin: a file added to it
	// now shows there.
	if err := linkOrCopy(other, filepath.Join(c.dir, "bin", "relay-other")); err != nil {
		t.Fatalf("installing relay-other in the container: %v", err)
	}
	runIn(t, c, "test", "-x", "/usr/local/bin/relay-other")

	const unit = "relay.service"
	const watchdog = 2 * time.Second
	addr := "127.0.0.1:" + strconv.Itoa(freeLoopbackPort(t)) // relay binds it in the container, which shares our network namespace
	url := httpURL(addr)
	c.writeFile("/etc/systemd/system/relay.service", shippedService(t, addr))
	c.writeFile("/etc/systemd/system/relay.service.d/watchdog.conf", "[Service]\nWatchdogSec=2s\n")
	c.daemonReload()
	started := time.Now()
	c.mustSystemctl("start", unit)
	if w := c.show(unit, "WatchdogUSec"); w != "2s" {
		t.Fatalf("WatchdogUSec=%s, want the drop-in's 2s", w)
	}
	relayPID := mainPID(t, c, unit)
	restarts := c.show(unit, "NRestarts")
	child := servedPID(t, url)
	if p := parentOf(t, c, child); p != relayPID {
		t.Fatalf("pid %d answers; its parent is %d, not relay (MainPID %d)", child, p, relayPID)
	}
	if n := c.show(unit, "NFileDescriptorStore"); n != "1" {
		t.Fatalf("NFileDescriptorStore=%s after the start, want 1", n)
	}
	// relay pings before any upgrade.
	waitWatchdogPing(t, c, unit, relayPID, monotonicUsec(t), "relay's first watchdog ping")
	t.Logf("relay.service: MainPID %d, NRestarts %s, child pid %d, WatchdogUSec 2s; builds %q and %q", relayPID, restarts, child, versionA, versionB)

	ld := startLoad(url, 4, 5*time.Minute)
	stopLoad := sync.OnceFunc(ld.stop)
	defer stopLoad()
	waitUntil(t, 30*time.Second, "the child answering the load", func() bool { n, _ := ld.served(child); return n > 0 })

	steps := []struct{ path, version string }{
		{"/usr/local/bin/relay-other", versionB}, // another build
		{"", versionA},                           // the file relay was started from, by the upgraded image
	}
	for i, s := range steps {
		n := i + 1
		before, _ := ld.served(child)
		// The client, built with -race, would sleep 1s before it exits
		// (GORACE's atexit_sleep_ms): here it returns as soon as it has
		// its answer, as relayCommand's do.
		args := []string{"env", "GORACE=atexit_sleep_ms=0", "/usr/local/bin/relay", "upgrade", "--name", "relay"}
		if s.path != "" {
			args = append(args, s.path)
		}
		pings := startWatchdogPings(c, unit)
		waitWatchdogPing(t, c, unit, relayPID, monotonicUsec(t), fmt.Sprintf("a watchdog ping before upgrade %d", n))
		begin := monotonicUsec(t)
		out, err := c.run(args...)
		done := monotonicUsec(t)
		t.Logf("upgrade %d: %s:\n%s", n, strings.Join(args[2:], " "), strings.TrimRight(out, "\n"))
		if err != nil {
			code := -1
			var exit *exec.ExitError
			if errors.As(err, &exit) {
				code = exit.ExitCode()
			}
			t.Fatalf("upgrade %d: relay upgrade exited %d (%v), want 0\n%s", n, code, err, c.journal(unit))
		}
		if want := "upgrade done: " + s.version + " serves"; !strings.Contains(out, want) {
			t.Errorf("upgrade %d: relay upgrade does not say %q", n, want)
		}
		// The child goes on answering, through relay's new image.
		waitUntil(t, 30*time.Second, fmt.Sprintf("the child answering after upgrade %d", n), func() bool { m, _ := ld.served(child); return m > before })
		// The new image pings, and systemd keeps taking its pings for a
		// whole WatchdogSec after the upgrade, relay active all along.
		// A ping after relay upgrade returned can only be the new image's.
		waitWatchdogPing(t, c, unit, relayPID, done, fmt.Sprintf("a watchdog ping of the relay upgrade %d made", n))
		waitWatchdogPing(t, c, unit, relayPID, done+watchdog.Microseconds(), fmt.Sprintf("a watchdog ping %s after upgrade %d", watchdog, n))
		seen, longest, first := pings.stop(t, begin)
		if a := c.show(unit, "ActiveState"); a != "active" {
			t.Errorf("upgrade %d: ActiveState %s, want active", n, a)
		}
		if p := mainPID(t, c, unit); p != relayPID {
			t.Errorf("upgrade %d: MainPID %d, want relay's %d still", n, p, relayPID)
		}
		if r := c.show(unit, "NRestarts"); r != restarts {
			t.Errorf("upgrade %d: NRestarts %s, want %s still", n, r, restarts)
		}
		if f := c.show(unit, "NFileDescriptorStore"); f != "1" {
			t.Errorf("upgrade %d: NFileDescriptorStore=%s, want the socket there still", n, f)
		}
		if p := servedPID(t, url); p != child {
			t.Errorf("upgrade %d: pid %d answers, want the child %d still", n, p, child)
		}
		checkUpgradeSysStatus(t, runIn(t, c, "/usr/local/bin/relay", "status", "--name", "relay", "--json"),
			fmt.Sprintf("after upgrade %d", n), relayPID, s.version, n, 1, child)
		t.Logf("upgrade %d: relay upgrade took %s (in the container, through nsenter), the first watchdog ping %s after it began; %d pings seen across it, at most %s apart (WatchdogSec=%s)",
			n, (time.Duration(done-begin) * time.Microsecond).Round(time.Millisecond), (time.Duration(first-begin) * time.Microsecond).Round(time.Millisecond),
			seen, longest.Round(time.Millisecond), watchdog)
	}
	stopLoad()
	requests, failures := ld.summary()
	noFailures(t, failures, requests)
	if requests == 0 {
		t.Error("the load sent no request")
	}
	ld.mu.Lock()
	for pid := range ld.pids {
		if pid != child {
			t.Errorf("pid %d answered: the child %d should have been the only one", pid, child)
		}
	}
	ld.mu.Unlock()

	// The journal: relay says it upgraded, twice, as the same pid; systemd
	// says nothing of a watchdog, a reload, a failure or a restart.
	es := journalEntries(t, c, unit)
	var gaps []string
	for _, e := range es {
		if !e.systemd && strings.Contains(e.msg, `msg="relay upgraded in place"`) {
			if e.pid != relayPID {
				t.Errorf("pid %d logged %q, want relay's %d", e.pid, e.msg, relayPID)
			}
			gaps = append(gaps, upgradeGapField(e.msg))
		}
	}
	if len(gaps) != len(steps) {
		t.Errorf("relay logged %d upgrades, want %d:\n%s", len(gaps), len(steps), journalText(es))
	}
	for _, e := range es {
		if !e.systemd || e.at.Before(started) {
			continue
		}
		for _, bad := range []string{"Watchdog timeout", "Reloading", "Main process exited", "Failed with result", "Scheduled restart", "Killing process"} {
			if strings.Contains(e.msg, bad) {
				t.Errorf("systemd logged %q: %s", bad, e.msg)
			}
		}
	}
	relayLogged(t, es, relayPID, `msg="upgrading relay in place"`)
	t.Logf("%d upgrades under systemd with WatchdogSec=2s: %d requests, %d failed; relay's gaps %v; MainPID %d, NRestarts %s, child %d throughout",
		len(steps), requests, len(failures), gaps, relayPID, restarts, child)
}

// TestUpgradeAsPID1: relay as PID 1 of a PID namespace of its own
// (startPID1), under load that opens a new connection per request. Two
// upgrades: relay upgrade on its control socket, to another build, then
// SIGUSR2 from the host to the namespace's PID 1, back to the file relay
// was started from. Each time relay logs "relay upgraded in place", runs
// the new binary (its /proc/PID/exe), and is still PID 1 of the namespace
// with the same host pid and unshare's only child; the child keeps its
// pid and answers; no request fails. A restart afterwards starts a new
// generation that takes the load, and SIGTERM ends relay with hello's 0.
func TestUpgradeAsPID1(t *testing.T) {
	other := relayOtherBuild(t)
	versionA, versionB := versionOf(t, built.relay), versionOf(t, other)
	p := startPID1(t, os.DevNull, "--name", "pid1-upgrade", "--listen", "127.0.0.1:0", "--", built.hello, "-lame-duck", "100ms")
	addr := p.listenAddrs(1)[0].str("addr")
	ready, from := p.waitMsg(0, "generation ready", 1)
	child := ready.num("pid") // in the namespace, as hello's X-Pid says
	host := p.host
	ld := startLoad(httpURL(addr), 4, 5*time.Minute)
	stopLoad := sync.OnceFunc(ld.stop)
	defer stopLoad()
	waitUntil(t, 30*time.Second, "the child answering the load", func() bool { n, _ := ld.served(child); return n > 0 })

	// stillPID1 checks that relay is host pid host, PID 1 of the namespace
	// p.ns, unshare's only child, and runs bin.
	stillPID1 := func(when, bin string) {
		t.Helper()
		if !nsPidIsOne(host) {
			t.Errorf("%s: host pid %d is not PID 1 of its namespace", when, host)
		}
		if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", host)); err != nil || ns != p.ns {
			t.Errorf("%s: host pid %d is in PID namespace %q (%v), want %s", when, host, ns, err, p.ns)
		}
		children, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", p.pid(), p.pid()))
		if err != nil || strings.TrimSpace(string(children)) != strconv.Itoa(host) {
			t.Errorf("%s: unshare's children are %q (%v), want relay %d alone", when, children, err, host)
		}
		if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", host)); err != nil || exe != bin {
			t.Errorf("%s: relay runs %q (%v), want %s", when, exe, err, bin)
		}
	}
	stillPID1("before the upgrades", built.relay)

	var gaps []time.Duration
	upgraded := func(n int, bin, version string) {
		t.Helper()
		var l logLine
		l, from = p.waitFor(from, 30*time.Second, fmt.Sprintf("upgrade %d: relay upgraded in place", n), func(l logLine) bool {
			return l.str("msg") == "relay upgraded in place"
		})
		if l.str("to") != version || l.num("upgrades") != n {
			t.Errorf("upgrade %d: relay logged to=%q upgrades=%d, want %q, %d", n, l.str("to"), l.num("upgrades"), version, n)
		}
		gaps = append(gaps, time.Duration(l.num("gap"))) // JSON logs durations in ns
		stillPID1(fmt.Sprintf("after upgrade %d", n), bin)
		before, _ := ld.served(child)
		waitUntil(t, 30*time.Second, fmt.Sprintf("the child answering after upgrade %d", n), func() bool { m, _ := ld.served(child); return m > before })
		out, errOut, code := p.client("status", "--json")
		if code != 0 {
			t.Fatalf("upgrade %d: relay status: exit %d: %s%s", n, code, out, errOut)
		}
		checkUpgradeSysStatus(t, out, fmt.Sprintf("after upgrade %d", n), 1, version, n, 1, child)
	}

	// 1: relay upgrade, on the control socket, to another build.
	out, code := p.upgrade(other)
	t.Logf("upgrade 1: relay upgrade %s: exit %d:\n%s", other, code, strings.TrimRight(out, "\n"))
	if code != 0 || !strings.Contains(out, "upgrade done: "+versionB+" serves") {
		t.Fatalf("upgrade 1: relay upgrade exited %d, want 0 and the new relay serving", code)
	}
	upgraded(1, other, versionB)

	// 2: SIGUSR2 from the host to the namespace's PID 1: the file relay
	// was started from.
	if err := syscall.Kill(host, syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	req, _ := p.waitMsg(from, "upgrade requested", 0)
	if !strings.Contains(req.str("reason"), "USR2") {
		t.Errorf("upgrade 2: relay logged upgrade requested for %q, want the signal USR2", req.str("reason"))
	}
	upgraded(2, built.relay, versionA)

	// A restart works as ever afterwards.
	if out, errOut, code := p.client("restart"); code != 0 {
		t.Fatalf("relay restart after the upgrades: exit %d\n%s%s", code, out, errOut)
	}
	second, _ := p.waitMsg(from, "generation ready", 2)
	p.waitMsg(from, "old generation exited", 1)
	waitUntil(t, 30*time.Second, "the second generation answering the load", func() bool { n, _ := ld.served(second.num("pid")); return n > 0 })
	stillPID1("after the restart", built.relay)
	stopLoad()
	requests, failures := ld.summary()
	noFailures(t, failures, requests)
	ld.mu.Lock()
	for pid := range ld.pids {
		if pid != child && pid != second.num("pid") {
			t.Errorf("pid %d answered: want only generation 1 (%d) and, after the restart, generation 2 (%d)", pid, child, second.num("pid"))
		}
	}
	ld.mu.Unlock()
	if n := p.count("generation starting"); n != 2 {
		t.Errorf("%d generations started, want 2: the upgrades must not restart the server, the restart must", n)
	}
	n1, _ := ld.served(child)
	n2, _ := ld.served(second.num("pid"))
	t.Logf("relay as PID 1 (host pid %d): 2 upgrades (relay upgrade, SIGUSR2) and a restart under load: %d requests, %d failed (generation 1 answered %d, generation 2 %d); relay's gaps %v",
		host, requests, len(failures), n1, n2, gaps)
	if err := syscall.Kill(host, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p.wait(30 * time.Second); code != 0 {
		t.Errorf("exit status %d, want hello's 0", code)
	}
}
