package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/relaysh/relay/bench/load"
	"github.com/relaysh/relay/bench/report"
	"github.com/relaysh/relay/internal/procfs"
)

// settings are the benchmark's knobs and the binaries it runs.
type settings struct {
	duration, startup, work, lameDuck, delay, timeout, bucket, idle time.Duration
	restarts, workers                                               int
	plainShutdown                                                   bool
	relay, hello, self, starter                                     string
	out                                                             string // results and logs
	tmp                                                             string // binaries and control sockets, removed at exit
	// The takeover cost comparison: rounds, restarts and load per run.
	costRounds, costRestarts int
	costDuration             time.Duration
	// The tight-restarts run: SIGHUPs, their spacing, the backend's startup.
	tightRestarts               int
	tightInterval, tightStartup time.Duration
	// The memory run: restarts, relay's --drain ("" for its default), and
	// the longest wait for the memory to settle at the end.
	memoryRestarts int
	memoryDrain    string
	memorySettle   time.Duration
	// The worker-pool run (pool.go).
	poolDuration, poolBurn time.Duration
}

// scenario is one way of running and restarting the backend.
type scenario struct {
	name string
	// health is relay's --health, for the relay scenarios; "" gives relay
	// no --health, so that it uses its default.
	health string
	// relayArgs are more flags for relay run.
	relayArgs []string
	// backendArgs are more flags for the backend (hello).
	backendArgs []string
	// launch starts the backend on addr (with its supervisor, if any).
	launch func(s *settings, sc scenario, addr string, logf *os.File) (*setup, error)
}

// setup is a running scenario.
type setup struct {
	supervisor string // its name; "" when the backend runs alone
	control    string // relay's control socket; "" for the others
	pid        func() int
	restart    func() error // nil: never restarted
	stop       func() error
	// exited is closed when the process launched (or last restarted)
	// has exited.
	exited func() <-chan struct{}
}

func scenarios() []scenario {
	// direct, naive and relay-bind run the same command: hello binding
	// its port itself, a server that knows nothing of relay.
	return []scenario{
		{name: "direct", backendArgs: []string{"-bind"}, launch: launchAlone(false)},
		{name: "naive", backendArgs: []string{"-bind"}, launch: launchAlone(true)},
		{name: "relay-bind", backendArgs: []string{"-bind"}, launch: launchRelay},
		{name: "relay-fd", relayArgs: []string{"--takeover", "off"}, launch: launchRelay},
		{name: "relay-notify", health: "notify", launch: launchRelay},
		{name: "relay-shared", health: "notify", relayArgs: []string{"--steer", "off"}, launch: launchRelay},
		{name: "relay-http", health: "http://{health_addr}/healthz", launch: launchRelay},
		{name: "relay-delay", health: "delay", launch: launchRelay},
		{name: "start_server", launch: launchStarter},
		// relay itself replaced, the backend untouched: in place (relay
		// upgrade, by SIGUSR2), and as a service manager's restart of
		// relay does it without an fd store (stop relay, start another).
		{name: "relay-upgrade", health: "notify", launch: launchRelayWith(relayUpgrade)},
		{name: "relay-stop-start", health: "notify", launch: launchRelayWith(relayStopStart)},
	}
}

// helloArgs is the backend's command line, with scenario sc's own flags.
func (s *settings) helloArgs(sc scenario, addr string) []string {
	args := []string{s.hello, "-addr", addr, "-startup", s.startup.String(), "-work", s.work.String(),
		"-lame-duck", s.lameDuck.String()}
	if s.plainShutdown {
		args = append(args, "-plain-shutdown")
	}
	return append(args, sc.backendArgs...)
}

// launchAlone runs the backend binding addr itself. With restarts, a restart
// stops it and starts it again: what a server does without a supervisor.
func launchAlone(restarts bool) func(*settings, scenario, string, *os.File) (*setup, error) {
	return func(s *settings, sc scenario, addr string, logf *os.File) (*setup, error) {
		p, err := startProc(s.helloArgs(sc, addr), logf)
		if err != nil {
			return nil, err
		}
		st := &setup{
			pid:    func() int { return 0 },
			stop:   func() error { return p.stop(s.stopGrace()) },
			exited: func() <-chan struct{} { return p.done },
		}
		if restarts {
			st.restart = func() error {
				if err := p.stop(s.stopGrace()); err != nil {
					return err
				}
				p, err = startProc(s.helloArgs(sc, addr), logf)
				return err
			}
		}
		return st, nil
	}
}

