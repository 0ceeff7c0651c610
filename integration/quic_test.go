package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/relaysh/relay/integration/h3load"
)

// freeDualPort returns a loopback port that is free for both TCP and UDP
// at the time of the call.
func freeDualPort(t testing.TB) int {
	t.Helper()
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		pc, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", port))
		l.Close()
		if err == nil {
			pc.Close()
			return port
		}
	}
	t.Fatal("no port free for both TCP and UDP on 127.0.0.1")
	return 0
}

// lineLog collects a program's stderr lines.
type lineLog struct {
	mu    sync.Mutex
	lines []string
}

func (l *lineLog) collect(r io.Reader) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		l.mu.Lock()
		l.lines = append(l.lines, sc.Text())
		l.mu.Unlock()
	}
}

func (l *lineLog) has(sub string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.lines {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

// count is how many lines hold sub.
func (l *lineLog) count(sub string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, s := range l.lines {
		if strings.Contains(s, sub) {
			n++
		}
	}
	return n
}

func (l *lineLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// getTCP does one HTTPS (HTTP/1.1) GET on a new connection to addr and
// returns the X-Pid and Alt-Svc headers.
func getTCP(addr string) (pid int, altSvc string, err error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableKeepAlives: true, Proxy: nil,
	}}
	resp, err := c.Get("https://" + addr + "/")
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	pid, err = strconv.Atoi(resp.Header.Get("X-Pid"))
	return pid, resp.Header.Get("Alt-Svc"), err
}

func logSummary(t *testing.T, what string, s h3load.Summary) {
	t.Helper()
	t.Logf("%s: %s", what, s)
	for _, c := range s.Conns {
		t.Logf("  %s", c)
	}
	for i, f := range s.Failures {
		if i == 10 {
			t.Logf("  ... %d more failures", len(s.Failures)-i)
			break
		}
		t.Logf("  failure: %s", f)
	}
}

// TestQUICServerAndLoad runs quicserver on its own, without relay, under
// h3load: no request fails and each long-lived connection is answered by
// the one server; then, on SIGTERM with a long-lived connection open, the
// request in flight is answered and the server exits within its grace.
// It proves the test tools, not relay.
func TestQUICServerAndLoad(t *testing.T) {
	port := freeDualPort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	const grace = 3 * time.Second
	cmd := exec.Command(built.quicserver, "-addr", addr, "-tcp", "-grace", grace.String())
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	var logs lineLog
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	collected := make(chan struct{})
	go func() { logs.collect(stderr); close(collected) }()
	exited := make(chan error, 1)
	var exitedAt time.Time
	go func() {
		<-collected
		err := cmd.Wait()
		exitedAt = time.Now()
		exited <- err
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		if t.Failed() {
			t.Logf("quicserver stderr:\n%s", logs.String())
		}
	})
	waitUntil(t, 10*time.Second, "quicserver listening", func() bool { return logs.has("msg=listening") })
	pid := cmd.Process.Pid

	if got, alt, err := getTCP(addr); err != nil || got != pid || alt != fmt.Sprintf(`h3=":%d"; ma=2592000`, port) {
		t.Errorf("HTTP/1.1 over TCP: pid %d, Alt-Svc %q, err %v; want pid %d", got, alt, err, pid)
	}

	ld := h3load.Start(h3load.Config{Addr: addr, Long: 4, Short: 2, Limit: time.Minute})
	waitUntil(t, 30*time.Second, "10 answers on each of 4 long-lived connections and 10 on new ones", func() bool {
		s := ld.Snapshot()
		busy := 0
		for _, c := range s.Conns {
			if c.Requests >= 10 {
				busy++
			}
		}
		return busy >= 4 && s.ShortRequests >= 10
	})
	sum := ld.Stop()
	logSummary(t, "load", sum)
	if sum.Requests == 0 || sum.Pids[pid] != sum.OK {
		t.Errorf("%d requests, answered by %v; want some, all by pid %d", sum.Requests, sum.Pids, pid)
	}
	for i, f := range sum.Failures {
		if i < 5 {
			t.Errorf("failed: %s", f)
		}
	}
	if n := len(sum.Failures); n > 0 {
		t.Errorf("%d of %d requests failed", n, sum.Requests)
	}
	if len(sum.Conns) < 4 {
		t.Errorf("%d long-lived connections, want 4", len(sum.Conns))
	}
	for _, c := range sum.Conns {
		if len(c.Pids) != 1 || c.Requests < 10 || c.End != "stop" {
			t.Errorf("long-lived %s; want one pid, many requests, open until the stop", c)
		}
	}

	// SIGTERM with a long-lived connection open and a request in flight.
	ld = h3load.Start(h3load.Config{Addr: addr, Path: "/slow?ms=300", Long: 1, Limit: time.Minute})
	// In flight at the server, not only sent: one more slow request
	// begun there than answered. (A request the server has not seen when
	// it stops is refused by its GOAWAY, and its retry finds no server.)
	waitUntil(t, 10*time.Second, "an answer on the long-lived connection, and the next request begun at the server", func() bool {
		s := ld.Snapshot()
		return s.OK > 0 && logs.count("msg=\"slow request begun\"") > s.OK
	})
	term := time.Now()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// The server's GOAWAY ends the long-lived connection once the
	// request in flight is answered.
	waitUntil(t, grace+2*time.Second, "the server to end the long-lived connection", func() bool {
		s := ld.Snapshot()
		return len(s.Conns) > 0 && s.Conns[0].End != ""
	})
	stopped := time.Now()
	sum = ld.Stop()
	logSummary(t, "load over the SIGTERM", sum)
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("quicserver: %v", err)
		}
	case <-time.After(grace + 2*time.Second):
		t.Fatalf("quicserver did not exit within %s of the load's stop", grace+2*time.Second)
	}
	t.Logf("quicserver exited %s after SIGTERM; the load was told to stop %s after SIGTERM",
		exitedAt.Sub(term).Round(time.Millisecond), stopped.Sub(term).Round(time.Millisecond))
	if d := exitedAt.Sub(term); d > grace+time.Second {
		t.Errorf("quicserver exited %s after SIGTERM, want within its grace %s", d, grace)
	}
	// It waited for the connection, not for the grace to run out: the
	// client closed it after the answer, as the GOAWAY asks.
	if !logs.has("msg=exiting") || logs.has("forced=true") {
		t.Errorf("quicserver did not end its shutdown before the grace ran out (forced=true)")
	}
	if n := sum.FailuresSentBefore(term); n > 0 {
		t.Errorf("%d requests sent before SIGTERM failed", n)
	}
	if len(sum.Conns) == 0 || sum.Conns[0].Requests < 2 || len(sum.Conns[0].Pids) != 1 || sum.Conns[0].End == "stop" {
		t.Errorf("long-lived connections %v; want the first answered by one pid until the server's GOAWAY", sum.Conns)
	}
	for _, want := range []string{"msg=started", "msg=\"shutdown begun\"", "msg=\"connections left\"", "msg=exiting"} {
		if !logs.has(want) {
			t.Errorf("no %s line on quicserver's stderr", want)
		}
	}
	t.Logf("quicserver stderr:\n%s", logs.String())
}

