package integration

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Tests 3, 4 and 5 of relay under a real systemd (nspawn_test.go boots it):
// the fd store across `systemctl restart relay` and a crash of relay, a
// .socket unit with ReusePort=yes, and the watchdog. The units are the ones
// in examples/systemd, with only the port and the server's command line
// substituted (and, for the watchdog, a shorter WatchdogSec= in a drop-in).

// shippedService is examples/systemd/relay.service with relay's --listen on
// addr and examples/hello as myapp (it takes no --config).
func shippedService(t *testing.T, addr string) string {
	return exampleUnit(t, "relay.service",
		"--listen http=:8080", "--listen http="+addr,
		"/usr/local/bin/myapp --config /etc/myapp.yaml", "/usr/local/bin/myapp")
}

// openLoad sends a request on a new connection every tick, each from a
// goroutine of its own, whether or not earlier ones were answered: while
// relay is down, requests keep being made, and wait in the socket's queue.
// At most maxInFlight wait at once; a tick that finds that many is skipped.
// A restart queues requests for about 2s (hello's 1s lame duck, then the
// race detector's 1s sleep at relay's exit), 400 of them at 5ms.
type openLoad struct {
	mu    sync.Mutex
	shots []shot
	stopC chan struct{}
	wg    sync.WaitGroup
}

// shot is one request of an openLoad: when it was sent, how long it took,
// and who answered it.
type shot struct {
	sent time.Time
	took time.Duration
	pid  int
	err  error
}

const maxInFlight = 1024

func startOpenLoad(url string, every, limit time.Duration) *openLoad {
	ld := &openLoad{stopC: make(chan struct{})}
	client := newConnClient()
	client.Timeout = 20 * time.Second // outlasts RestartSec=1s and a watchdog timeout
	slots := make(chan struct{}, maxInFlight)
	ld.wg.Add(1)
	go func() {
		defer ld.wg.Done()
		tick := time.NewTicker(every)
		defer tick.Stop()
		end := time.After(limit)
		for {
			select {
			case <-ld.stopC:
				return
			case <-end:
				return
			case <-tick.C:
			}
			select {
			case slots <- struct{}{}:
			default:
				continue
			}
			ld.wg.Add(1)
			go func() {
				defer ld.wg.Done()
				defer func() { <-slots }()
				s := shot{sent: time.Now()}
				s.pid, s.err = get(client, url)
				s.took = time.Since(s.sent)
				ld.mu.Lock()
				ld.shots = append(ld.shots, s)
				ld.mu.Unlock()
			}()
		}
	}()
	return ld
}

// stop stops sending and waits for the requests in flight.
func (ld *openLoad) stop() []shot {
	close(ld.stopC)
	ld.wg.Wait()
	ld.mu.Lock()
	defer ld.mu.Unlock()
	return append([]shot(nil), ld.shots...)
}

// answeredByOtherThan reports whether some request was answered by a pid other than
// those in old.
func (ld *openLoad) answeredByOtherThan(old map[int]bool) bool {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	for _, s := range ld.shots {
		if s.err == nil && !old[s.pid] {
			return true
		}
	}
	return false
}

// journalEntry is one line of a unit's journal: relay's own (from its
// stderr) or systemd's about the unit.
type journalEntry struct {
	at      time.Time // when it was logged (systemd's) or received (relay's)
	pid     int
	msg     string
	systemd bool
}

// journalEntries reads unit's journal in the container.
func journalEntries(t *testing.T, c *sdContainer, unit string) []journalEntry {
	t.Helper()
	out := runIn(t, c, "journalctl", "-u", unit, "-o", "json", "--no-pager",
		"--output-fields=MESSAGE,_PID,_COMM,__REALTIME_TIMESTAMP,_SOURCE_REALTIME_TIMESTAMP")
	var es []journalEntry
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" {
			continue
		}
		var f map[string]any
		if err := json.Unmarshal([]byte(line), &f); err != nil {
			t.Fatalf("journalctl -o json: %v: %s", err, line)
		}
		str := func(k string) string { s, _ := f[k].(string); return s }
		ts := str("_SOURCE_REALTIME_TIMESTAMP")
		if ts == "" {
			ts = str("__REALTIME_TIMESTAMP")
		}
		us, err := strconv.ParseInt(ts, 10, 64)
		if err != nil {
			t.Fatalf("journal entry with no timestamp: %s", line)
		}
		pid, _ := strconv.Atoi(str("_PID"))
		es = append(es, journalEntry{at: time.UnixMicro(us), pid: pid, msg: str("MESSAGE"), systemd: str("_COMM") == "systemd"})
	}
	return es
}