// How a relay scenario's restart is done.
const (
	relayRestart   = iota // SIGHUP: a new generation of the backend
	relayUpgrade          // SIGUSR2: relay replaces its own binary in place
	relayStopStart        // relay stopped, and a new relay started
)

func launchRelay(s *settings, sc scenario, addr string, logf *os.File) (*setup, error) {
	return launchRelayWith(relayRestart)(s, sc, addr, logf)
}

// launchRelayWith runs the backend under relay, restarted as how says.
func launchRelayWith(how int) func(*settings, scenario, string, *os.File) (*setup, error) {
	return func(s *settings, sc scenario, addr string, logf *os.File) (*setup, error) {
		argv, control, err := s.relayArgv(sc, addr)
		if err != nil {
			return nil, err
		}
		p, err := startProc(argv, logf)
		if err != nil {
			return nil, err
		}
		st := &setup{
			supervisor: "relay",
			control:    control,
			pid:        func() int { return p.cmd.Process.Pid },
			restart:    func() error { return p.cmd.Process.Signal(syscall.SIGHUP) },
			stop:       func() error { return p.stop(s.stopGrace()) },
			exited:     func() <-chan struct{} { return p.done },
		}
		switch how {
		case relayUpgrade:
			st.restart = func() error { return p.cmd.Process.Signal(syscall.SIGUSR2) }
		case relayStopStart:
			st.restart = func() error {
				if err := p.stop(s.stopGrace()); err != nil {
					return err
				}
				p, err = startProc(argv, logf)
				return err
			}
		}
		return st, nil
	}
}

// relayArgv is relay run's command line for sc on addr, and its control
// socket's path.
func (s *settings) relayArgv(sc scenario, addr string) ([]string, string, error) {
	ctl, err := os.MkdirTemp(s.tmp, "control-")
	if err != nil {
		return nil, "", fmt.Errorf("creating a control directory: %w", err)
	}
	control := filepath.Join(ctl, "relay.sock")
	args := []string{s.relay, "run", "--listen", addr, "--control", control, "--log-format", "json"}
	switch sc.health {
	case "":
	case "delay":
		args = append(args, "--health", "delay:"+s.delay.String())
	default:
		args = append(args, "--health", sc.health)
	}
	args = append(append(args, sc.relayArgs...), "--")
	return append(args, s.helloArgs(sc, addr)...), control, nil
}

// launchStarter runs the backend under start_server, which binds addr and
// passes it in SERVER_STARTER_PORT; this program's server-starter-exec turns
// that into socket activation for the same backend. On SIGHUP start_server
// starts a new worker, waits --interval (1 s, its default and its
// smallest: it sleeps whole seconds), and if the worker is still alive,
// sends the old one SIGTERM.
func launchStarter(s *settings, sc scenario, addr string, logf *os.File) (*setup, error) {
	args := append([]string{s.starter, "--port=" + addr, "--interval=1", "--", s.self, "server-starter-exec", "--"}, s.helloArgs(sc, addr)...)
	p, err := startProc(args, logf)
	if err != nil {
		return nil, err
	}
	return &setup{
		supervisor: "start_server",
		pid:        func() int { return p.cmd.Process.Pid },
		restart:    func() error { return p.cmd.Process.Signal(syscall.SIGHUP) },
		stop:       func() error { return p.stop(s.stopGrace()) },
		exited:     func() <-chan struct{} { return p.done },
	}, nil
}

// stopGrace bounds a graceful stop: the backend's lame duck, plus room.
func (s *settings) stopGrace() time.Duration { return s.lameDuck + 10*time.Second }

// proc is a started process in its own process group.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // Wait's result, once done is closed
}

