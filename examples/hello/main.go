// Command hello is a small HTTP server meant to be run under relay, and meant
// to be copied: it shows everything a backend needs to do to take part in
// zero-downtime restarts.
//
//   - It takes its listening sockets from relay via systemd socket activation
//     (fds 3.., LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES), and falls back to
//     binding -addr itself when started on its own.
//   - It tells relay it is ready with sd_notify READY=1 once it is serving.
//   - With -bind it is instead a plain server that knows nothing of relay: it
//     binds -addr itself with net.Listen, as http.ListenAndServe does, even
//     when sockets are passed in, ignores $RELAY_HEALTH_ADDR and sends no
//     sd_notify message (unless -notify). Under relay's bind takeover, that
//     bind is given relay's socket; relay's default readiness (--health auto)
//     then probes it.
//   - On SIGTERM (relay's "you are the old generation now") it stops with the
//     lame-duck pattern, so that no request is dropped while the new
//     generation takes over the same sockets. See shutdown below.
//   - For tests of relay's confirmation window (after a restart relay keeps
//     the old generation warm and switches back to it if the new one
//     fails), it can play a bad version: -exit-after gives up some time
//     after it became ready, stopping as on SIGTERM but then exiting with
//     -exit-code, and -unhealthy-after makes /healthz fail some time after
//     it became ready while / keeps answering.
//
// Endpoints:
//
//	GET /         200 "hello from pid <pid> generation <gen>\n"
//	              with headers X-Pid and X-Generation ("hello" is the first
//	              line of -greeting-file when given)
//	GET /healthz  200 "ok\n" while serving, 503 once shutting down, 500
//	              once -unhealthy-after has passed (503 when both apply)
//
// Run "hello -h" for the flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

func main() {
	os.Exit(run())
}

// cpuBurner spends d of CPU time per call, one call at a time, as a
// single-threaded server spends its one core on each request in turn.
type cpuBurner struct {
	mu  sync.Mutex
	d   time.Duration
	sum uint64 // the work's result, kept so that it is not optimized away
}

// burn spins until this thread has used b.d of CPU time. The goroutine
// stays on its thread meanwhile, so the thread's clock is the burn's.
func (b *cpuBurner) burn() {
	b.mu.Lock()
	defer b.mu.Unlock()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	start, err := threadCPU()
	if err != nil {
		return
	}
	x := b.sum | 1
	for {
		for range 1000 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
		}
		now, err := threadCPU()
		if err != nil || now-start >= b.d {
			break
		}
	}
	b.sum = x
}

// threadCPU is the CPU time the calling thread has used.
func threadCPU() (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		return 0, err
	}
	return time.Duration(ts.Nano()), nil
}

// namedListener is a listening socket plus the name it was passed under
// (LISTEN_FDNAMES), or a descriptive name when we bound it ourselves.
type namedListener struct {
	name string
	ln   net.Listener
}

