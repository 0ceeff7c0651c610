package main

import (
	"bytes"
	"errors"
	"fmt"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/relaysh/relay/internal/handoff"
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
		{[]string{"--no-such-flag"}, "(see 'relay --help')"},
		{[]string{"version", "extra"}, "relay version takes no arguments"},
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
	code := realMain(append([]string{"relay"}, args...), &stderr, boot{})
	return code, stderr.String()
}

// relay --version and relay version print one line with the version and
// commit from the build info, and exit 0.
func TestVersion(t *testing.T) {
	for _, args := range [][]string{{"--version"}, {"version"}} {
		var stdout, stderr bytes.Buffer
		app := newApp(&stderr, boot{})
		app.Writer = &stdout
		code := exitCode(app.Run(append([]string{"relay"}, args...)), &stderr)
		bi, ok := debug.ReadBuildInfo()
		if want := versionLine(bi, ok) + "\n"; code != exitOK || stdout.String() != want || stderr.Len() != 0 {
			t.Errorf("relay %s: exit %d, stdout %q, stderr %q; want exit 0 and %q", args[0], code, stdout.String(), stderr.String(), want)
		}
	}
	for _, c := range []struct {
		name string
		bi   *debug.BuildInfo
		ok   bool
		want string
	}{
		{"no build info", nil, false, "relay (devel) commit unknown"},
		{"a checkout without VCS info", &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}}, true, "relay (devel) commit unknown"},
		{"a release", &debug.BuildInfo{Main: debug.Module{Version: "v1.4.0"}, Settings: []debug.BuildSetting{
			{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: "4f1c2e0d9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e"}, {Key: "vcs.modified", Value: "false"},
		}}, true, "relay v1.4.0 commit 4f1c2e0d9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e"},
		{"a modified checkout", &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: "0357e12"}, {Key: "vcs.modified", Value: "true"},
		}}, true, "relay (devel) commit 0357e12 (modified)"},
	} {
		if got := versionLine(c.bi, c.ok); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}

// A --check of only spaces is a usage error for relay restart too, found
// before relay is asked anything.
func TestRestartRefusesABlankCheck(t *testing.T) {
	code, line := runRelay(t, "restart", "--control", "/nonexistent/relay.sock", "--check", "   ")
	if code != exitUsage || !strings.Contains(line, "holds no command") {
		t.Errorf("relay restart --check '   ': exit %d, %q; want a usage error", code, line)
	}
}

// relay restart takes a new command only after "--": "relay restart web"
// most likely names a relay, and taken as a command it would replace the
// default relay's server. The error says both ways, before relay is asked
// anything (the control socket here does not exist: exit 4 if reached).
func TestRestartWantsDashesBeforeACommand(t *testing.T) {
	for _, c := range []struct {
		args []string
		want []string
	}{
		{[]string{"web"}, []string{`got "web"`, "relay restart --name web", "relay restart -- web"}},
		{[]string{"./server", "-x"}, []string{`got "./server" "-x"`, "relay restart -- ./server -x"}},
	} {
		args := append([]string{"restart", "--control", "/nonexistent/relay.sock"}, c.args...)
		code, line := runRelay(t, args...)
		if code != exitUsage {
			t.Errorf("relay %v: exit %d (%q), want %d", args, code, line, exitUsage)
		}
		for _, w := range c.want {
			if !strings.Contains(line, w) {
				t.Errorf("relay %v said %q, want it to say %q", args, line, w)
			}
		}
	}
	args := []string{"restart", "--control", "/nonexistent/relay.sock", "--", "web"}
	if code, line := runRelay(t, args...); code != exitUnreachable {
		t.Errorf("relay %v: exit %d (%q), want %d: the command after -- goes to relay", args, code, line, exitUnreachable)
	}
}

// An upgrading relay's check passes its command line on: a candidate
// that would not take it says so, rather than exit at once after the
// exec with relay's children.
func TestHandoffCheckParsesTheCommandLine(t *testing.T) {
	code, out := realMainOutput(t, handoff.CheckArg, "run", "--listen", "127.0.0.1:0", "--", "/bin/true")
	if code != exitOK {
		t.Errorf("check of a good command line: exit %d: %s", code, out)
	}
	code, out = realMainOutput(t, handoff.CheckArg, "run", "--listen", "127.0.0.1:0", "--no-such-flag", "--", "/bin/true")
	if code != exitUsage || !strings.Contains(out, "no-such-flag") {
		t.Errorf("check of a command line with an unknown flag: exit %d: %s", code, out)
	}
}
