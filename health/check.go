package health

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/relaysh/relay/internal/reaper"
)

// Probe intervals: the first retry comes after firstInterval and the
// interval doubles up to maxInterval, so a child that becomes ready is seen
// within milliseconds early on and within maxInterval later.
const (
	firstInterval = 2 * time.Millisecond
	maxInterval   = 100 * time.Millisecond
	// attemptLimit bounds one http, tcp or exec attempt.
	attemptLimit = 5 * time.Second
	// outputLimit bounds what an exec check's output keeps for the log.
	outputLimit = 2048
)

// Starter starts processes; the reaper is one.
type Starter interface {
	Start(path string, argv []string, attr reaper.Attr) (*reaper.Process, error)
}

// Child is what a check knows of the child it checks.
type Child struct {
	Vars
	// NotifyReady is closed when the child sends READY=1 on its own
	// notify socket.
	NotifyReady <-chan struct{}
	// Notified is closed at the child's first sd_notify message of any
	// kind (READY=1, STATUS=..., anything); nil when relay does not
	// tell.
	Notified <-chan struct{}
	// SpeaksNotify reports whether an earlier generation of this relay
	// sent any sd_notify message; nil means false.
	SpeaksNotify func() bool
	// Control, if set, is the dialer's Control function for http, tcp
	// and accept probes: relay uses it to steer a probe of a public
	// address to this child's own socket.
	Control func(network, address string, c syscall.RawConn) error
	// Listeners are the child's listeners, for accept and auto.
	Listeners []Listener
}

// Listener is one of relay's listeners as a readiness check sees it.
type Listener struct {
	Name string // e.g. "tcp-8080", for messages
	// Probe is the host:port to dial for a steered TCP listener: Control
	// steers the connection to this child's own socket. "" when the
	// listener cannot be probed alone (UDP, unix, a shared TCP socket).
	Probe string
	// Claimed is closed once this child took the listener over with a
	// bind of its own (and, for a stream socket, its listen); nil when
	// relay cannot observe that (bind takeover off or unavailable).
	Claimed <-chan struct{}
	// QUIC probes this child's own socket of a UDP listener steered by
	// flow: nil once the child answered a QUIC packet of an unknown
	// version with Version Negotiation, as a QUIC server does. nil (the
	// func) for other listeners.
	QUIC func(ctx context.Context) error
}

// controlKey carries a Child's Control to the shared HTTP transport.
type controlKey struct{}

// dial connects as the probe of the child whose Control ctx carries.
func dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d := net.Dialer{}
	if ctl, ok := ctx.Value(controlKey{}).(func(string, string, syscall.RawConn) error); ok {
		d.Control = ctl
	}
	return d.DialContext(ctx, network, addr)
}

// Checker runs one Spec against children.
type Checker struct {
	spec    Spec
	starter Starter
	env     []string
	client  *http.Client
}

