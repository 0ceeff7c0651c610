package supervisor

import (
	"fmt"
	"strings"
	"testing"
)

// writes records each Write separately.
type writes struct{ got []string }

func (w *writes) Write(b []byte) (int, error) { w.got = append(w.got, string(b)); return len(b), nil }

// The child's stderr reaches relay's stream in whole lines, each in one
// Write, so that none can split one of relay's own log lines.
func TestChildStderrPassesWholeLines(t *testing.T) {
	t.Parallel()
	out := &writes{}
	pt := &passThrough{out: out, tail: newTailBuffer(64)}
	for _, chunk := range []string{"ab", "c\nde", "f\ng\nh", "\n", "tail without newline"} {
		pt.Write([]byte(chunk))
	}
	pt.flush()
	want := []string{"abc\n", "def\ng\n", "h\n", "tail without newline"}
	if fmt.Sprint(out.got) != fmt.Sprint(want) {
		t.Errorf("writes %q, want %q", out.got, want)
	}
	if got := pt.tail.Lines(10); !strings.Contains(got, "tail without newline") {
		t.Errorf("the tail lost the output: %q", got)
	}
}

// A line longer than maxPartialLine is passed on in pieces rather than
// held back without bound.
func TestLongPartialLineIsPassedOn(t *testing.T) {
	t.Parallel()
	out := &writes{}
	pt := &passThrough{out: out, tail: newTailBuffer(64)}
	pt.Write([]byte(strings.Repeat("x", maxPartialLine)))
	if len(out.got) != 1 || len(out.got[0]) != maxPartialLine {
		t.Errorf("%d writes, want the %d bytes held back passed on in one", len(out.got), maxPartialLine)
	}
}

// The tail keeps the last lines of what was written, at most max bytes.
func TestTailBufferKeepsTheLastLines(t *testing.T) {
	t.Parallel()
	tb := newTailBuffer(16)
	for i := range 10 {
		fmt.Fprintf(tb, "line %d\n", i)
	}
	if got, want := tb.Lines(2), "line 8\nline 9"; got != want {
		t.Errorf("last 2 lines %q, want %q", got, want)
	}
	if got := tb.Lines(10); len(got) > 16 || !strings.HasSuffix(got, "line 9") {
		t.Errorf("all it kept: %q, want at most 16 bytes ending with the last line", got)
	}
}
