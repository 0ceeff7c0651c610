// Package h3load is an HTTP/3 load generator for the integration tests:
// Long connections that each carry requests back to back for the whole
// run (one quic-go http3.ClientConn, an http.RoundTripper bound to one QUIC
// connection), plus Short workers that each open a new QUIC connection per
// request. It counts, per QUIC connection, the requests, the failures and
// the pids that answered (the X-Pid header), so that a test can check that
// no request failed and that every long-lived connection was served to
// its end by the pid that accepted it.
//
// Retries follow quic-go's own http3.Transport, which retries a request
// once on a new connection when it was certainly not processed: when the
// connection could not take a new request stream (after the server's
// GOAWAY, or once the connection is gone), or when the server reset the
// stream with H3_REQUEST_REJECTED. Such a request is counted once, by the
// outcome of its retry; the retry is counted in Summary.Retried and the
// connection it left ends with that reason. Any other error is a failure.
//
// Everything is bounded: each request (dial included) by Config.Timeout,
// the whole run by Config.Limit. Stop sends no new request and lets those
// in flight finish, each within its Timeout, so that they are counted and
// no dial is abandoned half-way (a QUIC client that abandons its
// handshake sends no CONNECTION_CLOSE, and the server would keep the
// connection until its idle timeout); then it closes the connections.
package h3load

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// Config is a load's shape.
type Config struct {
	Addr  string // the server's UDP address, HOST:PORT
	Path  string // the request path; default "/"
	Long  int    // long-lived connections (K)
	Short int    // workers that open a new connection per request (M)
	// Timeout bounds each request, its dial included; default 5 s.
	Timeout time.Duration
	// Limit ends the load on its own after this long; default 2 min.
	Limit time.Duration
	// MaxConsecutiveFailures: a long-lived connection is abandoned (and
	// a new one dialled) after this many failed requests in a row on it;
	// default 2. A connection that is closed is left at once.
	MaxConsecutiveFailures int
}

// Failure is one failed request.
type Failure struct {
	Slot   int    // the long-lived slot, or -1 for a short worker's request
	ConnID int    // the connection it was sent on (Conns[i].ID), 0 if none was made
	Local  string // the client's UDP address, if a connection was made
	Sent   time.Time
	Failed time.Time
	Err    string
}

func (f Failure) String() string {
	return fmt.Sprintf("slot %d conn %d from %s sent %s failed after %s: %s", f.Slot, f.ConnID, f.Local,
		f.Sent.Format("15:04:05.000"), f.Failed.Sub(f.Sent).Round(time.Millisecond), f.Err)
}

// Conn is one QUIC connection of a long-lived slot.
type Conn struct {
	ID       int
	Slot     int
	Local    string
	Opened   time.Time
	Ended    time.Time // zero while open
	End      string    // why it ended: "stop", "goaway", "rejected", "unusable: ...", "abandoned: ...", "closed: ..."
	Requests int       // requests that got an answer or failed on it
	Failures int
	// MaxLatency is the longest a request on it took to be answered.
	MaxLatency time.Duration
	Pids       map[int]int // pid -> answers
	FirstPid   int         // the pid of the first answer: the one that accepted it
	LastPid    int
}

// PidList returns the pids that answered on c, in increasing order.
func (c Conn) PidList() []int {
	var out []int
	for p := range c.Pids {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

func (c Conn) String() string {
	end := c.End
	if end == "" {
		end = "open"
	}
	return fmt.Sprintf("conn %d (slot %d, %s): %d requests, %d failed, pids %v, first %d, slowest %s, %s after %s",
		c.ID, c.Slot, c.Local, c.Requests, c.Failures, c.PidList(), c.FirstPid, c.MaxLatency.Round(time.Millisecond),
		end, c.duration().Round(time.Millisecond))
}

func (c Conn) duration() time.Duration {
	if c.Ended.IsZero() {
		return time.Since(c.Opened)
	}
	return c.Ended.Sub(c.Opened)
}

// Summary is what a load saw.
type Summary struct {
	Elapsed       time.Duration
	Requests      int // answered or failed, retries counted once
	OK            int
	Retried       int           // requests retried once on a new connection (see the package doc)
	MaxLatency    time.Duration // the longest an answered request took, its retry included
	Slow          int           // answered requests that took more than SlowAfter
	Failures      []Failure
	Conns         []Conn      // the long-lived slots' connections, in the order they were opened
	ShortRequests int         // of Requests, those of the short workers
	ShortPids     map[int]int // pid -> answers, short workers
	Pids          map[int]int // pid -> answers, all
	InFlight      int         // requests sent and not yet answered or failed
}

// MultiPid returns the long-lived connections that more than one pid
// answered on.
func (s Summary) MultiPid() []Conn {
	var out []Conn
	for _, c := range s.Conns {
		if len(c.Pids) > 1 {
			out = append(out, c)
		}
	}
	return out
}

// FailuresSentBefore counts the failed requests sent before t.
func (s Summary) FailuresSentBefore(t time.Time) int {
	n := 0
	for _, f := range s.Failures {
		if f.Sent.Before(t) {
			n++
		}
	}
	return n
}

func (s Summary) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d requests in %s (%d ok, %d failed, %d retried, %d slower than %s, slowest %s), short %d, pids %v",
		s.Requests, s.Elapsed.Round(time.Millisecond), s.OK, len(s.Failures), s.Retried, s.Slow, SlowAfter,
		s.MaxLatency.Round(time.Millisecond), s.ShortRequests, s.Pids)
	return b.String()
}

