package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Test 8: bad input gets a clear one-line error and a non-zero exit, and
// starts nothing.
func TestBadInputFailsClearly(t *testing.T) {
	held, busyAddr := mustFreeTCPAddr(t)
	defer held.Close()
	dir := t.TempDir()
	marker := filepath.Join(dir, "started")

	cases := []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"unknown flag", []string{"run", "--listen", "127.0.0.1:0", "--bogus", "--", built.testchild}, 2,
			[]string{"flag provided but not defined", "-bogus", "relay run --help"}},
		{"no command", []string{"run", "--listen", "127.0.0.1:0"}, 2,
			[]string{"no command to run"}},
		{"no listener", []string{"run", "--", built.testchild}, 2,
			[]string{"no --listen address"}},
		{"port in use", []string{"run", "--listen", busyAddr, "--", built.testchild, "-report", marker}, 1,
			[]string{"address already in use", busyAddr, "choose another address"}},
		{"missing binary", []string{"run", "--listen", "127.0.0.1:0", "--", filepath.Join(dir, "no-such-server")}, 2,
			[]string{"does not exist", "no-such-server"}},
		{"missing binary in PATH", []string{"run", "--listen", "127.0.0.1:0", "--", "no-such-server-in-path"}, 2,
			[]string{"not found in PATH", "no-such-server-in-path"}},
		{"bad health spec", []string{"run", "--listen", "127.0.0.1:0", "--health", "bogus://x", "--", built.testchild}, 2,
			[]string{"--health", "unknown check"}},
		{"bad delay", []string{"run", "--listen", "127.0.0.1:0", "--health", "delay:soon", "--", built.testchild}, 2,
			[]string{"--health", "delay:2s"}},
		{"bad stop signal", []string{"run", "--listen", "127.0.0.1:0", "--stop-signal", "NOPE", "--", built.testchild}, 2,
			[]string{"--stop-signal", "unknown signal"}},
		{"bad listen", []string{"run", "--listen", "localhost", "--", built.testchild}, 2,
			[]string{"--listen", "host:port"}},
		{"missing socket directory", []string{"run", "--listen", "unix:" + filepath.Join(dir, "nodir", "s.sock"), "--", built.testchild, "-report", marker}, 1,
			[]string{"nodir", "does not exist", "create it first"}},
		{"unknown global flag", []string{"--bogus"}, 2,
			[]string{"-bogus", "(see 'relay --help')"}},
		{"listen URL", []string{"run", "--listen", "tcp://127.0.0.1:8080", "--", built.testchild, "-report", marker}, 2,
			[]string{"not a URL", "write 127.0.0.1:8080 or tcp:127.0.0.1:8080"}},
		{"same listen twice", []string{"run", "--listen", busyAddr, "--listen", busyAddr, "--", built.testchild, "-report", marker}, 2,
			[]string{"is given twice", "give each address once"}},
		{"unix path too long", []string{"run", "--listen", "unix:" + filepath.Join(dir, strings.Repeat("s", 110)), "--", built.testchild, "-report", marker}, 2,
			[]string{"longer than the 107 a unix socket address holds", "choose a shorter path"}},
		{"control path too long", []string{"run", "--listen", "127.0.0.1:0", "--control", filepath.Join(dir, strings.Repeat("c", 110)), "--", built.testchild, "-report", marker}, 2,
			[]string{"--control", "longer than the 107", "choose a shorter path"}},
		{"stop signal KILL", []string{"run", "--listen", "127.0.0.1:0", "--stop-signal", "KILL", "--", built.testchild, "-report", marker}, 2,
			[]string{"--stop-signal", "cannot be caught", "--stop-timeout"}},
		{"stop signal STOP", []string{"run", "--listen", "127.0.0.1:0", "--stop-signal", "STOP", "--", built.testchild, "-report", marker}, 2,
			[]string{"--stop-signal", "suspends"}},
		{"stop signal CHLD", []string{"run", "--listen", "127.0.0.1:0", "--stop-signal", "CHLD", "--", built.testchild, "-report", marker}, 2,
			[]string{"--stop-signal", "ignored by default"}},
		{"blank check on run", []string{"run", "--listen", "127.0.0.1:0", "--check", "   ", "--", built.testchild, "-report", marker}, 2,
			[]string{"--check", "holds no command"}},
		{"blank check on restart", []string{"restart", "--control", filepath.Join(dir, "none.sock"), "--check", "   "}, 2,
			[]string{"--check", "holds no command"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, built.relay, c.args...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			code := cmd.ProcessState.ExitCode()
			if err == nil || code != c.code {
				t.Errorf("exit code %d (%v), want %d", code, err, c.code)
			}
			out := strings.TrimRight(stderr.String(), "\n")
			if strings.Count(out, "\n") != 0 || !strings.HasPrefix(out, "relay: ") {
				t.Errorf("want one line starting with 'relay: ', got:\n%s", out)
			}
			for _, w := range c.want {
				if !strings.Contains(out, w) {
					t.Errorf("error %q does not mention %q", out, w)
				}
			}
			if _, err := os.Stat(marker); err == nil {
				t.Errorf("the child was started")
			}
		})
	}
	// Nothing was left on disk: no socket, no lock file.
	left, _ := os.ReadDir(dir)
	for _, e := range left {
		t.Errorf("bad input left %s in %s", e.Name(), dir)
	}
}

