package health

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func closedChan() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}

// probeTarget is a loopback listener a Listener's Probe reaches (Control
// nil: no steering needed). serveIt starts accepting on it.
func probeTarget(t *testing.T, name string) (l Listener, serveIt func()) {
	tl := goListener(t, "tcp4", "127.0.0.1:0", unix.AF_INET)
	return Listener{Name: name, Probe: tl.Addr().String()}, func() { serve(t, tl) }
}

func checker(t *testing.T, kind string) *Checker {
	t.Helper()
	spec, err := Parse(kind)
	if err != nil {
		t.Fatal(err)
	}
	return NewChecker(spec, nil, nil)
}

func waitWith(t *testing.T, kind string, d time.Duration, ch Child) error {
	t.Helper()
	return checker(t, kind).Wait(shortCtx(t, d), ch)
}

// wantTimeout fails unless err is a timeout that mentions each of parts.
func wantTimeout(t *testing.T, err error, parts ...string) {
	t.Helper()
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait = %v, want a timeout", err)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Fatalf("Wait = %v, want it to mention %q", err, p)
		}
	}
}

func TestAcceptWaitsForClaims(t *testing.T) {
	second := make(chan struct{})
	ch := Child{Listeners: []Listener{
		{Name: "tcp-1", Claimed: closedChan()},
		{Name: "tcp-2", Claimed: second},
	}}
	wantTimeout(t, waitWith(t, "accept", 50*time.Millisecond, ch), "tcp-2")
	close(second)
	if err := waitWith(t, "accept", failAfter, ch); err != nil {
		t.Fatalf("accept with every listener claimed: %v", err)
	}
}

func TestAcceptWaitsForProbe(t *testing.T) {
	l, serveIt := probeTarget(t, "tcp-probe")
	ch := Child{Listeners: []Listener{{Name: "tcp-claimed", Claimed: closedChan()}, l}}
	wantTimeout(t, waitWith(t, "accept", 100*time.Millisecond, ch), "the child did not accept on tcp-probe", "waits in the accept queue")
	serveIt()
	if err := waitWith(t, "accept", failAfter, ch); err != nil {
		t.Fatalf("accept with the probe target accepting: %v", err)
	}
}

// A listener with neither a probe nor a claim fails the accept check at
// once, naming it and the checks that would work.
func TestAcceptCannotCheckListener(t *testing.T) {
	for _, ls := range [][]Listener{
		{{Name: "tcp-1", Claimed: closedChan()}, {Name: "udp-53"}},
		nil,
	} {
		err := waitWith(t, "accept", failAfter, Child{Listeners: ls, NotifyReady: closedChan()})
		if err == nil || errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "--health notify") {
			t.Fatalf("accept with listeners %v = %v, want an immediate error", ls, err)
		}
		if len(ls) > 0 && !strings.Contains(err.Error(), "listener udp-53 cannot be checked alone") {
			t.Fatalf("accept error %q does not name the listener", err)
		}
	}
}

func TestAutoReadyOnNotify(t *testing.T) {
	l, _ := probeTarget(t, "tcp-probe") // never accepts
	ready := make(chan struct{})
	ch := Child{NotifyReady: ready, Notified: ready, Listeners: []Listener{{Name: "tcp-1", Claimed: make(chan struct{})}, l}}
	c, ctx := checker(t, "auto"), shortCtx(t, failAfter)
	done := make(chan error, 1)
	go func() { done <- c.Wait(ctx, ch) }()
	close(ready)
	if err := <-done; err != nil {
		t.Fatalf("auto after READY=1: %v", err)
	}
	// And with a listener that no accept check can prove.
	ch.Listeners = append(ch.Listeners, Listener{Name: "udp-53"})
	if err := waitWith(t, "auto", failAfter, ch); err != nil {
		t.Fatalf("auto after READY=1: %v", err)
	}
}

func TestAutoReadyOnAcceptWhenSilent(t *testing.T) {
	l, serveIt := probeTarget(t, "tcp-probe")
	ch := Child{
		NotifyReady:  make(chan struct{}),
		Notified:     make(chan struct{}),
		SpeaksNotify: func() bool { return false },
		Listeners:    []Listener{{Name: "tcp-1", Claimed: closedChan()}, l},
	}
	// Not before the probe is accepted; the error says what was seen.
	wantTimeout(t, waitWith(t, "auto", 100*time.Millisecond, ch),
		"no READY=1", "the child did not accept on tcp-probe", "waits in the accept queue")
	serveIt()
	if err := waitWith(t, "auto", failAfter, ch); err != nil {
		t.Fatalf("auto of a silent child that accepts: %v", err)
	}
	ch.SpeaksNotify = nil // nil means false
	if err := waitWith(t, "auto", failAfter, ch); err != nil {
		t.Fatalf("auto of a silent child that accepts, SpeaksNotify nil: %v", err)
	}
}

