package health

import (
	"context"
	"fmt"
)

// noReady starts the error of an auto check that saw no READY=1.
const noReady = "no READY=1 on the child's NOTIFY_SOCKET"

// spokeBefore is the error of an auto check of a child whose earlier
// generation spoke sd_notify.
const spokeBefore = noReady + " (an earlier generation spoke sd_notify, so accepting connections does not count as ready)"

// unprovable returns the first listener that the accept condition cannot
// prove: one with neither a probe nor a claim to watch.
func unprovable(ls []Listener) (Listener, bool) {
	for _, l := range ls {
		if l.Probe == "" && l.Claimed == nil && l.QUIC == nil {
			return l, true
		}
	}
	return Listener{}, false
}

// acceptCondition proves, listener by listener, that the child took its
// listeners: a steered probe it accepted, a bind of its own, or, on a UDP
// listener steered by flow, a QUIC probe of its own socket it answered. A
// listener once proven stays so across attempts.
type acceptCondition struct {
	ch     Child
	proven []bool
}

func newAcceptCondition(ch Child) *acceptCondition {
	return &acceptCondition{ch: ch, proven: make([]bool, len(ch.Listeners))}
}

// attempt returns nil once every listener is proven. A probe still
// queued is awaited within ctx, not dialed again.
func (a *acceptCondition) attempt(ctx context.Context) error {
	ctx = withControl(ctx, a.ch)
	for i, l := range a.ch.Listeners {
		if a.proven[i] {
			continue
		}
		switch {
		case l.Probe != "":
			if err := probeAccepted(ctx, l.Probe); err != nil {
				return fmt.Errorf("the child did not accept on %s: %w", l.Name, err)
			}
		case l.QUIC != nil && !isClosed(l.Claimed):
			// A bind of its own proves it as well; a child that binds
			// nothing (it uses the inherited socket) must answer.
			if err := l.QUIC(ctx); err != nil {
				if isClosed(l.Claimed) {
					break
				}
				return fmt.Errorf("the child has not bound %s of its own, nor answered a QUIC probe on it: %w", l.Name, err)
			}
		default:
			select {
			case <-l.Claimed:
			case <-ctx.Done():
				return fmt.Errorf("the child has not bound %s of its own: %w", l.Name, ctx.Err())
			}
		}
		a.proven[i] = true
	}
	return nil
}

// waitAccept waits until the accept condition holds for every listener.
func waitAccept(ctx context.Context, ch Child) error {
	if l, ok := unprovable(ch.Listeners); ok {
		return fmt.Errorf("listener %s cannot be checked alone: relay can neither steer a probe to the child's own socket nor see the child bind it; use --health notify, http://{health_addr}/... or exec:CMD", l.Name)
	}
	if len(ch.Listeners) == 0 {
		return fmt.Errorf("--health accept: the child has no listeners to check; use --health notify, http://{health_addr}/... or exec:CMD")
	}
	n, last := retry(ctx, newAcceptCondition(ch).attempt)
	if last == nil {
		return nil
	}
	return fmt.Errorf("%d attempts, last: %w", n, withCtxErr(ctx, last))
}

// waitAuto is ready at READY=1, or, while the child is silent (sent no
// sd_notify message, and no earlier generation did), once the accept
// condition holds. A child that speaks sd_notify may accept before it is
// warm, so from its first message on only READY=1 counts.
func waitAuto(ctx context.Context, ch Child) error {
	if isClosed(ch.NotifyReady) {
		return nil
	}
	speaks := func() bool { return ch.SpeaksNotify != nil && ch.SpeaksNotify() }
	if l, ok := unprovable(ch.Listeners); ok {
		return waitReady(ctx, ch, fmt.Sprintf("%s, and listener %s cannot be checked alone (use --health http://{health_addr}/... or exec: for a server that does not call sd_notify)", noReady, l.Name))
	}
	if len(ch.Listeners) == 0 {
		return waitReady(ctx, ch, noReady+", and the child has no listeners to check for accepted connections")
	}
	if isClosed(ch.Notified) {
		return waitReady(ctx, ch, "the child sent sd_notify messages but no READY=1")
	}
	if speaks() {
		return waitReady(ctx, ch, spokeBefore)
	}

	actx, cancel := context.WithCancel(ctx)
	defer cancel()
	acceptC := make(chan error, 1)
	go func() {
		_, last := retry(actx, newAcceptCondition(ch).attempt)
		acceptC <- last
	}()
	// stop ends the accept condition's goroutine, which closes its probe.
	stop := func() {
		cancel()
		<-acceptC
	}
	select {
	case <-ch.NotifyReady:
		stop()
		return nil
	case <-ch.Notified:
		stop()
	case last := <-acceptC:
		if last != nil {
			// Only the end of ctx ends the accept condition unmet.
			return fmt.Errorf("%s, and %w", noReady, withCtxErr(ctx, last))
		}
		// A message may have come while the probe was accepted.
		switch {
		case isClosed(ch.NotifyReady):
			return nil
		case isClosed(ch.Notified):
		case speaks():
			return waitReady(ctx, ch, spokeBefore)
		default:
			return nil
		}
	}
	return waitReady(ctx, ch, "the child sent sd_notify messages but no READY=1")
}

// waitReady waits for READY=1; what says what was seen if ctx ends first.
func waitReady(ctx context.Context, ch Child, what string) error {
	select {
	case <-ch.NotifyReady:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%s: %w", what, ctx.Err())
	}
}

// isClosed reports whether c, which is only ever closed, is; nil is not.
func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
