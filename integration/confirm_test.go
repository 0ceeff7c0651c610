package integration

import (
	"encoding/json"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The log lines of the confirmation window (relay run --confirm).
const (
	msgKeptWarm   = "old generation kept warm: no new connections and no stop signal until the new one is confirmed"
	msgRolledBack = "new generation rolled back after the switch: new connections go to the warm generation again"
	msgConfirmed  = "new generation confirmed"
)

// confirmWorkers is the load of these tests: clients each sending
// requests on a new connection.
const confirmWorkers = 4

// confirmRestart is what a relay restart run in the background printed.
type confirmRestart struct {
	out  string
	code int
	err  error
}

// restartInBackground runs relay restart with args against r, which
// waits through the window, and returns its outcome when it ends.
func restartInBackground(r *relayProc, args ...string) <-chan confirmRestart {
	c := make(chan confirmRestart, 1)
	go func() {
		stdout, stderr, code, err := relayCommand(r.control, "restart", args...)
		c <- confirmRestart{out: stdout + stderr, code: code, err: err}
	}()
	return c
}

// waitRestart waits for the outcome of a restart run in the background.
func waitRestart(t *testing.T, c <-chan confirmRestart) confirmRestart {
	t.Helper()
	select {
	case o := <-c:
		if o.err != nil {
			t.Fatalf("relay restart: %v", o.err)
		}
		return o
	case <-time.After(2 * time.Minute):
		t.Fatal("relay restart did not return within 2m")
	}
	return confirmRestart{}
}

// confirmSetup runs hello under relay with args before the "--", under
// new-connection load, and returns relay, the load and the first pid.
func confirmSetup(t *testing.T, args ...string) (*relayProc, *load, func(), int) {
	t.Helper()
	r := startRelay(t, nil, append(append([]string{"--listen", "127.0.0.1:0", "--stop-timeout", "10s"}, args...),
		"--", built.hello, "-lame-duck", "200ms")...)
	url := httpURL(r.listenAddrs(1)[0].str("addr"))
	ready, _ := r.waitMsg(0, "generation ready", 1)
	pid1 := ready.num("pid")
	ld := startLoad(url, confirmWorkers, 3*time.Minute)
	stopLoad := sync.OnceFunc(ld.stop)
	t.Cleanup(stopLoad)
	waitUntil(t, 30*time.Second, "generation 1 to answer", func() bool { n, _ := ld.served(pid1); return n > 0 })
	return r, ld, stopLoad, pid1
}

// moreAnswers waits until pid has answered n more requests.
func moreAnswers(t *testing.T, ld *load, pid, n int, what string) {
	t.Helper()
	before, _ := ld.served(pid)
	waitUntil(t, 60*time.Second, what, func() bool { got, _ := ld.served(pid); return got >= before+n })
}

// statusDoc reads relay status --json.
func (r *relayProc) statusJSON(t *testing.T) map[string]any {
	t.Helper()
	out, errOut, code := r.client("status", "--json")
	if code != 0 {
		t.Fatalf("relay status --json: exit %d\n%s%s", code, out, errOut)
	}
	var doc map[string]any
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("relay status --json is not JSON: %v\n%s", err, out)
	}
	return doc
}

// afterSwitch reads restarts.rolled_back_after_switch[cause] from relay
// status --json.
func (r *relayProc) afterSwitch(t *testing.T, cause string) int {
	t.Helper()
	restarts, _ := r.statusJSON(t)["restarts"].(map[string]any)
	counts, _ := restarts["rolled_back_after_switch"].(map[string]any)
	n, _ := counts[cause].(float64)
	return int(n)
}

// stopRelay stops r and checks that it exits 0.
func stopRelay(t *testing.T, r *relayProc) {
	t.Helper()
	r.signal(syscall.SIGTERM)
	if code := r.wait(60 * time.Second); code != 0 {
		t.Errorf("relay exited %d, want 0", code)
	}
}

