package main

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/relaysh/relay/control"
)

func TestRestartOutcomes(t *testing.T) {
	starting := `{"v":1,"type":"event","event":{"phase":"starting","generation":5,"pid":1240}}`
	ready := `{"v":1,"type":"event","event":{"phase":"ready","generation":5,"pid":1240,"duration_ms":12.5}}`
	confirming := `{"v":1,"type":"event","event":{"phase":"confirming","generation":4,"pid":1200,"duration_ms":10000}}`
	for _, c := range []struct {
		name  string
		args  []string
		lines []string
		want  int
		out   []string // each printed
	}{
		{name: "done", want: exitOK,
			lines: []string{starting,
				`{"v":1,"type":"event","event":{"phase":"ready","generation":5,"pid":1240,"duration_ms":12.5}}`,
				`{"v":1,"type":"event","event":{"phase":"done","result":{"ok":true,"generation":5,"pid":1240,"duration_ns":9600000}}}`,
				`{"v":1,"type":"event","event":{"phase":"old_exited","generation":4,"pid":1200,"status":"exit status 0"}}`},
			out: []string{"generation 5 (pid 1240) starting", "ready after 12.5ms",
				"restart done: generation 5 (pid 1240) serving, took 9.6ms", "old generation 4 (pid 1200) exited (exit status 0); nothing of it is left"}},
		{name: "rolled back", want: exitRolledBack,
			lines: []string{starting,
				`{"v":1,"type":"event","event":{"phase":"done","result":{"ok":false,"generation":5,"pid":1240,"reason":"exited before ready","stderr_tail":"panic: x\nexit 2","duration_ns":1}}}`},
			out: []string{"restart rolled back: exited before ready", "stderr of generation 5 (pid 1240), last lines:", "  | panic: x", "  | exit 2"}},
		{name: "refused", want: exitRolledBack,
			lines: []string{`{"v":1,"type":"event","event":{"phase":"done","result":{"ok":false,"refused":true,"reason":"pre-flight check failed","duration_ns":1}}}`},
			out:   []string{"restart refused: pre-flight check failed"}},
		{name: "rolled back in the window", want: exitRolledBack,
			lines: []string{starting, ready, confirming,
				`{"v":1,"type":"event","event":{"phase":"rolling_back","generation":4,"pid":1200,"duration_ms":2012.5,"cause":"exited","reason":"exited in the confirmation window: exit status 1"}}`,
				`{"v":1,"type":"event","event":{"phase":"done","result":{"ok":false,"generation":5,"pid":1240,"reason":"exited in the confirmation window: exit status 1","duration_ns":1}}}`},
			out: []string{"old generation 4 (pid 1200) kept warm for 10s (--confirm): no new connections, no stop signal; relay rollback or a failure of the new one sends traffic back to it",
				"ROLLING BACK after 2.0125s (exited: exited in the confirmation window: exit status 1): generation 4 (pid 1200) serves again",
				"restart rolled back: exited in the confirmation window: exit status 1"}},
		{name: "confirmed", want: exitOK,
			lines: []string{starting, ready, confirming,
				`{"v":1,"type":"event","event":{"phase":"confirmed","generation":5,"pid":1240,"duration_ms":10000,"cause":"window"}}`,
				`{"v":1,"type":"event","event":{"phase":"done","result":{"ok":true,"generation":5,"pid":1240,"duration_ns":1}}}`},
			out: []string{"new generation 5 (pid 1240) confirmed: nothing failed in 10s"}},
		{name: "at the switch", args: []string{"--at-switch"}, want: exitOK,
			lines: []string{starting, ready, confirming},
			out:   []string{"ready after 12.5ms", "the new generation serves; not waiting for the rest (--at-switch)"}},
		{name: "at the switch, rolled back before it", args: []string{"--at-switch"}, want: exitRolledBack,
			lines: []string{starting, `{"v":1,"type":"event","event":{"phase":"done","result":{"ok":false,"generation":5,"pid":1240,"reason":"exited before ready","duration_ns":1}}}`},
			out:   []string{"restart rolled back: exited before ready"}},
		{name: "no wait", args: []string{"--no-wait"}, want: exitOK,
			lines: []string{`{"v":1,"type":"accepted"}`}, out: []string{"restart accepted"}},
		{name: "closed before done", want: exitFailure, lines: []string{starting}},
		{name: "refused user", want: exitUnreachable,
			lines: []string{`{"v":1,"type":"error","error":"permission denied: uid 5 may not control this relay (uid 0)","code":"permission_denied"}`}},
	} {
		t.Run(c.name, func(t *testing.T) {
			path, _ := fakeRelay(t, c.lines...)
			out, err := runClient(restartCommand(), append([]string{"--control", path}, c.args...)...)
			if got := exitCode(err, io.Discard); got != c.want {
				t.Errorf("relay restart: %v, exit code %d; want %d\n%s", err, got, c.want, out)
			}
			var rb rolledBackError
			if c.want == exitRolledBack && !errors.As(err, &rb) {
				t.Errorf("relay restart: %v; want a rolledBackError", err)
			}
			for _, want := range c.out {
				if !strings.Contains(out, want+"\n") {
					t.Errorf("relay restart printed\n%s\nwant a line %q", out, want)
				}
			}
		})
	}
}

// TestRestartRequest: what relay restart sends, paths made absolute where
// the caller named them.
func TestRestartRequest(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	path, reqs := fakeRelay(t, `{"v":1,"type":"accepted"}`)
	if out, err := runClient(restartCommand(), "--control", path, "--no-wait", "--check", exe+" -t", "--", "./api-v2", "--flag"); err != nil {
		t.Fatalf("relay restart: %v\n%s", err, out)
	}
	want := control.Request{V: control.Version, Op: control.OpRestart, NoWait: true,
		Command: []string{filepath.Join(wd, "api-v2"), "--flag"}, Check: []string{exe, "-t"}}
	if got := <-reqs; !reflect.DeepEqual(got, want) {
		t.Errorf("relay restart sent %+v, want %+v", got, want)
	}
}
