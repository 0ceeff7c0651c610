package admin

import (
	"container/list"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"
)

// The admin listener's cap on open connections. Whoever can reach the
// port can connect, and each connection net/http serves holds an fd and
// a goroutine with its buffers until a timeout ends it: ten thousand idle
// ones held 10,017 fds and 77 MB, and at relay's fd limit even the control
// socket's accept failed. So, as the control socket does (control/server.go),
// the listener keeps few open: one more takes the place of the one that
// has waited longest for a request, and idle connections, however many,
// never keep a probe or a scrape out.

const (
	// maxConns bounds the admin connections open at once. A probe or a
	// scrape needs one for a moment, a scraper that keeps its connection
	// one for good: a few, never 64.
	maxConns = 64
	// evictLogEvery spaces the log lines about connections closed for the
	// cap: one for the first, then one at most this often with the count.
	evictLogEvery = 10 * time.Second
)

// connsLimit is the cap for a process that may have nofile fds open: at
// most a sixteenth of them, as the control socket's connections being
// read, so that a flood of clients leaves relay the fds it needs to accept
// control connections and to start generations. The listener holds up to
// twice as many fds (connLimit.places).
func connsLimit(nofile uint64) int {
	return int(min(max(nofile/16, 4), maxConns))
}

// connLimit caps a Server's open connections, at accept: past the cap, a
// new connection evicts the one that has waited longest for a request, in
// net/http's StateNew (its request's headers have not all come) or
// StateIdle (between keep-alive requests), and is closed at once if every
// one is being answered (StateActive), which the write timeout ends. It
// is the listener's wrapper (listener) and the http.Server's ConnState
// hook (track), which says which connections wait; one connLimit serves
// the Server across Pause and Resume.
type connLimit struct {
	max int
	log *slog.Logger
	now func() time.Time // time.Now, or a test's clock
	// places holds one for each connection from its accept until net/http
	// has closed it (StateClosed): twice max, so that evicted connections
	// whose goroutines have not let go of their fds yet cannot pile fds
	// up. With none free, accepts wait, and new connections in the
	// socket's backlog, which holds no fd of relay's.
	places chan struct{}

	mu sync.Mutex
	// open counts the connections accepted and neither evicted nor
	// closed yet; waiting holds those of them that wait for a request
	// (*limitedConn), the longest waiting first; held counts the
	// connections that hold a place, the open and the evicted not closed
	// yet.
	open, held int
	waiting    list.List
	// evicted and refused count the connections closed for the cap and
	// not logged yet, since lastLog: idle ones for new ones, and new ones
	// while none was idle.
	evicted, refused int
	lastLog          time.Time
	// stats is for the tests: the totals and the most open at once.
	stats connStats
}

// connStats are what a connLimit did so far.
type connStats struct {
	// Open are the connections counted against the cap now, Peak the
	// most at once; Held, the connections whose fds are open: Open and
	// those evicted that net/http has not closed yet.
	Open, Peak, Held int
	// Evicted and Refused count the connections closed for the cap.
	Evicted, Refused int
}

func newConnLimit(n int, log *slog.Logger) *connLimit {
	return &connLimit{max: n, log: log, now: time.Now, places: make(chan struct{}, 2*n)}
}

// limitedConn is a connection of a connLimit's.
type limitedConn struct {
	net.Conn
	l *connLimit
	// Under l.mu: elem is its element in l.waiting while it waits for a
	// request, nil while it is answered; gone is set once it no longer
	// counts in l.open (evicted or closed); placed, while it holds a
	// place.
	elem   *list.Element
	gone   bool
	placed bool
}

// limitedListener is a Server's listener with its connLimit.
type limitedListener struct {
	net.Listener
	l         *connLimit
	done      chan struct{} // closed by Close: ends a wait for a place
	closeOnce sync.Once
}

// listener wraps ln, the listener of one http.Server whose ConnState is
// l.track.
func (l *connLimit) listener(ln net.Listener) net.Listener {
	return &limitedListener{Listener: ln, l: l, done: make(chan struct{})}
}

func (ln *limitedListener) Close() error {
	ln.closeOnce.Do(func() { close(ln.done) })
	return ln.Listener.Close()
}