// SlowAfter is the latency over which an answered request counts as slow.
const SlowAfter = time.Second

// Load is a running load.
type Load struct {
	cfg    Config
	tlsc   *tls.Config
	quicc  *quic.Config
	h3     *http3.Transport
	start  time.Time
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	sum      Summary
	conns    []*Conn
	nextConn int
	stopped  bool
	final    Summary
}

// Start starts the load. It returns at once; the connections are dialled
// by the workers.
func Start(cfg Config) *Load {
	if cfg.Path == "" {
		cfg.Path = "/"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.Limit <= 0 {
		cfg.Limit = 2 * time.Minute
	}
	if cfg.MaxConsecutiveFailures <= 0 {
		cfg.MaxConsecutiveFailures = 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.Limit)
	l := &Load{
		cfg:    cfg,
		tlsc:   &tls.Config{InsecureSkipVerify: true, NextProtos: []string{http3.NextProtoH3}},
		quicc:  &quic.Config{HandshakeIdleTimeout: cfg.Timeout, MaxIdleTimeout: 30 * time.Second, KeepAlivePeriod: 5 * time.Second},
		h3:     &http3.Transport{},
		start:  time.Now(),
		ctx:    ctx,
		cancel: cancel,
	}
	l.sum.ShortPids = map[int]int{}
	l.sum.Pids = map[int]int{}
	for i := range cfg.Long {
		l.wg.Go(func() { l.longSlot(i) })
	}
	for range cfg.Short {
		l.wg.Go(l.shortWorker)
	}
	return l
}

// Stop ends the load: it sends no new request, waits for those in flight
// (each bounded by Config.Timeout, twice with its retry), closes the
// connections and returns the summary. Later calls return the same.
func (l *Load) Stop() Summary {
	l.cancel()
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.stopped {
		l.stopped = true
		l.final = l.snapshotLocked()
	}
	return l.final
}

// Snapshot returns the figures so far, while the load runs.
func (l *Load) Snapshot() Summary {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		return l.final
	}
	return l.snapshotLocked()
}

func (l *Load) snapshotLocked() Summary {
	s := l.sum
	s.Elapsed = time.Since(l.start)
	s.Failures = slices.Clone(l.sum.Failures)
	s.ShortPids = cloneMap(l.sum.ShortPids)
	s.Pids = cloneMap(l.sum.Pids)
	s.Conns = make([]Conn, len(l.conns))
	for i, c := range l.conns {
		s.Conns[i] = *c
		s.Conns[i].Pids = cloneMap(c.Pids)
	}
	return s
}