// findLogWhere returns the first log line for which pred holds, without
// waiting.
func (r *relayProc) findLogWhere(pred func(logLine) bool) (logLine, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, l := range r.logs {
		if pred(l) {
			return l, true
		}
	}
	return nil, false
}

// findLog returns the first log line from index from on with msg and gen,
// without waiting.
func (r *relayProc) findLog(from int, msg string, gen int) (logLine, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := from; i < len(r.logs); i++ {
		if r.logs[i].str("msg") == msg && r.logs[i].num("gen") == gen {
			return r.logs[i], true
		}
	}
	return nil, false
}

// quicRun is one run of quicRestarts: how relay is started and what it
// showed.
type quicRun struct {
	wrap     []string // runs relay through this launcher (setpriv)
	server   []string // quicserver's flags besides -addr, -tcp and -grace
	ownBind  bool     // quicserver binds the listeners' address itself
	restarts int
	// upgradeEvery: relay upgrade (in place, the same binary) before
	// every upgradeEvery-th restart; 0 for none.
	upgradeEvery int
	upgrades     int

	relay   *relayProc
	pids    []int // by generation - 1
	sum     h3load.Summary
	slow    h3load.Summary // the slow requests, one always in flight
	restart []quicRestart
}

// quicRestart is what one restart showed.
type quicRestart struct {
	code           int
	start          time.Time
	took           time.Duration // relay restart, run to exit
	readyAfter     time.Duration // new generation: started to ready, relay's log
	drained        time.Duration // old generation's drain, relay's log
	quicHandshakes int           // QUIC handshakes in progress that held the drain up, relay's log
	oldExit        time.Duration // old generation: stop signal to exit, relay's log
	forced         bool          // the old quicserver's grace ran out
}

