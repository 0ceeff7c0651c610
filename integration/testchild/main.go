// Command testchild is the child process of relay's integration tests. Its
// behaviour is chosen by flags and by a mode file the test can rewrite
// between generations.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
)

// Report is what -report writes: the child's view of what relay gave it.
type Report struct {
	Pid            int               `json:"pid"`
	Env            map[string]string `json:"env"`
	FDs            map[int]string    `json:"fds"`             // fd -> readlink target
	Inherited      []int             `json:"inherited"`       // fds without FD_CLOEXEC
	SocketFamilies map[int]int       `json:"socket_families"` // fd -> AF_*
	SocketTypes    map[int]int       `json:"socket_types"`    // fd -> SOCK_*
	SocketAddrs    map[int]string    `json:"socket_addrs"`
}

func main() {
	var (
		report         = flag.String("report", "", "write a Report as JSON to this file at start")
		modeFile       = flag.String("mode-file", "", "read the mode (serve, exit, never-ready, hang) from this file")
		mode           = flag.String("mode", "serve", "mode when no -mode-file is given")
		ignoreTerm     = flag.Bool("ignore-term", false, "ignore SIGTERM")
		grandchild     = flag.Bool("grandchild", false, "start a grandchild, in this process group, that ignores SIGTERM")
		grandchildPid  = flag.String("grandchild-pid", "", "with -grandchild: write the grandchild's pid here")
		sleeper        = flag.Bool("sleeper", false, "be the grandchild: ignore SIGTERM and sleep")
		exitCodeOnTerm = flag.Int("exit-on-term", 0, "exit code after SIGTERM")
		version        = flag.String("version", "", "answer with this X-Version header")
		readyGate      = flag.String("ready-gate", "", "before serving, wait until this file holds a number at least RELAY_GENERATION")
		noisy          = flag.Bool("stderr-per-request", false, "write a line to stderr for every request")
		signalFile     = flag.String("signal-file", "", "write the name of each SIGUSR1, SIGUSR2 or SIGWINCH received to this file")
		notifyExtra    = flag.String("notify-extra", "", "before READY=1, send this sd_notify message (',' separates its lines), as servers that speak to systemd do")
		setNonblock    = flag.Int("set-nonblock-gen", 0, "in this generation, set O_NONBLOCK on fd 3 and serve; other generations leave the sockets' flags alone and do not accept")
		healthGate     = flag.String("health-gate", "", "serve at once, but answer /healthz 503 until this file holds a number at least RELAY_GENERATION; log every /healthz to stderr")
		bind           = flag.String("bind", "", "serve on a socket of its own bound to this address, as a server that knows nothing of LISTEN_FDS does, instead of on the passed sockets")
		bindGate       = flag.String("bind-gate", "", "with -bind: bind only once this file holds a number at least RELAY_GENERATION")
		notifyGate     = flag.String("ready-gate-notify", "", "serve at once, but send READY=1 only once this file holds a number at least RELAY_GENERATION")
		logAccepts     = flag.Bool("log-accepts", false, "with -bind: write a line to stderr for every connection accepted before READY=1 was sent")
		silent         = flag.Bool("silent", false, "send no sd_notify message at all, as a server that knows nothing of systemd")
		watchdog       = flag.Bool("watchdog", false, "once ready, send WATCHDOG=1 every half of WATCHDOG_USEC (exit 6 unless WATCHDOG_USEC and WATCHDOG_PID are this process's) until SIGUSR2, then go on serving without a ping")
		closeOnUSR1    = flag.Bool("close-listeners-on-usr1", false, "on SIGUSR1, close the passed listeners and go on running, as a server that lost its listener")
		deferAccept    = flag.Bool("defer-accept", false, "set TCP_DEFER_ACCEPT on the passed stream sockets: a client that connects and sends nothing stays a handshake in progress")
		orphans        = flag.Int("orphans", 0, "before serving, leave this many orphans: each started by a process of its own that exits at once, so it is adopted by the nearest subreaper (relay), and exits when its parent has; then write one line to stdout")
		orphanParent   = flag.Bool("orphan-parent", false, "be an orphan's parent: start one -orphan and exit without waiting for it")
		orphan         = flag.Bool("orphan", false, "be an orphan: exit once stdin ends, i.e. once the parent that holds its other end has exited")
		hangEndpoint   = flag.Bool("hang-endpoint", false, "serve /hang on the passed sockets: answer it, stop accepting, and once every connection accepted so far has closed, stop this process with SIGSTOP (a server that hangs with connections queued on its socket)")
		bindOnUSR1     = flag.String("bind-on-usr1", "", "on SIGUSR1, bind this address with a socket of its own and serve on it too, as a server that opens a listener late (the passed sockets are served as ever); say so on stderr")
	)
	flag.Parse()
	switch {
	case *orphan:
		io.Copy(io.Discard, os.Stdin)
		return
	case *orphanParent:
		w, err := startOrphan()
		if err != nil {
			fmt.Fprintln(os.Stderr, "testchild: orphan:", err)
			os.Exit(1)
		}
		runtime.KeepAlive(w) // open until the exit, which ends the orphan
		os.Exit(0)
	}
	if *sleeper {
		signal.Ignore(syscall.SIGTERM)
		time.Sleep(time.Hour)
		return
	}
	gen, _ := strconv.Atoi(os.Getenv("RELAY_GENERATION"))
	if *report != "" {
		if err := writeReport(*report); err != nil {
			fmt.Fprintln(os.Stderr, "testchild: report:", err)
			os.Exit(1)
		}
	}
	m := *mode
	if *modeFile != "" {
		b, err := os.ReadFile(*modeFile)
		if err == nil {
			m = strings.TrimSpace(string(b))
		}
	}
	fmt.Fprintf(os.Stderr, "testchild: pid %d generation %d mode %s\n", os.Getpid(), gen, m)
	switch m {
	case "exit":
		fmt.Fprintln(os.Stderr, "testchild: cannot open database: exiting with 3 on purpose")
		os.Exit(3)
	case "hang":
		signal.Ignore(syscall.SIGTERM)
		fmt.Fprintln(os.Stderr, "testchild: hanging on purpose")
		select {}
	}
	if *ignoreTerm {
		signal.Ignore(syscall.SIGTERM)
	}
	if *grandchild {
		gc := exec.Command("/proc/self/exe", "-sleeper")
		if err := gc.Start(); err != nil {
			fmt.Fprintln(os.Stderr, "testchild: grandchild:", err)
			os.Exit(1)
		}
		if *grandchildPid != "" {
			writeFileAtomic(*grandchildPid, []byte(strconv.Itoa(gc.Process.Pid)))
		}
	}
	if *orphans > 0 {
		for i := range *orphans {
			if err := exec.Command("/proc/self/exe", "-orphan-parent").Run(); err != nil {
				fmt.Fprintf(os.Stderr, "testchild: orphan %d: %v\n", i, err)
				os.Exit(1)
			}
		}
		fmt.Printf("testchild: pid %d left %d orphans\n", os.Getpid(), *orphans)
	}
	if *signalFile != "" {
		sigC := make(chan os.Signal, 4)
		signal.Notify(sigC, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH)
		go func() {
			var got []string
			for sig := range sigC {
				got = append(got, sig.String())
				writeFileAtomic(*signalFile, []byte(strings.Join(got, "\n")))
			}
		}()
	}
	termC := make(chan os.Signal, 1)
	if !*ignoreTerm {
		signal.Notify(termC, syscall.SIGTERM)
	}

	if *setNonblock != 0 && *setNonblock != gen {
		// Leave the shared sockets exactly as they are.
		daemon.SdNotify(false, daemon.SdNotifyReady)
		<-termC
		os.Exit(*exitCodeOnTerm)
	}

	ready := m != "never-ready"
	var listeners []net.Listener // the passed ones served
	var notified atomic.Bool     // READY=1 was sent
	var hang *hangGate           // with -hang-endpoint
	mux := http.NewServeMux()
	if *hangEndpoint {
		hang = newHangGate(gen)
		mux.HandleFunc("/hang", func(w http.ResponseWriter, r *http.Request) {
			// Shut before the answer: whoever has it knows that this
			// process accepts no more connections.
			hang.shut()
			w.Header().Set("Connection", "close")
			w.Header().Set("X-Pid", strconv.Itoa(os.Getpid()))
			fmt.Fprintf(w, "pid=%d gen=%d hanging\n", os.Getpid(), gen)
		})
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if *noisy {
			fmt.Fprintf(os.Stderr, "testchild: request %s\n", r.URL.Path)
		}
		w.Header().Set("X-Pid", strconv.Itoa(os.Getpid()))
		w.Header().Set("X-Version", *version)
		fmt.Fprintf(w, "pid=%d gen=%d\n", os.Getpid(), gen)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if *healthGate != "" {
			code := http.StatusOK
			if !gateOpen(*healthGate, gen) {
				code = http.StatusServiceUnavailable
			}
			fmt.Fprintf(os.Stderr, "testchild: healthz gen=%d pid=%d agent=%s code=%d\n", gen, os.Getpid(), r.UserAgent(), code)
			w.WriteHeader(code)
			return
		}
		if !ready {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	if addr := os.Getenv("RELAY_HEALTH_ADDR"); addr != "" {
		// The private address also takes /exit, so a test can make this
		// generation, and no other, fail.
		private := http.NewServeMux()
		private.Handle("/", mux)
		private.HandleFunc("/exit", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintln(os.Stderr, "testchild: exiting with 4 on request")
			os.Exit(4)
		})
		if l, err := net.Listen("tcp", addr); err == nil {
			go http.Serve(l, private)
		}
	}
	if *readyGate != "" {
		waitForGate(*readyGate, gen)
	}
	if *notifyExtra != "" {
		if _, err := daemon.SdNotify(false, strings.ReplaceAll(*notifyExtra, ",", "\n")); err != nil {
			fmt.Fprintln(os.Stderr, "testchild: notify:", err)
		}
	}
	// Asked for before serving: a SIGUSR1 that came before signal.Notify
	// would be dropped by Go's runtime, and the test that sent it, having
	// seen an answer, would wait for a close that never comes.
	var usr1 chan os.Signal
	if *closeOnUSR1 {
		usr1 = make(chan os.Signal, 1)
		signal.Notify(usr1, syscall.SIGUSR1)
	}
	var bindUSR1 chan os.Signal
	if *bindOnUSR1 != "" {
		bindUSR1 = make(chan os.Signal, 1)
		signal.Notify(bindUSR1, syscall.SIGUSR1)
	}
	if ready {
		if *bind != "" {
			if *bindGate != "" {
				waitForGate(*bindGate, gen)
			}
			serveBound(*bind, mux, gen, *logAccepts, &notified)
		} else {
			if *deferAccept {
				setDeferAccept()
			}
			listeners = serveInherited(mux, hang)
		}
		if *notifyGate != "" {
			waitForGate(*notifyGate, gen)
		}
		if !*silent {
			daemon.SdNotify(false, daemon.SdNotifyReady)
			notified.Store(true)
		}
	}
	if *watchdog {
		startWatchdog(gen)
	}
	if *closeOnUSR1 {
		go func() {
			<-usr1
			for _, l := range listeners {
				l.Close()
			}
			fmt.Fprintf(os.Stderr, "testchild: closed its listeners gen=%d pid=%d\n", gen, os.Getpid())
		}()
	}
	if *bindOnUSR1 != "" {
		go func() {
			<-bindUSR1
			bindLate(*bindOnUSR1, mux, gen)
		}()
	}
	<-termC
	os.Exit(*exitCodeOnTerm)
}

// bindLate binds addr itself, on SIGUSR1, and serves HTTP on it. A failed
// bind is said on stderr, and the process serves on.
func bindLate(addr string, mux *http.ServeMux, gen int) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testchild: on SIGUSR1: bind failed gen=%d pid=%d: %v\n", gen, os.Getpid(), err)
		return
	}
	go http.Serve(l, mux)
	fmt.Fprintf(os.Stderr, "testchild: on SIGUSR1: bound gen=%d pid=%d on %s\n", gen, os.Getpid(), l.Addr())
}

