package integration

import (
	"encoding/json"
	"strings"
	"syscall"
	"testing"
	"time"
)

// With --shutdown-delay, SIGTERM leaves everything serving: /readyz on the
// admin listener fails and relay status says the delay is on at once (while
// /healthz passes), a restart is refused, requests sent after the signal
// are answered by the serving generation, and relay's stop begins only
// after the load, playing a load balancer that let go of it during the
// delay, has ended. No request of the whole run fails.
func TestShutdownDelayServesOn(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--shutdown-delay", "2s",
		"--", built.hello, "-lame-duck", "500ms")
	addr := r.listenAddrs(1)[0].str("addr")
	a := newAdminClient(t, r)
	ready, from := r.waitMsg(0, "generation ready", 1)
	a.expect("/readyz", 200)
	pid := ready.num("pid")
	ld := startLoad(httpURL(addr), 4, time.Minute)
	waitUntil(t, 30*time.Second, "the generation to answer the load", func() bool { n, _ := ld.served(pid); return n > 0 })
	before, _ := ld.served(pid)
	sent := time.Now()
	r.signal(syscall.SIGTERM)
	_, from = r.waitFor(from, 30*time.Second, "the shutdown delay's line", func(l logLine) bool {
		return strings.HasPrefix(l.str("msg"), "shutdown delay: serving on until ")
	})
	a.expect("/readyz", 503)
	a.expect("/healthz", 200)
	out, errOut, code := r.client("status", "--json")
	var doc struct {
		Stopping   bool      `json:"stopping"`
		ShutdownAt time.Time `json:"shutdown_at"`
	}
	if err := json.Unmarshal([]byte(out), &doc); code != 0 || err != nil || doc.Stopping || doc.ShutdownAt.IsZero() {
		t.Errorf("relay status --json in the delay: exit %d, %+v (%v) %s; want shutdown_at set, not stopping", code, doc, err, errOut)
	}
	if out, errOut, code := r.client("restart"); code == 0 || !strings.Contains(out+errOut, "relay is stopping") {
		t.Errorf("relay restart in the delay: exit %d, %s%s; want it refused: relay is stopping", code, out, errOut)
	}
	// The load balancer lets go of relay during the delay, once it has
	// had 200 more answers after the signal.
	waitUntil(t, 30*time.Second, "200 answers after SIGTERM", func() bool {
		n, _ := ld.served(pid)
		return n >= before+200 && ld.lastSent(pid).After(sent)
	})
	ld.stop()
	during, _ := ld.served(pid)
	answeredAfter := ld.lastSent(pid).After(sent)
	loadEnded := time.Now()
	stopping, _ := r.waitMsg(from, "stopping", 0)
	if stopAt, err := time.Parse(time.RFC3339Nano, stopping.str("time")); err != nil || !stopAt.After(loadEnded) {
		t.Errorf("relay began its stop at %s (%v), before the load ended at %s: the delay did not last", stopping.str("time"), err, loadEnded)
	}
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("exit status %d, want hello's 0", code)
	}
	requests, failures := ld.summary()
	t.Logf("requests %d, failed %d; answered by generation 1 after SIGTERM: %d", requests, len(failures), during-before)
	if during <= before || !answeredAfter {
		t.Errorf("no request sent after SIGTERM was answered (%d before, %d after)", before, during)
	}
	noFailures(t, failures, requests)
}
