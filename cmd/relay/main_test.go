package main

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// exitCode alone decides relay's exit status, and says why in one line.
func TestExitCode(t *testing.T) {
	for _, c := range []struct {
		name string
		err  error
		code int
		line string // what stderr holds; "" for nothing
	}{
		{"success", nil, exitOK, ""},
		{"the child's status", childExit{code: 7}, 7, ""},
		{"the child's status, wrapped", fmt.Errorf("running: %w", childExit{code: 143}), 143, ""},
		{"a usage error", usagef("--steer %q: use auto, on or off", "x"), exitUsage, `relay: --steer "x": use auto, on or off` + "\n"},
		{"a wrapped usage error", fmt.Errorf("run: %w", usageError{errors.New("bad")}), exitUsage, "relay: run: bad\n"},
		{"a rolled-back restart", rolledBackError{msg: "restart rolled back: not ready"}, exitRolledBack, "relay: restart rolled back: not ready\n"},
		{"an unreachable relay", unreachableError{errors.New("no relay at /run/relay/x.sock")}, exitUnreachable, "relay: no relay at /run/relay/x.sock\n"},
		{"any other error", errors.New("listen :80: permission denied"), exitFailure, "relay: listen :80: permission denied\n"},
		{"a multi-line error", errors.Join(errors.New("first"), errors.New("second")), exitFailure, "relay: first | second\n"},
		{"surrounding space", errors.New("  spaced\n"), exitFailure, "relay: spaced\n"},
	} {
		var stderr bytes.Buffer
		if got := exitCode(c.err, &stderr); got != c.code {
			t.Errorf("%s: exit code %d, want %d", c.name, got, c.code)
		}
		if stderr.String() != c.line {
			t.Errorf("%s: stderr %q, want %q", c.name, stderr.String(), c.line)
		}
	}
}

// relay with an unknown command or flag exits 2 and points at --help.
func TestUnknownCommandsAndFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"run", "--no-such-flag", "--", "true"}, "see 'relay run --help'"},
	} {
		code, line := runRelay(t, c.args...)
		if code != exitUsage || !strings.Contains(line, c.want) {
			t.Errorf("relay %s: exit %d, %q; want exit %d and a line with %q", strings.Join(c.args, " "), code, line, exitUsage, c.want)
		}
	}
}

// runRelay runs relay with args as realMain does and returns the exit code
// and what it wrote to stderr, which must be one line.
func runRelay(t *testing.T, args ...string) (int, string) {
	t.Helper()
	code, out := realMainOutput(t, args...)
	if strings.Count(out, "\n") != 1 || !strings.HasPrefix(out, "relay: ") {
		t.Errorf("relay %s: stderr %q, want one line starting with \"relay: \"", strings.Join(args, " "), out)
	}
	return code, out
}

// realMainOutput runs relay as realMain does and returns the exit code and
// all it wrote to stderr, log lines included.
func realMainOutput(t *testing.T, args ...string) (int, string) {
	t.Helper()
	var stderr bytes.Buffer
	code := realMain(append([]string{"relay"}, args...), &stderr)
	return code, stderr.String()
}
