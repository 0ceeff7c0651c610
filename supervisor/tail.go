package supervisor

import (
	"bytes"
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
