package signals

import (
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
)

func TestDecide(t *testing.T) {
	for _, c := range []struct {
		sig      os.Signal
		stopping bool
		want     Action
	}{
		{syscall.SIGHUP, false, Restart},
		{syscall.SIGHUP, true, Restart},
		{syscall.SIGTERM, false, Stop},
		{syscall.SIGINT, false, Stop},
		{syscall.SIGQUIT, false, Stop},
		{syscall.SIGTERM, true, StopNow},
		{syscall.SIGINT, true, StopNow},
		{syscall.SIGQUIT, true, StopNow},
		{syscall.SIGUSR1, false, Forward},
		{syscall.SIGUSR2, true, Upgrade},
		{syscall.SIGWINCH, false, Forward},
		{syscall.SIGPIPE, false, Ignore},
		{syscall.SIGCHLD, false, Ignore},
	} {
		if got := Decide(c.sig, c.stopping); got != c.want {
			t.Errorf("Decide(%v, stopping=%v) = %v, want %v", c.sig, c.stopping, got, c.want)
		}
	}
}

// Every signal relay takes over has an action, and only SIGPIPE is
// taken over just to be ignored.
func TestHandled(t *testing.T) {
	for _, sig := range Handled() {
		if a := Decide(sig, false); a == Ignore && sig != syscall.SIGPIPE {
			t.Errorf("%v is taken over but ignored", sig)
		}
	}
	if !slices.Contains(Handled(), os.Signal(syscall.SIGPIPE)) {
		t.Error("SIGPIPE is not taken over: a closed log reader would kill relay")
	}
}

func TestStopStep(t *testing.T) {
	for _, c := range []struct {
		n       int
		delayed bool
		want    Action
	}{
		{1, false, Stop}, {2, false, StopNow}, {3, false, StopNow},
		{1, true, StopDelayed}, {2, true, Stop}, {3, true, StopNow}, {4, true, StopNow},
	} {
		if got := StopStep(c.n, c.delayed); got != c.want {
			t.Errorf("StopStep(%d, delayed=%v) = %v, want %v", c.n, c.delayed, got, c.want)
		}
	}
}

func TestParse(t *testing.T) {
	for in, want := range map[string]syscall.Signal{
		"TERM": syscall.SIGTERM, "SIGTERM": syscall.SIGTERM, "term": syscall.SIGTERM,
		"quit": syscall.SIGQUIT, "USR1": syscall.SIGUSR1, "15": syscall.SIGTERM, "64": syscall.Signal(64),
	} {
		if got, err := Parse(in); err != nil || got != want {
			t.Errorf("Parse(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "65", "-1", "NOPE", "SIG"} {
		if got, err := Parse(in); err == nil {
			t.Errorf("Parse(%q) = %v, want an error", in, got)
		}
	}
}

// A --stop-signal must be one a server can take as "stop gracefully".
func TestParseStop(t *testing.T) {
	for _, in := range []string{"TERM", "QUIT", "INT", "USR1", "WINCH", "HUP", "34"} {
		if _, err := ParseStop(in); err != nil {
			t.Errorf("ParseStop(%q): %v, want it accepted", in, err)
		}
	}
	for in, want := range map[string]string{
		"KILL": "--stop-timeout", "9": "--stop-timeout", "sigkill": "--stop-timeout",
		"STOP": "suspends", "TSTP": "suspends", "TTIN": "suspends", "TTOU": "suspends",
		"CONT": "ignored by default", "CHLD": "ignored by default", "URG": "ignored by default",
		"NOPE": "unknown signal",
	} {
		if sig, err := ParseStop(in); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseStop(%q) = %v, %v; want an error mentioning %q", in, sig, err, want)
		}
	}
}

func TestName(t *testing.T) {
	for sig, want := range map[syscall.Signal]string{syscall.SIGTERM: "TERM", syscall.SIGHUP: "HUP", syscall.Signal(64): "64"} {
		if got := Name(sig); got != want {
			t.Errorf("Name(%d) = %q, want %q", sig, got, want)
		}
	}
	if got := StopNow.String(); got != "stop-now" {
		t.Errorf("StopNow.String() = %q", got)
	}
}