// Accept returns the next connection within the cap; the ones it refuses
// it closes, and waits for the next.
func (ln *limitedListener) Accept() (net.Conn, error) {
	for {
		select {
		case ln.l.places <- struct{}{}:
		case <-ln.done:
			return nil, net.ErrClosed
		}
		c, err := ln.Listener.Accept()
		if err != nil {
			<-ln.l.places
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Free what relay can; net/http retries after a pause
				// (the error is temporary), as the connection waits in
				// the backlog.
				ln.l.evictOldest()
			}
			return nil, err
		}
		if lc := ln.l.admit(c); lc != nil {
			return lc, nil
		}
	}
}

// admit counts c against the cap, evicting the connection that has waited
// longest for a request if it is reached; if none waits, it closes c and
// returns nil.
func (l *connLimit) admit(c net.Conn) *limitedConn {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open >= l.max && !l.evictOldestLocked() {
		c.Close()
		<-l.places
		l.refused++
		l.stats.Refused++
		l.logClosedLocked()
		return nil
	}
	lc := &limitedConn{Conn: c, l: l, placed: true}
	lc.elem = l.waiting.PushBack(lc)
	l.open++
	l.held++
	l.stats.Peak = max(l.stats.Peak, l.open)
	return lc
}

// evictOldest closes the connection that has waited longest for a
// request, if any.
func (l *connLimit) evictOldest() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.evictOldestLocked()
}

// evictOldestLocked closes the connection that has waited longest for a
// request, and takes it out of the count; false if every connection is
// being answered. Its read fails at once, and net/http closes it
// (StateClosed), which gives its place back. A request whose headers come
// just as its connection is evicted is lost as if the connection had
// closed a moment before, which an HTTP client retries on a new one.
func (l *connLimit) evictOldestLocked() bool {
	front := l.waiting.Front()
	if front == nil {
		return false
	}
	lc := front.Value.(*limitedConn)
	l.waiting.Remove(front)
	lc.elem, lc.gone = nil, true
	l.open--
	lc.Conn.Close()
	l.evicted++
	l.stats.Evicted++
	l.logClosedLocked()
	return true
}

// logClosedLocked logs the connections closed for the cap since the last
// line, for the first, then at most every evictLogEvery.
func (l *connLimit) logClosedLocked() {
	now := l.now()
	if !l.lastLog.IsZero() && now.Sub(l.lastLog) < evictLogEvery {
		return
	}
	l.log.Warn("admin connections closed to make room: the longest idle for new ones, new ones while none was idle",
		"evicted", l.evicted, "refused", l.refused, "connections_max", l.max)
	l.evicted, l.refused, l.lastLog = 0, 0, now
}

// track is the http.Server's ConnState hook: it keeps the connections
// that wait for a request in l.waiting, in the order they began to wait,
// and takes closed ones out of the count.
func (l *connLimit) track(c net.Conn, state http.ConnState) {
	lc, ok := c.(*limitedConn)
	if !ok {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	switch state {
	case http.StateActive:
		// A request's headers came: it is answered, never evicted.
		if lc.elem != nil {
			l.waiting.Remove(lc.elem)
			lc.elem = nil
		}
	case http.StateIdle:
		// Answered; it waits for the next request, behind those that
		// waited longer.
		if !lc.gone && lc.elem == nil {
			lc.elem = l.waiting.PushBack(lc)
		}
	case http.StateClosed, http.StateHijacked:
		if !lc.gone {
			lc.gone = true
			l.open--
			if lc.elem != nil {
				l.waiting.Remove(lc.elem)
				lc.elem = nil
			}
		}
		if lc.placed {
			lc.placed = false
			l.held--
			<-l.places
		}
	}
}

// snapshot is what l did so far, for the tests.
func (l *connLimit) snapshot() connStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.stats
	s.Open, s.Held = l.open, l.held
	return s
}

// isWaiting reports whether the connection whose remote address is addr
// (its client's local one) is open and waits for a request, for the tests.
func (l *connLimit) isWaiting(addr string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for e := l.waiting.Front(); e != nil; e = e.Next() {
		if e.Value.(*limitedConn).RemoteAddr().String() == addr {
			return true
		}
	}
	return false
}
