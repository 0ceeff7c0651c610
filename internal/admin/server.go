// Package admin is relay's admin listener (relay run --metrics): an HTTP
// server relay binds itself, never passed to a child, serving /metrics in
// the Prometheus text format, /healthz (relay's supervisor answers) and
// /readyz (a generation serves and relay is not stopping).
//
// The counters and gauges are read from one supervisor Status per scrape
// (statusCollector); the histograms are observed as each event happens,
// through the supervisor's Recorder (Recorder). Every request asks the
// supervisor with a time limit, so a wedged supervisor fails /healthz
// rather than hanging it.
package admin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/relaysh/relay/internal/fdlimit"
	"github.com/relaysh/relay/supervisor"
)

// Options configure a Server.
type Options struct {
	// Status is asked for relay's state on every request.
	Status StatusSource
	// Recorder holds the histograms; nil for none.
	Recorder *Recorder
	Build    BuildInfo
	Log      *slog.Logger
	// StatusTimeout bounds each wait for Status; 0 for 1s.
	StatusTimeout time.Duration
	// maxConns caps the connections open at once, for the tests; 0 for
	// connsLimit of relay's RLIMIT_NOFILE.
	maxConns int
}

// The server's limits: a probe or a scrape is a small GET, answered at
// once; nothing a client does can hold relay's resources for longer. The
// connections open at once are capped too (limit.go).
const (
	readHeaderTimeout = 5 * time.Second
	// readTimeout is readHeaderTimeout: no admin path takes a body.
	readTimeout = 5 * time.Second
	// writeTimeout bounds a request from its headers to the end of its
	// answer, the time a connection is busy and cannot be evicted: a
	// scrape's scrapeTimeout and its writing.
	writeTimeout   = 15 * time.Second
	idleTimeout    = 60 * time.Second
	maxHeaderBytes = 16 << 10
	maxScrapes     = 4 // scrapes at once; more get 503
	scrapeTimeout  = 10 * time.Second
	// closeTimeout bounds how long Close lets requests in flight finish.
	closeTimeout = time.Second
)

// Server is the admin listener.
type Server struct {
	handler http.Handler
	addr    net.Addr
	log     *slog.Logger
	// limit caps the open connections of every http.Server of s's.
	limit *connLimit

	// mu guards what Pause and Resume (handoff.go) change: the listener
	// and the http.Server that serves it (nil while paused), the kept
	// socket, and the channel Resume closes to wake Serve.
	mu sync.Mutex
	ln net.Listener
	// srv serves ln; nil while paused.
	srv *http.Server
	// kept is a close-on-exec fd of the listening socket, for relay's
	// next image: made by Pause, or the one that crossed the exec
	// (ListenFD); -1 for none. It stays open until Close.
	kept    int
	resumed chan struct{}

	closeOnce sync.Once
	closed    chan struct{} // closed by Close
}

// Listen binds addr ([HOST]:PORT) and returns the Server, to be run with
// Serve. The socket is close-on-exec: no child inherits it.
func Listen(addr string, o Options) (*Server, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.StatusTimeout <= 0 {
		o.StatusTimeout = statusTimeout
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, listenError(addr, err)
	}
	return newServer(ln, o), nil
}

// newServer is the Server of ln; o has its defaults filled in.
func newServer(ln net.Listener, o Options) *Server {
	if o.maxConns <= 0 {
		o.maxConns = connsLimit(fdlimit.Soft())
	}
	s := &Server{handler: newHandler(o), addr: ln.Addr(), log: o.Log, limit: newConnLimit(o.maxConns, o.Log), ln: ln,
		kept: -1, resumed: make(chan struct{}), closed: make(chan struct{})}
	s.srv = s.newHTTPServer()
	return s
}

// newHTTPServer is a fresh http.Server for s: one that was shut down
// cannot serve again.
func (s *Server) newHTTPServer() *http.Server {
	return &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ConnState:         s.limit.track,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
}

func listenError(addr string, err error) error {
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("--metrics %s: address already in use; pick another port or stop what holds it: %w", addr, err)
	case errors.Is(err, syscall.EACCES):
		return fmt.Errorf("--metrics %s: permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE: %w", addr, err)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return fmt.Errorf("--metrics %s: address not available on this machine: %w", addr, err)
	}
	return fmt.Errorf("--metrics %s: binding the admin listener: %w", addr, err)
}

// Addr is the address the Server listens on.
func (s *Server) Addr() net.Addr { return s.addr }

// Serve answers requests until Close. An admin listener that fails is
// logged, never the end of relay: Serve then waits for Close all the same.
// While the Server is paused (Pause), Serve waits, and serves again after
// Resume.
func (s *Server) Serve() error {
	for {
		s.mu.Lock()
		srv, ln, resumed := s.srv, s.ln, s.resumed
		s.mu.Unlock()
		if srv != nil {
			// Shutdown, by Pause or Close, ends it with
			// ErrServerClosed, even before it starts.
			err := srv.Serve(s.limit.listener(ln))
			if !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("admin listener failed; /metrics, /healthz and /readyz are gone until relay restarts", "addr", s.Addr().String(), "err", err)
			}
			s.mu.Lock()
			again := s.srv != srv // paused, and resumed already
			s.mu.Unlock()
			if again {
				continue
			}
		}
		select {
		case <-s.closed:
			return nil
		case <-resumed:
		}
	}
}

// Close stops the Server and closes its socket, whether or not Serve ran:
// requests in flight get closeTimeout to finish. It may be called more
// than once, and on a nil Server.
func (s *Server) Close() {
	if s == nil {
		return
	}
	s.closeOnce.Do(func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		close(s.closed)
		if s.kept >= 0 {
			syscall.Close(s.kept)
			s.kept = -1
		}
		if s.srv != nil {
			s.shutdown()
		}
	})
}

// shutdown stops s.srv and closes s.ln: requests in flight get
// closeTimeout to finish.
func (s *Server) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil {
		s.srv.Close()
	}
	s.ln.Close() // if Serve never ran; else closed already
}

// newHandler routes the admin paths; anything else is 404, and a method
// other than GET or HEAD on them 405.
func newHandler(o Options) http.Handler {
	b := newBoundedStatus(o.Status, o.StatusTimeout)
	reg := newRegistry(b.status, o)
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:            slog.NewLogLogger(o.Log.Handler(), slog.LevelWarn),
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: maxScrapes,
		Timeout:             scrapeTimeout,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		if _, err := b.status(); err != nil {
			answer(w, http.StatusServiceUnavailable, "not healthy: "+err.Error())
			return
		}
		answer(w, http.StatusOK, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		st, err := b.status()
		if err != nil {
			answer(w, http.StatusServiceUnavailable, "not ready: "+err.Error())
			return
		}
		if ok, why := readiness(st, time.Now()); !ok {
			answer(w, http.StatusServiceUnavailable, "not ready: "+why)
			return
		}
		answer(w, http.StatusOK, "ready")
	})
	return mux
}

// newRegistry holds every metric /metrics serves: relay's own, the Go
// runtime's (go_*) and the process's (process_*). The pedantic registry
// checks each scrape's metrics against their descriptions.
func newRegistry(status func() (supervisor.Status, error), o Options) *prometheus.Registry {
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(newStatusCollector(status, o.Build, o.Log),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if o.Recorder != nil {
		reg.MustRegister(o.Recorder)
	}
	return reg
}

// answer writes a one-line plain-text answer, never cached.
func answer(w http.ResponseWriter, code int, line string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	fmt.Fprintln(w, line)
}