func startProc(argv []string, logf *os.File) (*proc, error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = cleanEnv()
	// An *os.File is handed to the child as is: no copying goroutine, and
	// every process of a run appends its lines to the same log.
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", argv[0], err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	return p, nil
}

// stop sends SIGTERM and waits for the exit; after grace it kills the
// process group and the process groups of the children (relay starts each
// generation in a group of its own). A process that had exited before it
// was asked to, or that exits with a failure, is an error: the run it
// belonged to is suspect.
func (p *proc) stop(grace time.Duration) error {
	name := filepath.Base(p.cmd.Path)
	select {
	case <-p.done:
		return fmt.Errorf("%s exited during the run: %v", name, p.err)
	default:
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("asking %s to stop: %w", name, err)
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
		if p.err != nil {
			return fmt.Errorf("%s stopped with a failure: %w", name, p.err)
		}
		return nil
	case <-t.C:
	}
	pid := p.cmd.Process.Pid
	for _, child := range procfs.Children(pid) {
		syscall.Kill(-child, syscall.SIGKILL)
		syscall.Kill(child, syscall.SIGKILL)
	}
	syscall.Kill(-pid, syscall.SIGKILL)
	<-p.done
	return fmt.Errorf("%s did not stop within %v and was killed", name, grace)
}

// cleanEnv is this process's environment without what would make a backend
// or supervisor take sockets or notifications meant for this process.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "LISTEN_") || strings.HasPrefix(kv, "NOTIFY_SOCKET=") ||
			strings.HasPrefix(kv, "WATCHDOG_") || strings.HasPrefix(kv, "SERVER_STARTER_") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// freeAddr returns a loopback address with a port that was free a moment ago.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("finding a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// waitServing waits until addr answers a request with 2xx, or until the