// serveBound binds addr itself and serves HTTP on it. It says on stderr
// when it accepts, and with logAccepts every connection it accepted before
// notified was set.
func serveBound(addr string, mux *http.ServeMux, gen int, logAccepts bool, notified *atomic.Bool) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testchild: bind:", err)
		os.Exit(1)
	}
	if logAccepts {
		l = loggingListener{l, gen, notified}
	}
	go http.Serve(l, mux)
	fmt.Fprintf(os.Stderr, "testchild: accepting gen=%d pid=%d on %s\n", gen, os.Getpid(), l.Addr())
}

// loggingListener logs each connection it accepts until notified is set.
type loggingListener struct {
	net.Listener
	gen      int
	notified *atomic.Bool
}

func (l loggingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil && !l.notified.Load() {
		fmt.Fprintf(os.Stderr, "testchild: accepted gen=%d pid=%d from %s\n", l.gen, os.Getpid(), c.RemoteAddr())
	}
	return c, err
}

// setDeferAccept sets TCP_DEFER_ACCEPT on the passed TCP listeners, each
// generation's own socket where relay steers.
func setDeferAccept() {
	n, _ := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	for fd := 3; fd < 3+n; fd++ {
		typ, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
		dom, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
		if typ != unix.SOCK_STREAM || (dom != unix.AF_INET && dom != unix.AF_INET6) {
			continue
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 600); err != nil {
			fmt.Fprintln(os.Stderr, "testchild: TCP_DEFER_ACCEPT:", err)
			os.Exit(1)
		}
	}
}

