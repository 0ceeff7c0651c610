package supervisor

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/reaper"
	"github.com/relaysh/relay/signals"
)

// fakeProc is a child that records the signals it gets and exits when a
// test says.
type fakeProc struct {
	id   int
	argv []string

	mu       sync.Mutex
	signals  []string // "TERM" to the process, "group TERM" to its group; no CONT
	seq      []string // every signal, CONT too, in order
	changed  chan struct{}
	done     chan struct{}
	status   reaper.Status
	exited   bool
	lingers  bool     // its group outlives it
	stderrFD *os.File // the child's end of its stderr, while it holds it
}

func (p *fakeProc) pid() int { return p.id }

func (p *fakeProc) Done() <-chan struct{} { return p.done }

func (p *fakeProc) Status() reaper.Status {
	<-p.done
	return p.status
}

func (p *fakeProc) Signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited {
		return os.ErrProcessDone
	}
	p.record(signals.Name(sig))
	return nil
}

func (p *fakeProc) SignalGroup(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited && !p.lingers {
		return os.ErrProcessDone
	}
	p.record("group " + signals.Name(sig))
	return nil
}

func (p *fakeProc) GroupAlive() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.exited || p.lingers
}

// exitedNow reports whether the process has exited.
func (p *fakeProc) exitedNow() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exited
}

// GroupSize is 1 while the process or its group lives.
func (p *fakeProc) GroupSize() int {
	if p.GroupAlive() {
		return 1
	}
	return 0
}

// record notes a signal; p.mu is held. The SIGCONT that follows each stop
// signal is kept apart, in seq only, so that the tests of which signals
// a child gets need not name it.
func (p *fakeProc) record(s string) {
	p.seq = append(p.seq, s)
	if strings.HasSuffix(s, "CONT") {
		close(p.changed)
		p.changed = make(chan struct{})
		return
	}
	p.signals = append(p.signals, s)
	close(p.changed)
	p.changed = make(chan struct{})
}

// exit ends the process with st. Its group lives on if lingers.
func (p *fakeProc) exit(st reaper.Status, lingers bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited {
		return
	}
	p.exited, p.lingers, p.status = true, lingers, st
	close(p.done)
}

// groupGone ends the processes left in its group.
func (p *fakeProc) groupGone() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.lingers = false
}

// writeStderr writes to the child's stderr, which it must hold.
func (p *fakeProc) writeStderr(t *testing.T, s string) {
	t.Helper()
	if _, err := p.stderrFD.WriteString(s); err != nil {
		t.Fatal(err)
	}
}

// closeStderr closes its end of its stderr pipe.
func (p *fakeProc) closeStderr() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stderrFD != nil {
		p.stderrFD.Close()
		p.stderrFD = nil
	}
}

// waitSignals waits until p has had as many signals as want and checks
// that they are want, in order.
func (p *fakeProc) waitSignals(t *testing.T, want ...string) {
	t.Helper()
	p.waitList(t, func() []string { return p.signals }, want)
}

// waitSeq waits until p has had as many signals as want, CONT included,
// and checks that they are want, in order.
func (p *fakeProc) waitSeq(t *testing.T, want ...string) {
	t.Helper()
	p.waitList(t, func() []string { return p.seq }, want)
}

// waitList waits until list (read under p.mu) is as long as want, and
// checks that it is want.
func (p *fakeProc) waitList(t *testing.T, list func() []string, want []string) {
	t.Helper()
	deadline := time.After(waitLimit)
	for {
		p.mu.Lock()
		got, changed := slices.Clone(list()), p.changed
		p.mu.Unlock()
		if len(got) >= len(want) {
			if !slices.Equal(got, want) {
				t.Fatalf("pid %d got signals %q, want %q", p.id, got, want)
			}
			return
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("pid %d got signals %q, want %q", p.id, got, want)
		}
	}
}

// got returns the signals p has had.
func (p *fakeProc) got() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.signals)
}

func exited(code int) reaper.Status { return reaper.Status{WaitStatus: unix.WaitStatus(code << 8)} }

func killed(sig syscall.Signal) reaper.Status { return reaper.Status{WaitStatus: unix.WaitStatus(sig)} }

// fakeCheck is one readiness check or pre-flight command in progress.
type fakeCheck struct {
	gen int // the generation checked; 0 for a pre-flight command
	// worker and pid are the copy checked.
	worker, pid int
	argv        []string // the pre-flight command
	ctx         context.Context
	reply       chan error
}

func (c *fakeCheck) pass()          { c.reply <- nil }
func (c *fakeCheck) fail(err error) { c.reply <- err }

// wait is the check's side: it ends when the test answers or ctx ends.
func (c *fakeCheck) wait() error {
	select {
	case err := <-c.reply:
		return err
	case <-c.ctx.Done():
		return fmt.Errorf("fake check cut short: %w", c.ctx.Err())
	}
}

// observer records the Observer's calls in order.
type observer struct {
	mu      sync.Mutex
	calls   []string
	changed chan struct{} // closed and replaced at each call
	seen    int           // the calls waitLine has looked past
}

func newObserver() *observer { return &observer{changed: make(chan struct{})} }

func (o *observer) add(s string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.calls = append(o.calls, s)
	close(o.changed)
	o.changed = make(chan struct{})
}

func (o *observer) Ready()          { o.add("ready") }
func (o *observer) Reloading()      { o.add("reloading") }
func (o *observer) Stopping()       { o.add("stopping") }
func (o *observer) Status(l string) { o.add("status: " + l) }

func (o *observer) history() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.calls)
}

// milestones are the calls but Status.
func (o *observer) milestones() []string {
	var out []string
	for _, c := range o.history() {
		if !strings.HasPrefix(c, "status: ") {
			out = append(out, c)
		}
	}
	return out
}

// waitLine waits until the status line is want, after the one the last
// waitLine saw. The supervisor publishes it after each request or event
// it handled, so it tells the test that an event it cannot see arrive (a
// check's outcome, a timer's) has been handled.
func (o *observer) waitLine(t *testing.T, want string) {
	t.Helper()
	deadline := time.After(waitLimit)
	for {
		o.mu.Lock()
		calls, changed := o.calls, o.changed
		for i := o.seen; i < len(calls); i++ {
			if calls[i] == "status: "+want {
				o.seen = i + 1
				o.mu.Unlock()
				return
			}
		}
		o.mu.Unlock()
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("status line never became %q; the Observer heard %q", want, o.history())
		}
	}
}
