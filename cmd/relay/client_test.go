package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/relaysh/relay/control"
)

func TestParseCheck(t *testing.T) {
	// Not given is no check (checkFlag); given, even empty, it must hold
	// a command.
	for _, blank := range []string{"", " ", "   ", "\t \n"} {
		argv, err := parseCheck(blank)
		var ue usageError
		if !errors.As(err, &ue) || !strings.Contains(err.Error(), "holds no command") || !strings.Contains(err.Error(), "leave --check out") {
			t.Errorf("parseCheck(%q) = %q, %v; want a usage error saying it holds no command and how to fix it", blank, argv, err)
		}
	}

	sh, err := os.Executable() // a program that surely exists
	if err != nil {
		t.Fatal(err)
	}
	argv, err := parseCheck("  " + sh + "  -check   config ")
	if want := []string{sh, "-check", "config"}; err != nil || !reflect.DeepEqual(argv, want) {
		t.Errorf("parseCheck(%q ...) = %q, %v; want %q", sh, argv, err, want)
	}

	// A program found in PATH is resolved where the caller named it.
	t.Setenv("PATH", filepath.Dir(sh))
	argv, err = parseCheck(filepath.Base(sh) + " x")
	if want := []string{sh, "x"}; err != nil || !reflect.DeepEqual(argv, want) {
		t.Errorf("parseCheck(%q) = %q, %v; want %q", filepath.Base(sh)+" x", argv, err, want)
	}

	for _, missing := range []string{"/nonexistent/relay-check -t", "relay-no-such-check"} {
		argv, err := parseCheck(missing)
		var ue usageError
		if !errors.As(err, &ue) || !strings.Contains(err.Error(), "--check") {
			t.Errorf("parseCheck(%q) = %q, %v; want a usage error naming --check", missing, argv, err)
		}
	}
}

// Every client command refuses what it does not take, in a usage error
// that names it, before it reaches for relay: status, stop and rollback
// take no arguments, upgrade one PATH at most, and an empty --check holds
// no command.
func TestClientUsageErrors(t *testing.T) {
	path, reqs := fakeRelay(t, `{"v":1,"type":"error","error":"unexpected","code":"busy"}`)
	for _, c := range []struct {
		cmd  *cli.Command
		args []string
		want string
	}{
		{statusCommand(), []string{"extra"}, `relay status takes no arguments, but got "extra"; to name the relay, use --name: relay status --name extra`},
		{statusCommand(), []string{"--json", "a", "b"}, `relay status takes no arguments, but got "a" "b"; remove them (the relay is named with --name NAME or --control PATH)`},
		{stopCommand(), []string{"api"}, `relay stop takes no arguments, but got "api"; to name the relay, use --name: relay stop --name api`},
		{stopCommand(), []string{"a/b"}, `relay stop takes no arguments, but got "a/b"; remove them`},
		{rollbackCommand(), []string{"api", "now"}, `relay rollback takes no arguments, but got "api" "now"; remove them`},
		{upgradeCommand(), []string{"/a", "/b"}, `relay upgrade takes at most one PATH, the new relay binary, but got 2: "/a" "/b"; give one, or none for the file relay was started from`},
		{restartCommand(), []string{"--check", ""}, `--check "" holds no command: give one, such as --check "nginx -t", or leave --check out`},
		{restartCommand(), []string{"--check="}, `--check "" holds no command`},
	} {
		args := append([]string{"--control", path}, c.args...)
		_, err := runClient(c.cmd, args...)
		var ue usageError
		if !errors.As(err, &ue) || !strings.HasPrefix(err.Error(), c.want) {
			t.Errorf("relay %s %q: %v; want a usage error %q", c.cmd.Name, c.args, err, c.want)
		}
	}
	select {
	case req := <-reqs:
		t.Errorf("a refused command reached relay: %+v", req)
	default:
	}
}