// serveInherited serves HTTP on the passed stream sockets and echoes the
// pid on passed datagram sockets. It returns the stream listeners. With a
// hangGate, the stream listeners accept through it.
func serveInherited(mux *http.ServeMux, hang *hangGate) (listeners []net.Listener) {
	n, _ := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	for fd := 3; fd < 3+n; fd++ {
		f := os.NewFile(uintptr(fd), "fd"+strconv.Itoa(fd))
		if typ, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); typ == unix.SOCK_DGRAM {
			pc, err := net.FilePacketConn(f)
			if err != nil {
				fmt.Fprintln(os.Stderr, "testchild: udp:", err)
				os.Exit(1)
			}
			go func() {
				buf := make([]byte, 512)
				for {
					_, from, err := pc.ReadFrom(buf)
					if err != nil {
						return
					}
					pc.WriteTo([]byte("pid="+strconv.Itoa(os.Getpid())), from)
				}
			}()
			continue
		}
		l, err := net.FileListener(f)
		if err != nil {
			fmt.Fprintln(os.Stderr, "testchild: listener:", err)
			os.Exit(1)
		}
		if hang != nil {
			l = hang.listener(l)
		}
		go http.Serve(l, mux)
		listeners = append(listeners, l)
	}
	return listeners
}

func writeReport(path string) error {
	r := Report{
		Pid: os.Getpid(), Env: map[string]string{}, FDs: map[int]string{},
		SocketFamilies: map[int]int{}, SocketTypes: map[int]int{}, SocketAddrs: map[int]string{},
	}
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		r.Env[k] = v
	}
	// Read the fd table with raw calls so that no fd of our own is open
	// while we look, apart from the directory's.
	dfd, err := unix.Open("/proc/self/fd", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	buf := make([]byte, 8192)
	var names []string
	for {
		n, err := unix.ReadDirent(dfd, buf)
		if err != nil {
			unix.Close(dfd)
			return err
		}
		if n == 0 {
			break
		}
		_, _, names = unix.ParseDirent(buf[:n], -1, names)
	}
	unix.Close(dfd)
	for _, name := range names {
		fd, err := strconv.Atoi(name)
		if err != nil || fd == dfd {
			continue
		}
		target, err := os.Readlink(filepath.Join("/proc/self/fd", name))
		if err != nil {
			continue
		}
		r.FDs[fd] = target
		// Whatever this process opened itself (the Go runtime keeps
		// cgroup files open) is close-on-exec; what crossed the exec
		// into it is not.
		if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && flags&unix.FD_CLOEXEC == 0 {
			r.Inherited = append(r.Inherited, fd)
		}
		if strings.HasPrefix(target, "socket:") {
			sa, err := unix.Getsockname(fd)
			if err == nil {
				r.SocketAddrs[fd] = sockaddr.String(sa)
			}
			r.SocketFamilies[fd], _ = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
			r.SocketTypes[fd], _ = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
		}
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return writeFileAtomic(path, b)
}

func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return errors.Join(err, os.Remove(tmp))
	}
	return nil
}

