package admin

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/fdlimit"
)

// waitFor polls cond until it holds, for 10s at most.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after 10s waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// startLimited runs a Server capped at maxConns connections (0: the
// default) until the test ends, with src's status waited for up to 30s,
// its log in logs and the rate limit on the clock clk (nil: time.Now).
func startLimited(t *testing.T, src StatusSource, maxConns int, logs io.Writer, clk *fakeClock) *Server {
	t.Helper()
	if logs == nil {
		logs = io.Discard
	}
	s, err := Listen("127.0.0.1:0", Options{Status: src, Build: testBuild, StatusTimeout: 30 * time.Second,
		Log: slog.New(slog.NewTextHandler(logs, nil)), maxConns: maxConns})
	if err != nil {
		t.Fatal(err)
	}
	if clk != nil {
		s.limit.now = clk.now // before Serve: no accept reads it yet
	}
	serveUntilClosed(t, s)
	return s
}

// holdStatus makes src's Status wait until the returned release is called,
// or the test ends: a request that asks for it stays busy meanwhile.
func holdStatus(t *testing.T, src *fakeSource) (release func()) {
	t.Helper()
	hold := make(chan struct{})
	src.mu.Lock()
	src.hold = hold
	src.mu.Unlock()
	var once sync.Once
	release = func() {
		once.Do(func() {
			src.mu.Lock()
			src.hold = nil
			src.mu.Unlock()
			close(hold)
		})
	}
	t.Cleanup(release) // before the Server's Close, which waits for requests
	return release
}

// client is a raw connection to the admin listener.
type client struct {
	net.Conn
	r *bufio.Reader
}

func dial(t *testing.T, s *Server) *client {
	t.Helper()
	c, err := net.DialTimeout("tcp", s.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &client{Conn: c, r: bufio.NewReader(c)}
}

// send writes a keep-alive GET of path.
func (c *client) send(t *testing.T, path string) {
	t.Helper()
	c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: admin\r\n\r\n", path); err != nil {
		t.Fatalf("sending GET %s: %v", path, err)
	}
}