// A new version that serves for 2 s and then exits 1 (hello -exit-after,
// which stops accepting and answers what it accepted before it exits, as
// a server that gives up does): with --confirm, new connections go back
// to the warm old generation once it exits; no request fails, and relay
// restart exits 3 with the reason. Without the window, the old generation
// was stopped long before: a cold start of the same version replaces it,
// and fails again. The figures of both are logged.
func TestConfirmRollsBackAVersionThatExits(t *testing.T) {
	bad := []string{"--", built.hello, "-lame-duck", "200ms", "-exit-after", "2s", "-exit-code", "1"}

	t.Run("window", func(t *testing.T) {
		r, ld, stopLoad, pid1 := confirmSetup(t, "--confirm", "10s")
		restarted := restartInBackground(r, bad...)
		ready, _ := r.waitMsg(0, "generation ready", 2)
		pid2 := ready.num("pid")
		r.waitMsg(0, msgKeptWarm, 1)
		waitUntil(t, 30*time.Second, "generation 2 to answer", func() bool { n, _ := ld.served(pid2); return n > 0 })
		back, _ := r.waitMsg(0, msgRolledBack, 2)
		if back.str("cause") != "exited" {
			t.Errorf("rolled back for %q, want exited: %v", back.str("cause"), back)
		}
		exitSeen := logTime(t, back)
		moreAnswers(t, ld, pid1, 100, "generation 1 to answer again")
		first, _ := ld.answeredAfter(pid1, exitSeen)
		res := waitRestart(t, restarted)
		stopLoad()

		requests, failures := ld.summary()
		served1, _ := ld.served(pid1)
		served2, _ := ld.served(pid2)
		t.Logf("FIGURES with --confirm 10s: generation 2 (pid %d) exited; generation 1 (pid %d) answered %s after relay saw the exit; "+
			"%d requests, %d failed; pid %d answered %d, pid %d answered %d",
			pid2, pid1, first.Sub(exitSeen).Round(time.Microsecond), requests, len(failures), pid1, served1, pid2, served2)
		noFailures(t, failures, requests)
		if res.code != 3 || !strings.Contains(res.out, "ROLLING BACK") || !strings.Contains(res.out, "restart rolled back: exited in the confirmation window: exit status 1") {
			t.Errorf("relay restart: exit %d, want 3 with the reason:\n%s", res.code, res.out)
		}
		if got := ld.answered(); len(got) != 2 {
			t.Errorf("answered by %v, want pid %d and pid %d only", got, pid1, pid2)
		}
		if n := r.afterSwitch(t, "exited"); n != 1 {
			t.Errorf("rolled_back_after_switch.exited %d, want 1", n)
		}
		if n := r.count("stopping generation"); n != 0 {
			t.Errorf("%d generations were told to stop; want none: generation 1 was warm, generation 2 exited by itself", n)
		}
		stopRelay(t, r)
	})

	t.Run("without window", func(t *testing.T) {
		r, ld, stopLoad, pid1 := confirmSetup(t)
		restarted := restartInBackground(r, bad...)
		ready, _ := r.waitMsg(0, "generation ready", 2)
		pid2 := ready.num("pid")
		res := waitRestart(t, restarted)
		if res.code != 0 {
			t.Fatalf("relay restart without a window: exit %d, want 0 (the switch and the drain went well):\n%s", res.code, res.out)
		}
		crashed, _ := r.waitMsg(0, "serving child exited on its own", 2)
		exitSeen := logTime(t, crashed)
		ready3, _ := r.waitMsg(0, "generation ready", 3)
		pid3 := ready3.num("pid")
		moreAnswers(t, ld, pid3, 100, "the cold replacement to answer")
		first, _ := ld.answeredAfter(pid3, exitSeen)
		stopLoad()

		requests, failures := ld.summary()
		served1, _ := ld.served(pid1)
		served2, _ := ld.served(pid2)
		served3, _ := ld.served(pid3)
		t.Logf("FIGURES without a window: generation 2 (pid %d) exited; the cold replacement, generation 3 (pid %d) of the same version, answered %s after relay saw the exit "+
			"(generation 1, pid %d, had been stopped); %d requests, %d failed; pid %d answered %d, pid %d %d, pid %d %d; generation 3 will exit too",
			pid2, pid3, first.Sub(exitSeen).Round(time.Microsecond), pid1, requests, len(failures), pid1, served1, pid2, served2, pid3, served3)
		for _, f := range failures {
			t.Logf("failed: %v", f)
		}
		stopRelay(t, r)
	})
}

// A new version that passes its readiness check but fails --liveness under
// traffic (hello -unhealthy-after): probed every tenth of the window, it is
// rolled back within the window, and no request fails.
func TestConfirmRollsBackOnLiveness(t *testing.T) {
	r, ld, stopLoad, pid1 := confirmSetup(t, "--confirm", "20s",
		"--liveness", "http://{health_addr}/healthz", "--liveness-interval", "30s", "--liveness-failures", "3")
	restarted := restartInBackground(r, "--", built.hello, "-lame-duck", "200ms", "-unhealthy-after", "1s")
	ready, _ := r.waitMsg(0, "generation ready", 2)
	pid2 := ready.num("pid")
	waitUntil(t, 30*time.Second, "generation 2 to answer", func() bool { n, _ := ld.served(pid2); return n > 0 })
	back, _ := r.waitMsg(0, msgRolledBack, 2)
	if back.str("cause") != "liveness" {
		t.Errorf("rolled back for %q, want liveness: %v", back.str("cause"), back)
	}
	res := waitRestart(t, restarted)
	r.waitMsg(0, "old generation exited", 2)
	moreAnswers(t, ld, pid1, 100, "generation 1 to answer again")
	stopLoad()

	requests, failures := ld.summary()
	t.Logf("load: %d requests, %d failed, answered by %v; rolled back %.0f ms after the switch: %s",
		requests, len(failures), ld.answered(), float64(back.num("after_switch"))/1e6, back.str("reason"))
	noFailures(t, failures, requests)
	if res.code != 3 || !strings.Contains(res.out, "restart rolled back: 3 liveness checks failed in a row") {
		t.Errorf("relay restart: exit %d, want 3 with the reason:\n%s", res.code, res.out)
	}
	// Probed every 2s (a tenth of 20s), not every 30s: three failures
	// fit in the window.
	if after := time.Duration(back.num("after_switch")); after >= 20*time.Second {
		t.Errorf("rolled back %s after the switch, after the window", after)
	}
	if n := r.afterSwitch(t, "liveness"); n != 1 {
		t.Errorf("rolled_back_after_switch.liveness %d, want 1", n)
	}
	stopRelay(t, r)
}

