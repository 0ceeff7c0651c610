package supervisor

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/health"
	"github.com/relaysh/relay/internal/reaper"
	"github.com/relaysh/relay/internal/sockets/steer"
)

// The harness runs a Supervisor on fakes of env (fakeclock_test.go,
// fakeproc_test.go): processes that do only what a test tells them, a
// clock that moves only when a test advances it, and checks that end when
// a test says. No child process is started, and nothing waits on the wall
// clock but the bound on a test's failure.

// waitLimit bounds every wait of a test for something that should happen.
const waitLimit = 10 * time.Second

// recv receives from c, failing the test after waitLimit.
func recv[T any](t *testing.T, c <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-c:
		return v
	case <-time.After(waitLimit):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// syncBuffer is a bytes.Buffer safe for the log handler's goroutines.
type syncBuffer struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	changed chan struct{} // closed and replaced at each write
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.changed != nil {
		close(b.changed)
		b.changed = nil
	}
	return b.buf.Write(p)
}

// next returns the text so far and a channel closed at the next write.
func (b *syncBuffer) next() (string, <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.changed == nil {
		b.changed = make(chan struct{})
	}
	return b.buf.String(), b.changed
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// harness is a Supervisor on fakes.
type harness struct {
	t     *testing.T
	sup   *Supervisor
	clock *fakeClock
	obs   *observer
	logs  syncBuffer

	startedC   chan *fakeProc
	checkC     chan *fakeCheck
	preflightC chan *fakeCheck
	probeC     chan *fakeCheck // liveness probes
	drainC     chan *fakeCheck // watches of old sockets draining
	stallC     chan *fakeCheck // watches of old sockets stalling
	orphanC    chan struct{}
	runC       chan runResult

	mu          sync.Mutex
	procs       []*fakeProc
	cgroups     []*fakeCgroup // by generation, from 1, when contained
	attrs       []reaper.Attr // each start's
	orphans     map[int][]int // by generation: what env.adopted lists
	orphanSigs  []string      // what signalPid sent: "4242 KILL"
	handedOver  []int         // the generations env.handOver was called for
	handOverErr error         // what env.handOver returns
	startErr    error         // the next start fails with it
	holdStderr  bool          // children keep their stderr open until closeStderr
	manual      bool          // the test plays Run's loop (see step)
	broken      bool          // checkStep found the state broken; on Run's goroutine
}

type runResult struct {
	out Outcome
	err error
}

// The test configuration's values, each distinct so that a test can tell
// the timers apart.
const (
	testHealthTimeout  = 60 * time.Second
	testStopTimeout    = 30 * time.Second
	testDrain          = 2 * time.Second
	testRestartBackoff = 100 * time.Millisecond
	testMaxBackoff     = 800 * time.Millisecond
)

var testCommand = Command{Path: "/srv/server", Args: []string{"server", "-version", "1"}}

// newHarness returns a harness whose Supervisor has the test
// configuration, changed by tweak if not nil. Run it with run.
func newHarness(t *testing.T, tweak func(*Config)) *harness {
	t.Helper()
	return newHarnessWith(t, tweak, harnessOpts{})
}

// newHarnessContained is newHarness, with each generation in a fake
// cgroup (contain_test.go) if contained.
func newHarnessContained(t *testing.T, tweak func(*Config), contained bool) *harness {
	t.Helper()
	return newHarnessWith(t, tweak, harnessOpts{contained: contained})
}

// harnessOpts choose the fakes of env that not every test has.
type harnessOpts struct {
	contained bool // each generation in a fake cgroup (contain_test.go)
	adaptive  bool // env.drained is a fake watch (drain_test.go)
	handOver  bool // env.stalled is a fake watch, env.handOver records its calls (kill_test.go)
}

func newHarnessWith(t *testing.T, tweak func(*Config), opts harnessOpts) *harness {
	t.Helper()
	h := &harness{
		t: t, clock: newFakeClock(), obs: newObserver(),
		startedC: make(chan *fakeProc, 64), checkC: make(chan *fakeCheck, 64), preflightC: make(chan *fakeCheck, 64),
		probeC: make(chan *fakeCheck, 64), drainC: make(chan *fakeCheck, 64), stallC: make(chan *fakeCheck, 64), orphanC: make(chan struct{}, 1), runC: make(chan runResult, 1),
	}
	cfg := Config{
		Command:        testCommand,
		HealthTimeout:  testHealthTimeout,
		Drain:          testDrain,
		StopTimeout:    testStopTimeout,
		RestartBackoff: testRestartBackoff,
		MaxBackoff:     testMaxBackoff,
		RuntimeDir:     t.TempDir(),
		Stderr:         io.Discard,
		Log:            slog.New(slog.NewTextHandler(&h.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Observer:       h.obs,
	}
	if tweak != nil {
		tweak(&cfg)
	}
	sup, err := newSupervisor(cfg, func(Config) (env, error) {
		var contain func(int) (container, error)
		adopted := h.adopted
		if opts.contained {
			contain, adopted = h.newCgroup, nil
		}
		var drained func(context.Context, int, func(steer.Backlog)) error
		if opts.adaptive {
			drained = h.drained
		}
		var stalled func(context.Context, int, time.Duration) error
		var handOver func(int) (int, error)
		if opts.handOver {
			stalled, handOver = h.stalled, h.handOver
		}
		return env{
			drained:     drained,
			stalled:     stalled,
			handOver:    handOver,
			contain:     contain,
			adopted:     adopted,
			signalPid:   h.signalPid,
			start:       h.start,
			adopt:       h.adoptProc,
			orphans:     h.orphanC,
			ready:       h.ready,
			probe:       h.liveProbe,
			preflight:   h.preflight,
			now:         h.clock.Now,
			afterFunc:   h.clock.AfterFunc,
			withTimeout: h.clock.WithTimeout,
			stepped:     h.checkStep,
		}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	h.sup = sup
	t.Cleanup(h.cleanup)
	return h
}

func (h *harness) start(path string, argv []string, attr reaper.Attr) (process, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.startErr; err != nil {
		h.startErr = nil
		return nil, err
	}
	p := &fakeProc{id: 1000 + len(h.procs) + 1, argv: argv, changed: make(chan struct{}), done: make(chan struct{})}
	h.attrs = append(h.attrs, attr)
	if h.holdStderr {
		fd, err := unix.FcntlInt(attr.Files[2].Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		p.stderrFD = os.NewFile(uintptr(fd), "fake child stderr")
	}
	h.procs = append(h.procs, p)
	if len(h.cgroups) == len(h.procs) {
		h.cgroups[len(h.procs)-1].main = p // its cgroup, just made
	}
	h.startedC <- p
	return p, nil
}

// adoptProc is a fake of a child an earlier image started (Restore).
func (h *harness) adoptProc(sp reaper.SavedProc, exited *reaper.Status) process {
	h.mu.Lock()
	defer h.mu.Unlock()
	p := &fakeProc{id: sp.Pid, changed: make(chan struct{}), done: make(chan struct{})}
	if exited != nil {
		p.exited, p.status = true, *exited
		close(p.done)
	}
	h.procs = append(h.procs, p)
	return p
}

func (h *harness) ready(ctx context.Context, ch health.Child) error {
	c := &fakeCheck{gen: ch.Generation, worker: ch.Worker, pid: ch.Pid, ctx: ctx, reply: make(chan error, 1)}
	h.checkC <- c
	return c.wait()
}

func (h *harness) liveProbe(ctx context.Context, ch health.Child) error {
	c := &fakeCheck{gen: ch.Generation, worker: ch.Worker, pid: ch.Pid, ctx: ctx, reply: make(chan error, 1)}
	h.probeC <- c
	return c.wait()
}

func (h *harness) drained(ctx context.Context, gen int, _ func(steer.Backlog)) error {
	c := &fakeCheck{gen: gen, ctx: ctx, reply: make(chan error, 1)}
	h.drainC <- c
	return c.wait()
}

func (h *harness) stalled(ctx context.Context, gen int, _ time.Duration) error {
	c := &fakeCheck{gen: gen, ctx: ctx, reply: make(chan error, 1)}
	h.stallC <- c
	return c.wait()
}

func (h *harness) handOver(gen int) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.handedOver = append(h.handedOver, gen)
	return 3, h.handOverErr
}

func (h *harness) preflight(ctx context.Context, argv, _ []string) error {
	c := &fakeCheck{argv: argv, ctx: ctx, reply: make(chan error, 1)}
	h.preflightC <- c
	return c.wait()
}

// run starts Run.
func (h *harness) run() {
	go func() {
		out, err := h.sup.Run()
		h.runC <- runResult{out, err}
	}()
}

// wait waits for Run to return.
func (h *harness) wait() (Outcome, error) {
	h.t.Helper()
	r := recv(h.t, h.runC, "Run to return")
	h.runC <- r // for cleanup
	return r.out, r.err
}

// cleanup ends what a test left running: every child exits and Run
// returns.
func (h *harness) cleanup() {
	if h.manual {
		close(h.sup.doneC) // as Run would: posts from helpers return
		h.mu.Lock()
		for _, p := range h.procs {
			p.closeStderr()
		}
		h.mu.Unlock()
		return
	}
	select {
	case <-h.sup.Done():
	default:
		h.sup.Stop(true)
		h.mu.Lock()
		procs := slices.Clone(h.procs)
		h.mu.Unlock()
		for _, p := range procs {
			p.closeStderr()
			p.exit(killed(syscall.SIGKILL), false)
			p.groupGone()
		}
		h.orphaned()
		select {
		case <-h.sup.Done():
		case <-time.After(waitLimit):
			h.t.Errorf("Run did not return after every child exited")
		}
	}
	if h.t.Failed() {
		h.t.Logf("supervisor log:\n%s", h.logs.String())
	}
}

// checkStep fails the test, once, if the supervisor's state is broken
// after it handled what: a generation whose slot disagrees with its state
// (generations.check). Run calls it after each step (env.stepped).
func (h *harness) checkStep(what any) {
	if h.broken {
		return
	}
	s := &h.sup.gens
	known := []*generation{s.lastExit, h.sup.stop.exitGen, h.sup.live.gen, h.sup.live.pending}
	if run := h.sup.restarts.current; run != nil {
		known = append(known, run.gen, run.prev, run.watch)
	}
	if err := s.check(known...); err != nil {
		h.broken = true
		desc := fmt.Sprintf("%T", what)
		if name, ok := what.(string); ok {
			desc = name
		}
		h.t.Errorf("after %s: %v", desc, err)
	}
}

// begin starts the first generation as Run does, for a test that then
// plays the loop with step.
func (h *harness) begin() {
	h.manual = true
	h.sup.beginRestart(&restartRun{reason: reasonStart})
	h.checkStep(reasonStart)
}

// step plays one turn of Run's loop, for a test that must choose the order
// in which the supervisor hears of events: it waits for the next event,
// checks that it is of want's type, and has the supervisor handle it.
func (h *harness) step(want event) {
	h.t.Helper()
	ev := recv(h.t, h.sup.eventC, fmt.Sprintf("a %T", want))
	if fmt.Sprintf("%T", ev) != fmt.Sprintf("%T", want) {
		h.t.Fatalf("event %T, want a %T", ev, want)
	}
	ev.handleEvent(h.sup)
	h.checkStep(ev)
}

// orphaned tells the supervisor that orphans were reaped.
func (h *harness) orphaned() {
	select {
	case h.orphanC <- struct{}{}:
	default:
	}
}

// started waits for the next child to start.
func (h *harness) started() *fakeProc {
	h.t.Helper()
	return recv(h.t, h.startedC, "a child to start")
}

// noStart checks that no child started that the test has not seen.
func (h *harness) noStart() {
	h.t.Helper()
	select {
	case p := <-h.startedC:
		h.t.Fatalf("pid %d started (%q), want no new child", p.id, p.argv)
	default:
	}
}

// check waits for the readiness check of generation gen.
func (h *harness) check(gen int) *fakeCheck {
	h.t.Helper()
	c := recv(h.t, h.checkC, fmt.Sprintf("the readiness check of generation %d", gen))
	if c.gen != gen {
		h.t.Fatalf("readiness check of generation %d, want %d", c.gen, gen)
	}
	return c
}

// serving runs the supervisor and makes its first generation ready.
func (h *harness) serving() *fakeProc {
	h.t.Helper()
	h.run()
	p := h.started()
	h.check(1).pass()
	h.waitLine("gen 1 pid 1001 serving")
	return p
}

// starting asks for a restart and waits for its new generation, number
// gen, to start and for its readiness check.
func (h *harness) starting(req RestartRequest, gen int) (<-chan Event, *fakeProc, *fakeCheck) {
	h.t.Helper()
	events := h.restart(req)
	p := h.started()
	return events, p, h.check(gen)
}

// draining makes a first generation serve, then restarts it with req into
// its drain window, and returns both generations and the restart's events
// so far and to come.
func (h *harness) draining(req RestartRequest) (old, p *fakeProc, seen []Event, events <-chan Event) {
	h.t.Helper()
	old = h.serving()
	events, p, c := h.starting(req, 2)
	c.pass()
	return old, p, until(h.t, events, PhaseDraining), events
}

// waitLog waits for a log line that contains want.
func (h *harness) waitLog(want string) {
	h.t.Helper()
	deadline := time.Now().Add(waitLimit)
	for time.Now().Before(deadline) {
		text, changed := h.logs.next()
		if strings.Contains(text, want) {
			return
		}
		recv(h.t, changed, fmt.Sprintf("a log line with %q", want))
	}
	h.t.Fatalf("no log line with %q within %s", want, waitLimit)
}

// waitLine waits for the status line want (see observer.waitLine).
func (h *harness) waitLine(want string) {
	h.t.Helper()
	h.obs.waitLine(h.t, want)
}

// gens describes the live generations, oldest first: "1:draining
// 2:serving".
func gens(st Status) string {
	var parts []string
	for _, g := range st.Generations {
		parts = append(parts, fmt.Sprintf("%d:%s", g.Generation, g.State))
	}
	return strings.Join(parts, " ")
}

// wantGens checks the live generations (see gens).
func (h *harness) wantGens(want string) Status {
	h.t.Helper()
	st, err := h.sup.Status()
	if err != nil {
		h.t.Fatal(err)
	}
	if got := gens(st); got != want {
		h.t.Errorf("generations %q, want %q", got, want)
	}
	return st
}

// restart asks for a restart and returns the channel that follows it.
func (h *harness) restart(req RestartRequest) <-chan Event {
	h.t.Helper()
	if req.Reason == "" {
		req.Reason = "test"
	}
	events, err := h.sup.Restart(req)
	if err != nil {
		h.t.Fatal(err)
	}
	return events
}

// until reads events up to and including the first of phase.
func until(t *testing.T, events <-chan Event, phase Phase) []Event {
	t.Helper()
	var got []Event
	for {
		ev, ok := recvOK(t, events)
		if !ok {
			t.Fatalf("events ended before %s: %v", phase, phases(got))
		}
		got = append(got, ev)
		if ev.Phase == phase {
			return got
		}
	}
}

// all reads events until the channel is closed.
func all(t *testing.T, events <-chan Event) []Event {
	t.Helper()
	var got []Event
	for {
		ev, ok := recvOK(t, events)
		if !ok {
			return got
		}
		got = append(got, ev)
	}
}

func recvOK(t *testing.T, events <-chan Event) (Event, bool) {
	t.Helper()
	select {
	case ev, ok := <-events:
		return ev, ok
	case <-time.After(waitLimit):
		t.Fatalf("timed out waiting for a restart event")
		return Event{}, false
	}
}

func phases(evs []Event) []Phase {
	var out []Phase
	for _, ev := range evs {
		out = append(out, ev.Phase)
	}
	return out
}

// result is the Result among evs.
func result(t *testing.T, evs []Event) Result {
	t.Helper()
	for _, ev := range evs {
		if ev.Result != nil {
			return *ev.Result
		}
	}
	t.Fatalf("no result in %v", phases(evs))
	return Result{}
}

func checkPhases(t *testing.T, evs []Event, want ...Phase) {
	t.Helper()
	if got := phases(evs); !slices.Equal(got, want) {
		t.Errorf("phases %v, want %v", got, want)
	}
}
