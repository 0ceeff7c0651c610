package supervisor

import (
	"errors"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/relaysh/relay/health"
)

// The liveness configuration's values, distinct from the other timers:
// a probe's own timeout is min(interval, maxLivenessTimeout).
const (
	testLivenessInterval = 7 * maxLivenessTimeout / 5
	testLivenessFailures = 3
	testChildWatchdog    = 11 * maxLivenessTimeout / 5
)

// withLiveness configures an accept liveness check.
func withLiveness(cfg *Config) {
	cfg.Liveness = health.Spec{Kind: health.Accept, Raw: "accept"}
	cfg.LivenessInterval = testLivenessInterval
	cfg.LivenessFailures = testLivenessFailures
}

func withWatchdog(cfg *Config) { cfg.ChildWatchdog = testChildWatchdog }

// probe waits for the next liveness probe, after its interval, and checks
// that it is of generation gen.
func (h *harness) probe(gen int) *fakeCheck {
	h.t.Helper()
	h.clock.waitTimer(h.t, testLivenessInterval)
	h.clock.advance(testLivenessInterval)
	c := recv(h.t, h.probeC, "a liveness probe")
	if c.gen != gen {
		h.t.Fatalf("liveness probe of generation %d, want %d", c.gen, gen)
	}
	return c
}

// failProbes fails n probes of generation gen in a row.
func (h *harness) failProbes(gen, n int) {
	h.t.Helper()
	for range n {
		h.probe(gen).fail(errors.New("connected, but the server has not accepted it"))
	}
}

// noProbe checks that no probe of the test's has started.
func (h *harness) noProbe() {
	h.t.Helper()
	select {
	case c := <-h.probeC:
		h.t.Fatalf("a liveness probe of generation %d ran, want none", c.gen)
	default:
	}
}

// ping sends WATCHDOG=1 to generation gen's notify socket, as the child's
// sd_notify does.
func (h *harness) ping(gen int) {
	h.t.Helper()
	path := filepath.Join(h.sup.cfg.RuntimeDir, "gen-"+string(rune('0'+gen))+".notify")
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		h.t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("WATCHDOG=1")); err != nil {
		h.t.Fatal(err)
	}
}

// untouched checks that p got no signal; who names it and when.
func (p *fakeProc) untouched(t *testing.T, who string) {
	t.Helper()
	if got := p.got(); len(got) != 0 {
		t.Errorf("%s got %q, want nothing", who, got)
	}
}

// wantReplaced checks the live generations (see gens), and that n
// liveness replacements and no other restart were counted.
func (h *harness) wantReplaced(gens string, n int) {
	h.t.Helper()
	r := h.wantGens(gens).Restarts
	if r.LivenessReplacements != n || r.OK+r.RolledBack+r.Refused+r.Replacements != 0 {
		h.t.Errorf("restart counts %+v, want %d liveness replacements and no other restart", r, n)
	}
}

// logged checks that the log has want.
func (h *harness) logged(want string) {
	h.t.Helper()
	if !strings.Contains(h.logs.String(), want) {
		h.t.Errorf("no %q in the log", want)
	}
}

// Failures below --liveness-failures change nothing, and a passing probe
// starts the count again.
func TestLivenessFailuresBelowThresholdDoNothing(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withLiveness)
	p := h.serving()
	h.failProbes(1, testLivenessFailures-1)
	h.probe(1).pass()
	h.failProbes(1, testLivenessFailures-1)
	h.clock.waitTimer(t, testLivenessInterval) // the last failure was handled
	h.noStart()
	p.untouched(t, "the serving generation")
	h.wantReplaced("1:serving", 0)
	h.logged("liveness check passed again")
}

// At --liveness-failures in a row a restart with its own reason begins
// after the backoff; the failed generation serves until the new one is
// ready, and gets its stop signal only after the drain.
func TestLivenessFailureReplacesAfterTheNewServes(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withLiveness)
	old := h.serving()
	h.failProbes(1, testLivenessFailures)
	h.waitLine("gen 1 pid 1001 serving; liveness replacement pending")
	h.clock.waitTimer(t, testRestartBackoff)
	h.clock.advance(testRestartBackoff)
	p := h.started()
	c := h.check(2)
	h.wantGens("1:serving 2:starting")
	old.untouched(t, "the failed generation before its replacement was ready")
	h.noProbe() // paused during the restart
	c.pass()
	h.waitLine("gen 1 pid 1001 draining; gen 2 pid 1002 serving")
	old.untouched(t, "the failed generation in its drain")
	h.clock.waitTimer(t, testDrain)
	h.clock.advance(testDrain)
	old.waitSignals(t, "TERM")
	// The restart is over once the new one's watch is armed; only then may
	// the clock move, or the watch's first probe would come due after it.
	h.clock.waitTimer(t, testLivenessInterval)
	// A hung child is killed after the stop timeout.
	h.clock.advance(testStopTimeout)
	old.waitSignals(t, "TERM", "group KILL")
	old.exit(killed(syscall.SIGKILL), false)
	h.waitLine("gen 2 pid 1002 serving")
	h.wantReplaced("2:serving", 1)
	if got := h.obs.milestones(); !slices.Equal(got, []string{"ready"}) {
		t.Errorf("the Observer heard %q, want only the first ready: a liveness replacement is no reload", got)
	}
	h.logged(`msg="serving generation failed its liveness check; replacing it with a restart" gen=1 pid=1001`)
	h.logged(`msg="restart begun" reason="liveness failed"`)
	p.untouched(t, "the new generation")
	// The new one is watched in turn, from the end of its restart (the
	// stop timeout's advance made its first probe due), its count fresh.
	if c := recv(t, h.probeC, "a liveness probe of generation 2"); c.gen != 2 {
		t.Fatalf("liveness probe of generation %d, want 2", c.gen)
	} else {
		c.fail(errors.New("refused"))
	}
	h.failProbes(2, testLivenessFailures-2)
	h.probe(2).pass()
	h.clock.waitTimer(t, testLivenessInterval)
	h.noStart()
}