// answer reads the answer to a request sent, within 10s, and returns its
// status code.
func (c *client) answer(t *testing.T) int {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil {
		t.Fatalf("reading an answer on %s: %v", c.LocalAddr(), err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// closedByServer reports whether the server closed c, waiting 10s at most;
// c must have no answer pending.
func (c *client) closedByServer() bool {
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := c.r.ReadByte()
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
}

func (c *client) addr() string { return c.LocalAddr().String() }

// busy waits until the server answers c's request: it no longer waits for
// one.
func busy(t *testing.T, s *Server, c *client, open int) {
	t.Helper()
	waitFor(t, c.addr()+" to be answered", func() bool { return s.limit.snapshot().Open == open && !s.limit.isWaiting(c.addr()) })
}

// Past the cap, a new connection evicts the one that has waited longest
// for a request (a connection that sent none, or one idle between
// keep-alive requests, in the order they began to wait), never one whose
// request is being answered; with every connection busy, a new one is
// closed at once. The busy ones get their answers.
func TestEvictsTheLongestWaitingNeverABusyOne(t *testing.T) {
	src := &fakeSource{}
	src.set(serving(), nil)
	s := startLimited(t, src, 3, nil, nil)
	release := holdStatus(t, src)

	answering := dial(t, s)
	answering.send(t, "/healthz") // waits for the held status
	busy(t, s, answering, 1)
	// kept connects before fresh, but is used after it: it waits behind.
	kept := dial(t, s)
	fresh := dial(t, s)
	waitFor(t, "3 connections", func() bool { return s.limit.snapshot().Open == 3 })
	kept.send(t, "/nothing") // answered without the status
	if code := kept.answer(t); code != 404 {
		t.Fatalf("GET /nothing: %d, want 404", code)
	}
	waitFor(t, "kept to be idle", func() bool { return s.limit.isWaiting(kept.addr()) })

	newcomer := dial(t, s)
	if !fresh.closedByServer() {
		t.Fatalf("the connection that never sent a request was not evicted")
	}
	waitFor(t, "newcomer to be counted", func() bool { return s.limit.isWaiting(newcomer.addr()) })
	if st := s.limit.snapshot(); st.Open != 3 || st.Evicted != 1 || st.Refused != 0 {
		t.Errorf("after the first eviction: %+v, want 3 open, 1 evicted", st)
	}
	if !s.limit.isWaiting(kept.addr()) {
		t.Errorf("the idle keep-alive connection was evicted before the older one that never sent a request")
	}

	second := dial(t, s)
	if !kept.closedByServer() {
		t.Fatalf("the idle keep-alive connection, the longest waiting, was not evicted")
	}
	waitFor(t, "second to be counted", func() bool { return s.limit.isWaiting(second.addr()) })
	if !s.limit.isWaiting(newcomer.addr()) {
		t.Errorf("the newer connection was evicted too")
	}

	// Every connection busy: a new one is refused.
	newcomer.send(t, "/healthz")
	busy(t, s, newcomer, 3)
	second.send(t, "/readyz")
	busy(t, s, second, 3)
	refused := dial(t, s)
	if !refused.closedByServer() {
		t.Fatalf("a connection past the cap, with all busy, was not closed")
	}
	waitFor(t, "the refusal to be counted", func() bool { return s.limit.snapshot().Refused == 1 })
	if st := s.limit.snapshot(); st.Open != 3 || st.Evicted != 2 || st.Peak != 3 {
		t.Errorf("after the refusal: %+v, want 3 open, 2 evicted, a peak of 3", st)
	}

	release()
	for _, c := range []*client{answering, newcomer, second} {
		if code := c.answer(t); code != 200 {
			t.Errorf("the busy connection %s: %d, want 200", c.addr(), code)
		}
	}
	// Answered, they wait again, in the order they began to: answering,
	// then the two that sent another request, and can be evicted.
	waitFor(t, "the first answered connection to wait", func() bool { return s.limit.isWaiting(answering.addr()) })
	for _, c := range []*client{newcomer, second} {
		c.send(t, "/nothing")
		if code := c.answer(t); code != 404 {
			t.Fatalf("GET /nothing: %d", code)
		}
	}
	waitFor(t, "the answered connections to wait", func() bool {
		return s.limit.isWaiting(newcomer.addr()) && s.limit.isWaiting(second.addr())
	})
	dial(t, s)
	if !answering.closedByServer() {
		t.Errorf("the connection idle longest was not evicted once answered")
	}
	if !s.limit.isWaiting(newcomer.addr()) || !s.limit.isWaiting(second.addr()) {
		t.Errorf("a connection idle for less time was evicted")
	}
}

// openFDs counts this process's open fds.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// Far more idle connections than the cap, some that never sent a request,
// some idle after one: the connections open never exceed the cap, the fds
// the server holds never twice the cap and, once the accepts are over,
// never the cap (counted by the server, and in /proc/self/fd); and
// /metrics, /healthz and /readyz answer all along. Once the clients close,
// the server holds nothing. With the test's cap of 8 and with the default
// one.
func TestConnectionCapHolds(t *testing.T) {
	for _, c := range []struct {
		name      string
		maxConns  int
		idle      int
		wantLimit int
	}{
		{"cap 8", 8, 400, 8},
		{"default cap", 0, 2000, connsLimit(fdlimit.Soft())},
	} {
		t.Run(c.name, func(t *testing.T) {
			var rl unix.Rlimit
			if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
				t.Fatal(err)
			}
			if rl.Cur < uint64(c.idle+256) {
				t.Skipf("RLIMIT_NOFILE is %d, %d needed", rl.Cur, c.idle+256)
			}
			src := &fakeSource{}
			src.set(serving(), nil)
			before := openFDs(t)
			s := startLimited(t, src, c.maxConns, nil, nil)
			if s.limit.max != c.wantLimit {
				t.Fatalf("the cap is %d, want %d", s.limit.max, c.wantLimit)
			}
			// The listener's own fd, and what its poller may add.
			const margin = 4
			check := func(when string, settled bool) {
				t.Helper()
				st := s.limit.snapshot()
				if st.Open > c.wantLimit || st.Peak > c.wantLimit || st.Held > 2*c.wantLimit {
					t.Fatalf("%s: %+v: over the cap of %d", when, st, c.wantLimit)
				}
				if settled && st.Held > c.wantLimit {
					t.Fatalf("%s: %+v: the server holds more than %d", when, st, c.wantLimit)
				}
			}
			conns := make([]*client, 0, c.idle)
			for i := range c.idle {
				cl := dial(t, s)
				if i%10 == 0 {
					// Idle after a request, rather than never sending one.
					cl.send(t, "/nothing")
					if code := cl.answer(t); code != 404 {
						t.Fatalf("GET /nothing: %d", code)
					}
				}
				conns = append(conns, cl)
				check(fmt.Sprintf("after %d connections", i+1), false)
				if i%100 == 99 {
					if code, _ := getCode(t, "GET", "http://"+s.Addr().String()+"/healthz"); code != 200 {
						t.Fatalf("GET /healthz beside %d idle connections: %d", i+1, code)
					}
				}
			}
			waitFor(t, "the evicted connections' fds to be closed", func() bool {
				st := s.limit.snapshot()
				return st.Held == st.Open
			})
			check("with all connected", true)
			// The clients' fds, and the server's: the cap, the listener.
			if n, most := openFDs(t)-before, c.idle+c.wantLimit+margin; n > most {
				t.Errorf("%d fds more than before beside %d idle connections, want %d at most", n, c.idle, most)
			}
			base := "http://" + s.Addr().String()
			for _, path := range []string{"/metrics", "/healthz", "/readyz"} {
				if code, body := getCode(t, "GET", base+path); code != 200 {
					t.Errorf("GET %s beside %d idle connections: %d %q", path, c.idle, code, body)
				}
			}
			check("after the requests", false)
			if st := s.limit.snapshot(); st.Evicted < c.idle-c.wantLimit || st.Refused != 0 {
				t.Errorf("%+v: want %d evicted at least, none refused", st, c.idle-c.wantLimit)
			}

			for _, cl := range conns {
				cl.Close()
			}
			waitFor(t, "the server to let go of every connection", func() bool {
				st := s.limit.snapshot()
				return st.Open == 0 && st.Held == 0
			})
			if n := openFDs(t) - before; n > margin {
				t.Errorf("%d fds more than before the server once every client closed", n)
			}
		})
	}
}

// fakeClock is a clock a test moves.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// syncBuffer is a log written by the server's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// lines are the log lines about connections closed for the cap.
func (b *syncBuffer) lines() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for _, l := range strings.Split(b.b.String(), "\n") {
		if strings.Contains(l, "admin connections closed to make room") {
			out = append(out, l)
		}
	}
	return out
}

// The connections closed for the cap are logged for the first, then at
// most every 10s, with the counts since the last line: evicted, and
// refused while none waited.
func TestEvictionLogIsRateLimited(t *testing.T) {
	src := &fakeSource{}
	src.set(serving(), nil)
	var logs syncBuffer
	clk := &fakeClock{t: time.Unix(1700000000, 0)}
	s := startLimited(t, src, 2, &logs, clk)
	release := holdStatus(t, src)

	evictions := func(n int) {
		t.Helper()
		waitFor(t, fmt.Sprintf("%d evictions", n), func() bool { return s.limit.snapshot().Evicted == n })
	}
	expectLines := func(when string, want ...string) {
		t.Helper()
		lines := logs.lines()
		if len(lines) != len(want) {
			t.Fatalf("%s: %d log lines %q, want %d", when, len(lines), lines, len(want))
		}
		for i, w := range want {
			if !strings.Contains(lines[i], w) {
				t.Errorf("%s: line %d %q, want %q in it", when, i+1, lines[i], w)
			}
		}
	}
	first := "evicted=1 refused=0 connections_max=2"
	dial(t, s)
	dial(t, s)
	dial(t, s)
	evictions(1)
	expectLines("after the first eviction", first)
	for range 3 {
		dial(t, s)
	}
	evictions(4)
	clk.advance(9 * time.Second)
	dial(t, s)
	evictions(5)
	expectLines("within 10s of the first line", first)

	clk.advance(time.Second)
	a, b := dial(t, s), dial(t, s) // two more evictions: the second is logged
	evictions(7)
	second := "evicted=5 refused=0"
	expectLines("10s after the first line", first, second)

	// Both busy: new connections are refused, and counted on the next
	// line.
	a.send(t, "/healthz")
	busy(t, s, a, 2)
	b.send(t, "/healthz")
	busy(t, s, b, 2)
	for i := range 3 {
		if c := dial(t, s); !c.closedByServer() {
			t.Fatalf("refused connection %d was not closed", i+1)
		}
	}
	waitFor(t, "3 refusals", func() bool { return s.limit.snapshot().Refused == 3 })
	expectLines("after refusals within 10s", first, second)
	clk.advance(10 * time.Second)
	if c := dial(t, s); !c.closedByServer() {
		t.Fatalf("a refused connection was not closed")
	}
	waitFor(t, "4 refusals", func() bool { return s.limit.snapshot().Refused == 4 })
	expectLines("10s later", first, second, "evicted=1 refused=4")
	release()
}

// The cap shrinks with a small RLIMIT_NOFILE, as the control socket's do,
// and is never below 4.
func TestConnsLimit(t *testing.T) {
	for _, c := range []struct {
		nofile uint64
		want   int
	}{{16, 4}, {64, 4}, {256, 16}, {1000, 62}, {1024, 64}, {1 << 20, 64}} {
		if got := connsLimit(c.nofile); got != c.want {
			t.Errorf("connsLimit(%d) = %d, want %d", c.nofile, got, c.want)
		}
	}
}
