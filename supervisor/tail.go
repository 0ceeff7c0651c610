package supervisor

import (
	"bytes"
	"errors"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// tailBuffer keeps the last bytes written to it: enough of a child's stderr
// to say why it failed.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
	max int
}

func newTailBuffer(max int) *tailBuffer { return &tailBuffer{max: max} }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if len(t.buf) > 2*t.max {
		t.buf = append(t.buf[:0], t.buf[len(t.buf)-t.max:]...)
	}
	return len(p), nil
}

// bytes returns what it keeps.
func (t *tailBuffer) bytes() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]byte(nil), t.buf...)
}

// Lines returns at most n of the last lines, without trailing newline.
func (t *tailBuffer) Lines(n int) string {
	t.mu.Lock()
	b := t.buf
	if len(b) > t.max {
		b = b[len(b)-t.max:]
	}
	b = bytes.TrimRight(append([]byte(nil), b...), "\n")
	t.mu.Unlock()
	for i, seen := len(b)-1, 0; i >= 0; i-- {
		if b[i] == '\n' {
			seen++
			if seen == n {
				return string(b[i+1:])
			}
		}
	}
	return string(b)
}

// passThrough writes to out, ignoring its errors, and to tail. It passes
// whole lines, each in one Write, so that the child's output never splits
// one of relay's log lines that shares out (a writer that serializes its
// Writes): a partial line waits for its end, up to maxPartialLine bytes.
type passThrough struct {
	out     io.Writer
	tail    *tailBuffer
	partial []byte
}

// maxPartialLine bounds what passThrough holds back of an unfinished line.
const maxPartialLine = 64 << 10

func (p *passThrough) Write(b []byte) (int, error) {
	p.tail.Write(b)
	p.partial = append(p.partial, b...)
	if i := bytes.LastIndexByte(p.partial, '\n'); i >= 0 {
		p.out.Write(p.partial[:i+1]) // a closed or full log reader must not stop the copy
		p.partial = append(p.partial[:0], p.partial[i+1:]...)
	}
	if len(p.partial) >= maxPartialLine {
		p.flush()
	}
	return len(b), nil
}

// flush passes on what is held back.
func (p *passThrough) flush() {
	if len(p.partial) > 0 {
		p.out.Write(p.partial)
		p.partial = p.partial[:0]
	}
}

// stderrCopier copies a child's stderr pipe to a passThrough until the
// pipe ends, and can pause between reads without closing the pipe: relay
// hands the pipe to its next image so (handoff.go).
type stderrCopier struct {
	f  *os.File
	pt *passThrough
	// paused is set while a pause is asked for; the copier then stops at
	// its read's deadline, says so on pausedC, and waits on resumeC.
	paused  atomic.Bool
	pausedC chan struct{}
	resumeC chan struct{}
	done    chan struct{} // closed once the pipe has ended
}

func newStderrCopier(f *os.File, pt *passThrough) *stderrCopier {
	return &stderrCopier{f: f, pt: pt, pausedC: make(chan struct{}), resumeC: make(chan struct{}), done: make(chan struct{})}
}

// run copies until the pipe ends, then passes on what is held back and
// closes it. It keeps reading when relay's own stderr fails: closing the
// pipe would kill the child with SIGPIPE.
func (c *stderrCopier) run() {
	defer close(c.done)
	defer c.f.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := c.f.Read(buf)
		if n > 0 {
			c.pt.Write(buf[:n])
		}
		switch {
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded) && c.paused.Load():
			c.pausedC <- struct{}{}
			<-c.resumeC
		default:
			c.pt.flush()
			return
		}
	}
}

// pause stops the copy between two reads. It reports false if the pipe
// has ended instead. Call resume after it, whatever it reported.
func (c *stderrCopier) pause() bool {
	if isClosed(c.done) {
		return false
	}
	c.paused.Store(true)
	if err := c.f.SetReadDeadline(time.Now()); err != nil {
		<-c.done // the copy is ending: its file is closed already
		return false
	}
	select {
	case <-c.pausedC:
		return true
	case <-c.done:
		return false
	}
}

// resume goes on copying after pause.
func (c *stderrCopier) resume() {
	if !c.paused.Swap(false) {
		return
	}
	c.f.SetReadDeadline(time.Time{})
	select {
	case c.resumeC <- struct{}{}:
	case <-c.done:
	}
}

// partial is what the passThrough holds back, while paused or ended.
func (c *stderrCopier) partial() []byte { return append([]byte(nil), c.pt.partial...) }

// fd is the pipe's fd, while paused; its flags are left alone.
func (c *stderrCopier) fd() (int, error) {
	rc, err := c.f.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := rc.Control(func(u uintptr) { fd = int(u) }); err != nil {
		return -1, err
	}
	return fd, nil
}
