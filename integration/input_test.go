package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
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

// USR1, USR2 and WINCH sent to relay reach the serving child.
func TestSignalsAreForwardedToTheServingChild(t *testing.T) {
	sigFile := filepath.Join(t.TempDir(), "signals")
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--", built.testchild, "-signal-file", sigFile)
	r.listenAddrs(1)
	_, from := r.waitMsg(0, "generation ready", 1)
	want := ""
	for _, sig := range []syscall.Signal{syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH} {
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
