package admin

import (
	"errors"
	"fmt"
	"time"

	"github.com/relaysh/relay/supervisor"
)

// StatusSource is what the admin listener asks about relay: the
// supervisor, or a fake in tests.
type StatusSource interface {
	Status() (supervisor.Status, error)
}

// statusTimeout is how long /healthz, /readyz and a scrape wait for the
// supervisor to answer: a loop that takes longer is not working.
const statusTimeout = time.Second

// maxStatusCalls bounds the Status calls waiting at once. A working
// supervisor answers in microseconds, so only a wedged one fills them; past
// that, requests fail at once rather than pile up goroutines behind it.
const maxStatusCalls = 8

// errNoAnswer: the supervisor did not answer in time.
var errNoAnswer = errors.New("the supervisor did not answer")

// boundedStatus asks a StatusSource with a time limit.
type boundedStatus struct {
	src     StatusSource
	timeout time.Duration
	slots   chan struct{}
}

func newBoundedStatus(src StatusSource, timeout time.Duration) *boundedStatus {
	return &boundedStatus{src: src, timeout: timeout, slots: make(chan struct{}, maxStatusCalls)}
}

// status returns the source's status, or an error if it failed, did not
// answer within the timeout, or too many calls wait for it already.
func (b *boundedStatus) status() (supervisor.Status, error) {
	select {
	case b.slots <- struct{}{}:
	default:
		return supervisor.Status{}, fmt.Errorf("asking for relay's status: %w: %d calls wait for it", errNoAnswer, maxStatusCalls)
	}
	type answer struct {
		st  supervisor.Status
		err error
	}
	c := make(chan answer, 1) // the call may outlive the wait
	go func() {
		defer func() { <-b.slots }()
		st, err := b.src.Status()
		c <- answer{st, err}
	}()
	timer := time.NewTimer(b.timeout)
	defer timer.Stop()
	select {
	case a := <-c:
		if a.err != nil {
			return supervisor.Status{}, fmt.Errorf("asking for relay's status: %w", a.err)
		}
		return a.st, nil
	case <-timer.C:
		return supervisor.Status{}, fmt.Errorf("asking for relay's status: %w within %s", errNoAnswer, b.timeout)
	}
}

// servingGeneration is the number of the serving generation, 0 for none.
func servingGeneration(st supervisor.Status) int {
	for _, g := range st.Generations {
		if g.State == supervisor.Serving {
			return g.Generation
		}
	}
	return 0
}

// readiness says whether relay should get traffic: a generation serves,
// and relay neither stops nor waits out its shutdown delay. why says
// what is so, for the probe's body.
func readiness(st supervisor.Status, now time.Time) (ready bool, why string) {
	gen := servingGeneration(st)
	switch {
	case st.Stopping:
		return false, "relay is stopping"
	case !st.ShutdownAt.IsZero():
		return false, fmt.Sprintf("relay is shutting down: the graceful stop begins in %s", max(st.ShutdownAt.Sub(now), 0).Round(time.Millisecond))
	case gen == 0:
		return false, "no generation is serving"
	}
	return true, fmt.Sprintf("generation %d is serving", gen)
}
