package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Every bad flag of relay run is a usage error (exit 2) with one line that
// names the flag and what to give instead. Parsing fails before anything
// starts: no socket is bound, no child runs.
func TestRunUsageErrors(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", t.TempDir())
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"no command", []string{"--listen", "127.0.0.1:0"}, "no command to run; put it after the flags"},
		{"bad --listen", []string{"--listen", "localhost", "--", "true"}, "want host:port"},
		{"bad --listen port", []string{"--listen", ":http", "--", "true"}, "not a number from 0 to 65535"},
		{"bad --listen name", []string{"--listen", "a b=:80", "--", "true"}, "printable ASCII"},
		{"bad --socket-mode", []string{"--listen", ":0", "--socket-mode", "999", "--", "true"}, "--socket-mode \"999\": want an octal permission"},
		{"bad --health", []string{"--listen", ":0", "--health", "ping", "--", "true"}, "unknown check; use auto"},
		{"bad --health URL", []string{"--listen", ":0", "--health", "http://", "--", "true"}, "not a valid URL"},
		{"bad --stop-signal", []string{"--listen", ":0", "--stop-signal", "NOPE", "--", "true"}, "--stop-signal"},
		{"bad --steer", []string{"--listen", ":0", "--steer", "maybe", "--", "true"}, "--steer \"maybe\": use auto, on or off"},
		{"bad --takeover", []string{"--listen", ":0", "--takeover", "maybe", "--", "true"}, "--takeover \"maybe\": use auto, on or off"},
		{"negative --drain", []string{"--listen", ":0", "--drain", "-1s", "--", "true"}, "--drain not negative"},
		{"zero --health-timeout", []string{"--listen", ":0", "--health-timeout", "0s", "--", "true"}, "must be positive"},
		{"negative --stop-timeout", []string{"--listen", ":0", "--stop-timeout", "-2s", "--", "true"}, "must be positive"},
		{"negative --shutdown-delay", []string{"--listen", ":0", "--shutdown-delay", "-1s", "--", "true"}, "--shutdown-delay -1s: must not be negative"},
		{"negative --confirm", []string{"--listen", ":0", "--confirm", "-1s", "--", "true"}, "--confirm -1s: must not be negative"},
		{"--max-draining 0", []string{"--listen", ":0", "--max-draining", "0", "--", "true"}, "--max-draining 0: must be at least 1"},
		{"--kill-mode process", []string{"--listen", ":0", "--kill-mode", "process", "--", "true"}, "--kill-mode: \"process\" would leave a stopped generation's other processes running"},
		{"--kill-mode none", []string{"--listen", ":0", "--kill-mode", "none", "--", "true"}, "use mixed (the stop signal to the main process) or control-group"},
		{"bad --kill-mode", []string{"--listen", ":0", "--kill-mode", "cgroup", "--", "true"}, "--kill-mode: \"cgroup\" is not a kill mode"},
		{"bad --name", []string{"--listen", ":0", "--name", "a/b", "--", "true"}, "--name \"a/b\": want 1 to 64 letters"},
		{"bad --check", []string{"--listen", ":0", "--check", "no-such-check-relay-test", "--", "true"}, "not found in PATH"},
		{"bad --log-format", []string{"--listen", ":0", "--log-format", "xml", "--", "true"}, "--log-format \"xml\": use text or json"},
		{"bad --log-level", []string{"--listen", ":0", "--log-level", "loud", "--", "true"}, "--log-level \"loud\": use debug, info, warn or error"},
		{"a --listen URL", []string{"--listen", "tcp://127.0.0.1:8080", "--", "true"}, "not a URL; write 127.0.0.1:8080 or tcp:127.0.0.1:8080"},
		{"an http --listen URL", []string{"--listen", "http://127.0.0.1:8080/", "--", "true"}, "not a URL; write 127.0.0.1:8080 or tcp:127.0.0.1:8080"},
		{"a udp --listen URL", []string{"--listen", "udp://127.0.0.1:53", "--", "true"}, "not a URL; write udp:127.0.0.1:53"},
		{"a unix --listen URL", []string{"--listen", "unix:///run/a.sock", "--", "true"}, "not a URL; write unix:/run/a.sock"},
		{"the same --listen twice", []string{"--listen", "127.0.0.1:8080", "--listen", "127.0.0.1:8080", "--", "true"}, "--listen \"127.0.0.1:8080\" is given twice; give each address once"},
		{"overlapping --listen", []string{"--listen", ":8080", "--listen", "127.0.0.1:8080", "--", "true"}, "--listen \":8080\" and --listen \"127.0.0.1:8080\" overlap"},
		{"--stop-signal KILL", []string{"--listen", ":0", "--stop-signal", "KILL", "--", "true"}, "--stop-signal: signal \"KILL\" cannot be caught"},
		{"--stop-signal STOP", []string{"--listen", ":0", "--stop-signal", "STOP", "--", "true"}, "suspends a process instead of stopping it"},
		{"--stop-signal CHLD", []string{"--listen", ":0", "--stop-signal", "CHLD", "--", "true"}, "ignored by default and sent by the kernel"},
		{"a blank --check", []string{"--listen", ":0", "--check", "   ", "--", "true"}, "--check \"   \" holds no command"},
		{"a --control path too long", []string{"--listen", ":0", "--control", "/" + strings.Repeat("c", 110), "--", "true"}, "the socket path is 111 bytes, longer than the 107"},
		{"a command not in PATH", []string{"--listen", ":0", "--", "no-such-command-relay-test"}, "not found in PATH; give a path such as ./no-such-command-relay-test"},
		{"a missing binary", []string{"--listen", ":0", "--", "/nonexistent/server"}, "does not exist; check the path"},
		{"a binary that cannot run", []string{"--listen", ":0", "--", "/dev/null"}, "is not executable; chmod +x it"},
	} {
		code, line := runRelay(t, append([]string{"run"}, c.args...)...)
		if code != exitUsage || !strings.Contains(line, c.want) {
			t.Errorf("%s: exit %d, %q; want exit %d and a line with %q", c.name, code, line, exitUsage, c.want)
		}
	}
}

