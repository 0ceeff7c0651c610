package integration

import (
	"encoding/json"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The log lines of a liveness replacement.
const (
	msgLivenessFailed = "serving generation failed its liveness check; replacing it with a restart"
	msgPings          = "child pings its watchdog; relay replaces it if it stays silent for --child-watchdog once serving"
)

// livenessLoad is the load of these tests: workers each sending requests
// on a new connection, bounded in time.
const (
	livenessWorkers   = 4
	livenessLoadLimit = 90 * time.Second
)

// logTime is when relay wrote l.
func logTime(t *testing.T, l logLine) time.Time {
	t.Helper()
	at, err := time.Parse(time.RFC3339Nano, l.str("time"))
	if err != nil {
		t.Fatalf("log line %v: time: %v", l, err)
	}
	return at
}

// livenessReplacements reads liveness_replacements from relay status --json.
func (r *relayProc) livenessReplacements(t *testing.T) int {
	t.Helper()
	out, errOut, code := r.client("status", "--json")
	if code != 0 {
		t.Fatalf("relay status --json: exit %d\n%s%s", code, out, errOut)
	}
	var doc struct {
		Restarts map[string]any `json:"restarts"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("relay status --json is not JSON: %v\n%s", err, out)
	}
	n, ok := doc.Restarts["liveness_replacements"].(float64)
	if !ok {
		t.Fatalf("no liveness_replacements in %s", out)
	}
	return int(n)
}

// replacedInOrder checks, from relay's log, that generation 1 was
// replaced the graceful way: its failure, then a restart for it, then
// generation 2 ready (the switch), and only then generation 1's stop
// signal, any SIGKILL and its exit. It returns the switch's line.
func replacedInOrder(t *testing.T, r *relayProc) logLine {
	t.Helper()
	failed, iFailed := r.waitMsg(0, msgLivenessFailed, 1)
	_, iBegun := r.waitFor(0, 30*time.Second, "the liveness restart", func(l logLine) bool {
		return l.str("msg") == "restart begun" && l.str("reason") == "liveness failed"
	})
	ready, iReady := r.waitMsg(0, "generation ready", 2)
	_, iStop := r.waitMsg(0, "stopping generation", 1)
	_, iExit := r.waitMsg(0, "old generation exited", 1)
	t.Logf("generation 1 failed: %s", failed.str("err"))
	if !(iFailed < iBegun && iBegun < iReady && iReady < iStop && iStop < iExit) {
		t.Errorf("log order: failed #%d, restart begun #%d, gen 2 ready #%d, gen 1 stopping #%d, gen 1 exited #%d; want them in that order",
			iFailed, iBegun, iReady, iStop, iExit)
	}
	for _, l := range r.linesWhere(func(l logLine) bool { return l.num("gen") == 1 && strings.Contains(l.str("msg"), "killing") }) {
		if logTime(t, l).Before(logTime(t, ready)) {
			t.Errorf("generation 1 was killed (%q) before generation 2 served", l.str("msg"))
		}
	}
	return ready
}

// A serving child that stops accepting while under load, by SIGSTOP or by
// closing its listener, fails --liveness accept and is replaced by a
// normal restart: the new generation serves before the stuck one gets its
// stop signal (a stopped one its SIGKILL after --stop-timeout), and no
// request sent after the switch fails. Requests that the stuck child had
// accepted before it stopped may fail (it never answers them); those
// queued on its socket move to the new one when its socket closes
// (net.ipv4.tcp_migrate_req).
func TestLivenessReplacesAStuckChild(t *testing.T) {
	for _, c := range []struct {
		name  string
		flags []string
		stick syscall.Signal
	}{
		{"SIGSTOP", nil, syscall.SIGSTOP},
		{"closed listener", []string{"-close-listeners-on-usr1"}, syscall.SIGUSR1},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := startRelay(t, nil, append([]string{"--listen", "127.0.0.1:0", "--liveness", "accept",
				"--liveness-interval", "400ms", "--liveness-failures", "3", "--stop-timeout", "1s",
				"--", built.testchild}, c.flags...)...)
			url := httpURL(r.listenAddrs(1)[0].str("addr"))
			ready1, _ := r.waitMsg(0, "generation ready", 1)
			pid1 := ready1.num("pid")
			ld := startLoad(url, livenessWorkers, livenessLoadLimit)
			stopLoad := sync.OnceFunc(ld.stop)
			defer stopLoad()
			waitUntil(t, 30*time.Second, "generation 1 to answer", func() bool { n, _ := ld.served(pid1); return n > 0 })
			stuckAt := time.Now()
			if err := syscall.Kill(pid1, c.stick); err != nil {
				t.Fatal(err)
			}
			ready := replacedInOrder(t, r)
			pid2 := ready.num("pid")
			switchAt := logTime(t, ready)
			waitUntil(t, 30*time.Second, "generation 2 to answer", func() bool { n, _ := ld.served(pid2); return n > 0 })
			// Requests made after generation 1 is gone, then the load ends.
			n2, _ := ld.served(pid2)
			waitUntil(t, 30*time.Second, "more answers from generation 2", func() bool { n, _ := ld.served(pid2); return n >= n2+50 })
			stopLoad()

			requests, failures := ld.summary()
			ld.mu.Lock()
			sent := append([]time.Time(nil), ld.failSent...)
			ld.mu.Unlock()
			served1, _ := ld.served(pid1)
			served2, _ := ld.served(pid2)
			t.Logf("load: %d requests, %d failed, answered by %v: pid %d (gen 1) %d, pid %d (gen 2) %d; stuck %s before the switch",
				requests, len(failures), ld.answered(), pid1, served1, pid2, served2, switchAt.Sub(stuckAt).Round(time.Millisecond))
			for i, at := range sent {
				if !at.Before(switchAt) {
					t.Errorf("a request sent %s after the switch failed: %v", at.Sub(switchAt), failures[i])
				}
			}
			if len(failures) > livenessWorkers {
				t.Errorf("%d requests failed; want at most %d, those the stuck child had accepted: %v", len(failures), livenessWorkers, failures)
			}
			if got := ld.answered(); len(got) != 2 {
				t.Errorf("answered by %v, want pid %d then pid %d only", got, pid1, pid2)
			}
			if n := r.livenessReplacements(t); n != 1 {
				t.Errorf("liveness_replacements %d, want 1", n)
			}
			r.signal(syscall.SIGTERM)
			if code := r.wait(30 * time.Second); code != 0 {
				t.Errorf("relay exited %d, want 0", code)
			}
		})
	}
}

// A child that pings WATCHDOG=1 (it gets WATCHDOG_USEC and its own
// WATCHDOG_PID, or it exits) and then stops pinging is replaced the same
// way, with no request failing: it still serves until the new one does.
func TestChildWatchdogSilenceReplaces(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--child-watchdog", "1s", "--",
		built.testchild, "-watchdog")
	url := httpURL(r.listenAddrs(1)[0].str("addr"))
	ready1, _ := r.waitMsg(0, "generation ready", 1)
	pid1 := ready1.num("pid")
	r.waitMsg(0, msgPings, 1)
	ld := startLoad(url, livenessWorkers, livenessLoadLimit)
	stopLoad := sync.OnceFunc(ld.stop)
	defer stopLoad()
	waitUntil(t, 30*time.Second, "generation 1 to answer", func() bool { n, _ := ld.served(pid1); return n > 0 })
	silentAt := time.Now()
	if err := syscall.Kill(pid1, syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	r.waitRaw("testchild: watchdog stopped gen=1")
	ready := replacedInOrder(t, r)
	pid2 := ready.num("pid")
	failed, _ := r.waitMsg(0, msgLivenessFailed, 1)
	if !strings.Contains(failed.str("err"), "no WATCHDOG=1 for") {
		t.Errorf("generation 1 failed with %q, want its silence", failed.str("err"))
	}
	if at := logTime(t, failed); at.Before(silentAt) {
		t.Errorf("generation 1 was declared silent %s before it stopped pinging", silentAt.Sub(at))
	}
	r.waitMsg(0, msgPings, 2)
	n2, _ := ld.served(pid2)
	waitUntil(t, 30*time.Second, "more answers from generation 2", func() bool { n, _ := ld.served(pid2); return n >= n2+50 })
	stopLoad()
	requests, failures := ld.summary()
	served1, _ := ld.served(pid1)
	served2, _ := ld.served(pid2)
	t.Logf("load: %d requests, %d failed, answered by %v: pid %d (gen 1) %d, pid %d (gen 2) %d",
		requests, len(failures), ld.answered(), pid1, served1, pid2, served2)
	noFailures(t, failures, requests)
	if n := r.livenessReplacements(t); n != 1 {
		t.Errorf("liveness_replacements %d, want 1", n)
	}
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exited %d, want 0", code)
	}
}