// systemdSaid returns the first of systemd's messages about the unit after
// from that contains sub.
func systemdSaid(t *testing.T, es []journalEntry, from time.Time, sub string) journalEntry {
	t.Helper()
	for _, e := range es {
		if e.systemd && !e.at.Before(from) && strings.Contains(e.msg, sub) {
			return e
		}
	}
	t.Fatalf("systemd did not log %q after %s; the unit's journal:\n%s", sub, from.Format(time.StampMicro), journalText(es))
	return journalEntry{}
}

func journalText(es []journalEntry) string {
	var b strings.Builder
	for _, e := range es {
		fmt.Fprintf(&b, "%s [%d] %s\n", e.at.Format(time.StampMicro), e.pid, e.msg)
	}
	return b.String()
}

// relayLogged returns the first line relay (pid) logged that contains sub.
func relayLogged(t *testing.T, es []journalEntry, pid int, sub string) journalEntry {
	t.Helper()
	for _, e := range es {
		if !e.systemd && e.pid == pid && strings.Contains(e.msg, sub) {
			return e
		}
	}
	t.Fatalf("relay (pid %d) did not log %q; the unit's journal:\n%s", pid, sub, journalText(es))
	return journalEntry{}
}

// runIn runs a command in the container and fails the test if it fails.
func runIn(t *testing.T, c *sdContainer, args ...string) string {
	t.Helper()
	out, err := c.run(args...)
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	return out
}

func mainPID(t *testing.T, c *sdContainer, unit string) int {
	t.Helper()
	s := c.show(unit, "MainPID")
	pid, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("MainPID of %s: %q", unit, s)
	}
	return pid
}

// waitActiveWithNewPID waits until unit is active again with a main
// process other than old, and returns it.
func waitActiveWithNewPID(t *testing.T, c *sdContainer, unit string, old int, timeout time.Duration) int {
	t.Helper()
	var pid int
	waitUntil(t, timeout, unit+" active with a new MainPID", func() bool {
		pid = mainPID(t, c, unit)
		return pid != 0 && pid != old && c.show(unit, "ActiveState") == "active"
	})
	return pid
}

// parentOf reads pid's parent in the container.
func parentOf(t *testing.T, c *sdContainer, pid int) int {
	t.Helper()
	stat := runIn(t, c, "cat", fmt.Sprintf("/proc/%d/stat", pid))
	// pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
	f := strings.Fields(stat[strings.LastIndex(stat, ")")+1:])
	if len(f) < 2 {
		t.Fatalf("/proc/%d/stat: %q", pid, stat)
	}
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		t.Fatalf("/proc/%d/stat: %q", pid, stat)
	}
	return ppid
}

