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
}

// The server's limits: a probe or a scrape is a small GET, answered at
// once; nothing a client does can hold relay's resources for longer.
const (
	readHeaderTimeout = 5 * time.Second
	readTimeout       = 10 * time.Second
	writeTimeout      = 30 * time.Second
	idleTimeout       = 60 * time.Second
	maxHeaderBytes    = 16 << 10
	maxScrapes        = 4 // scrapes at once; more get 503
	scrapeTimeout     = 10 * time.Second
	// closeTimeout bounds how long Close lets requests in flight finish.
	closeTimeout = time.Second
)

// Server is the admin listener.
type Server struct {
	ln  net.Listener
	srv *http.Server
	log *slog.Logger

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
	s := &Server{ln: ln, log: o.Log, closed: make(chan struct{})}
	s.srv = &http.Server{
		Handler:           newHandler(o),
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(o.Log.Handler(), slog.LevelWarn),
	}
	return s, nil
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
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Serve answers requests until Close. An admin listener that fails is
// logged, never the end of relay: Serve then waits for Close all the same.
func (s *Server) Serve() error {
	err := s.srv.Serve(s.ln)
	if !errors.Is(err, http.ErrServerClosed) {
		s.log.Error("admin listener failed; /metrics, /healthz and /readyz are gone until relay restarts", "addr", s.Addr().String(), "err", err)
	}
	<-s.closed
	return nil
}

// Close stops the Server and closes its socket, whether or not Serve ran:
// requests in flight get closeTimeout to finish. It may be called more
// than once, and on a nil Server.
func (s *Server) Close() {
	if s == nil {
		return
	}
	s.closeOnce.Do(func() {
		close(s.closed)
		ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
		defer cancel()
		if err := s.srv.Shutdown(ctx); err != nil {
			s.srv.Close()
		}
		s.ln.Close() // if Serve never ran; else closed already
	})
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
