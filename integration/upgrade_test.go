package integration

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// relay upgrade: relay execs a new relay binary in place, and the server
// does not notice.

// relayOtherBuild builds relay a second time, as the README builds it (but
// with the test switches) and with its VCS stamp, so that it reports another version line than
// built.relay (built without one) where the tree is a git checkout.
func relayOtherBuild(tb testing.TB) string {
	tb.Helper()
	return otherBuild.build(tb, "relay-other", []string{"-buildvcs=auto", "-tags", "nethttpomithttp2,urfave_cli_no_docs,relaytest"}, "GOFLAGS=")
}

var otherBuild lazyBuild

// versionOf is what relay version prints for bin.
func versionOf(t *testing.T, bin string) string {
	t.Helper()
	out, err := exec.Command(bin, "version").Output()
	if err != nil {
		t.Fatalf("%s version: %v", bin, err)
	}
	return strings.TrimSpace(string(out))
}

// fdCount is the number of fds pid has open.
func fdCount(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// listeningOn counts the TCP sockets listening on port, from
// /proc/net/tcp and tcp6 (state 0A).
func listeningOn(t *testing.T, port int) int {
	t.Helper()
	n := 0
	hexPort := fmt.Sprintf(":%04X", port)
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fields := strings.Fields(line)
			if len(fields) > 3 && strings.HasSuffix(fields[1], hexPort) && fields[3] == "0A" {
				n++
			}
		}
	}
	return n
}

func keepAliveClient(workers int) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: workers}}
}

// upgrade runs relay upgrade with bin and returns its output and exit code.
func (r *relayProc) upgrade(bin string) (string, int) {
	r.t.Helper()
	args := []string{}
	if bin != "" {
		args = append(args, bin)
	}
	stdout, stderr, code := r.client("upgrade", args...)
	return stdout + stderr, code
}

