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
		{"negative --drain", []string{"--listen", ":0", "--drain", "-1s", "--", "true"}, "relay: --drain -1s: must not be negative, e.g. --drain 2s (0 tells the old generation to stop at the switch; without --drain, 5s on steered listeners)\n"},
		{"zero --health-timeout", []string{"--listen", ":0", "--health-timeout", "0s", "--", "true"}, "relay: --health-timeout 0s: must be positive, e.g. --health-timeout 60s (how long a new generation may take to become ready)\n"},
		{"negative --health-timeout", []string{"--listen", ":0", "--health-timeout", "-1m", "--", "true"}, "relay: --health-timeout -1m0s: must be positive"},
		{"negative --stop-timeout", []string{"--listen", ":0", "--stop-timeout", "-2s", "--", "true"}, "relay: --stop-timeout -2s: must be positive, e.g. --stop-timeout 30s (how long a generation may take to stop before SIGKILL)\n"},
		{"zero --stop-timeout", []string{"--listen", ":0", "--stop-timeout", "0s", "--", "true"}, "relay: --stop-timeout 0s: must be positive"},
		{"negative --shutdown-delay", []string{"--listen", ":0", "--shutdown-delay", "-1s", "--", "true"}, "--shutdown-delay -1s: must not be negative"},
		{"negative --confirm", []string{"--listen", ":0", "--confirm", "-1s", "--", "true"}, "--confirm -1s: must not be negative"},
		{"--max-draining 0", []string{"--listen", ":0", "--max-draining", "0", "--", "true"}, "--max-draining 0: must be at least 1"},
		{"--workers 0", []string{"--listen", ":0", "--workers", "0", "--", "true"}, "--workers 0: want 1 to 64 copies"},
		{"--workers 65", []string{"--listen", ":0", "--workers", "65", "--", "true"}, "--workers 65: want 1 to 64 copies"},
		{"--workers many", []string{"--listen", ":0", "--workers", "many", "--", "true"}, "--workers \"many\": want a number of copies, e.g. --workers 4, or cpus for one per CPU"},
		{"--rolling without --workers", []string{"--listen", ":0", "--rolling", "1", "--", "true"}, "--rolling 1: restarts K copies at a time, from 1 to --workers less one (--workers is 1)"},
		{"--rolling as many as --workers", []string{"--listen", ":0", "--workers", "4", "--rolling", "4", "--", "true"}, "--rolling 4: restarts K copies at a time"},
		{"--workers with --confirm", []string{"--listen", ":0", "--workers", "2", "--confirm", "5s", "--", "true"}, "--confirm does not work with --workers above 1 yet"},
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
		{"an empty --check", []string{"--listen", ":0", "--check", "", "--", "true"}, "relay: --check \"\" holds no command: give one, such as --check \"nginx -t\", or leave --check out\n"},
		{"an empty --check=", []string{"--listen", ":0", "--check=", "--", "true"}, "relay: --check \"\" holds no command"},
		{"a newline in --listen", []string{"--listen", "127.0.0.1:8080\n", "--", "true"}, "relay: --listen \"127.0.0.1:8080\\n\": holds the control character '\\n', which no address or socket name may; remove it: --listen \"127.0.0.1:8080\"\n"},
		{"a tab in a --listen name", []string{"--listen", "a\tb=127.0.0.1:8080", "--", "true"}, "holds the control character '\\t'"},
		{"a control character in a unix --listen", []string{"--listen", "unix:/run/a\x1b.sock", "--", "true"}, "holds the control character '\\x1b'"},
		{"a space around --listen", []string{"--listen", " 127.0.0.1:8080", "--", "true"}, "is neither an IP address nor a host name"},
		{"a control character in --control", []string{"--listen", ":0", "--control", "/tmp/a\nb.sock", "--", "true"}, "relay: --control \"/tmp/a\\nb.sock\": holds the control character '\\n'"},
		{"the same name twice", []string{"--listen", "a=127.0.0.1:8080", "--listen", "a=127.0.0.1:8081", "--", "true"}, "relay: --listen \"a=127.0.0.1:8080\" and --listen \"a=127.0.0.1:8081\" use the same name \"a\"; give each listener its own name\n"},
		{"an IPv4 address out of range", []string{"--listen", "256.1.1.1:8080", "--", "true"}, "relay: --listen \"256.1.1.1:8080\": host \"256.1.1.1\" is not an IPv4 address (four numbers from 0 to 255, no leading zeros); write one such as 127.0.0.1:8080, or 0.0.0.0:8080 for every IPv4 address\n"},
		{"a short IPv4 address", []string{"--listen", "udp:127.1:53", "--", "true"}, "host \"127.1\" is not an IPv4 address"},
		{"a bad IPv6 address", []string{"--listen", "[::g]:8080", "--", "true"}, "host \"::g\" is not an IP address; write an IPv6 address in brackets"},
		{"a zone that names no interface", []string{"--listen", "[fe80::1%nosuchif]:8080", "--", "true"}, "relay: --listen \"[fe80::1%nosuchif]:8080\": zone \"nosuchif\" of fe80::1 names no network interface of this machine (it has "},
		{"--metrics on a unix socket", []string{"--listen", ":0", "--metrics", "unix:/run/m.sock", "--", "true"}, "relay: --metrics \"unix:/run/m.sock\": not a unix socket: --metrics takes a TCP address only; give [IP]:PORT, e.g. --metrics 127.0.0.1:9090, or --metrics :9090 for every address\n"},
		{"--metrics on a path", []string{"--listen", ":0", "--metrics", "/run/m.sock", "--", "true"}, "not a unix socket: --metrics takes a TCP address only"},
		{"--metrics as a URL", []string{"--listen", ":0", "--metrics", "http://127.0.0.1:9090/metrics", "--", "true"}, "not a URL: --metrics takes a TCP address only"},
		{"--metrics on UDP", []string{"--listen", ":0", "--metrics", "udp:127.0.0.1:9090", "--", "true"}, "not UDP: --metrics takes a TCP address only"},
		{"--metrics with tcp:", []string{"--listen", ":0", "--metrics", "tcp:127.0.0.1:9090", "--", "true"}, "write the address without \"tcp:\" (127.0.0.1:9090)"},
		{"--confirm on a unix socket", []string{"--listen", "unix:/nonexistent/s.sock", "--confirm", "10s", "--", "true"}, "relay: --confirm 10s: no listener is steered (unix listeners share one socket among generations), so new connections could not go back to the warm generation alone; use a TCP --listen with --steer auto or on, or drop --confirm\n"},
		{"--confirm with --steer off", []string{"--listen", "127.0.0.1:0", "--steer", "off", "--confirm", "10s", "--", "true"}, "relay: --confirm 10s: no listener is steered (--steer off shares one socket among generations)"},
		{"--liveness accept on UDP", []string{"--listen", "udp:127.0.0.1:0", "--liveness", "accept", "--", "true"}, "relay: --liveness accept needs a steered TCP listener to probe"},
		{"--liveness accept with --steer off", []string{"--listen", "127.0.0.1:0", "--steer", "off", "--liveness", "accept", "--", "true"}, "relay: --liveness accept needs a steered TCP listener to probe"},
		{"--health accept on unix with --takeover off", []string{"--listen", "unix:/nonexistent/s.sock", "--takeover", "off", "--health", "accept", "--", "true"}, "relay: --health accept cannot check unix-s.sock: its socket is shared by every generation and --takeover is off"},
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
// watch the child's bind, could prove nothing: refused before the socket is
// bound, in one line.
func TestRunRefusesAnAcceptCheckThatCannotTell(t *testing.T) {
	t.Setenv("LISTEN_FDS", "")
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("XDG_RUNTIME_DIR", t.TempDir())
	code, line := runRelay(t, "run", "--listen", "127.0.0.1:0", "--health", "accept", "--steer", "off", "--takeover", "off", "--", "true")
	if code != exitUsage || !strings.HasPrefix(line, "relay: --health accept cannot check 127.0.0.1:0: ") || !strings.Contains(line, "use --health notify") {
		t.Errorf("exit %d, %q; want a usage error naming the listener and the checks to use", code, line)
	}
}

// --confirm needs a steered listener: where every generation shares the
// socket, new connections could not go back to the warm one alone. Known
// from the flags, it is refused before anything is bound or logged.
func TestRunRefusesConfirmOnSharedSockets(t *testing.T) {
	t.Setenv("LISTEN_FDS", "")
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("XDG_RUNTIME_DIR", t.TempDir())
	dir := t.TempDir()
	for _, args := range [][]string{
		{"--listen", "127.0.0.1:0", "--steer", "off"},
		{"--listen", "unix:" + filepath.Join(dir, "s.sock")},
		// UDP is steered by flow where relay may load eBPF; with
		// --steer off it is shared too.
		{"--listen", "udp:127.0.0.1:0", "--listen", "unix:" + filepath.Join(dir, "s.sock"), "--steer", "off"},
	} {
		code, line := runRelay(t, append(append([]string{"run", "--confirm", "10s"}, args...), "--", "true")...)
		if code != exitUsage || !strings.HasPrefix(line, "relay: --confirm 10s: no listener is steered") || !strings.Contains(line, "or drop --confirm") {
			t.Errorf("relay run --confirm %v: exit %d, %q; want a usage error saying why", args, code, line)
		}
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("refused --confirm left %v in %s", left, dir)
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