func TestAbsCommand(t *testing.T) {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ in, want []string }{
		{in: nil, want: nil},
		{in: []string{"api", "-x"}, want: []string{"api", "-x"}}, // found in PATH by relay
		{in: []string{"/srv/api", "-x"}, want: []string{"/srv/api", "-x"}},
		{in: []string{"./api", "./x"}, want: []string{filepath.Join(wd, "api"), "./x"}},
		{in: []string{"bin/api"}, want: []string{filepath.Join(wd, "bin/api")}},
	} {
		got, err := absCommand(c.in)
		if err != nil || !reflect.DeepEqual(got, c.want) {
			t.Errorf("absCommand(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
}

// TestCallClassifies: call sorts a relay's answers into exit codes by the
// code in the response, never by its message.
func TestCallClassifies(t *testing.T) {
	status := control.Request{Op: control.OpStatus}
	for _, c := range []struct {
		name  string
		lines []string
		want  int
	}{
		{name: "refused user", want: exitUnreachable,
			lines: []string{`{"v":1,"type":"error","error":"permission denied: uid 5 may not control this relay (uid 0)","code":"permission_denied"}`}},
		{name: "busy", want: exitFailure,
			lines: []string{`{"v":1,"type":"error","error":"too many control connections; try again","code":"busy"}`}},
		{name: "code unknown to this client", want: exitFailure,
			lines: []string{`{"v":1,"type":"error","error":"permission denied, but for a new reason","code":"from_the_future"}`}},
		// A relay that predates codes: the message alone decides nothing.
		{name: "no code", want: exitFailure,
			lines: []string{`{"v":1,"type":"error","error":"permission denied: uid 5 may not control this relay (uid 0)"}`}},
		{name: "answered", want: exitOK, lines: []string{`{"v":1,"type":"status","status":{"version":1}}`}},
	} {
		t.Run(c.name, func(t *testing.T) {
			path, _ := fakeRelay(t, c.lines...)
			err := call(path, status, func(control.Response) error { return nil })
			if got := exitCode(err, io.Discard); got != c.want {
				t.Errorf("call: %v, exit code %d; want %d", err, got, c.want)
			}
			var se *control.ServerError
			if c.want != exitOK && (!errors.As(err, &se) || !strings.Contains(err.Error(), se.Msg)) {
				t.Errorf("call: %v; want the relay's message in it", err)
			}
		})
	}

	t.Run("nobody listening", func(t *testing.T) {
		err := call(filepath.Join(t.TempDir(), "none.sock"), status, func(control.Response) error { return nil })
		var ur unreachableError
		if !errors.As(err, &ur) || exitCode(err, io.Discard) != exitUnreachable {
			t.Errorf("call to no socket: %v; want an unreachableError, exit %d", err, exitUnreachable)
		}
		if !strings.Contains(err.Error(), "--name or --control") {
			t.Errorf("call to no socket: %v; want it to say which flags name the relay", err)
		}
	})
}

// fakeRelay listens on a unix socket in a temporary directory and answers
// every connection with lines, once it has read its request line. The
// requests it read arrive on the channel returned.
func fakeRelay(t *testing.T, lines ...string) (string, <-chan control.Request) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "c.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	reqs := make(chan control.Request, 16)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return // closed at the end of the test
			}
			line, _ := bufio.NewReader(conn).ReadBytes('\n')
			var req control.Request
			if json.Unmarshal(line, &req) == nil {
				select {
				case reqs <- req:
				default:
				}
			}
			for _, l := range lines {
				io.WriteString(conn, l+"\n")
			}
			conn.Close()
		}
	}()
	return path, reqs
}

// runClient runs one client command as relay would, returning what it
// printed and its error.
func runClient(cmd *cli.Command, args ...string) (string, error) {
	var out bytes.Buffer
	app := &cli.App{
		Name: "relay", Writer: &out, ErrWriter: io.Discard, Commands: []*cli.Command{cmd},
		ExitErrHandler: func(*cli.Context, error) {}, DisableSliceFlagSeparator: true,
	}
	err := app.Run(append([]string{"relay", cmd.Name}, args...))
	return out.String(), err
}
