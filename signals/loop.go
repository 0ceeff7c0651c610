package signals

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// Target is what the signals sent to relay act on: the supervisor, and
// relay's upgrade.
type Target interface {
	RequestRestart(reason string) error
	Stop(now bool)
	StopAfter(d time.Duration)
	Forward(sig syscall.Signal)
	// Upgrade begins relay's upgrade in place and returns at once.
	Upgrade(reason string)
}

// Notify takes over the signals relay handles. They wait in the returned
// channel's buffer until Loop reads them, so that none sent while relay
// starts kills it with the default action. Call stop when done.
func Notify() (c <-chan os.Signal, stop func()) {
	ch := make(chan os.Signal, 8)
	signal.Notify(ch, Handled()...)
	return ch, func() { signal.Stop(ch) }
}

// Loop turns the signals from c into requests to t, as Decide and
// StopStep say, until ctx ends. delay is the shutdown delay
// (--shutdown-delay; 0 for none). It never ends on its own: in relay's run
// group only the supervisor's return says how relay ends.
func Loop(ctx context.Context, c <-chan os.Signal, t Target, delay time.Duration) {
	stops := 0
	for {
		select {
		case <-ctx.Done():
			return
		case sig := <-c:
			a := Decide(sig, false)
			if a == Stop {
				stops++
				a = StopStep(stops, delay > 0)
			}
			switch a {
			case Restart:
				t.RequestRestart("signal " + Name(sig.(syscall.Signal)))
			case StopDelayed:
				t.StopAfter(delay)
			case Stop:
				t.Stop(false)
			case StopNow:
				t.Stop(true)
			case Forward:
				t.Forward(sig.(syscall.Signal))
			case Upgrade:
				t.Upgrade("signal " + Name(sig.(syscall.Signal)))
			}
		}
	}
}
