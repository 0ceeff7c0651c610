package integration

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

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
	waitUntil(t, 10*time.Second, "an answer on the long-lived connection, and the next request in flight", func() bool {
		s := ld.Snapshot()
		return s.OK > 0 && s.InFlight > 0
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

// TestQUICRestartUnderRelayToday runs quicserver under relay on a TCP and a
// UDP listener of the same port and restarts it three times under HTTP/3
// load. relay shares the one UDP socket among the generations, so during a
// restart the old and the new generation read the same socket and each
// gets the other's packets; this test documents what that does to QUIC
// today. It logs the figures and asserts only that load ran and relay
// exits 0.
func TestQUICRestartUnderRelayToday(t *testing.T) {
	port := freeDualPort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	const grace = 3 * time.Second
	r := startRelay(t, nil, "--listen", addr, "--listen", "udp:"+addr,
		"--", built.quicserver, "-inherited", "-tcp", "-notify", "-grace", grace.String())
	r.listenAddrs(2)
	ready, from := r.waitMsg(0, "generation ready", 1)
	pids := []int{ready.num("pid")}
	if got, _, err := getTCP(addr); err != nil || got != pids[0] {
		t.Errorf("HTTP/1.1 over the TCP listener: pid %d, err %v; want %d", got, err, pids[0])
	}

	ld := h3load.Start(h3load.Config{Addr: addr, Long: 4, Short: 2, Limit: 3 * time.Minute})
	defer ld.Stop()
	waitUntil(t, 10*time.Second, "generation 1 to answer 50 requests", func() bool { return ld.Snapshot().Pids[pids[0]] >= 50 })

	type figures struct {
		code       int
		start      time.Time     // relay restart run
		took       time.Duration // relay restart, run to exit
		readyAfter time.Duration // new generation: started to ready, relay's log
		oldExit    time.Duration // old generation: stop signal to exit, relay's log
	}
	var rs []figures
	for i := 1; i <= 3; i++ {
		gen := i + 1
		start := time.Now()
		out, errOut, code := r.client("restart")
		f := figures{code: code, start: start, took: time.Since(start)}
		t.Logf("restart %d: relay restart exit %d\nstdout: %s\nstderr: %s", i, code, strings.TrimSpace(out), strings.TrimSpace(errOut))
		var l logLine
		l, from = r.waitMsg(from, "generation ready", gen)
		pid := l.num("pid")
		pids = append(pids, pid)
		if st, ok := r.findLog(0, "generation starting", gen); ok {
			f.readyAfter = logTime(t, l).Sub(logTime(t, st))
		}
		exitLine, _ := r.waitMsg(0, "old generation exited", gen-1)
		if stop, ok := r.findLog(0, "stopping generation", gen-1); ok {
			f.oldExit = logTime(t, exitLine).Sub(logTime(t, stop))
		}
		rs = append(rs, f)
		// Let the new generation serve 50 answers, if it does, before
		// the next restart.
		if !eventually(10*time.Second, func() bool { return ld.Snapshot().Pids[pid] >= 50 }) {
			t.Logf("restart %d: generation %d (pid %d) answered %d requests within 10 s", i, gen, pid, ld.Snapshot().Pids[pid])
		}
	}
	sum := ld.Stop()

	t.Logf("generations' pids: %v", pids)
	for i, f := range rs {
		// The failed requests sent from this restart to the next.
		failed := 0
		for _, fl := range sum.Failures {
			if !fl.Sent.Before(f.start) && (i+1 == len(rs) || fl.Sent.Before(rs[i+1].start)) {
				failed++
			}
		}
		t.Logf("restart %d: relay restart exit %d, took %s; new generation ready after %s; old generation exited %s after its stop signal; %d requests sent from it to the next restart failed",
			i+1, f.code, f.took.Round(time.Millisecond), f.readyAfter.Round(time.Millisecond), f.oldExit.Round(time.Millisecond), failed)
	}
	logSummary(t, "HTTP/3 load across 3 restarts", sum)
	multi := sum.MultiPid()
	t.Logf("FIGURES: requests=%d ok=%d failed=%d retried=%d slow(>%s)=%d slowest=%s long-lived-conns=%d conns-answered-by-more-than-one-pid=%d short-requests=%d pids=%v",
		sum.Requests, sum.OK, len(sum.Failures), sum.Retried, h3load.SlowAfter, sum.Slow, sum.MaxLatency.Round(time.Millisecond),
		len(sum.Conns), len(multi), sum.ShortRequests, sum.Pids)
	ends := map[string]int{}
	for _, c := range sum.Conns {
		e := c.End
		if i := strings.IndexAny(e, ":"); i >= 0 {
			e = e[:i]
		}
		ends[e]++
	}
	t.Logf("long-lived connections by how they ended: %v", ends)
	var quicLog []string
	for _, line := range strings.Split(r.output(), "\n") {
		if strings.Contains(line, "prog=quicserver") {
			quicLog = append(quicLog, line)
		}
	}
	t.Logf("quicserver's lines:\n%s", strings.Join(quicLog, "\n"))

	if sum.Requests == 0 {
		t.Errorf("no request was sent")
	}
	r.signal(syscall.SIGTERM)
	if code := r.wait(60 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
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