// Every bad input is a usage error: exit 2 and one line on stderr, the
// error, with no log line before it (nothing was bound, created or
// logged), no child started, and nothing left on disk: no control socket
// or lock file in XDG_RUNTIME_DIR, no unix socket or lock file where
// --listen unix: and --control point.
func TestBadInputIsOneUsageLine(t *testing.T) {
	held1, addr1 := mustFreeTCPAddr(t)
	defer held1.Close()
	held2, addr2 := mustFreeTCPAddr(t)
	defer held2.Close()
	_, port1, _ := net.SplitHostPort(addr1)
	dir := t.TempDir()  // --listen unix: and --control paths
	xdg := t.TempDir()  // XDG_RUNTIME_DIR: the default control socket
	mark := t.TempDir() // the child's report, if one ever starts
	marker := filepath.Join(mark, "started")
	child := []string{"--", built.testchild, "-report", marker}
	run := func(args ...string) []string { return append(append([]string{"run"}, args...), child...) }
	unixSock := "unix:" + filepath.Join(dir, "app.sock")
	none := filepath.Join(dir, "none.sock") // no relay there: a client that got that far would exit 4
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		// 1. Control characters.
		{"newline after --listen", run("--listen", addr1+"\n"),
			"relay: --listen \"" + addr1 + "\\n\": holds the control character '\\n', which no address or socket name may; remove it: --listen \"" + addr1 + "\""},
		{"tab in a --listen name", run("--listen", "a\tb="+addr1), "holds the control character '\\t'"},
		{"escape in a unix --listen", run("--listen", unixSock+"\x1b"), "holds the control character '\\x1b'"},
		{"newline in --control", run("--listen", addr1, "--control", filepath.Join(dir, "c\n.sock")), "relay: --control"},
		// 2. An empty --check, given.
		{"empty --check on run", run("--listen", addr1, "--check", ""),
			"relay: --check \"\" holds no command: give one, such as --check \"nginx -t\", or leave --check out"},
		{"empty --check= on run", run("--listen", addr1, "--check="), "relay: --check \"\" holds no command"},
		{"empty --check on restart", []string{"restart", "--control", none, "--check", ""}, "relay: --check \"\" holds no command"},
		// 3. One name twice.
		{"same name twice", run("--listen", "a="+addr1, "--listen", "a="+addr2),
			"relay: --listen \"a=" + addr1 + "\" and --listen \"a=" + addr2 + "\" use the same name \"a\"; give each listener its own name"},
		// 4. Arguments a client command does not take.
		{"status with an argument", []string{"status", "--control", none, "extra"},
			"relay: relay status takes no arguments, but got \"extra\"; to name the relay, use --name: relay status --name extra"},
		{"stop with an argument", []string{"stop", "--control", none, "extra"}, "relay: relay stop takes no arguments, but got \"extra\""},
		{"rollback with arguments", []string{"rollback", "--control", none, "a", "b"}, "relay: relay rollback takes no arguments, but got \"a\" \"b\""},
		{"upgrade with two paths", []string{"upgrade", "--control", none, "/a", "/b"}, "relay: relay upgrade takes at most one PATH, the new relay binary, but got 2: \"/a\" \"/b\""},
		// 5. Digits and dots that are no IPv4 address: no lookup.
		{"IPv4 out of range", run("--listen", "256.1.1.1:"+port1),
			"relay: --listen \"256.1.1.1:" + port1 + "\": host \"256.1.1.1\" is not an IPv4 address (four numbers from 0 to 255, no leading zeros)"},
		// 6. A zone that names no interface.
		{"zone of no interface", run("--listen", "[fe80::1%nosuchif]:"+port1),
			"relay: --listen \"[fe80::1%nosuchif]:" + port1 + "\": zone \"nosuchif\" of fe80::1 names no network interface of this machine"},
		// 7. --metrics on a unix socket.
		{"--metrics unix:", run("--listen", addr1, "--metrics", "unix:"+filepath.Join(dir, "m.sock")),
			"not a unix socket: --metrics takes a TCP address only; give [IP]:PORT, e.g. --metrics 127.0.0.1:9090"},
		// 8. One sentence per duration flag.
		{"negative --stop-timeout", run("--listen", addr1, "--stop-timeout", "-1s"), "relay: --stop-timeout -1s: must be positive, e.g. --stop-timeout 30s"},
		{"negative --drain", run("--listen", addr1, "--drain", "-1s"), "relay: --drain -1s: must not be negative, e.g. --drain 2s"},
		{"zero --health-timeout", run("--listen", addr1, "--health-timeout", "0s"), "relay: --health-timeout 0s: must be positive, e.g. --health-timeout 60s"},
		// 9. What the sockets cannot serve, known before any bind.
		{"--confirm on unix", run("--listen", unixSock, "--confirm", "10s"), "relay: --confirm 10s: no listener is steered (unix listeners share one socket among generations)"},
		{"--confirm with --steer off", run("--listen", "127.0.0.1:0", "--steer", "off", "--confirm", "10s"), "relay: --confirm 10s: no listener is steered (--steer off shares one socket among generations)"},
		{"--liveness accept on unix", run("--listen", unixSock, "--liveness", "accept"), "relay: --liveness accept needs a steered TCP listener to probe"},
		{"--health accept unprovable", run("--listen", unixSock, "--health", "accept", "--takeover", "off"), "relay: --health accept cannot check unix-app.sock"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, built.relay, c.args...)
			cmd.Env = append(os.Environ(), "XDG_RUNTIME_DIR="+xdg, "LISTEN_FDS=", "LISTEN_PID=", "NOTIFY_SOCKET=")
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			if code := cmd.ProcessState.ExitCode(); code != 2 {
				t.Errorf("exit code %d (%v), want 2", code, err)
			}
			out := stderr.String()
			if strings.Count(out, "\n") != 1 || !strings.HasSuffix(out, "\n") || !strings.HasPrefix(out, "relay: ") || strings.Contains(out, "level=") {
				t.Errorf("stderr %q, want exactly one line, the error, and no log line", out)
			}
			if !strings.Contains(out, c.want) {
				t.Errorf("stderr %q, want it to say %q", out, c.want)
			}
			for _, d := range []string{dir, xdg, mark} {
				left, _ := os.ReadDir(d)
				for _, e := range left {
					t.Errorf("left %s in %s", e.Name(), d)
					os.RemoveAll(filepath.Join(d, e.Name()))
				}
			}
		})
	}
}