// servedPID asks the unit's server who it is, once, on a new connection.
func servedPID(t *testing.T, url string) int {
	t.Helper()
	pid, err := get(newConnClient(), url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return pid
}

// downWindow checks the requests of a load across an outage of relay that
// ended in [gone, back]: gone when systemd saw the old relay (and, with
// KillMode=mixed, its children) gone, back when systemd logged the new relay
// started (its READY=1). Every request sent from gone on must have been
// answered, by a generation of the new relay (newPIDs), and some must have
// been sent before back: made while no relay ran, they waited in the
// stored socket's queue. It returns the failed requests (all sent before
// gone) and the longest wait.
func downWindow(t *testing.T, shots []shot, gone, back time.Time, newPIDs func(int) bool) (failed []shot, longest time.Duration) {
	t.Helper()
	whileDown, bad := 0, 0
	complain := func(format string, args ...any) {
		if bad++; bad <= 5 {
			t.Errorf(format, args...)
		}
	}
	for _, s := range shots {
		longest = max(longest, s.took)
		if s.sent.Before(gone) {
			if s.err != nil {
				failed = append(failed, s)
			}
			continue
		}
		switch {
		case s.err != nil:
			complain("a request sent %s after systemd saw relay gone failed: %v", s.sent.Sub(gone), s.err)
		case !newPIDs(s.pid):
			complain("a request sent %s after systemd saw relay gone was answered by pid %d, not by the new relay's generation", s.sent.Sub(gone), s.pid)
		case s.sent.Before(back):
			whileDown++
		}
	}
	if bad > 5 {
		t.Errorf("%d requests sent after systemd saw relay gone went wrong (the first 5 above)", bad)
	}
	if whileDown == 0 {
		t.Errorf("no request was sent while relay was down (%s to %s), so none was shown waiting in the queue", gone.Format(time.StampMicro), back.Format(time.StampMicro))
	}
	t.Logf("%d requests, %d sent while relay was down (%s) and answered by the new relay, %d failed (sent before), longest wait %s",
		len(shots), whileDown, back.Sub(gone).Round(time.Millisecond), len(failed), longest.Round(time.Millisecond))
	return failed, longest
}

// newGenerations returns a test for the pids of the generations of the
// relay that runs now, which must be newRelay.
func newGenerations(t *testing.T, c *sdContainer, newRelay int) func(int) bool {
	t.Helper()
	st := relayStatus(t, c)
	if st.PID != newRelay {
		t.Fatalf("relay status answers from pid %d, want the new MainPID %d", st.PID, newRelay)
	}
	gens := map[int]bool{}
	for _, g := range st.Generations {
		gens[g.PID] = true
	}
	return func(pid int) bool { return gens[pid] }
}

// Test 3: `systemctl restart relay` and a crash of relay (kill -9, then
// Restart=on-failure after RestartSec=1s), under load that opens a new
// connection per request. relay.service keeps its socket in the fd store:
// the connections made while no relay runs wait in that socket's queue and
// are answered by the new relay.
func TestSystemdRealRestartKeepsTheSocketInTheFDStore(t *testing.T) {
	c := bootSystemd(t)
	addr := "127.0.0.1:" + strconv.Itoa(freeLoopbackPort(t)) // systemd or relay binds it in the container, which shares our network namespace
	url := httpURL(addr)
	c.writeFile("/etc/systemd/system/relay.service", shippedService(t, addr))
	c.daemonReload()
	c.mustSystemctl("start", "relay.service")
	if n := c.show("relay.service", "NFileDescriptorStore"); n != "1" {
		t.Fatalf("NFileDescriptorStore=%s after the start, want 1 (relay stores the socket it bound)", n)
	}

	t.Run("restart", func(t *testing.T) {
		_, failed := relayOutage(t, c, url, "Deactivated successfully", func(int) {
			c.mustSystemctl("restart", "relay.service")
		})
		if len(failed) > 0 {
			t.Errorf("%d requests sent before the old relay exited failed, the first: %v", len(failed), failed[0].err)
		}
	})

	t.Run("crash", func(t *testing.T) {
		restarts := c.show("relay.service", "NRestarts")
		// A request the killed generation had taken and not answered is
		// lost with it: quoted, not failed.
		relayOutage(t, c, url, "Failed with result 'signal'", func(oldRelay int) {
			runIn(t, c, "kill", "-KILL", strconv.Itoa(oldRelay))
		})
		if n := c.show("relay.service", "NRestarts"); n == restarts {
			t.Errorf("NRestarts=%s, unchanged by the crash: Restart=on-failure did not restart relay", n)
		}
	})
}

// relayOutage ends the running relay.service with end, under load on url,
// waits for a new relay to serve, and checks the requests across the
// outage (downWindow): gone is what systemd logs once the old relay and its
// children are gone. The new relay must have its socket from the fd store.
// It returns the unit's journal and the requests that failed before gone.
func relayOutage(t *testing.T, c *sdContainer, url, gone string, end func(oldRelay int)) ([]journalEntry, []shot) {
	t.Helper()
	oldRelay := mainPID(t, c, "relay.service")
	oldChild := servedPID(t, url)
	ld := startOpenLoad(url, 5*time.Millisecond, 90*time.Second)
	waitUntil(t, 10*time.Second, "the load answered", func() bool { return ld.answeredByOtherThan(nil) })
	from := time.Now()
	end(oldRelay)
	newRelay := waitActiveWithNewPID(t, c, "relay.service", oldRelay, 60*time.Second)
	waitUntil(t, 10*time.Second, "the new relay's generation answering the load", func() bool {
		return ld.answeredByOtherThan(map[int]bool{oldChild: true})
	})
	shots := ld.stop()
	es := journalEntries(t, c, "relay.service")
	down := systemdSaid(t, es, from, gone)
	back := systemdSaid(t, es, down.at, "Started ")
	failed, _ := downWindow(t, shots, down.at, back.at, newGenerations(t, c, newRelay))
	if l := relayLogged(t, es, newRelay, "msg=listening"); !strings.Contains(l.msg, "origin=inherited") {
		t.Errorf("the new relay did not take its socket from the fd store: %s", l.msg)
	}
	if n := c.show("relay.service", "NFileDescriptorStore"); n != "1" {
		t.Errorf("NFileDescriptorStore=%s after relay came back, want 1", n)
	}
	return es, failed
}

// shippedSocket is examples/systemd/relay.socket listening on addr.
func shippedSocket(t *testing.T, addr string) string {
	return exampleUnit(t, "relay.socket", "ListenStream=8080", "ListenStream="+addr)
}

// statusJSON is what this file reads of `relay status --json`.
type statusJSON struct {
	PID       int `json:"pid"`
	Listeners []struct {
		Name    string `json:"name"`
		Address string `json:"address"`
		Origin  string `json:"origin"`
		Drain   string `json:"drain"`
	} `json:"listeners"`
	Generations []struct {
		PID   int    `json:"pid"`
		State string `json:"state"`
	} `json:"generations"`
}

func relayStatus(t *testing.T, c *sdContainer) statusJSON {
	t.Helper()
	out := runIn(t, c, "/usr/local/bin/relay", "status", "--name", "relay", "--json")
	var st statusJSON
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("relay status --json: %v\n%s", err, out)
	}
	return st
}