// quicGrace is quicserver's grace under relay: the time it gives open
// connections after SIGTERM before it closes them.
const quicGrace = 3 * time.Second

// quicRestarts runs quicserver under relay on a TCP and a UDP listener of
// one port and restarts it q.restarts times under HTTP/3 load: 4
// long-lived connections each sending requests back to back, 2 workers
// opening a new connection per request, and one long-lived connection of
// slow requests (200 ms), one of which is in flight at every restart.
func quicRestarts(t *testing.T, q *quicRun) {
	port := freeDualPort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	args := append([]string{"--listen", addr, "--listen", "udp:" + addr, "--", built.quicserver}, q.server...)
	if q.ownBind {
		// The takeover lands the server's own binds on relay's sockets.
		args = append(args, "-addr", addr)
	}
	args = append(args, "-tcp", "-grace", quicGrace.String())
	r := startRelayWrapped(t, q.wrap, built.relay, nil, nil, args...)
	q.relay = r
	r.listenAddrs(2)
	ready, from := r.waitMsg(0, "generation ready", 1)
	q.pids = []int{ready.num("pid")}
	if got, _, err := getTCP(addr); err != nil || got != q.pids[0] {
		t.Errorf("HTTP/1.1 over the TCP listener: pid %d, err %v; want %d", got, err, q.pids[0])
	}

	ld := h3load.Start(h3load.Config{Addr: addr, Long: 4, Short: 2, Limit: 5 * time.Minute})
	defer ld.Stop()
	slow := h3load.Start(h3load.Config{Addr: addr, Path: "/slow?ms=200", Long: 1, Limit: 5 * time.Minute})
	defer slow.Stop()
	waitUntil(t, 10*time.Second, "generation 1 to answer 50 requests", func() bool { return ld.Snapshot().Pids[q.pids[0]] >= 50 })

	upFrom := 0 // where to look for the next upgrade's line
	for i := 1; i <= q.restarts; i++ {
		gen := i + 1
		if q.upgradeEvery > 0 && i%q.upgradeEvery == 0 {
			// relay replaces its own image under the load: the UDP
			// group's program, maps and sockets cross the exec.
			waitUntil(t, 10*time.Second, "a slow request in flight", func() bool { return slow.Snapshot().InFlight > 0 })
			if out, code := r.upgrade(""); code != 0 || !strings.Contains(out, "upgrade done") {
				t.Fatalf("relay upgrade before restart %d: exit %d:\n%s", i, code, out)
			}
			q.upgrades++
			_, upFrom = r.waitFor(upFrom, 30*time.Second, "relay upgraded in place", func(l logLine) bool {
				return l.str("msg") == "relay upgraded in place"
			})
			before := ld.Snapshot().Pids[q.pids[len(q.pids)-1]]
			waitUntil(t, 10*time.Second, "50 more answers after the upgrade", func() bool {
				return ld.Snapshot().Pids[q.pids[len(q.pids)-1]] >= before+50
			})
		}
		waitUntil(t, 10*time.Second, "a slow request in flight", func() bool { return slow.Snapshot().InFlight > 0 })
		f := quicRestart{start: time.Now()}
		out, errOut, code := r.client("restart")
		f.code, f.took = code, time.Since(f.start)
		if code != 0 {
			t.Errorf("restart %d: relay restart exit %d\nstdout: %s\nstderr: %s", i, code, strings.TrimSpace(out), strings.TrimSpace(errOut))
		}
		var l logLine
		l, from = r.waitMsg(from, "generation ready", gen)
		pid := l.num("pid")
		q.pids = append(q.pids, pid)
		if st, ok := r.findLog(0, "generation starting", gen); ok {
			f.readyAfter = logTime(t, l).Sub(logTime(t, st))
		}
		exitLine, _ := r.waitFor(0, quicGrace+30*time.Second, fmt.Sprintf("generation %d to exit", gen-1), func(l logLine) bool {
			return l.str("msg") == "old generation exited" && l.num("gen") == gen-1
		})
		if stop, ok := r.findLog(0, "stopping generation", gen-1); ok {
			f.oldExit = logTime(t, exitLine).Sub(logTime(t, stop))
		}
		if dr, ok := r.findLog(0, "old generation drained", gen-1); ok {
			f.drained = time.Duration(dr.num("drain"))
		}
		if w, ok := r.findLog(0, "connections still on their way to the old generation; its drain waits for them", gen-1); ok {
			f.quicHandshakes = w.num("quic_handshakes")
		}
		q.restart = append(q.restart, f)
		// The new generation serves before the next restart.
		if !eventually(10*time.Second, func() bool { return ld.Snapshot().Pids[pid] >= 50 }) {
			t.Errorf("restart %d: generation %d (pid %d) answered %d requests within 10 s, want 50", i, gen, pid, ld.Snapshot().Pids[pid])
		}
	}
	q.sum = ld.Stop()
	q.slow = slow.Stop()
	// Which old quicservers ran out of grace: their "exiting" line says.
	for _, line := range strings.Split(r.output(), "\n") {
		if !strings.Contains(line, "prog=quicserver") || !strings.Contains(line, "msg=exiting") {
			continue
		}
		for i := range q.restart {
			if strings.Contains(line, fmt.Sprintf("generation=%d ", i+1)) && strings.Contains(line, "forced=true") {
				q.restart[i].forced = true
			}
		}
	}

	t.Logf("generations' pids: %v", q.pids)
	for i, f := range q.restart {
		failed := 0
		for _, fl := range append(q.sum.Failures, q.slow.Failures...) {
			if !fl.Sent.Before(f.start) && (i+1 == len(q.restart) || fl.Sent.Before(q.restart[i+1].start)) {
				failed++
			}
		}
		t.Logf("restart %d: relay restart exit %d, took %s; new generation ready after %s; old generation drained in %s (waited for %d QUIC handshakes), exited %s after its stop signal (grace ran out: %v); %d requests sent from it to the next restart failed",
			i+1, f.code, f.took.Round(time.Millisecond), f.readyAfter.Round(time.Millisecond), f.drained, f.quicHandshakes, f.oldExit.Round(time.Millisecond), f.forced, failed)
	}
	logSummary(t, "HTTP/3 load", q.sum)
	logSummary(t, "slow requests", q.slow)
	ends := map[string]int{}
	for _, c := range q.sum.Conns {
		e, _, _ := strings.Cut(c.End, ":")
		ends[e]++
	}
	t.Logf("FIGURES: upgrades=%d restarts=%d requests=%d ok=%d failed=%d retried=%d slow-requests=%d slow-failed=%d slowest=%s long-lived-conns=%d conns-answered-by-more-than-one-pid=%d ended-by=%v short-requests=%d",
		q.upgrades, q.restarts, q.sum.Requests, q.sum.OK, len(q.sum.Failures), q.sum.Retried, q.slow.Requests, len(q.slow.Failures),
		q.sum.MaxLatency.Round(time.Millisecond), len(q.sum.Conns), len(q.sum.MultiPid()), ends, q.sum.ShortRequests)

	r.signal(syscall.SIGTERM)
	if code := r.wait(60 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
}

// TestQUICRestarts: quicserver (quic-go's http3) under relay with a TCP and
// a UDP --listen, binding its own port or taking the inherited sockets, 10
// restarts under HTTP/3 load, with two relay upgrades in place among them
// in the inherited run. relay steers the UDP listener by flow: no
// request fails, every long-lived connection is answered by the one
// generation that accepted it until the server's GOAWAY ends it, and
// every old generation ends its connections and exits within its grace
// rather than running out of it.
func TestQUICRestarts(t *testing.T) {
	needUDPSteering(t)
	for _, tc := range []struct {
		name    string
		server  []string
		ownBind bool
	}{
		{"own-bind", nil, true},
		{"inherited", []string{"-inherited", "-notify"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := &quicRun{server: tc.server, ownBind: tc.ownBind, restarts: 10}
			if !tc.ownBind {
				q.upgradeEvery = 4
			}
			quicRestarts(t, q)
			r := q.relay
			if l, ok := r.findLogWhere(func(l logLine) bool {
				return l.str("msg") == "listening" && l.str("network") == "udp"
			}); !ok || l.str("drain") != "steered" {
				t.Errorf("the UDP listener's line %v; want drain=steered", l)
			}
			if n := len(q.sum.Failures) + len(q.slow.Failures); n > 0 {
				t.Errorf("%d requests failed", n)
			}
			for _, c := range q.sum.MultiPid() {
				t.Errorf("long-lived %s: answered by more than one generation", c)
			}
			for _, c := range append(q.sum.Conns, q.slow.Conns...) {
				if c.Failures > 0 {
					t.Errorf("long-lived %s: failures", c)
				}
			}
			for i, f := range q.restart {
				if f.forced {
					t.Errorf("restart %d: the old generation ran out of its %s grace with connections open", i+1, quicGrace)
				}
			}
			for gen, pid := range q.pids {
				if q.sum.Pids[pid] == 0 {
					t.Errorf("generation %d (pid %d) answered nothing", gen+1, pid)
				}
			}
		})
	}
}

// TestQUICRestartsWithoutBPF is TestQUICRestarts with relay denied what
// eBPF steering needs (CAP_BPF and CAP_SYS_ADMIN dropped from its bounding
// set): one warning, and relay shares the UDP socket among generations, as
// it did before it could steer UDP. The test documents what that costs
// (its FIGURES line); it asserts only the warning and that relay serves.
func TestQUICRestartsWithoutBPF(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to drop capabilities from")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		requireOrSkip(t, false, fmt.Sprintf("no setpriv (util-linux) to drop capabilities with: %v", err))
	}
	// The server binds its own sockets, as caddy does.
	q := &quicRun{wrap: []string{setpriv, "--bounding-set=-bpf,-sys_admin", "--"}, ownBind: true, restarts: 10}
	quicRestarts(t, q)
	r := q.relay
	var warnings []logLine
	r.mu.Lock()
	for _, l := range r.logs {
		if strings.HasPrefix(l.str("msg"), "UDP steering unavailable") {
			warnings = append(warnings, l)
		}
	}
	r.mu.Unlock()
	if len(warnings) != 1 || warnings[0].str("level") != "WARN" || !strings.Contains(warnings[0].str("err"), "CAP_BPF") {
		t.Errorf("UDP steering warnings %v; want one WARN naming CAP_BPF", warnings)
	}
	if l, ok := r.findLogWhere(func(l logLine) bool {
		return l.str("msg") == "listening" && l.str("network") == "udp"
	}); !ok || l.str("drain") != "shared" {
		t.Errorf("the UDP listener's line %v; want drain=shared", l)
	}
	for gen, pid := range q.pids {
		if q.sum.Pids[pid] == 0 {
			t.Errorf("generation %d (pid %d) answered nothing", gen+1, pid)
		}
	}
}