func cloneMap(m map[int]int) map[int]int {
	out := make(map[int]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// live is a long-lived slot's current connection.
type live struct {
	rec  *Conn
	qc   *quic.Conn
	cc   *http3.ClientConn
	fail int // consecutive failures
}

func (l *Load) dial(ctx context.Context) (*quic.Conn, *http3.ClientConn, error) {
	qc, err := quic.DialAddr(ctx, l.cfg.Addr, l.tlsc, l.quicc)
	if err != nil {
		return nil, nil, err
	}
	return qc, l.h3.NewClientConn(qc), nil
}

// longSlot keeps one long-lived connection busy with requests back to
// back, dialling a new one when the current one ends.
func (l *Load) longSlot(slot int) {
	var cur *live
	defer func() {
		if cur != nil {
			l.endConn(cur, "stop")
		}
	}()
	for l.ctx.Err() == nil {
		sent := time.Now()
		retried := false
		for {
			// Not l.ctx: Stop lets the request finish (see the package doc).
			rctx, cancel := context.WithTimeout(context.Background(), l.cfg.Timeout)
			var pid int
			var err error
			if cur == nil {
				var qc *quic.Conn
				var cc *http3.ClientConn
				qc, cc, err = l.dial(rctx)
				if err == nil {
					cur = &live{qc: qc, cc: cc, rec: l.newConn(slot, qc.LocalAddr().String())}
				}
			}
			if err == nil {
				pid, err = l.do(rctx, cur.cc)
			}
			cancel()
			if err == nil {
				cur.fail = 0
				l.answered(cur.rec, pid, time.Since(sent))
				break
			}
			if reason, ok := retryable(err); ok && cur != nil && !retried {
				// Not processed by the server: once more, on a new connection.
				l.endConn(cur, reason)
				cur = nil
				retried = true
				l.mu.Lock()
				l.sum.Retried++
				l.mu.Unlock()
				continue
			}
			var rec *Conn
			local := ""
			if cur != nil {
				rec, local = cur.rec, cur.rec.Local
				cur.fail++
			}
			l.failed(slot, rec, local, sent, err)
			if cur != nil {
				if cerr := context.Cause(cur.qc.Context()); cerr != nil {
					l.endConn(cur, "closed: "+cerr.Error())
					cur = nil
				} else if cur.fail >= l.cfg.MaxConsecutiveFailures {
					l.endConn(cur, fmt.Sprintf("abandoned: %d failures in a row", cur.fail))
					cur = nil
				}
			}
			pause(l.ctx, 20*time.Millisecond)
			break
		}
	}
}

// shortWorker sends requests, each on a new QUIC connection.
func (l *Load) shortWorker() {
	for l.ctx.Err() == nil {
		sent := time.Now()
		var err error
		var pid int
		local := ""
		for attempt := 0; attempt < 2; attempt++ {
			rctx, cancel := context.WithTimeout(context.Background(), l.cfg.Timeout)
			qc, cc, derr := l.dial(rctx)
			if derr != nil {
				err = derr
			} else {
				local = qc.LocalAddr().String()
				pid, err = l.do(rctx, cc)
				qc.CloseWithError(0, "")
			}
			cancel()
			if _, ok := retryable(err); err == nil || !ok || attempt == 1 {
				break
			}
			l.mu.Lock()
			l.sum.Retried++
			l.mu.Unlock()
		}
		if err == nil {
			l.answered(nil, pid, time.Since(sent))
			continue
		}
		l.failed(-1, nil, local, sent, err)
		pause(l.ctx, 20*time.Millisecond)
	}
}

// do sends one GET on cc and returns the pid that answered.
func (l *Load) do(ctx context.Context, cc *http3.ClientConn) (int, error) {
	l.mu.Lock()
	l.sum.InFlight++
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		l.sum.InFlight--
		l.mu.Unlock()
	}()
	return Get(ctx, cc, l.cfg.Addr, l.cfg.Path)
}

// Get sends GET path to addr on cc, reads the answer, and returns the pid
// that answered it (X-Pid); an answer other than 200 is an error.
func Get(ctx context.Context, cc *http3.ClientConn, addr, path string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+addr+path, nil)
	if err != nil {
		return 0, err
	}
	resp, err := cc.RoundTrip(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, fmt.Errorf("reading body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("status %s: %q", resp.Status, body)
	}
	pid, err := strconv.Atoi(resp.Header.Get("X-Pid"))
	if err != nil {
		return 0, fmt.Errorf("X-Pid %q: %w", resp.Header.Get("X-Pid"), err)
	}
	return pid, nil
}

// retryable tells whether err says the request was certainly not
// processed, as quic-go's http3.Transport decides its one retry, and why.
func retryable(err error) (string, bool) {
	if err == nil {
		return "", false
	}
	var h3err *http3.Error
	if errors.As(err, &h3err) && h3err.ErrorCode == http3.ErrCodeRequestRejected {
		return "rejected", true
	}
	// http3.ClientConn returns an unexported errConnUnusable ("http3: conn
	// unusable: ...") when it could not open the request stream: after a
	// GOAWAY ("connection in graceful shutdown"), or on a closed
	// connection. Its text is all there is to tell it by.
	if msg := err.Error(); strings.HasPrefix(msg, "http3: conn unusable: ") {
		if strings.Contains(msg, "graceful shutdown") {
			return "goaway", true
		}
		return "unusable: " + strings.TrimPrefix(msg, "http3: conn unusable: "), true
	}
	return "", false
}

func (l *Load) newConn(slot int, local string) *Conn {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.nextConn++
	c := &Conn{ID: l.nextConn, Slot: slot, Local: local, Opened: time.Now(), Pids: map[int]int{}}
	l.conns = append(l.conns, c)
	return c
}

func (l *Load) endConn(cur *live, reason string) {
	cur.qc.CloseWithError(0, "")
	l.mu.Lock()
	defer l.mu.Unlock()
	if cur.rec.Ended.IsZero() {
		cur.rec.Ended = time.Now()
		cur.rec.End = reason
	}
}

func (l *Load) answered(rec *Conn, pid int, took time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sum.Requests++
	l.sum.OK++
	l.sum.Pids[pid]++
	l.sum.MaxLatency = max(l.sum.MaxLatency, took)
	if took > SlowAfter {
		l.sum.Slow++
	}
	if rec == nil {
		l.sum.ShortRequests++
		l.sum.ShortPids[pid]++
		return
	}
	rec.Requests++
	rec.MaxLatency = max(rec.MaxLatency, took)
	if rec.FirstPid == 0 {
		rec.FirstPid = pid
	}
	rec.LastPid = pid
	rec.Pids[pid]++
}

func (l *Load) failed(slot int, rec *Conn, local string, sent time.Time, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sum.Requests++
	f := Failure{Slot: slot, Local: local, Sent: sent, Failed: time.Now(), Err: err.Error()}
	if rec != nil {
		f.ConnID = rec.ID
		rec.Requests++
		rec.Failures++
	}
	if slot < 0 {
		l.sum.ShortRequests++
	}
	l.sum.Failures = append(l.sum.Failures, f)
}

func pause(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}