// process behind it has exited (exited is closed).
func waitServing(ctx context.Context, addr string, within time.Duration, exited <-chan struct{}) (int32, error) {
	deadline := time.Now().Add(within)
	c := load.NewClient(load.Config{Addr: addr, Timeout: time.Second}, time.Now())
	defer c.Close()
	for {
		s := c.Do()
		if s.Class == load.OK {
			return s.Pid, nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("%s did not answer within %v (last outcome: %v)", addr, within, s.Class)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-exited:
			return 0, fmt.Errorf("exited before %s answered (last outcome: %v)", addr, s.Class)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// serving is a scenario launched and answering on addr, its processes'
// output going to the log at logPath.
type serving struct {
	*setup
	addr, logPath string
	logf          *os.File
	stopped       bool
}

// launchServing launches sc on a free loopback port, logging to
// logs/NAME.log, and waits until it answers.
func launchServing(ctx context.Context, s *settings, sc scenario, name string) (*serving, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	logPath := filepath.Join(s.out, "logs", name+".log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("creating the log of %s: %w", name, err)
	}
	st, err := sc.launch(s, sc, addr, logf)
	if err != nil {
		logf.Close()
		return nil, err
	}
	run := &serving{setup: st, addr: addr, logPath: logPath, logf: logf}
	if _, err := waitServing(ctx, addr, 30*time.Second+s.startup, st.exited()); err != nil {
		run.close()
		return nil, fmt.Errorf("%s: %w (see %s)", name, err, logPath)
	}
	return run, nil
}

// finish stops the scenario's processes and reports how they stopped.
func (r *serving) finish() error {
	r.stopped = true
	return r.stop()
}

// close stops the processes unless finish did, and closes the log.
func (r *serving) close() {
	if !r.stopped {
		r.finish()
	}
	r.logf.Close()
}

// runOne runs scenario sc in one mode and returns its figures.
func runOne(ctx context.Context, s *settings, sc scenario, mode string) (report.Result, error) {
	run, err := launchServing(ctx, s, sc, sc.name+"-"+mode)
	if err != nil {
		return report.Result{}, err
	}
	defer run.close()
	st, addr := run.setup, run.addr

	var before usage
	if st.supervisor != "" {
		if before, err = readUsage(st.pid()); err != nil {
			return report.Result{}, err
		}
	}
	restarts := s.restarts
	if st.restart == nil {
		restarts = 0
	}
	base := time.Now()
	loadCtx, cancel := context.WithDeadline(ctx, base.Add(s.duration))
	defer cancel()
	results := make(chan load.Result, 1)
	go func() {
		results <- load.Run(loadCtx, load.Config{Addr: addr, Workers: s.workers, KeepAlive: mode == "keep-alive", Timeout: s.timeout}, base)
	}()

	// K restarts, evenly spaced: at D*i/(K+1).
	var triggers []time.Duration
	var restartErr error
	for i := 1; i <= restarts; i++ {
		at := base.Add(s.duration * time.Duration(i) / time.Duration(restarts+1))
		select {
		case <-loadCtx.Done():
		case <-time.After(time.Until(at)):
		}
		if loadCtx.Err() != nil {
			break
		}
		triggers = append(triggers, time.Since(base))
		if err := st.restart(); err != nil && restartErr == nil {
			restartErr = fmt.Errorf("restart %d: %w", i, err)
		}
	}
	lr := <-results
	if ctx.Err() != nil {
		return report.Result{}, ctx.Err()
	}

	var sup *report.Proc
	if st.supervisor != "" {
		after, err := readUsage(st.pid())
		if err != nil {
			return report.Result{}, err
		}
		// The fds are counted once the restarts are over: when every
		// backend but the newest has exited (bounded by a stop's grace).
		waitOldGone(lr.Samples, s.stopGrace())
		done, err := readUsage(st.pid())
		if err != nil {
			return report.Result{}, err
		}
		sup = supervisorUsage(st.supervisor, before, after, done.fds)
	}
	stopErr := run.finish()
	signals, err := stopSignals(run.logPath, base)
	if err != nil {
		return report.Result{}, err
	}
	r := report.Analyze(report.Input{
		Scenario: sc.name, Mode: mode, Duration: s.duration, Bucket: s.bucket,
		Samples: lr.Samples, Triggers: triggers, StopSignals: signals, Supervisor: sup, FirstErrors: lr.FirstErrors,
	})
	return r, errors.Join(restartErr, stopErr)
}

// stopSignals reads when each backend pid got its stop signal, from the
// run's log, as offsets from base.
func stopSignals(logPath string, base time.Time) (map[int32]time.Duration, error) {
	l, err := readRunLog(logPath, base)
	return l.stops, err
}

// measureIdle runs a supervisor with one backend and no load for s.idle and
// reports its CPU time and memory over that period.
func measureIdle(ctx context.Context, s *settings, sc scenario) (report.Idle, error) {
	run, err := launchServing(ctx, s, sc, "idle-"+sc.name)
	if err != nil {
		return report.Idle{}, err
	}
	defer run.close()
	st := run.setup
	before, err := readUsage(st.pid())
	if err != nil {
		return report.Idle{}, err
	}
	t0 := time.Now()
	select {
	case <-ctx.Done():
		return report.Idle{}, ctx.Err()
	case <-time.After(s.idle):
	}
	after, err := readUsage(st.pid())
	if err != nil {
		return report.Idle{}, err
	}
	idle := report.Idle{Name: st.supervisor, Seconds: time.Since(t0).Seconds(),
		CPUSeconds: (after.cpu - before.cpu).Seconds(), RSSKB: after.rssKB, RSSAnonKB: after.anonKB, RSSFileKB: after.fileKB, FDs: after.fds}
	if err := run.finish(); err != nil {
		return idle, fmt.Errorf("idle %s: %w", sc.name, err)
	}
	return idle, nil
}

// waitOldGone waits until every pid that answered, but the one that answered
// last, has exited, or until within has passed.
func waitOldGone(samples []load.Sample, within time.Duration) {
	var newest load.Sample
	pids := map[int32]bool{}
	for _, s := range samples {
		if s.Class == load.OK && s.Pid > 0 {
			pids[s.Pid] = true
			if s.End() > newest.End() {
				newest = s
			}
		}
	}
	delete(pids, newest.Pid)
	deadline := time.Now().Add(within)
	for pid := range pids {
		for syscall.Kill(int(pid), 0) == nil && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
	}
}