// A liveness replacement that is rolled back leaves the failed generation
// serving and watched, and the next one waits twice as long.
func TestLivenessRollbackKeepsTheOldAndBacksOff(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withLiveness)
	old := h.serving()
	h.failProbes(1, testLivenessFailures)
	h.clock.waitTimer(t, testRestartBackoff)
	h.clock.advance(testRestartBackoff)
	p := h.started()
	h.check(2).fail(errors.New("GET /healthz: 503 Service Unavailable"))
	p.waitSignals(t, "group KILL")
	p.exit(killed(syscall.SIGKILL), false)
	h.waitLine("gen 1 pid 1001 serving")
	old.untouched(t, "the old generation")
	h.failProbes(1, testLivenessFailures)
	h.waitLine("gen 1 pid 1001 serving; liveness replacement pending")
	if h.clock.pending(testRestartBackoff) {
		t.Errorf("the second replacement waits %s, want twice that", testRestartBackoff)
	}
	h.clock.waitTimer(t, 2*testRestartBackoff)
	h.clock.advance(2*testRestartBackoff - 1)
	h.noStart()
	h.clock.advance(1)
	h.started()
	h.check(3).pass()
	h.waitLine("gen 1 pid 1001 draining; gen 3 pid 1003 serving")
	h.wantReplaced("1:draining 3:serving", 2)
}

// A restart pauses the watch: the probe under way is cut short, no probe
// runs until the restart has finished, and the new generation is watched
// with a fresh count.
func TestLivenessPausedDuringARestart(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withLiveness)
	h.serving()
	h.failProbes(1, testLivenessFailures-1)
	c := h.probe(1)
	_, _, check := h.starting(RestartRequest{}, 2)
	recv(t, c.ctx.Done(), "the probe under way to be cut short")
	if h.clock.pending(testLivenessInterval) {
		t.Errorf("a liveness probe is due during the restart")
	}
	check.pass()
	h.waitLine("gen 1 pid 1001 draining; gen 2 pid 1002 serving")
	if h.clock.pending(testLivenessInterval) {
		t.Errorf("a liveness probe is due during the drain")
	}
	h.clock.advance(testDrain)
	h.waitLine("gen 1 pid 1001 stopping; gen 2 pid 1002 serving")
	h.failProbes(2, testLivenessFailures-1)
	h.clock.waitTimer(t, testLivenessInterval)
	h.noStart()
	if st := h.wantGens("1:stopping 2:serving"); st.Restarts.LivenessReplacements != 0 || st.Restarts.OK != 1 {
		t.Errorf("restart counts %+v, want the requested restart only", st.Restarts)
	}
}

// A child that pinged WATCHDOG=1 and then stays silent for
// --child-watchdog is replaced the same way.
func TestWatchdogSilenceReplaces(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withWatchdog)
	old := h.serving()
	h.ping(1)
	h.clock.waitTimer(t, testChildWatchdog)
	h.clock.advance(testChildWatchdog - 1)
	h.noStart()
	h.clock.advance(1)
	h.waitLine("gen 1 pid 1001 serving; liveness replacement pending")
	h.clock.advance(testRestartBackoff)
	h.started()
	h.check(2).pass()
	h.waitLine("gen 1 pid 1001 draining; gen 2 pid 1002 serving")
	old.untouched(t, "the silent generation before the drain ended")
	h.wantReplaced("1:draining 2:serving", 1)
	h.logged("no WATCHDOG=1 for")
	// Generation 2 never pinged: it is not watched.
	h.clock.advance(testDrain)
	h.clock.advance(3 * testChildWatchdog)
	h.noStart()
}

// A child that never pings is not watched, however long it serves.
func TestWatchdogNeverPingedIsNotWatched(t *testing.T) {
	t.Parallel()
	h := newHarness(t, withWatchdog)
	h.serving()
	h.clock.advance(10 * testChildWatchdog)
	if h.clock.pending(testChildWatchdog) {
		t.Errorf("a watchdog runs for a child that never pinged")
	}
	h.noStart()
	h.wantGens("1:serving")
}