// Without --listen and with no socket from systemd there is nothing to
// serve: a usage error, found before any socket is bound or child runs.
func TestRunNeedsASocket(t *testing.T) {
	t.Setenv("LISTEN_FDS", "")
	t.Setenv("LISTEN_PID", "")
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("XDG_RUNTIME_DIR", t.TempDir())
	code, line := runRelay(t, "run", "--", "true")
	if code != exitUsage || !strings.Contains(line, "no --listen address and no sockets from systemd; give at least one, e.g. --listen :8080") {
		t.Errorf("relay run without a socket: exit %d, %q; want a usage error", code, line)
	}
}

// --health accept on a socket every generation shares, with no takeover to
// watch the child's bind, could prove nothing: refused once the socket is
// open, before any child runs.
func TestRunRefusesAnAcceptCheckThatCannotTell(t *testing.T) {
	t.Setenv("LISTEN_FDS", "")
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("XDG_RUNTIME_DIR", t.TempDir())
	code, out := realMainOutput(t, "run", "--listen", "127.0.0.1:0", "--health", "accept", "--steer", "off", "--takeover", "off", "--", "true")
	last := out[strings.LastIndex(strings.TrimSuffix(out, "\n"), "\n")+1:]
	if code != exitUsage || !strings.HasPrefix(last, "relay: --health accept cannot check tcp-") || !strings.Contains(last, "use --health notify") {
		t.Errorf("exit %d, last line %q; want a usage error naming the listener and the checks to use", code, last)
	}
}

// --confirm needs a steered listener: where every generation shares the
// socket, new connections could not go back to the warm one alone.
func TestRunRefusesConfirmOnSharedSockets(t *testing.T) {
	t.Setenv("LISTEN_FDS", "")
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("XDG_RUNTIME_DIR", t.TempDir())
	for _, args := range [][]string{
		{"--listen", "127.0.0.1:0", "--steer", "off"},
		{"--listen", "unix:" + filepath.Join(t.TempDir(), "s.sock")},
	} {
		code, out := realMainOutput(t, append(append([]string{"run", "--confirm", "10s"}, args...), "--", "true")...)
		last := out[strings.LastIndex(strings.TrimSuffix(out, "\n"), "\n")+1:]
		if code != exitUsage || !strings.HasPrefix(last, "relay: --confirm 10s: no listener is steered") || !strings.Contains(last, "or drop --confirm") {
			t.Errorf("relay run --confirm %v: exit %d, last line %q; want a usage error saying why", args, code, last)
		}
	}
}

// A unix socket path too long for a socket address is refused as a usage
// error that says so, and nothing is created for it: no lock file, no
// socket, for --listen as for --control.
func TestRunRefusesALongUnixPathLeavingNothing(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", t.TempDir())
	dir := t.TempDir()
	long := filepath.Join(dir, strings.Repeat("s", 120-len(dir)))
	for _, args := range [][]string{
		{"--listen", "unix:" + long, "--", "true"},
		{"--listen", "127.0.0.1:0", "--control", long, "--", "true"},
	} {
		code, line := runRelay(t, append([]string{"run"}, args...)...)
		if code != exitUsage || !strings.Contains(line, "longer than the 107 a unix socket address holds; choose a shorter path") {
			t.Errorf("relay run %s: exit %d, %q; want a usage error that the path is too long", strings.Join(args, " "), code, line)
		}
		if left, _ := os.ReadDir(dir); len(left) != 0 {
			t.Errorf("relay run %s left %v in %s", strings.Join(args, " "), left, dir)
		}
	}
}
