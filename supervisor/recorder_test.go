package supervisor

import (
	"errors"
	"fmt"
	"sync"
	"syscall"
	"testing"
	"time"
)

// recorder is a Recorder that notes what it hears, in order.
type recorder struct {
	mu    sync.Mutex
	heard []string
}

func (r *recorder) GenerationReady(gen int, readyAfter time.Duration) {
	r.add(fmt.Sprintf("ready %d after %s", gen, readyAfter))
}

func (r *recorder) RestartFinished(res Result) {
	outcome := "rolled back"
	switch res.Outcome {
	case RestartOK:
		outcome = "ok"
	case RestartRefused:
		outcome = "refused"
	}
	r.add(fmt.Sprintf("restart %s in %s", outcome, res.Duration))
}

func (r *recorder) add(s string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.heard = append(r.heard, s)
}

func (r *recorder) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.heard...)
}

// The Recorder hears every readiness, the first start's included, with
// the time from the start to it, and each requested restart's outcome with
// its duration, as they happen: a rolled-back and a refused restart as
// well as a good one.
func TestRecorderHearsReadinessAndOutcomes(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	h := newHarness(t, func(c *Config) { c.Recorder = rec; c.Drain = 0 })
	h.run()
	old := h.started()
	h.clock.advance(250 * time.Millisecond)
	h.check(1).pass()
	h.waitLine("gen 1 pid 1001 serving")

	// ok: generation 2 ready 1.5s after its start.
	events, _, c := h.starting(RestartRequest{}, 2)
	h.clock.advance(1500 * time.Millisecond)
	c.pass()
	until(t, events, PhaseDone)
	old.waitSignals(t, "TERM")
	old.exit(exited(0), false)
	all(t, events)

	// rolled back: generation 3 fails its check after 2s.
	events, p, c := h.starting(RestartRequest{}, 3)
	h.clock.advance(2 * time.Second)
	c.fail(errors.New("GET /healthz: 503 Service Unavailable"))
	p.waitSignals(t, "group KILL")
	p.exit(killed(syscall.SIGKILL), false)
	all(t, events)

	// refused: the pre-flight check fails after 3s; no generation starts.
	events = h.restart(RestartRequest{Check: []string{"nginx", "-t"}})
	pre := recv(t, h.preflightC, "the pre-flight check")
	h.clock.advance(3 * time.Second)
	pre.fail(errors.New("exit status 1"))
	all(t, events)
	h.noStart()

	want := []string{
		"ready 1 after 250ms",
		"ready 2 after 1.5s", "restart ok in 1.5s",
		"restart rolled back in 2s",
		"restart refused in 3s",
	}
	if got := rec.list(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("the recorder heard\n%q\nwant\n%q", got, want)
	}
	st := h.wantGens("2:serving")
	if r := st.Restarts; r.OK != 1 || r.RolledBack != 1 || r.Refused != 1 {
		t.Errorf("restart counts %+v, want one of each outcome", r)
	}
}

// A crash replacement is no requested restart: the Recorder hears its
// readiness, and no restart outcome.
func TestRecorderHearsAReplacementsReadinessOnly(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	h := newHarness(t, func(c *Config) { c.Recorder = rec })
	p := h.serving()
	p.exit(exited(1), false)
	h.clock.waitTimer(t, testRestartBackoff)
	h.clock.advance(testRestartBackoff)
	h.started()
	h.clock.advance(time.Second)
	h.check(2).pass()
	h.waitLine("gen 2 pid 1002 serving")
	want := []string{"ready 1 after 0s", "ready 2 after 1s"}
	if got := rec.list(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("the recorder heard %q, want %q", got, want)
	}
}