// Test 4: relay.socket (ReusePort=yes) with relay.service. The first
// connection starts relay.service and is answered; relay takes systemd's
// socket for its --listen and steers it; `systemctl reload` under load
// loses nothing.
func TestSystemdRealSocketUnitWithReusePort(t *testing.T) {
	c := bootSystemd(t)
	addr := "127.0.0.1:" + strconv.Itoa(freeLoopbackPort(t)) // systemd or relay binds it in the container, which shares our network namespace
	url := httpURL(addr)
	c.writeFile("/etc/systemd/system/relay.socket", shippedSocket(t, addr))
	c.writeFile("/etc/systemd/system/relay.service", shippedService(t, addr))
	c.daemonReload()
	c.mustSystemctl("start", "relay.socket")
	if s := c.show("relay.service", "ActiveState"); s != "inactive" {
		t.Fatalf("relay.service is %s with only relay.socket started, want inactive", s)
	}

	first := servedPID(t, url)
	if s := c.show("relay.service", "ActiveState"); s != "active" {
		t.Fatalf("relay.service is %s after the first connection was answered, want active", s)
	}
	relayPID := mainPID(t, c, "relay.service")
	if p := parentOf(t, c, first); p != relayPID {
		t.Errorf("the first connection was answered by pid %d, whose parent is %d, not relay (%d)", first, p, relayPID)
	}
	st := relayStatus(t, c)
	if len(st.Listeners) != 1 {
		t.Fatalf("relay status shows %d listeners, want 1: %+v", len(st.Listeners), st.Listeners)
	}
	if l := st.Listeners[0]; l.Name != "http" || l.Address != addr || l.Origin != "inherited" || l.Drain != "steered" {
		t.Errorf("relay's listener is %+v, want http on %s, origin inherited (systemd's socket), drain steered", l, addr)
	}
	// systemd holds the socket already: relay does not store it.
	if n := c.show("relay.service", "NFileDescriptorStore"); n != "0" {
		t.Errorf("NFileDescriptorStore=%s, want 0 (a .socket unit's socket is not stored)", n)
	}

	ld := startLoad(url, 4, 2*time.Minute)
	seen := map[int]bool{first: true}
	const reloads = 3
	for i := range reloads {
		c.mustSystemctl("reload", "relay.service")
		if r := c.show("relay.service", "ReloadResult"); r != "success" {
			t.Fatalf("reload %d: ReloadResult=%s, want success", i+1, r)
		}
		st := relayStatus(t, c)
		var serving int
		for _, g := range st.Generations {
			if g.State == "serving" {
				serving = g.PID
			}
		}
		if serving == 0 || seen[serving] {
			t.Fatalf("reload %d: no new serving generation after systemctl reload returned: %+v", i+1, st.Generations)
		}
		seen[serving] = true
		waitUntil(t, 10*time.Second, fmt.Sprintf("generation pid %d answering the load", serving), func() bool {
			n, _ := ld.served(serving)
			return n > 0
		})
		if st.Listeners[0].Drain != "steered" {
			t.Errorf("reload %d: the listener's drain is %s, want steered", i+1, st.Listeners[0].Drain)
		}
	}
	ld.stop()
	requests, failures := ld.summary()
	noFailures(t, failures, requests)
	if p := mainPID(t, c, "relay.service"); p != relayPID {
		t.Errorf("MainPID went from %d to %d over the reloads", relayPID, p)
	}
	t.Logf("%d reloads under load: %d requests, %d failed", reloads, requests, len(failures))
}