// A relay that exits cleanly leaves no control socket and no lock file
// for it, nor its unix listener's socket.
func TestInputCleanExitLeavesNoControlFiles(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "app.sock")
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--listen", "unix:"+sock, "--", built.testchild)
	r.listenAddrs(2)
	r.waitMsg(0, "generation ready", 1)
	ctlDir := filepath.Dir(r.control)
	for _, p := range []string{r.control, r.control + ".lock", sock} {
		if _, err := os.Lstat(p); err != nil {
			t.Fatalf("while relay runs: %v", err)
		}
	}
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
	left, err := os.ReadDir(ctlDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range left {
		t.Errorf("relay left %s in its control directory %s", e.Name(), ctlDir)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("relay left its unix socket %s: %v", sock, err)
	}
}

// relay --version and relay version print one line, the same, with the
// commit the toolchain stamped into the binary, if it did.
func TestVersionInputs(t *testing.T) {
	var lines []string
	for _, args := range [][]string{{"--version"}, {"version"}} {
		out, err := exec.Command(built.relay, args...).Output()
		if err != nil {
			t.Fatalf("relay %s: %v", args[0], err)
		}
		line := string(out)
		if strings.Count(line, "\n") != 1 || !strings.HasPrefix(line, "relay ") || !strings.Contains(line, " commit ") {
			t.Errorf("relay %s printed %q, want one line: relay VERSION commit REVISION", args[0], line)
		}
		lines = append(lines, line)
	}
	if lines[0] != lines[1] {
		t.Errorf("relay --version %q and relay version %q differ", lines[0], lines[1])
	}
	info, err := exec.Command("go", "version", "-m", built.relay).Output()
	if err != nil {
		t.Fatalf("go version -m: %v", err)
	}
	for _, l := range strings.Split(string(info), "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "build" && strings.HasPrefix(f[1], "vcs.revision=") {
			if rev := strings.TrimPrefix(f[1], "vcs.revision="); !strings.Contains(lines[0], " commit "+rev) {
				t.Errorf("relay --version %q does not name the revision %s", lines[0], rev)
			}
		}
	}
}

