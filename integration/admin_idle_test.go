package integration

import (
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/relaysh/relay/internal/procfs"
)

// adminConnsMax is the admin listener's cap on open connections
// (internal/admin's maxConns), which it keeps at any RLIMIT_NOFILE of 1024
// or more; relay here has at least the 10,100 this test needs.
const adminConnsMax = 64

// adminEvictLog is relay's rate-limited line about admin connections
// closed for the cap.
const adminEvictLog = "admin connections closed to make room: the longest idle for new ones, new ones while none was idle"

// Ten thousand idle TCP connections to relay's admin listener take neither
// its fds nor its memory: relay keeps at most adminConnsMax of them open
// (the one idle longest makes room for a new one), and while all ten
// thousand are still open on the client's side, /metrics and /healthz
// answer and so does relay status.
//
// relay is the build without -race, as the README builds it: a -race
// binary's memory is mostly the race detector's, not relay's.
//
// The bounds: relay's fds, at most before + 2 x adminConnsMax + 8 at any
// sample (a connection keeps its place until its goroutine has closed it,
// and the listener holds at most twice the cap), and before + adminConnsMax
// + 8 once the accepts are over; its RssAnon, at most before + 20 MiB. Each
// idle connection held open would cost relay some 8 KiB of stack and 4 KiB
// of buffer at least, so 10,000 of them would be 100 MiB and more (77 MB
// was measured before the cap), and anything relay kept per connection, 2
// KiB or more, would break the bound; what is left is the churn of 10,000
// accepts that the garbage collector reclaims and 64 connections' buffers.
func TestAdminBesideTenThousandIdleConnections(t *testing.T) {
	const idle = 10000
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	if rl.Max < idle+100 {
		t.Skipf("this test holds %d connections and needs %d open files; the hard RLIMIT_NOFILE is %d: raise it (ulimit -Hn, LimitNOFILE=)", idle, idle+100, rl.Max)
	}
	if rl.Cur < rl.Max {
		old := rl.Cur
		rl.Cur = rl.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			rl.Cur = old
			syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl)
		})
	}

	r := startRelayBin(t, relayNoRace(t), nil, nil, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--", built.hello)
	r.listenAddrs(1)
	r.waitMsg(0, "generation ready", 1)
	a := newAdminClient(t, r)
	addr := strings.TrimPrefix(a.base, "http://")
	pid := r.pid()
	// A few scrapes first: the first ones allocate what every later one
	// reuses, which is not what the connections cost.
	for range 3 {
		if code, _ := a.get("/metrics"); code != 200 {
			t.Fatalf("GET /metrics: %d", code)
		}
	}
	fdsBefore, anonBefore := fdCount(t, pid), rssAnonKB(t, pid)
	peakBound, settledBound := fdsBefore+2*adminConnsMax+8, fdsBefore+adminConnsMax+8

	conns := make([]net.Conn, 0, idle)
	closeAll := func() {
		for _, c := range conns {
			c.Close()
		}
		conns = conns[:0]
	}
	defer closeAll()
	start := time.Now()
	peak := fdsBefore
	for len(conns) < idle {
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			t.Fatalf("idle connection %d: %v", len(conns), err)
		}
		conns = append(conns, c)
		if len(conns)%250 == 0 {
			n := fdCount(t, pid)
			peak = max(peak, n)
			if n > peakBound {
				t.Fatalf("relay has %d fds open with %d idle admin connections, more than %d (%d before, cap %d)", n, len(conns), peakBound, fdsBefore, adminConnsMax)
			}
		}
		if time.Since(start) > 2*time.Minute {
			t.Fatalf("opening %d connections took over 2 minutes; %d open", idle, len(conns))
		}
	}
	t.Logf("opened %d idle connections in %s; relay's fds peaked at %d or more", idle, time.Since(start).Round(time.Millisecond), peak)
	var fdsDuring int
	waitUntil(t, 10*time.Second, fmt.Sprintf("relay's fds to settle at %d or fewer", settledBound), func() bool {
		fdsDuring = fdCount(t, pid)
		return fdsDuring <= settledBound
	})

	// With all of them still open on this side.
	code, body := a.get("/metrics")
	if code != 200 || !strings.Contains(body, "relay_restarts_total") {
		t.Errorf("GET /metrics beside %d idle connections: %d, relay_restarts_total %v", idle, code, strings.Contains(body, "relay_restarts_total"))
	}
	a.expect("/healthz", 200)
	if out, stderr, code := r.client("status"); code != 0 || !strings.Contains(out, "serving") {
		t.Errorf("relay status beside %d idle connections: exit %d, %q %q", idle, code, out, stderr)
	}
	anonDuring := rssAnonKB(t, pid)
	if fds := fdCount(t, pid); fds > settledBound {
		t.Errorf("relay has %d fds open after the requests, more than %d", fds, settledBound)
	}
	if anonDuring > anonBefore+20<<10 {
		t.Errorf("relay's RssAnon is %d kB beside %d idle connections, %d kB before: more than 20 MiB more", anonDuring, idle, anonBefore)
	}
	r.waitMsg(0, adminEvictLog, 0)
	// One line for the first eviction, then at most one every 10 s.
	if n, most := r.count(adminEvictLog), 2+int(time.Since(start)/(10*time.Second)); n > most {
		t.Errorf("%d log lines about closed admin connections in %s, want %d at most", n, time.Since(start).Round(time.Second), most)
	}
	if strings.Contains(r.output(), "Accept error") {
		t.Errorf("the admin listener failed to accept:\n%s", r.output())
	}
	if len(conns) != idle {
		t.Fatalf("%d connections open, want %d", len(conns), idle)
	}

	closeAll()
	var fdsAfter int
	waitUntil(t, 10*time.Second, "relay's fds to go back to where they were", func() bool {
		fdsAfter = fdCount(t, pid)
		return fdsAfter <= fdsBefore+8
	})
	anonAfter := rssAnonKB(t, pid)
	t.Logf("FIGURES admin idle: fds before %d, with %d idle conns %d, RssAnon before %.1f MiB, during %.1f MiB, after close %.1f MiB",
		fdsBefore, idle, fdsDuring, mib(anonBefore), mib(anonDuring), mib(anonAfter))
	if out, stderr, code := r.client("stop"); code != 0 {
		t.Errorf("relay stop: exit %d, %q %q", code, out, stderr)
	}
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
}

// rssAnonKB is pid's resident anonymous memory, in kB.
func rssAnonKB(t *testing.T, pid int) int64 {
	t.Helper()
	st, err := procfs.ReadStatus(pid)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := st.Int("RssAnon")
	if err != nil {
		t.Fatal(err)
	}
	return kb
}

func mib(kb int64) float64 { return float64(kb) / 1024 }