// A server that binds its HTTP/3 UDP port itself beside the TCP port relay
// listens on (caddy does) gets one log line naming the --listen to add:
// without it, its UDP socket is its own and no restart keeps it.
func TestQUICUncoveredUDPPortIsNamed(t *testing.T) {
	port := freeDualPort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	r := startRelay(t, nil, "--listen", addr, "--", built.quicserver, "-addr", addr, "-tcp", "-grace", "1s")
	l, _ := r.waitFor(0, 30*time.Second, "the note of the uncovered UDP port", func(l logLine) bool {
		return strings.Contains(l.str("msg"), "which no --listen covers")
	})
	if !strings.Contains(l.str("msg"), "add --listen udp:"+addr) || l.str("level") != "WARN" || l.num("gen") != 1 {
		t.Errorf("note %v; want a WARN of generation 1 naming --listen udp:%s", l, addr)
	}
	r.waitMsg(0, "generation ready", 1)
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exited %d, want 0", code)
	}
}

// eventually reports whether cond held within timeout, checking as
// waitUntil does, without failing the test.
func eventually(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

// TestQUICReadinessProbe: a server that takes the inherited UDP socket and
// never speaks sd_notify is proven ready by a QUIC probe relay steers to
// its own socket. A new generation that reads the socket but does not
// speak QUIC (udpecho) is not ready, although the old generation would
// answer the same probe on the same address: the restart rolls back, with
// the reason, and the old generation serves on without a failed request.
func TestQUICReadinessProbe(t *testing.T) {
	needUDPSteering(t)
	port := freeDualPort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	// Generation 2 is the server that does not speak QUIC.
	script := fmt.Sprintf(`if [ "$RELAY_GENERATION" = 2 ]; then exec %s -inherited; fi; exec %s -inherited -grace 3s`, built.udpecho, built.quicserver)
	r := startRelay(t, nil, "--listen", "udp:"+addr, "--health-timeout", "3s", "--", "/bin/sh", "-c", script)
	r.listenAddrs(1)
	// The advice at start, logged after the listeners.
	r.waitFor(0, 10*time.Second, "the advice line on the QUIC probe", func(l logLine) bool {
		return strings.Contains(l.str("msg"), "relay sends a QUIC probe")
	})
	ready, from := r.waitMsg(0, "generation ready", 1)
	first := ready.num("pid")

	ld := h3load.Start(h3load.Config{Addr: addr, Long: 2, Short: 1, Limit: 2 * time.Minute})
	defer ld.Stop()
	waitUntil(t, 10*time.Second, "generation 1 to answer 20 requests", func() bool { return ld.Snapshot().Pids[first] >= 20 })

	out, errOut, code := r.client("restart")
	if code == 0 || !strings.Contains(out+errOut, "QUIC probe") {
		t.Errorf("restart to a server that does not speak QUIC: exit %d\nstdout: %s\nstderr: %s\nwant a failure naming the QUIC probe", code, out, errOut)
	}
	t.Logf("the restart to udpecho: exit %d: %s", code, strings.TrimSpace(out+errOut))
	l := restartUnderH3Load(t, r, ld, first, from, 3)
	sum := ld.Stop()
	logSummary(t, "HTTP/3 load", sum)
	if n := len(sum.Failures); n > 0 {
		t.Errorf("%d of %d requests failed", n, sum.Requests)
	}
	for _, c := range sum.MultiPid() {
		t.Errorf("long-lived %s: answered by more than one generation", c)
	}
	t.Logf("FIGURES: requests=%d failed=%d pids=%v generation 1 ready after %s, generation 3 after %s",
		sum.Requests, len(sum.Failures), sum.Pids, time.Duration(ready.num("ready_after")), time.Duration(l.num("ready_after")))
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
}

// With --steer on, a UDP listener relay cannot steer (no CAP_BPF) is an
// error at start, one line naming what is missing and the way out, and
// relay starts nothing.
func TestSteerOnRefusesUDPWithoutBPF(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to drop capabilities from")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		requireOrSkip(t, false, fmt.Sprintf("no setpriv (util-linux) to drop capabilities with: %v", err))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	mark := filepath.Join(t.TempDir(), "started")
	cmd := exec.CommandContext(ctx, setpriv, "--bounding-set=-bpf,-sys_admin", "--", built.relay, "run",
		"--control", filepath.Join(t.TempDir(), "ctl", "relay.sock"),
		"--steer", "on", "--listen", "udp:127.0.0.1:0", "--", built.testchild, "-report", mark)
	cmd.Env = append(os.Environ(), "LISTEN_FDS=", "LISTEN_PID=", "NOTIFY_SOCKET=")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	out := stderr.String()
	if code := cmd.ProcessState.ExitCode(); code == 0 {
		t.Errorf("relay run --steer on without CAP_BPF: exit 0 (%v), want an error", err)
	}
	last := strings.TrimSpace(out)
	if i := strings.LastIndexByte(last, '\n'); i >= 0 {
		last = last[i+1:]
	}
	for _, want := range []string{"relay: --steer on: UDP listeners cannot be steered", "CAP_BPF", "use --steer auto"} {
		if !strings.Contains(last, want) {
			t.Errorf("last line %q, want it to say %q\nstderr:\n%s", last, want, out)
		}
	}
	if _, err := os.Stat(mark); err == nil {
		t.Errorf("the child started")
	}
	t.Logf("relay said: %s", last)
}

// TestUpgradeFailureKeepsUDPSteering: a new relay image that fails after
// it has rebuilt the listeners (RELAY_TEST_FAIL_RESTORE=after-sockets)
// returns to the old one with every fd of the UDP group (its program, its
// maps, its sockets) still open: the old image serves on under HTTP/3
// load, and a restart after it steers as before, with no failed request.
func TestUpgradeFailureKeepsUDPSteering(t *testing.T) {
	needUDPSteering(t)
	other := relayOtherBuild(t)
	port := freeDualPort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	r := startRelay(t, []string{"RELAY_TEST_FAIL_RESTORE=after-sockets"}, "--listen", "udp:"+addr, "--",
		built.quicserver, "-inherited", "-notify", "-grace", "3s")
	r.listenAddrs(1)
	ready, from := r.waitMsg(0, "generation ready", 1)
	first := ready.num("pid")
	ld := h3load.Start(h3load.Config{Addr: addr, Long: 2, Short: 1, Limit: 2 * time.Minute})
	defer ld.Stop()
	waitUntil(t, 10*time.Second, "generation 1 to answer 20 requests", func() bool { return ld.Snapshot().Pids[first] >= 20 })

	out, code := r.upgrade(other)
	t.Logf("relay upgrade: exit %d:\n%s", code, strings.TrimSpace(out))
	if code != 3 || !strings.Contains(out, "could not take over") || !strings.Contains(out, "after the listeners") {
		t.Errorf("relay upgrade to an image that fails after the listeners: exit %d; want 3, saying it could not take over", code)
	}
	r.waitFor(0, 30*time.Second, "the way back", func(l logLine) bool {
		return l.str("msg") == "back on this relay: the new one could not take over"
	})
	restartUnderH3Load(t, r, ld, first, from, 2)
	r.waitFor(0, 30*time.Second, "generation 1 to exit", func(l logLine) bool {
		return l.str("msg") == "old generation exited" && l.num("gen") == 1
	})
	sum := ld.Stop()
	logSummary(t, "HTTP/3 load", sum)
	if n := len(sum.Failures); n > 0 {
		t.Errorf("%d of %d requests failed", n, sum.Requests)
	}
	for _, c := range sum.MultiPid() {
		t.Errorf("long-lived %s: answered by more than one generation", c)
	}
	t.Logf("FIGURES: requests=%d failed=%d pids=%v", sum.Requests, len(sum.Failures), sum.Pids)
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
}

// TestQUICReusedClientPort: a client that opens a new QUIC connection from
// the address and port of a connection it finished with the old generation
// (quic-go's Transport dialing twice from one socket, as a client or a NAT
// that reuses a port does) reaches the new generation, though the flow is
// seconds from idle and the old generation is stopping: it stopped
// accepting at its SIGTERM, and a slow request keeps it alive.
func TestQUICReusedClientPort(t *testing.T) {
	needUDPSteering(t)
	port := freeDualPort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	r := startRelay(t, nil, "--listen", "udp:"+addr, "--",
		built.quicserver, "-inherited", "-notify", "-grace", "20s")
	r.waitMsg(0, "generation ready", 1)

	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: conn}
	defer tr.Close()
	server := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}
	tlsc := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{http3.NextProtoH3}}
	var last time.Time // the previous connection's end
	get := func(what string) (int, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		qc, err := tr.Dial(ctx, server, tlsc, &quic.Config{HandshakeIdleTimeout: 3 * time.Second})
		if err != nil {
			return 0, fmt.Errorf("%s: dialing from %s: %w", what, conn.LocalAddr(), err)
		}
		defer func() {
			qc.CloseWithError(0, "")
			last = time.Now()
		}()
		return h3load.Get(ctx, (&http3.Transport{}).NewClientConn(qc), addr, "/")
	}
	first, err := get("the first connection")
	if err != nil {
		t.Fatal(err)
	}

	// A slow request keeps generation 1 alive after its SIGTERM.
	slow := h3load.Start(h3load.Config{Addr: addr, Path: "/slow?ms=5000", Long: 1, Timeout: 15 * time.Second, Limit: time.Minute})
	defer slow.Stop()
	waitUntil(t, 10*time.Second, "the slow request to begin at generation 1", func() bool {
		return strings.Contains(r.output(), "slow request begun")
	})
	// --at-switch: not waiting for generation 1 to exit.
	if out, errOut, code := r.client("restart", "--at-switch"); code != 0 {
		t.Fatalf("relay restart: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	ready, _ := r.waitMsg(0, "generation ready", 2)
	second := ready.num("pid")
	waitUntil(t, 10*time.Second, "generation 1 to begin its shutdown", func() bool {
		return strings.Contains(r.output(), "shutdown begun")
	})
	since := time.Since(last)
	pid, err := get("the connection from the same port after the restart")
	if err != nil {
		t.Fatalf("%v (generation 1, pid %d, is stopping; generation 2 is pid %d)", err, first, second)
	}
	if pid != second {
		t.Fatalf("the new connection from the same port was answered by pid %d, want generation 2's %d", pid, second)
	}
	t.Logf("a new connection from %s, %s after the last one ended there, was answered by generation 2 (pid %d) while generation 1 (pid %d) was stopping",
		conn.LocalAddr(), since.Round(time.Millisecond), second, first)
	if since >= 3*time.Second {
		t.Logf("the port was idle for 3 s or more: this run did not test the reuse of an active flow")
	}
}

// restartUnderH3Load waits until pid, serving, has answered 20 more of ld's
// requests, restarts relay, and returns generation gen's "generation ready"
// line (sought from line from) once gen has answered 20.
func restartUnderH3Load(t *testing.T, r *relayProc, ld *h3load.Load, pid, from, gen int) logLine {
	t.Helper()
	before := ld.Snapshot().Pids[pid]
	waitUntil(t, 10*time.Second, fmt.Sprintf("pid %d to answer 20 more requests", pid), func() bool { return ld.Snapshot().Pids[pid] >= before+20 })
	if out, errOut, code := r.client("restart"); code != 0 {
		t.Errorf("restart to generation %d: exit %d\nstdout: %s\nstderr: %s", gen, code, out, errOut)
	}
	l, _ := r.waitMsg(from, "generation ready", gen)
	next := l.num("pid")
	waitUntil(t, 10*time.Second, fmt.Sprintf("generation %d to answer 20 requests", gen), func() bool { return ld.Snapshot().Pids[next] >= 20 })
	return l
}