// A WATCHDOG_USEC too short to keep (5µs) is refused in one warning that
// names the fix, and relay never pings it, let alone every 2.5µs.
func TestTooShortWatchdogInputIsRefused(t *testing.T) {
	rec := newNotifyRecorder(t)
	r := startRelay(t, []string{"NOTIFY_SOCKET=" + rec.path, "WATCHDOG_USEC=5"},
		"--listen", "127.0.0.1:0", "--", built.testchild)
	warn, _ := r.waitMsg(0, "ignoring the watchdog settings", 0)
	if err := warn.str("err"); !strings.Contains(err, "WATCHDOG_USEC=5 ") || !strings.Contains(err, "set WatchdogSec= to 1s or more") {
		t.Errorf("warning %q, want one naming WATCHDOG_USEC=5 and the fix", err)
	}
	r.waitMsg(0, "generation ready", 1)
	rec.waitCount(1, "READY=1", has("READY", "1"))
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
	rec.sync()
	for _, m := range rec.all() {
		if m.vars["WATCHDOG"] == "1" {
			t.Fatalf("relay pinged the watchdog: %q", m.raw)
		}
	}
	if n := r.count("watchdog: pinging while the supervisor answers"); n != 0 {
		t.Errorf("relay said it pings the watchdog")
	}
}

// Thousands of idle connections to the control socket, from relay's own
// user, keep neither status, restart nor stop from being answered, and do
// not starve relay of fds, even with a limit of 256 of them: the restart
// still starts its new generation.
func TestControlAnswersBesideThousandsOfIdleConnections(t *testing.T) {
	const idle = 2000
	raiseNofile(t, idle+256)
	limit := []string{"sh", "-c", `ulimit -n 256 && exec "$0" "$@"`}
	r := startRelayWrapped(t, limit, built.relay, nil, nil, "--listen", "127.0.0.1:0", "--", built.testchild)
	r.listenAddrs(1)
	_, from := r.waitMsg(0, "generation ready", 1)
	conns := make([]net.Conn, 0, idle)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range idle {
		c, err := net.Dial("unix", r.control)
		if err != nil {
			t.Fatalf("idle connection %d: %v", len(conns), err)
		}
		conns = append(conns, c)
	}
	if out, stderr, code := r.client("status"); code != 0 || !strings.Contains(out, "serving") {
		t.Fatalf("relay status beside %d idle connections: exit %d, %q %q", idle, code, out, stderr)
	}
	if out, stderr, code := r.client("restart"); code != 0 {
		t.Fatalf("relay restart beside %d idle connections: exit %d, %q %q", idle, code, out, stderr)
	}
	r.waitMsg(from, "generation ready", 2)
	r.waitMsg(0, "control connections that sent no request closed to make room for new ones", 0)
	if out, stderr, code := r.client("stop"); code != 0 {
		t.Errorf("relay stop beside %d idle connections: exit %d, %q %q", idle, code, out, stderr)
	}
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exit code %d, want 0", code)
	}
	if n := r.count("accepting a control connection"); n != 0 {
		t.Errorf("relay failed to accept %d times", n)
	}
}

// raiseNofile makes sure the test may open n files.
func raiseNofile(t *testing.T, n uint64) {
	t.Helper()
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	if rl.Cur >= n {
		return
	}
	rl.Cur = n
	rl.Max = max(rl.Max, n) // only root may raise the hard limit
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatalf("this test needs %d open files: %v; raise ulimit -n", n, err)
	}
}