// NewChecker returns a Checker for spec. Exec checks are started through
// starter with env plus the child's variables.
func NewChecker(spec Spec, starter Starter, env []string) *Checker {
	c := &Checker{spec: spec, starter: starter, env: env}
	if spec.Kind == HTTP {
		c.client = &http.Client{
			Transport: &http.Transport{
				// A fresh connection per probe: a pooled one could
				// be held by another generation's server.
				DisableKeepAlives: true,
				Proxy:             nil,
				DialContext:       dial,
				// The private address is on loopback and often has a
				// self-signed certificate; the probe asks "is it
				// up", not "is it trusted".
				TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, //nolint:gosec
			},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	return c
}

// Wait returns nil once the child is ready, or an error that wraps ctx's
// error and says what the last attempt saw.
func (c *Checker) Wait(ctx context.Context, ch Child) error {
	switch c.spec.Kind {
	case Notify:
		select {
		case <-ch.NotifyReady:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("no READY=1 on the child's NOTIFY_SOCKET (a server that does not call sd_notify needs another --health): %w", ctx.Err())
		}
	case Delay:
		t := time.NewTimer(c.spec.Delay)
		defer t.Stop()
		select {
		case <-t.C:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("waiting %s: %w", c.spec.Delay, ctx.Err())
		}
	case Accept:
		return waitAccept(ctx, ch)
	case Auto:
		return waitAuto(ctx, ch)
	}
	n, last := retry(ctx, func(ctx context.Context) error { return c.attempt(ctx, ch) })
	if last == nil {
		return nil
	}
	return fmt.Errorf("%d attempts, last: %w", n, withCtxErr(ctx, last))
}

// retry calls try, each time with a context bounded by attemptLimit, until
// it succeeds or ctx ends, waiting between attempts for an interval that
// doubles from firstInterval to maxInterval. It returns the number of
// attempts, and nil or the last error.
func retry(ctx context.Context, try func(context.Context) error) (attempts int, last error) {
	interval := firstInterval
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, attemptLimit)
		err := try(actx)
		cancel()
		if err == nil {
			return attempt, nil
		}
		// An attempt cut short by the end of the whole check says less
		// than the one before it (a 503, a refused connection): keep
		// that one.
		if last == nil || ctx.Err() == nil {
			last = err
		}
		t := time.NewTimer(interval)
		select {
		case <-ctx.Done():
			t.Stop()
			return attempt, last
		case <-t.C:
		}
		interval = min(2*interval, maxInterval)
	}
}

// withCtxErr returns err, which an attempt returned when ctx ended, with
// ctx's error after it unless err already wraps that.
func withCtxErr(ctx context.Context, err error) error {
	if ctx.Err() == nil || errors.Is(err, ctx.Err()) {
		return err
	}
	return fmt.Errorf("%w: %w", err, ctx.Err())
}

// withControl returns ctx carrying ch's Control for dial.
func withControl(ctx context.Context, ch Child) context.Context {
	if ch.Control != nil {
		return context.WithValue(ctx, controlKey{}, ch.Control)
	}
	return ctx
}

func (c *Checker) attempt(ctx context.Context, ch Child) error {
	ctx = withControl(ctx, ch)
	switch c.spec.Kind {
	case HTTP:
		return c.httpAttempt(ctx, Expand(c.spec.Target, ch.Vars))
	case TCP:
		return probeAccepted(ctx, Expand(c.spec.Target, ch.Vars))
	case Exec:
		return c.execAttempt(ctx, ch)
	}
	return fmt.Errorf("unknown check kind %q", c.spec.Kind)
}

func (c *Checker) httpAttempt(ctx context.Context, target string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", "relay-health")
	resp, err := c.client.Do(req)
	if err != nil {
		return err
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("GET %s: %s", target, resp.Status)
	}
	return nil
}

func (c *Checker) execAttempt(ctx context.Context, ch Child) error {
	argv := make([]string, len(c.spec.Argv))
	for i, a := range c.spec.Argv {
		argv[i] = Expand(a, ch.Vars)
	}
	env := append(append([]string(nil), c.env...), ch.Vars.Env()...)
	return RunCommand(ctx, c.starter, argv, env)
}

// RunCommand runs argv (no shell) through starter in a process group of its
// own, with env, and returns nil if it exits 0. Otherwise the error holds
// its status and the start of its output. When ctx ends first, the group is
// killed.
func RunCommand(ctx context.Context, starter Starter, argv []string, env []string) error {
	_, err := CommandOutput(ctx, starter, argv, env)
	return err
}

