package supervisor

import (
	"bytes"
	"io"
	"sync"
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