// TestUpgradeInPlaceUnderLoad: 20 upgrades in a row, alternating two relay
// builds, under load on new connections and on kept-alive ones: no request
// fails, relay's pid and the serving child's stay the same, and relay's
// fds and the sockets listening on the port are back where they started.
func TestUpgradeInPlaceUnderLoad(t *testing.T) {
	other := relayOtherBuild(t)
	a, b := versionOf(t, built.relay), versionOf(t, other)
	t.Logf("builds: %q and %q", a, b)
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--", built.hello)
	addr := r.listenAddrs(1)[0].str("addr")
	ready, _ := r.waitMsg(0, "generation ready", 1)
	child := ready.num("pid")
	port, _ := strconv.Atoi(addr[strings.LastIndexByte(addr, ':')+1:])
	fdsBefore, listenBefore := fdCount(t, r.pid()), listeningOn(t, port)

	const workers = 4
	newConn := startLoad(httpURL(addr), workers, 5*time.Minute)
	kept := startLoadWith(keepAliveClient(workers), httpURL(addr), workers, 5*time.Minute)
	stopLoads := sync.OnceFunc(func() { newConn.stop(); kept.stop() })
	defer stopLoads()
	waitUntil(t, 30*time.Second, "the child to answer both loads", func() bool {
		n1, _ := newConn.served(child)
		n2, _ := kept.served(child)
		return n1 > 0 && n2 > 0
	})

	const upgrades = 20
	var maxGap time.Duration
	from := 0
	fdsFirst := 0
	for i := range upgrades {
		bin := built.relay
		if i%2 == 0 {
			bin = other
		}
		before, _ := newConn.served(child)
		out, code := r.upgrade(bin)
		if code != 0 || !strings.Contains(out, "upgrade done") {
			t.Fatalf("upgrade %d to %s: exit %d:\n%s", i+1, bin, code, out)
		}
		l, next := r.waitFor(from, 30*time.Second, "relay upgraded in place", func(l logLine) bool { return l.str("msg") == "relay upgraded in place" })
		from = next
		gap := time.Duration(l.num("gap")) // JSON logs durations in ns
		if gap <= 0 {
			t.Fatalf("upgrade %d: gap %q", i+1, l.str("gap"))
		}
		maxGap = max(maxGap, gap)
		if got, want := l.str("to"), versionOf(t, bin); got != want {
			t.Errorf("upgrade %d: the new relay says it is %q, want %q", i+1, got, want)
		}
		// The child goes on answering through it all.
		waitUntil(t, 30*time.Second, "the child to answer after the upgrade", func() bool { n, _ := newConn.served(child); return n > before })
		if i == 0 {
			fdsFirst = fdCount(t, r.pid())
		}
	}
	stopLoads()
	requests1, failures1 := newConn.summary()
	requests2, failures2 := kept.summary()
	noFailures(t, failures1, requests1)
	noFailures(t, failures2, requests2)
	t.Logf("%d upgrades: %d requests on new connections and %d kept alive, none failed; relay's longest gap %s",
		upgrades, requests1, requests2, maxGap)
	for _, ld := range []*load{newConn, kept} {
		ld.mu.Lock()
		for pid := range ld.pids {
			if pid != child {
				t.Errorf("pid %d answered: the serving child %d should have been the only one", pid, child)
			}
		}
		ld.mu.Unlock()
	}
	if n := r.count("generation starting"); n != 1 {
		t.Errorf("%d generations started, want 1: an upgrade must not restart the server", n)
	}
	// The first image may hold an fd or two that no later one needs (one
	// the start opened, an inherited one): no more than before, and none
	// more from one upgrade to the next.
	if got := fdCount(t, r.pid()); got > fdsBefore || got != fdsFirst {
		t.Errorf("relay has %d fds after %d upgrades, %d after the first, %d before", got, upgrades, fdsFirst, fdsBefore)
	}
	t.Logf("relay's fds: %d before, %d after the first upgrade, %d after the last", fdsBefore, fdsFirst, fdCount(t, r.pid()))
	if got := listeningOn(t, port); got != listenBefore {
		t.Errorf("%d sockets listen on port %d after the upgrades, %d before", got, port, listenBefore)
	}
	// relay status says which relay answers, and how often it upgraded.
	out, errOut, code := r.client("status", "--json")
	var doc struct {
		RelayVersion string `json:"relay_version"`
		Upgrades     int    `json:"upgrades"`
		LastUpgrade  string `json:"last_upgrade"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &doc) != nil {
		t.Fatalf("relay status --json: exit %d: %s%s", code, out, errOut)
	}
	if doc.Upgrades != upgrades || doc.RelayVersion != a || doc.LastUpgrade == "" {
		t.Errorf("status after %d upgrades: relay_version %q, upgrades %d, last_upgrade %q; want %q, %d", upgrades, doc.RelayVersion, doc.Upgrades, doc.LastUpgrade, a, upgrades)
	}
	// The relay that serves now restarts as ever.
	if out, errOut, code := r.client("restart"); code != 0 {
		t.Fatalf("restart after the upgrades: exit %d: %s%s", code, out, errOut)
	}
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exited %d, want 0", code)
	}
}

// TestUpgradeCarriesAStoppingGeneration: an upgrade while the old
// generation finishes a slow request after its stop signal: the request
// completes, and the new relay sees the old generation out.
func TestUpgradeCarriesAStoppingGeneration(t *testing.T) {
	// Every request takes 8s: the upgrade comes while generation 1
	// finishes one.
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--", built.hello, "-work", "8s")
	addr := r.listenAddrs(1)[0].str("addr")
	ready, from := r.waitMsg(0, "generation ready", 1)
	sent := make(chan struct{})
	type answer struct {
		pid int
		err error
	}
	answered := make(chan answer, 1)
	go func() {
		req, _ := http.NewRequest("GET", httpURL(addr), nil)
		req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
			WroteRequest: func(httptrace.WroteRequestInfo) { close(sent) },
		}))
		client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
		resp, err := client.Do(req)
		if err != nil {
			answered <- answer{err: err}
			return
		}
		resp.Body.Close()
		pid, _ := strconv.Atoi(resp.Header.Get("X-Pid"))
		answered <- answer{pid: pid}
	}()
	<-sent
	r.signal(syscall.SIGHUP)
	_, from = r.waitMsg(from, "stopping generation", 1)
	if out, code := r.upgrade(""); code != 0 {
		t.Fatalf("upgrade while generation 1 stops: exit %d:\n%s", code, out)
	}
	adopted, _ := r.waitFor(from, 30*time.Second, "generation 1 adopted", func(l logLine) bool {
		return l.str("msg") == "generation adopted" && l.num("gen") == 1
	})
	if adopted.str("state") != "stopping" {
		t.Errorf("generation 1 adopted %s, want stopping", adopted.str("state"))
	}
	_, from = r.waitFor(from, 30*time.Second, "relay upgraded in place", func(l logLine) bool { return l.str("msg") == "relay upgraded in place" })
	select {
	case a := <-answered:
		if a.err != nil || a.pid != ready.num("pid") {
			t.Fatalf("the slow request: pid %d, %v; want generation 1's (pid %d) answer", a.pid, a.err, ready.num("pid"))
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the slow request was never answered")
	}
	// The relay that took over sees generation 1 out.
	r.waitMsg(from, "old generation exited", 1)
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// TestUpgradeCarriesADrain: an upgrade during the drain of a shared
// socket (--steer off, where the drain lasts --drain): the new relay
// drains the old generation on and stops it at the window's end; no
// request fails.
func TestUpgradeCarriesADrain(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--steer", "off", "--drain", "4s", "--", built.hello)
	addr := r.listenAddrs(1)[0].str("addr")
	_, from := r.waitMsg(0, "generation ready", 1)
	ld := startLoad(httpURL(addr), 4, 2*time.Minute)
	stopLoad := sync.OnceFunc(ld.stop)
	defer stopLoad()
	r.signal(syscall.SIGHUP)
	_, from = r.waitMsg(from, "old generation draining", 1)
	if out, code := r.upgrade(""); code != 0 {
		t.Fatalf("upgrade during the drain: exit %d:\n%s", code, out)
	}
	l, from := r.waitMsg(from, "old generation draining on", 1)
	if l.num("left") <= 0 {
		t.Errorf("the drain goes on with %q left", l.str("left"))
	}
	_, from = r.waitFor(from, 30*time.Second, "relay upgraded in place", func(l logLine) bool { return l.str("msg") == "relay upgraded in place" })
	r.waitMsg(from, "stopping generation", 1)
	r.waitMsg(from, "old generation exited", 1)
	stopLoad()
	requests, failures := ld.summary()
	noFailures(t, failures, requests)
	if out, errOut, code := r.client("status"); code != 0 || !strings.Contains(out, "restarts: 1 ok") {
		t.Errorf("status after the carried restart: exit %d: %s%s", code, out, errOut)
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}