// A child that sent an sd_notify message but not READY=1 is not ready for
// accepting: it may accept before it is warm.
func TestAutoNotReadyOnAcceptAfterNotify(t *testing.T) {
	l, serveIt := probeTarget(t, "tcp-probe")
	serveIt()
	ready := make(chan struct{})
	ch := Child{NotifyReady: ready, Notified: closedChan(), Listeners: []Listener{{Name: "tcp-1", Claimed: closedChan()}, l}}
	wantTimeout(t, waitWith(t, "auto", 50*time.Millisecond, ch), "the child sent sd_notify messages but no READY=1")
	close(ready)
	if err := waitWith(t, "auto", failAfter, ch); err != nil {
		t.Fatalf("auto after READY=1: %v", err)
	}
}

// The first message arrives while auto waits for the accept condition,
// which then holds: only READY=1 counts from the message on.
func TestAutoNotifiedWhileWaitingForAccept(t *testing.T) {
	notified, claimed := make(chan struct{}), make(chan struct{})
	asked := make(chan struct{})
	var once sync.Once
	ch := Child{
		NotifyReady: make(chan struct{}),
		Notified:    notified,
		// SpeaksNotify is auto's last look before it waits for either
		// path: once asked, the message below comes during the wait.
		SpeaksNotify: func() bool { once.Do(func() { close(asked) }); return false },
		Listeners:    []Listener{{Name: "tcp-1", Claimed: claimed}},
	}
	c, ctx := checker(t, "auto"), shortCtx(t, 200*time.Millisecond)
	done := make(chan error, 1)
	go func() { done <- c.Wait(ctx, ch) }()
	select {
	case <-asked:
	case <-time.After(failAfter):
		t.Fatal("auto never asked SpeaksNotify")
	}
	close(notified)
	close(claimed)
	wantTimeout(t, <-done, "the child sent sd_notify messages but no READY=1")
}

func TestAutoNotReadyOnAcceptWhenAnEarlierGenerationSpoke(t *testing.T) {
	ready := make(chan struct{})
	ch := Child{
		NotifyReady:  ready,
		SpeaksNotify: func() bool { return true },
		Listeners:    []Listener{{Name: "tcp-1", Claimed: closedChan()}},
	}
	wantTimeout(t, waitWith(t, "auto", 50*time.Millisecond, ch), "no READY=1", "earlier generation")
	close(ready)
	if err := waitWith(t, "auto", failAfter, ch); err != nil {
		t.Fatalf("auto after READY=1: %v", err)
	}
}

// With a listener no accept check can prove, auto waits for READY=1 only.
func TestAutoWithAnUncheckableListenerWaitsForNotify(t *testing.T) {
	ready := make(chan struct{})
	ch := Child{NotifyReady: ready, Listeners: []Listener{{Name: "tcp-1", Claimed: closedChan()}, {Name: "udp-53"}}}
	wantTimeout(t, waitWith(t, "auto", 50*time.Millisecond, ch), "no READY=1", "udp-53 cannot be checked alone")
	ch.Listeners = nil
	wantTimeout(t, waitWith(t, "auto", 50*time.Millisecond, ch), "no READY=1", "no listeners")
	close(ready)
	if err := waitWith(t, "auto", failAfter, ch); err != nil {
		t.Fatalf("auto after READY=1: %v", err)
	}
}

// A UDP listener steered by flow is proven by a QUIC probe of the child's
// own socket, answered, or by the child's own bind of it; a child that
// does neither is not ready.
func TestAcceptByQUICProbe(t *testing.T) {
	var mu sync.Mutex
	answers := false
	quic := func(ctx context.Context) error {
		mu.Lock()
		defer mu.Unlock()
		if !answers {
			return errors.New("no Version Negotiation")
		}
		return nil
	}
	ch := Child{Listeners: []Listener{{Name: "udp-443", QUIC: quic}}}
	wantTimeout(t, waitWith(t, "accept", 100*time.Millisecond, ch), "udp-443", "QUIC probe", "no Version Negotiation")
	wantTimeout(t, waitWith(t, "auto", 100*time.Millisecond, ch), "udp-443", "QUIC probe")

	mu.Lock()
	answers = true
	mu.Unlock()
	for _, kind := range []string{"accept", "auto"} {
		if err := waitWith(t, kind, 5*time.Second, ch); err != nil {
			t.Fatalf("%s, the child answers the QUIC probe: %v", kind, err)
		}
	}

	// A bind of its own proves it without an answer (a DNS server).
	mu.Lock()
	answers = false
	mu.Unlock()
	ch.Listeners[0].Claimed = closedChan()
	if err := waitWith(t, "accept", 5*time.Second, ch); err != nil {
		t.Fatalf("accept, the child bound the listener itself: %v", err)
	}
}