// CommandOutput is RunCommand that also returns what the command wrote to
// its stdout and stderr, up to outputLimit bytes, when it exits 0.
func CommandOutput(ctx context.Context, starter Starter, argv []string, env []string) ([]byte, error) {
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return nil, fmt.Errorf("finding command %q: %w", argv[0], err)
	}
	cmdline := strings.Join(argv, " ")
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("creating pipe for the output of %s: %w", cmdline, err)
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		pr.Close()
		pw.Close()
		return nil, fmt.Errorf("opening %s: %w", os.DevNull, err)
	}
	p, err := starter.Start(path, argv, reaper.Attr{Env: env, Files: []*os.File{devnull, pw, pw}, NewGroup: true})
	pw.Close()
	devnull.Close()
	if err != nil {
		pr.Close()
		return nil, fmt.Errorf("starting %s: %w", cmdline, err)
	}
	outC := make(chan []byte, 1)
	go func() {
		defer pr.Close()
		b, _ := io.ReadAll(io.LimitReader(pr, outputLimit))
		io.Copy(io.Discard, pr) // drain, so the command never blocks writing
		outC <- b
	}()
	select {
	case <-p.Done():
	case <-ctx.Done():
		p.SignalGroup(syscall.SIGKILL)
		<-p.Done()
		p.SignalGroup(syscall.SIGKILL) // anything it left in its group
		return nil, fmt.Errorf("%s did not finish: %w", cmdline, ctx.Err())
	}
	p.SignalGroup(syscall.SIGKILL)
	st := p.Status()
	var out []byte
	select {
	case out = <-outC:
	case <-time.After(100 * time.Millisecond):
		// A process it left behind still holds the pipe.
	}
	if st.ExitCode() == 0 {
		return out, nil
	}
	if out = bytes.TrimSpace(out); len(out) > 0 {
		return nil, fmt.Errorf("%s: %s: %s", cmdline, st, out)
	}
	return nil, fmt.Errorf("%s: %s", cmdline, st)
}

// PickHealthAddr chooses a free loopback port for a child's private health
// address. The port is free when it returns, and the child must bind it
// soon after it starts. Where it can, the port comes from below the kernel's
// ephemeral range (net.ipv4.ip_local_port_range), skipping the ports
// reserved there (ip_local_reserved_ports): no outgoing connection is given
// such a port on its own, so none can take it before the child binds it, as
// one could take a port from the ephemeral range.
func PickHealthAddr() (string, error) {
	ports, _ := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	reserved, _ := os.ReadFile("/proc/sys/net/ipv4/ip_local_reserved_ports")
	for _, port := range candidatePorts(string(ports), string(reserved), rand.IntN) {
		if addr, err := freeLoopback(port); err == nil {
			return addr, nil
		}
	}
	addr, err := freeLoopback(0) // the kernel's choice, from the ephemeral range
	if err != nil {
		return "", fmt.Errorf("picking a private health port: %w", err)
	}
	return addr, nil
}

// healthPortTries bounds the ports PickHealthAddr tries below the
// ephemeral range.
const healthPortTries = 16

// candidatePorts returns up to healthPortTries random ports from 1024 to
// just below the ephemeral range given in portRange ("32768 60999"), none
// of them in reserved ("8080,9000-9010"); none if that leaves no room.
func candidatePorts(portRange, reserved string, intN func(int) int) []int {
	f := strings.Fields(portRange)
	if len(f) != 2 {
		return nil
	}
	low, err := strconv.Atoi(f[0])
	if err != nil || low <= 1024+healthPortTries {
		return nil
	}
	var out []int
	for range healthPortTries {
		p := 1024 + intN(low-1024)
		if !inPortList(reserved, p) {
			out = append(out, p)
		}
	}
	return out
}

// inPortList reports whether port is in a list like "8080,9000-9010".
func inPortList(list string, port int) bool {
	for _, item := range strings.Split(strings.TrimSpace(list), ",") {
		lo, hi, isRange := strings.Cut(item, "-")
		a, err := strconv.Atoi(lo)
		if err != nil {
			continue
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil {
				continue
			}
		}
		if port >= a && port <= b {
			return true
		}
	}
	return false
}

// freeLoopback binds 127.0.0.1:port (0: any) and lets it go, returning
// the address.
func freeLoopback(port int) (string, error) {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return "", err
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return "", err
	}
	return addr, nil
}