// waitForGate waits, for at most a minute, until path holds a number of at
// least gen: the test opens the gate for one generation at a time.
func waitForGate(path string, gen int) {
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		if gateOpen(path, gen) {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	fmt.Fprintln(os.Stderr, "testchild: the ready gate never opened")
	os.Exit(5)
}

// gateOpen reports whether path holds a number of at least gen.
func gateOpen(path string, gen int) bool {
	b, _ := os.ReadFile(path)
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	return err == nil && n >= gen
}

// startWatchdog pings WATCHDOG=1 every half of the interval systemd's
// rules give this process (WATCHDOG_USEC, and WATCHDOG_PID naming it),
// until SIGUSR2.
func startWatchdog(gen int) {
	interval, err := daemon.SdWatchdogEnabled(false)
	if err != nil || interval == 0 {
		fmt.Fprintf(os.Stderr, "testchild: watchdog not enabled for pid %d (WATCHDOG_USEC=%q WATCHDOG_PID=%q): %v\n",
			os.Getpid(), os.Getenv("WATCHDOG_USEC"), os.Getenv("WATCHDOG_PID"), err)
		os.Exit(6)
	}
	usr2 := make(chan os.Signal, 1)
	signal.Notify(usr2, syscall.SIGUSR2)
	fmt.Fprintf(os.Stderr, "testchild: watchdog pinging gen=%d pid=%d every %s\n", gen, os.Getpid(), interval/2)
	go func() {
		t := time.NewTicker(interval / 2)
		defer t.Stop()
		for {
			daemon.SdNotify(false, daemon.SdNotifyWatchdog)
			select {
			case <-usr2:
				fmt.Fprintf(os.Stderr, "testchild: watchdog stopped gen=%d pid=%d\n", gen, os.Getpid())
				return
			case <-t.C:
			}
		}
	}()
}

// startOrphan starts an -orphan whose stdin is a pipe whose write end
// only this process holds, and returns that end: the orphan ends once this
// process has exited, adopted by then.
func startOrphan() (*os.File, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	cmd := exec.Command("/proc/self/exe", "-orphan")
	cmd.Stdin = r
	if err := cmd.Start(); err != nil {
		w.Close()
		return nil, err
	}
	return w, nil
}

// hangGate makes a server hang the way a deadlocked one does, with no
// connection of its own left unanswered: shut stops every accept, and once
// the connections accepted so far have all closed (answered), the process
// stops itself with SIGSTOP. What clients send from then on waits in the
// accept queue of its socket, and only there.
type hangGate struct {
	gen     int
	mu      sync.Mutex
	shutC   chan struct{} // closed by shut
	shutOne sync.Once
	lns     []*gatedListener
	open    int           // connections accepted and not yet closed
	parked  int           // accept loops that will accept no more
	changed chan struct{} // closed and replaced when open or parked change
}

func newHangGate(gen int) *hangGate {
	return &hangGate{gen: gen, shutC: make(chan struct{}), changed: make(chan struct{})}
}

// listener makes l accept through the gate. Call it before shut.
func (h *hangGate) listener(l net.Listener) net.Listener {
	g := &gatedListener{Listener: l, h: h}
	h.mu.Lock()
	h.lns = append(h.lns, g)
	h.mu.Unlock()
	return g
}

// shut stops accepting and starts the wait for the stop. Only the first
// call does anything.
func (h *hangGate) shut() {
	h.shutOne.Do(func() {
		close(h.shutC)
		h.mu.Lock()
		lns := append([]*gatedListener(nil), h.lns...)
		h.mu.Unlock()
		for _, l := range lns {
			// Wakes an accept under way, which then parks.
			if d, ok := l.Listener.(interface{ SetDeadline(time.Time) error }); ok {
				d.SetDeadline(time.Unix(1, 0))
			}
		}
		go h.stopWhenIdle(len(lns))
	})
}

// stopWhenIdle waits, at most 10 s, until every accept loop has parked and
// every accepted connection has closed, then sends SIGSTOP to this
// process. It says on stderr how many connections were still open.
func (h *hangGate) stopWhenIdle(loops int) {
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
wait:
	for {
		h.mu.Lock()
		open, parked, changed := h.open, h.parked, h.changed
		h.mu.Unlock()
		if open == 0 && parked >= loops {
			break
		}
		select {
		case <-changed:
		case <-deadline.C:
			break wait
		}
	}
	h.mu.Lock()
	open := h.open
	h.mu.Unlock()
	fmt.Fprintf(os.Stderr, "testchild: stopping itself (SIGSTOP) gen=%d pid=%d open=%d\n", h.gen, os.Getpid(), open)
	syscall.Kill(os.Getpid(), syscall.SIGSTOP)
}

// update changes the counts under the lock and wakes stopWhenIdle.
func (h *hangGate) update(f func()) {
	h.mu.Lock()
	f()
	close(h.changed)
	h.changed = make(chan struct{})
	h.mu.Unlock()
}

// gatedListener counts what it accepts, and once its gate is shut accepts
// nothing more: its Accept blocks for good.
type gatedListener struct {
	net.Listener
	h *hangGate
}

func (l *gatedListener) Accept() (net.Conn, error) {
	for {
		select {
		case <-l.h.shutC:
			// Counted after any connection this loop accepted
			// before (the same goroutine), so a stop that waits for
			// both leaves none unanswered.
			l.h.update(func() { l.h.parked++ })
			select {}
		default:
		}
		c, err := l.Listener.Accept()
		if err != nil {
			select {
			case <-l.h.shutC:
				continue // the deadline set by shut
			default:
				return nil, err
			}
		}
		l.h.update(func() { l.h.open++ })
		return &gatedConn{Conn: c, h: l.h}, nil
	}
}

// gatedConn tells its gate when it closes.
type gatedConn struct {
	net.Conn
	h    *hangGate
	once sync.Once
}

func (c *gatedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.h.update(func() { c.h.open-- }) })
	return err
}
