package signals

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

// Target is what the signals sent to relay act on: the supervisor.
type Target interface {
	RequestRestart(reason string) error
	Stop(now bool)
	Forward(sig syscall.Signal)
}

// Notify takes over the signals relay handles. They wait in the returned
// channel's buffer until Loop reads them, so that none sent while relay
// starts kills it with the default action. Call stop when done.
func Notify() (c <-chan os.Signal, stop func()) {
	ch := make(chan os.Signal, 8)
	signal.Notify(ch, Handled()...)
	return ch, func() { signal.Stop(ch) }
}

// Loop turns the signals from c into requests to t, as Decide says, until
// ctx ends. It never ends on its own: in relay's run group only the
// supervisor's return says how relay ends.
func Loop(ctx context.Context, c <-chan os.Signal, t Target) {
	stopping := false
	for {
		select {
		case <-ctx.Done():
			return
		case sig := <-c:
			switch Decide(sig, stopping) {
			case Restart:
				t.RequestRestart("signal " + Name(sig.(syscall.Signal)))
			case Stop:
				stopping = true
				t.Stop(false)
			case StopNow:
				t.Stop(true)
			case Forward:
				t.Forward(sig.(syscall.Signal))
			}
		}
	}
}