// run is main without os.Exit, so that deferred calls run. It returns the
// process exit code.
func run() int {
	addr := flag.String("addr", "127.0.0.1:8080",
		"address to bind when no sockets are passed in (standalone mode), and always with -bind")
	healthAddr := flag.String("health-addr", "",
		"private address to bind for /healthz (default $RELAY_HEALTH_ADDR, but none with -bind; empty: none)")
	startup := flag.Duration("startup", 0,
		"simulated startup work before serving and reporting ready")
	work := flag.Duration("work", 0,
		"simulated work per request to /")
	lameDuck := flag.Duration("lame-duck", time.Second,
		"how long to keep answering after stopping to accept, before shutting down")
	shutdownTimeout := flag.Duration("shutdown-timeout", 10*time.Second,
		"how long Shutdown waits for in-flight requests after the lame duck")
	plainShutdown := flag.Bool("plain-shutdown", false,
		"on SIGTERM just call http.Server.Shutdown, as most Go servers do (no lame duck):\n"+
			"requests it reads after Shutdown begins are dropped; for comparisons")
	bind := flag.Bool("bind", false,
		"be a plain server that knows nothing of relay: bind -addr with net.Listen (as\n"+
			"http.ListenAndServe does) even when sockets are passed in, leave LISTEN_* and the\n"+
			"passed fds alone, ignore $RELAY_HEALTH_ADDR (-health-addr still applies) and send\n"+
			"no sd_notify message unless -notify; for relay's bind takeover")
	notify := flag.Bool("notify", false,
		"with -bind, still send sd_notify READY=1 once serving (without -bind it is always sent)")
	greetingFile := flag.String("greeting-file", "",
		"file whose first line replaces \"hello\" in the answers to GET /; read once at start,\n"+
			"so a change shows after a restart (a config file, e.g. from a Kubernetes ConfigMap)")
	exitAfter := flag.Duration("exit-after", 0,
		"play a bad version that gives up: this long after becoming ready, stop as on SIGTERM\n"+
			"(lame duck and all) and then exit with -exit-code; 0: never")
	exitCode := flag.Int("exit-code", 1,
		"the exit code after -exit-after, even when the shutdown was clean")
	burn := flag.Duration("burn", 0,
		"spend this much CPU time on each request to /, one request at a time, and run Go on\n"+
			"one CPU (GOMAXPROCS=1): a CPU-bound single-threaded server, as a benchmark backend")
	unhealthyAfter := flag.Duration("unhealthy-after", 0,
		"play a bad version that sickens: this long after becoming ready, GET /healthz answers\n"+
			"500 while GET / keeps answering 200; 0: never")
	flag.Parse()
	var burner *cpuBurner
	if *burn > 0 {
		runtime.GOMAXPROCS(1)
		burner = &cpuBurner{d: *burn}
	}

	// Every log line carries pid and generation, so that the interleaved
	// output of two generations during a restart can be told apart.
	pid := os.Getpid()
	gen := os.Getenv("RELAY_GENERATION")
	if gen == "" {
		gen = "0"
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).
		With("pid", pid, "generation", gen)

	greeting, err := readGreeting(*greetingFile)
	if err != nil {
		log.Error("greeting", "err", err)
		return 1
	}

	if *healthAddr == "" && !*bind {
		*healthAddr = os.Getenv("RELAY_HEALTH_ADDR")
	}

	// Take the sockets first: this also unsets LISTEN_* so that they do not
	// leak into anything we might start. With -bind, bind -addr whatever was
	// passed in, as a server that knows nothing of socket activation would.
	takeListeners := publicListeners
	if *bind {
		takeListeners = bindAddr
	}
	listeners, err := takeListeners(log, *addr)
	if err != nil {
		log.Error("no listeners", "err", err)
		return 1
	}
	for _, l := range listeners {
		log.Info("listener", "name", l.name, "addr", l.ln.Addr().String())
	}

	// The private health listener is bound by this process itself. relay gives
	// every generation its own address, so a successful probe there proves
	// that THIS process is ready, whereas a probe on the shared socket might
	// be answered by the other generation.
	var health net.Listener
	if *healthAddr != "" {
		t0 := time.Now()
		health, err = net.Listen("tcp", *healthAddr)
		if err != nil {
			log.Error("bind health address", "addr", *healthAddr, "err", err)
			return 1
		}
		log.Info("health listener", "addr", health.Addr().String(), "took", time.Since(t0))
	}

	// Ask for the stop signals before the (possibly slow) startup, so that a
	// stop during startup is handled by us rather than killing us mid-way.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT)
	defer signal.Stop(sigs)

	// Simulated slow initialisation (loading config, warming caches, ...).
	// While we sleep, connections queue in the shared kernel socket and the
	// previous generation, if any, keeps accepting them.
	if *startup > 0 {
		log.Info("starting up", "duration", *startup)
		select {
		case <-time.After(*startup):
		case sig := <-sigs:
			log.Info("signal during startup, exiting", "signal", sig.String())
			return 0
		}
	}

	// draining flips /healthz to 503 once shutdown has begun; unhealthy flips
	// it to 500 once -unhealthy-after has passed.
	var draining, unhealthy atomic.Bool
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		if *work > 0 {
			select {
			case <-time.After(*work):
			case <-r.Context().Done():
				return // client went away
			}
		}
		if burner != nil {
			burner.burn()
		}
		w.Header().Set("X-Pid", strconv.Itoa(pid))
		w.Header().Set("X-Generation", gen)
		fmt.Fprintf(w, "%s from pid %d generation %s\n", greeting, pid, gen)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		// Draining is checked first: a process on its way out says so, sick
		// or not, as it always has.
		if draining.Load() {
			http.Error(w, "shutting down", http.StatusServiceUnavailable)
			return
		}
		if unhealthy.Load() {
			http.Error(w, "unhealthy: -unhealthy-after passed", http.StatusInternalServerError)
			return
		}
		fmt.Fprint(w, "ok\n")
	})

	// During the lame duck every response carries "Connection: close" (see
	// shutdown): net/http closes the connection after such a response, and
	// the client's next request opens a new connection, which lands on the
	// new generation.
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if draining.Load() {
			w.Header().Set("Connection", "close")
		}
		mux.ServeHTTP(w, r)
	})

	busy := newConnTracker()
	srv := &http.Server{
		Handler:           handler,
		ConnState:         busy.track,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       60 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}

	// One Serve goroutine per listener. serveErr receives only unexpected
	// errors; the ones caused by closing the listener are normal.
	serveErr := make(chan error, len(listeners)+1)
	var wg sync.WaitGroup
	serve := func(name string, ln net.Listener) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := srv.Serve(ln)
			if errors.Is(err, http.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
				// Closed by us (lame duck) or by srv.Shutdown.
				log.Info("stopped accepting", "listener", name)
				return
			}
			serveErr <- fmt.Errorf("serve %s: %w", name, err)
		}()
	}
	for _, l := range listeners {
		serve(l.name, l.ln)
	}
	if health != nil {
		serve("health", health)
	}

	// Everything is being served: tell relay. Without NOTIFY_SOCKET (not
	// under relay or systemd) SdNotify does nothing and reports false.
	// With -bind (and no -notify), it says nothing: a plain server.
	if *bind && !*notify {
		log.Info("ready, -bind without -notify: no sd_notify message sent")
	} else {
		sent, err := daemon.SdNotify(false, daemon.SdNotifyReady)
		switch {
		case err != nil:
			log.Warn("ready, but sd_notify failed", "err", err)
		case sent:
			log.Info("ready, sent READY=1")
		default:
			log.Info("ready, NOTIFY_SOCKET not set, no notification sent")
		}
	}

	// The bad-version clocks start now, once we are serving and have said
	// so: relay's confirmation window runs from readiness, and a version that
	// fails before it is ready is a failed start, not what these flags are
	// for.
	if *unhealthyAfter > 0 {
		t := time.AfterFunc(*unhealthyAfter, func() {
			unhealthy.Store(true)
			log.Info("unhealthy as -unhealthy-after asks: /healthz now answers 500",
				"after", *unhealthyAfter)
		})
		defer t.Stop()
	}
	// giveUp stays nil without -exit-after, and a nil channel is never ready
	// in a select.
	var giveUp <-chan time.Time
	if *exitAfter > 0 {
		t := time.NewTimer(*exitAfter)
		defer t.Stop()
		giveUp = t.C
	}

	// code is the exit code after a clean shutdown. A bad version that gives
	// up exits with -exit-code even then: it still stops with the lame duck,
	// so that whatever relay does about the failure, no request that this
	// process accepted is dropped on its way out.
	code := 0
	select {
	case sig := <-sigs:
		log.Info("stopping", "signal", sig.String())
	case <-giveUp:
		log.Info("giving up as -exit-after asks", "after", *exitAfter, "code", *exitCode)
		code = *exitCode
	case err := <-serveErr:
		log.Error("serve failed, stopping", "err", err)
		shutdown(log, srv, busy, listeners, &draining, sigs, 0, *shutdownTimeout)
		return 1
	}
	// An unclean shutdown exits 1, unless we are giving up with a code of
	// our own, which the tests expect whatever happened on the way out.
	failCode := 1
	if code != 0 {
		failCode = code
	}
	if *plainShutdown {
		ctx, cancel := context.WithTimeout(context.Background(), *shutdownTimeout)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			log.Warn("shutdown incomplete", "err", err)
			return failCode
		}
		log.Info("shutdown complete")
	} else if !shutdown(log, srv, busy, listeners, &draining, sigs, *lameDuck, *shutdownTimeout) {
		return failCode
	}
	wg.Wait()
	log.Info("exiting", "code", code)
	return code
}