// relay rollback by hand, after a restart --at-switch returned: traffic
// goes back to the warm generation with no request failing, the new one
// drains and stops, and a second relay rollback finds nothing warm.
func TestConfirmRollbackByHand(t *testing.T) {
	r, ld, stopLoad, pid1 := confirmSetup(t, "--confirm", "5m")
	res := waitRestart(t, restartInBackground(r, "--at-switch"))
	if res.code != 0 || !strings.Contains(res.out, "ready after") || !strings.Contains(res.out, "not waiting for the rest (--at-switch)") {
		t.Fatalf("relay restart --at-switch: exit %d, want 0 at the switch:\n%s", res.code, res.out)
	}
	ready, _ := r.waitMsg(0, "generation ready", 2)
	pid2 := ready.num("pid")
	waitUntil(t, 30*time.Second, "generation 2 to answer", func() bool { n, _ := ld.served(pid2); return n > 0 })
	moreAnswers(t, ld, pid2, 50, "generation 2 to serve a while")

	st := r.statusJSON(t)
	confirm, _ := st["confirm"].(map[string]any)
	if confirm == nil || int(confirm["generation"].(float64)) != 2 || int(confirm["warm_pid"].(float64)) != pid1 {
		t.Errorf("relay status --json during the window: confirm %v, want generation 2 on trial and pid %d warm", confirm, pid1)
	}
	text, _, _ := r.client("status")
	if !strings.Contains(text, "CONFIRMING generation 2") {
		t.Errorf("relay status during the window says nothing of it:\n%s", text)
	}

	out, errOut, code := r.client("rollback")
	if code != 0 || !strings.Contains(out, "rolled back: generation 1") {
		t.Fatalf("relay rollback: exit %d, want 0:\n%s%s", code, out, errOut)
	}
	back, _ := r.waitMsg(0, msgRolledBack, 2)
	moreAnswers(t, ld, pid1, 100, "generation 1 to answer again")
	r.waitMsg(0, "old generation exited", 2)
	stopLoad()

	requests, failures := ld.summary()
	first, _ := ld.answeredAfter(pid1, logTime(t, back))
	t.Logf("load: %d requests, %d failed, answered by %v; generation 1 answered %s after the rollback's log line",
		requests, len(failures), ld.answered(), first.Sub(logTime(t, back)).Round(time.Microsecond))
	noFailures(t, failures, requests)
	if back.str("cause") != "manual" {
		t.Errorf("rolled back for %q, want manual", back.str("cause"))
	}
	if n := r.afterSwitch(t, "manual"); n != 1 {
		t.Errorf("rolled_back_after_switch.manual %d, want 1", n)
	}
	out, errOut, code = r.client("rollback")
	if code != 3 || !strings.Contains(errOut, "nothing warm to go back to") {
		t.Errorf("a second relay rollback: exit %d, want 3 saying nothing is warm:\n%s%s", code, out, errOut)
	}
	stopRelay(t, r)
}

// A window that ends quietly: the old generation gets no stop signal
// before it ends, then drains and stops as without a window; no request
// fails and relay restart exits 0.
func TestConfirmWindowEndsQuietly(t *testing.T) {
	r, ld, stopLoad, pid1 := confirmSetup(t, "--confirm", "3s")
	restarted := restartInBackground(r)
	ready, _ := r.waitMsg(0, "generation ready", 2)
	pid2 := ready.num("pid")
	res := waitRestart(t, restarted)
	stopping, iStop := r.waitMsg(0, "stopping generation", 1)
	confirmed, iConfirmed := r.waitMsg(0, msgConfirmed, 2)
	r.waitMsg(0, "old generation exited", 1)
	moreAnswers(t, ld, pid2, 50, "generation 2 to serve on")
	stopLoad()

	requests, failures := ld.summary()
	t.Logf("load: %d requests, %d failed, answered by %v; generation 1 told to stop %s after the switch",
		requests, len(failures), ld.answered(), logTime(t, stopping).Sub(logTime(t, ready)).Round(time.Millisecond))
	noFailures(t, failures, requests)
	if res.code != 0 || !strings.Contains(res.out, "confirmed: nothing failed in") || !strings.Contains(res.out, "restart done") {
		t.Errorf("relay restart: exit %d, want 0 once confirmed:\n%s", res.code, res.out)
	}
	if iStop < iConfirmed || confirmed.str("ended") != "window" {
		t.Errorf("generation 1 (pid %d) was told to stop (#%d) before generation 2 was confirmed (#%d, ended %q)",
			pid1, iStop, iConfirmed, confirmed.str("ended"))
	}
	stopRelay(t, r)
}