// Test 5: the watchdog. relay frozen with SIGSTOP stops pinging; systemd
// kills it at WatchdogSec= (SIGABRT, then SIGKILL of the rest of the unit)
// and Restart=on-failure starts it again; the socket comes back from the fd
// store and a new relay serves. The shipped WatchdogSec=30s would make the
// test wait 30s for the timeout, so a drop-in shortens it to 4s: relay pings
// every 2s, which a loaded CI machine still keeps.
func TestSystemdRealWatchdogRestartsAFrozenRelay(t *testing.T) {
	c := bootSystemd(t)
	addr := "127.0.0.1:" + strconv.Itoa(freeLoopbackPort(t)) // systemd or relay binds it in the container, which shares our network namespace
	url := httpURL(addr)
	c.writeFile("/etc/systemd/system/relay.service", shippedService(t, addr))
	c.writeFile("/etc/systemd/system/relay.service.d/watchdog.conf", "[Service]\nWatchdogSec=4s\n")
	c.daemonReload()
	c.mustSystemctl("start", "relay.service")
	if w := c.show("relay.service", "WatchdogUSec"); w != "4s" {
		t.Fatalf("WatchdogUSec=%s, want the drop-in's 4s", w)
	}
	restarts := c.show("relay.service", "NRestarts")
	frozen := time.Now()
	es, _ := relayOutage(t, c, url, "Failed with result 'watchdog'", func(oldRelay int) {
		runIn(t, c, "kill", "-STOP", strconv.Itoa(oldRelay))
	})
	systemdSaid(t, es, frozen, "Watchdog timeout")
	if n := c.show("relay.service", "NRestarts"); n == restarts {
		t.Errorf("NRestarts=%s, unchanged: systemd did not restart relay", n)
	}
	newRelay := mainPID(t, c, "relay.service")
	pid := servedPID(t, url)
	if p := parentOf(t, c, pid); p != newRelay {
		t.Errorf("pid %d answered after the restart; its parent is %d, not the new MainPID %d", pid, p, newRelay)
	}
}