// shutdown stops the server with the lame-duck pattern and reports whether
// every connection was finished cleanly.
//
// Why not just srv.Shutdown? Shutdown marks the server as shutting down and
// from then on a connection that reads a request closes without answering it.
// Two kinds of request get caught by that:
//
//   - one per idle keep-alive connection: the client may already have sent
//     its next request on a connection that looked idle to us;
//   - at high connection rates, a few connections that were just accepted
//     and whose first request had not been read yet.
//
// The clients see a connection closed without a response (EOF / reset), in
// the middle of what should be a zero-downtime restart. So instead:
//
//  1. Stop accepting: close our listeners. Under relay these are dups of the
//     sockets relay holds (with -bind too, when relay took the bind over and
//     installed its socket at our fd), so this closes them only in this process; the
//     kernel socket stays open in relay and the new generation keeps
//     accepting from it. Connections still in the kernel's accept queue are
//     taken by the new generation, not lost.
//  2. Set draining: from now on every response carries "Connection: close"
//     (see the handler wrapper in run), so each client gets its current and
//     next request answered and then reconnects, to the new generation.
//     /healthz answers 503.
//  3. Keep serving for the lame-duck period, so that in-flight requests,
//     requests arriving on keep-alive connections and connections already
//     accepted all get their answer.
//  4. Wait, bounded by the shutdown timeout, until no connection is left
//     whose request has not been answered (net/http's StateNew or
//     StateActive). On a busy machine a connection accepted just before step
//     1 may not have had its request read within the lame duck; Shutdown
//     would then drop that request.
//  5. srv.SetKeepAlivesEnabled(false) and srv.Shutdown, which by now have
//     (almost) nothing left to cut off; with a timeout for slow requests.
//
// Why set "Connection: close" per response in step 2 rather than calling
// srv.SetKeepAlivesEnabled(false) there (which also makes every response
// carry "Connection: close")? SetKeepAlivesEnabled(false) additionally closes
// all currently idle connections at once, and a busy keep-alive client is
// "idle" in the short gap between receiving a response and sending its next
// request: closing it then loses that request just like Shutdown would. The
// per-response header lets those clients finish cleanly. Connections that
// stayed idle for the whole lame duck are closed in step 4; a client that
// sends on one at that very moment can still lose the race, as with any
// keep-alive connection the server closes (IdleTimeout has the same race),
// which is why well-behaved HTTP clients retry idempotent requests that fail
// this way.
//
// The private health listener (if any) stays open during the lame duck so a
// probe sees 503 rather than "connection refused"; Shutdown closes it.
func shutdown(log *slog.Logger, srv *http.Server, busy *connTracker, listeners []namedListener,
	draining *atomic.Bool, sigs <-chan os.Signal, lameDuck, timeout time.Duration) bool {
	// (1) Stop accepting on the public sockets.
	for _, l := range listeners {
		if err := l.ln.Close(); err != nil {
			log.Warn("close listener", "name", l.name, "err", err)
		}
	}
	// (2) Every further response says "Connection: close"; fail health checks.
	draining.Store(true)

	// (3) Lame duck: keep answering what we already have. A second signal
	// cuts it short.
	if lameDuck > 0 {
		log.Info("lame duck", "duration", lameDuck)
		select {
		case <-time.After(lameDuck):
		case sig := <-sigs:
			log.Info("second signal, ending lame duck early", "signal", sig.String())
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// (4) Every connection accepted so far gets its answer.
	if err := busy.waitIdle(ctx); err != nil {
		log.Warn("connections still busy after the shutdown timeout", "err", err)
	}

	// (5) Close what is still idle, finish in-flight requests, close the rest.
	srv.SetKeepAlivesEnabled(false)
	if err := srv.Shutdown(ctx); err != nil {
		log.Warn("shutdown incomplete, closing remaining connections", "err", err)
		srv.Close()
		return false
	}
	log.Info("shutdown complete")
	return true
}

// publicListeners returns the stream listeners passed in by relay (or
// systemd). If no sockets were passed at all, it binds addr itself so the
// program can also run standalone.
func publicListeners(log *slog.Logger, addr string) ([]namedListener, error) {
	if _, activated := os.LookupEnv("LISTEN_FDS"); !activated {
		return bindAddr(log, addr)
	}

	// activation.Files is what activation.ListenersWithNames uses underneath.
	// We call it directly so we can log, rather than silently skip, the
	// sockets that are not stream listeners (UDP, datagram unix sockets).
	// It checks LISTEN_PID against our pid and unsets the LISTEN_* variables.
	files := activation.Files(true)
	if len(files) == 0 {
		// LISTEN_FDS was set but LISTEN_PID is not ours (or LISTEN_FDS is 0):
		// binding -addr ourselves now would likely just collide with the
		// supervisor's socket, so fail loudly instead.
		return nil, errors.New("LISTEN_FDS is set but no sockets were passed to this pid (check LISTEN_PID)")
	}
	var out []namedListener
	for _, f := range files {
		// FileListener dups the fd; the original is closed right after.
		ln, err := net.FileListener(f)
		f.Close()
		if err != nil {
			log.Warn("ignoring passed socket: not a stream listener", "name", f.Name(), "err", err)
			continue
		}
		out = append(out, namedListener{name: f.Name(), ln: &closeOnceListener{Listener: ln}})
	}
	if len(out) == 0 {
		return nil, errors.New("none of the passed sockets is a stream listener")
	}
	return out, nil
}

// bindAddr binds addr with net.Listen, as http.ListenAndServe does, and
// logs how long net.Listen took: under relay's bind takeover relay answers
// its bind and listen and installs a socket of its own in their place.
func bindAddr(log *slog.Logger, addr string) ([]namedListener, error) {
	t0 := time.Now()
	ln, err := net.Listen("tcp", addr)
	took := time.Since(t0)
	if err != nil {
		return nil, fmt.Errorf("binding -addr: %w", err)
	}
	log.Info("bound -addr", "addr", addr, "took", took)
	return []namedListener{{name: "addr", ln: &closeOnceListener{Listener: ln}}}, nil
}

// closeOnceListener makes Close idempotent. We close the listeners ourselves
// at the start of the lame duck, and srv.Shutdown closes every listener it
// still tracks; without this, a second Close would make Shutdown return a
// spurious "use of closed network connection" error.
type closeOnceListener struct {
	net.Listener
	once sync.Once
	err  error
}

func (l *closeOnceListener) Close() error {
	l.once.Do(func() { l.err = l.Listener.Close() })
	return l.err
}

// connTracker knows which connections have a request not yet answered:
// those net/http reports as StateNew (accepted, request not read yet) or
// StateActive (request being served).
type connTracker struct {
	mu     sync.Mutex
	busy   map[net.Conn]bool
	idleCh chan struct{} // closed when busy becomes empty, if someone waits
}

func newConnTracker() *connTracker { return &connTracker{busy: make(map[net.Conn]bool)} }

// track is the http.Server ConnState hook.
func (t *connTracker) track(c net.Conn, state http.ConnState) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if state == http.StateNew || state == http.StateActive {
		t.busy[c] = true
		return
	}
	delete(t.busy, c)
	if len(t.busy) == 0 && t.idleCh != nil {
		close(t.idleCh)
		t.idleCh = nil
	}
}

// waitIdle returns once no connection is busy, or when ctx ends.
func (t *connTracker) waitIdle(ctx context.Context) error {
	t.mu.Lock()
	if len(t.busy) == 0 {
		t.mu.Unlock()
		return nil
	}
	if t.idleCh == nil {
		t.idleCh = make(chan struct{})
	}
	ch := t.idleCh
	t.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// readGreeting returns the first line of path, or "hello" when path is
// empty. A file that cannot be read, or whose first line is empty, is an
// error: hello exits, and under relay the restart that started it rolls
// back.
func readGreeting(path string) (string, error) {
	if path == "" {
		return "hello", nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("reading -greeting-file: %w", err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	if line = strings.TrimSpace(line); line == "" {
		return "", fmt.Errorf("-greeting-file %s: the first line is empty; write the greeting there", path)
	}
	return line, nil
}