// Test 9: SIGTERM makes relay stop its child and exit with the child's
// status, leaving no process behind.
func TestSigtermExitsWithTheChildsStatus(t *testing.T) {
	dir := t.TempDir()
	gcFile := filepath.Join(dir, "grandchild")
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--stop-timeout", "2s",
		"--", built.testchild, "-exit-on-term", "7", "-grandchild", "-grandchild-pid", gcFile)
	r.listenAddrs(1)
	ready, _ := r.waitMsg(0, "generation ready", 1)
	gc := readPid(t, gcFile)
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 7 {
		t.Errorf("relay exit code %d, want the child's 7", code)
	}
	for _, pid := range []int{ready.num("pid"), gc} {
		if !processGone(pid) {
			t.Errorf("pid %d outlived relay", pid)
		}
	}
}

// A second SIGINT during a graceful stop kills at once.
func TestSecondInterruptStopsNow(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--stop-timeout", "5m",
		"--", built.testchild, "-ignore-term")
	r.listenAddrs(1)
	ready, from := r.waitMsg(0, "generation ready", 1)
	r.signal(syscall.SIGINT)
	r.waitMsg(from, "stopping generation", 1)
	r.signal(syscall.SIGINT)
	if code := r.wait(30 * time.Second); code != 128+9 {
		t.Errorf("relay exit code %d, want %d", code, 128+9)
	}
	if !processGone(ready.num("pid")) {
		t.Errorf("child outlived relay")
	}
}

// USR1 and WINCH sent to relay reach the serving child (USR2 upgrades
// relay itself: upgrade_test.go).
func TestSignalsAreForwardedToTheServingChild(t *testing.T) {
	sigFile := filepath.Join(t.TempDir(), "signals")
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--", built.testchild, "-signal-file", sigFile)
	r.listenAddrs(1)
	_, from := r.waitMsg(0, "generation ready", 1)
	want := ""
	for _, sig := range []syscall.Signal{syscall.SIGUSR1, syscall.SIGWINCH} {
		r.signal(sig)
		_, from = r.waitMsg(from, "forwarded signal", 1)
		if want != "" {
			want += "\n"
		}
		want += sig.String()
		waitUntil(t, 10*time.Second, "the child to see "+sig.String(), func() bool {
			b, _ := os.ReadFile(sigFile)
			return string(b) == want
		})
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// When relay's own stderr goes away (a log reader that exits), the
// children keep running: relay keeps draining their stderr.
func TestClosedLogReaderKillsNoChild(t *testing.T) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(built.relay, "run", "--log-format", "json", "--listen", "127.0.0.1:0",
		"--", built.testchild, "-stderr-per-request")
	cmd.Stderr = pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()
	var addr string
	var pid int
	sc := bufio.NewScanner(pr)
	for pid == 0 && sc.Scan() {
		var l logLine
		if json.Unmarshal(sc.Bytes(), &l) != nil {
			continue
		}
		switch l.str("msg") {
		case "listening":
			addr = l.str("addr")
		case "generation ready":
			pid = l.num("pid")
		}
	}
	if pid == 0 {
		t.Fatalf("relay's log ended before the child was ready: %v", sc.Err())
	}
	pr.Close() // the log reader goes away
	client := newConnClient()
	for i := range 5 {
		got, err := get(client, httpURL(addr))
		if err != nil || got != pid {
			t.Fatalf("request %d: pid %d, %v; want the first child %d still serving", i, got, err, pid)
		}
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		t.Fatal("relay did not exit")
	}
	if code := cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("relay exit code %d, want 0 (the child's own)", code)
	}
}

// A second relay on a unix socket path a live relay holds fails clearly and
// leaves the first one serving.
func TestSecondRelayOnTheSameUnixPathFails(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "app.sock")
	r := startRelay(t, nil, "--listen", "unix:"+sock, "--", built.testchild)
	r.listenAddrs(1)
	r.waitMsg(0, "generation ready", 1)

	var stderr bytes.Buffer
	second := exec.Command(built.relay, "run", "--listen", "unix:"+sock, "--", built.testchild)
	second.Stderr = &stderr
	err := second.Run()
	if code := second.ProcessState.ExitCode(); err == nil || code != 1 {
		t.Errorf("second relay: exit code %d (%v), want 1", code, err)
	}
	if !strings.Contains(stderr.String(), "another relay holds "+sock) {
		t.Errorf("second relay said %q", stderr.String())
	}
	if _, err := os.Stat(sock); err != nil {
		t.Errorf("the first relay's socket is gone: %v", err)
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}
