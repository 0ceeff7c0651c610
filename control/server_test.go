package control

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/supervisor"
)

// fakeSupervisor answers the server as relay's supervisor would. Each
// Restart is handed to the test on restarts, which then sends its events.
type fakeSupervisor struct {
	status     supervisor.Status
	statusErr  error
	restartErr error
	restarts   chan restartCall
	stops      chan bool
	// rolled and rollbackErr answer Rollback.
	rolled      supervisor.Rolled
	rollbackErr error
}

type restartCall struct {
	req    supervisor.RestartRequest
	events chan supervisor.Event
}

func newFake() *fakeSupervisor {
	return &fakeSupervisor{restarts: make(chan restartCall, 64), stops: make(chan bool, 4)}
}

func (f *fakeSupervisor) Restart(req supervisor.RestartRequest) (<-chan supervisor.Event, error) {
	if f.restartErr != nil {
		return nil, f.restartErr
	}
	c := restartCall{req: req, events: make(chan supervisor.Event, 32)}
	f.restarts <- c
	return c.events, nil
}

func (f *fakeSupervisor) Status() (supervisor.Status, error) { return f.status, f.statusErr }

func (f *fakeSupervisor) Stop(now bool) { f.stops <- now }

func (f *fakeSupervisor) Rollback() (supervisor.Rolled, error) { return f.rolled, f.rollbackErr }

// waitTimeout bounds a wait for something that should happen at once.
const waitTimeout = 10 * time.Second

func (f *fakeSupervisor) nextRestart(t *testing.T) restartCall {
	t.Helper()
	select {
	case c := <-f.restarts:
		return c
	case <-time.After(waitTimeout):
		t.Fatal("the server never asked the supervisor for a restart")
		return restartCall{}
	}
}

// serve runs a Server for sup on a socket in a private directory it
// creates;
// adjust, if not nil, changes it before it serves.
func serve(t *testing.T, sup Supervisor, adjust func(*Server)) *Server {
	t.Helper()
	srv, err := Listen(filepath.Join(t.TempDir(), "relay", "c.sock"), sup, sampleInfo(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if adjust != nil {
		adjust(srv)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return srv
}

// collect sends req with Do and returns every response line.
func collect(path string, req Request) ([]Response, error) {
	var rs []Response
	err := Do(path, req, func(r Response) error {
		rs = append(rs, r)
		return nil
	})
	return rs, err
}

func wantCode(t *testing.T, what string, err error, code Code) {
	t.Helper()
	var se *ServerError
	if !errors.As(err, &se) || se.Code != code || se.Msg == "" {
		t.Errorf("%s: error %v, want a ServerError with code %s and a message", what, err, code)
	}
}

func TestServerStatus(t *testing.T) {
	f := newFake()
	f.status = sampleStatus()
	srv := serve(t, f, nil)
	rs, err := collect(srv.Path(), Request{Op: OpStatus})
	if err != nil || len(rs) != 1 || rs[0].Type != TypeStatus || rs[0].Status == nil {
		t.Fatalf("status: %+v, %v; want one status line", rs, err)
	}
	if want := statusDoc(sampleInfo(), srv.Path(), os.Getpid(), sampleStatus()); !reflect.DeepEqual(rs[0].Status, want) {
		t.Errorf("status document\n%+v\nwant\n%+v", rs[0].Status, want)
	}
}

// rollback answers with what the supervisor did, or with a code that says
// why it did nothing.
func TestServerRollback(t *testing.T) {
	f := newFake()
	f.rolled = supervisor.Rolled{Serving: 4, ServingPid: 1200, Failed: 5, FailedPid: 1240}
	srv := serve(t, f, nil)
	rs, err := collect(srv.Path(), Request{Op: OpRollback})
	want := &RollbackDoc{ServingGeneration: 4, ServingPid: 1200, FailedGeneration: 5, FailedPid: 1240}
	if err != nil || len(rs) != 1 || rs[0].Type != TypeRollback || !reflect.DeepEqual(rs[0].Rollback, want) {
		t.Fatalf("rollback: %+v, %v; want one rolled_back line with %+v", rs, err, want)
	}
	for _, c := range []struct {
		err  error
		code Code
	}{
		{err: fmt.Errorf("%w: no window", supervisor.ErrNothingWarm), code: CodeNothingWarm},
		{err: supervisor.ErrStopping, code: CodeStopping},
		{err: errors.New("the steering program was refused"), code: CodeInternal},
	} {
		f := newFake()
		f.rollbackErr = c.err
		srv := serve(t, f, nil)
		_, err := collect(srv.Path(), Request{Op: OpRollback})
		wantCode(t, "rollback failing with "+c.err.Error(), err, c.code)
	}
	_, err = collect(srv.Path(), Request{Op: OpRollback, Path: "/x"})
	wantCode(t, "rollback with a path", err, CodeBadRequest)
}

func TestServerStatusErrors(t *testing.T) {
	for _, c := range []struct {
		err  error
		code Code
	}{
		{err: supervisor.ErrStopping, code: CodeStopping},
		{err: errors.New("the supervisor is confused"), code: CodeInternal},
	} {
		f := newFake()
		f.statusErr = c.err
		srv := serve(t, f, nil)
		_, err := collect(srv.Path(), Request{Op: OpStatus})
		wantCode(t, "status from "+c.err.Error(), err, c.code)
		if err == nil || !strings.Contains(err.Error(), c.err.Error()) {
			t.Errorf("status: %v, want the supervisor's reason %q in it", err, c.err)
		}
	}
}

func TestServerStop(t *testing.T) {
	f := newFake()
	srv := serve(t, f, nil)
	errRead := errors.New("read the first line")
	var got Response
	err := Do(srv.Path(), Request{Op: OpStop}, func(r Response) error {
		got = r
		return errRead // the connection stays open until relay exits
	})
	if !errors.Is(err, errRead) || got.Type != TypeStopping || got.Pid != os.Getpid() {
		t.Errorf("stop: %+v, %v; want a stopping line with pid %d", got, err, os.Getpid())
	}
	select {
	case now := <-f.stops:
		if now {
			t.Error("stop over the control socket asked for Stop(true), want a graceful Stop(false)")
		}
	case <-time.After(waitTimeout):
		t.Error("stop: the supervisor was never told to stop")
	}
}

// TestServerRestartFollowers: every caller following a restart gets its
// own events, in order, while others follow theirs.
func TestServerRestartFollowers(t *testing.T) {
	f := newFake()
	srv := serve(t, f, nil)
	const n = 5
	type outcome struct {
		rs  []Response
		err error
	}
	outcomes := make(chan outcome, n)
	for i := 0; i < n; i++ {
		go func() {
			rs, err := collect(srv.Path(), Request{Op: OpRestart})
			outcomes <- outcome{rs, err}
		}()
	}
	var calls []restartCall
	for i := 0; i < n; i++ {
		calls = append(calls, f.nextRestart(t))
	}
	// All n are being followed at once; now each gets its events.
	for i, c := range calls {
		if c.req.Reason != "control" || c.req.Command != nil || c.req.Check != nil {
			t.Errorf("restart request %+v, want reason control and no command or check", c.req)
		}
		gen := 10 + i
		c.events <- supervisor.Event{Phase: supervisor.PhaseStarting, Generation: gen, Pid: 100 + i}
		c.events <- supervisor.Event{Phase: supervisor.PhaseReady, Generation: gen, Pid: 100 + i, Duration: time.Millisecond}
		c.events <- supervisor.Event{Phase: supervisor.PhaseDone, Result: &supervisor.Result{Outcome: supervisor.RestartOK, Generation: gen, Pid: 100 + i}}
		close(c.events)
	}
	seen := map[int]bool{}
	for i := 0; i < n; i++ {
		o := <-outcomes
		if o.err != nil || len(o.rs) != 3 {
			t.Errorf("restart follower: %+v, %v; want three event lines", o.rs, o.err)
			continue
		}
		gen := o.rs[0].Event.Generation
		for j, phase := range []Phase{PhaseStarting, PhaseReady, PhaseDone} {
			ev := o.rs[j].Event
			if o.rs[j].Type != TypeEvent || ev == nil || ev.Phase != phase {
				t.Errorf("restart follower line %d: %+v, want a %s event", j, o.rs[j], phase)
			}
		}
		if res := o.rs[2].Event.Result; res == nil || !res.OK || res.Generation != gen {
			t.Errorf("restart follower of generation %d got result %+v", gen, res)
		}
		seen[gen] = true
	}
	if len(seen) != n {
		t.Errorf("followers saw generations %v, want %d distinct ones", seen, n)
	}
}

func TestServerRestartRequest(t *testing.T) {
	f := newFake()
	srv := serve(t, f, nil)
	prog := filepath.Join(t.TempDir(), "api-v2")
	if err := os.WriteFile(prog, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	rs, err := collect(srv.Path(), Request{Op: OpRestart, Command: []string{prog, "--flag"}, Check: []string{"/bin/true", "-x"}, NoWait: true})
	if err != nil || len(rs) != 1 || rs[0].Type != TypeAccepted {
		t.Errorf("restart --no-wait: %+v, %v; want one accepted line", rs, err)
	}
	c := f.nextRestart(t)
	want := supervisor.RestartRequest{Reason: "control", Command: &supervisor.Command{Path: prog, Args: []string{prog, "--flag"}}, Check: []string{"/bin/true", "-x"}}
	if !reflect.DeepEqual(c.req, want) {
		t.Errorf("the supervisor was asked for %+v, want %+v", c.req, want)
	}
}

// TestServerRestartRefused: refusals are a done event with a refused
// result, as the supervisor's own are.
func TestServerRestartRefused(t *testing.T) {
	for _, c := range []struct {
		name       string
		command    []string
		restartErr error
		reason     string
	}{
		{name: "missing command", command: []string{"/nonexistent/relay-test-api"}, reason: `command "/nonexistent/relay-test-api" cannot be run`},
		{name: "stopping", restartErr: supervisor.ErrStopping, reason: supervisor.ErrStopping.Error()},
	} {
		f := newFake()
		f.restartErr = c.restartErr
		srv := serve(t, f, nil)
		rs, err := collect(srv.Path(), Request{Op: OpRestart, Command: c.command})
		if err != nil || len(rs) != 1 || rs[0].Event == nil || rs[0].Event.Phase != PhaseDone || rs[0].Event.Result == nil {
			t.Errorf("%s: %+v, %v; want one done event", c.name, rs, err)
			continue
		}
		if res := rs[0].Event.Result; res.OK || !res.Refused || !strings.Contains(res.Reason, c.reason) {
			t.Errorf("%s: result %+v, want refused with a reason mentioning %q", c.name, res, c.reason)
		}
		if len(f.restarts) != 0 {
			t.Errorf("%s: the supervisor was asked for a restart", c.name)
		}
	}
}

// TestServerBusy: a client that says nothing gives its place to the next
// one, beyond its limits the server says busy, and a client that goes
// away gives its place back.
func TestServerBusy(t *testing.T) {
	f := newFake()
	srv := serve(t, f, func(s *Server) {
		s.maxReading = 1
		s.streams = make(chan struct{}, 1)
	})

	// The one place for a request being read, held by a client that says
	// nothing: the next client takes it, and the silent one is told.
	idle, err := net.Dial("unix", srv.Path())
	if err != nil {
		t.Fatal(err)
	}
	if rs, err := collect(srv.Path(), Request{Op: OpStatus}); err != nil || len(rs) != 1 || rs[0].Type != TypeStatus {
		t.Errorf("status beside a silent client: %+v, %v; want it answered", rs, err)
	}
	if resp := readResponse(t, idle); resp.Type != TypeError || resp.Code != CodeBusy || !strings.Contains(resp.Error, "send the request as soon as you connect") {
		t.Errorf("the silent client got %+v, want a busy error", resp)
	}
	idle.Close()

	// The one restart followed, by a client that then goes away.
	first, err := net.Dial("unix", srv.Path())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(first, `{"v":1,"op":"restart"}`+"\n"); err != nil {
		t.Fatal(err)
	}
	call := f.nextRestart(t)
	_, err = collect(srv.Path(), Request{Op: OpRestart})
	wantCode(t, "a second restart followed", err, CodeBusy)
	if rs, err := collect(srv.Path(), Request{Op: OpRestart, NoWait: true}); err != nil || len(rs) != 1 || rs[0].Type != TypeAccepted {
		t.Errorf("restart --no-wait while one is followed: %+v, %v; want accepted", rs, err)
	}
	f.nextRestart(t)
	first.Close() // the restart itself goes on: its events stay open
	retry(t, "a restart followed once the first follower left", func() error {
		done := make(chan struct{})
		defer close(done)
		go func() {
			select {
			case c := <-f.restarts:
				close(c.events)
			case <-done:
			}
		}()
		_, err := collect(srv.Path(), Request{Op: OpRestart})
		return err
	})
	close(call.events)
}

// readResponse reads one response line from conn.
func readResponse(t *testing.T, conn net.Conn) Response {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(waitTimeout))
	line, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil {
		t.Fatalf("reading a response: %v", err)
	}
	var resp Response
	if err := json.Unmarshal(line, &resp); err != nil {
		t.Fatalf("response %q: %v", line, err)
	}
	return resp
}

// Thousands of clients that connect and say nothing never keep status,
// restart or stop from being answered: each new connection takes the place
// of the oldest silent one, which is told and closed, so the server holds
// no more than its limit of them.
func TestServerAnswersBesideThousandsOfIdleConnections(t *testing.T) {
	const idle = 1500
	// Both ends of each are in this process, whose soft limit Go raised
	// to the hard one at start.
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil || rl.Cur < 2*idle+256 {
		t.Fatalf("this test needs %d open files, RLIMIT_NOFILE is %d (%v): raise ulimit -n", 2*idle+256, rl.Cur, err)
	}
	f := newFake()
	f.status = sampleStatus()
	var reading int
	srv := serve(t, f, func(s *Server) { reading = s.maxReading })
	conns := make([]net.Conn, 0, idle)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range idle {
		c, err := net.Dial("unix", srv.Path())
		if err != nil {
			t.Fatalf("idle connection %d: %v", len(conns), err)
		}
		conns = append(conns, c)
	}
	if rs, err := collect(srv.Path(), Request{Op: OpStatus}); err != nil || len(rs) != 1 || rs[0].Type != TypeStatus {
		t.Fatalf("status beside %d idle connections: %+v, %v; want it answered", idle, rs, err)
	}
	done := make(chan error, 1)
	go func() {
		rs, err := collect(srv.Path(), Request{Op: OpRestart})
		if err == nil && (len(rs) != 1 || rs[0].Event == nil || rs[0].Event.Phase != PhaseDone) {
			err = fmt.Errorf("responses %+v, want the done event", rs)
		}
		done <- err
	}()
	call := f.nextRestart(t)
	call.events <- supervisor.Event{Phase: supervisor.PhaseDone, Result: &supervisor.Result{Outcome: supervisor.RestartOK, Generation: 2}}
	close(call.events)
	if err := <-done; err != nil {
		t.Errorf("restart beside %d idle connections: %v", idle, err)
	}
	stop, err := net.Dial("unix", srv.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer stop.Close()
	if _, err := io.WriteString(stop, `{"v":1,"op":"stop"}`+"\n"); err != nil {
		t.Fatal(err)
	}
	if resp := readResponse(t, stop); resp.Type != TypeStopping {
		t.Errorf("stop beside %d idle connections: %+v, want stopping", idle, resp)
	}
	// Every idle connection but the newest ones the server may still be
	// reading was told why it was closed, the oldest first.
	for i, c := range conns[:idle-reading] {
		if resp := readResponse(t, c); resp.Type != TypeError || resp.Code != CodeBusy {
			t.Fatalf("idle connection %d got %+v, want a busy error", i, resp)
		}
	}
}

// connLimits leaves most of a small fd limit to relay's other work.
func TestConnLimits(t *testing.T) {
	for _, c := range []struct {
		nofile           uint64
		reading, streams int
	}{
		{1 << 20, maxReading, maxStreams},
		{1024, 64, 128},
		{256, 16, 32},
		{16, 4, 4},
	} {
		if r, s := connLimits(c.nofile); r != c.reading || s != c.streams {
			t.Errorf("connLimits(%d) = %d, %d; want %d, %d", c.nofile, r, s, c.reading, c.streams)
		}
	}
}

// retry calls try until it succeeds, a bounded number of times.
func retry(t *testing.T, what string, try func() error) {
	t.Helper()
	var err error
	deadline := time.Now().Add(waitTimeout)
	for i := 0; i < 1000 && time.Now().Before(deadline); i++ {
		if err = try(); err == nil {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Errorf("%s: still %v", what, err)
}

// TestServerBadRequests: each request the server will not answer gets
// one error line with its code, and relay serves on.
func TestServerBadRequests(t *testing.T) {
	f := newFake()
	srv := serve(t, f, nil)
	for _, c := range []struct {
		name, req string
		code      Code
	}{
		{"malformed", "{not json\n", CodeBadRequest},
		{"arguments to status", `{"v":1,"op":"status","command":["x"]}` + "\n", CodeBadRequest},
		{"nothing", "", CodeBadRequest},
		{"oversized", strings.Repeat("x", 1<<20) + "\n", CodeTooLarge},
		{"wrong version", `{"v":99,"op":"status"}` + "\n", CodeBadVersion},
		{"unknown op", `{"v":1,"op":"explode"}` + "\n", CodeUnknownOp},
	} {
		resp := rawRequest(t, srv.Path(), c.req)
		if resp.V != Version || resp.Type != TypeError || resp.Code != c.code || resp.Error == "" {
			t.Errorf("%s request: response %+v, want an error with code %s", c.name, resp, c.code)
		}
	}
	if _, err := collect(srv.Path(), Request{Op: OpStatus}); err != nil {
		t.Errorf("status after bad requests: %v", err)
	}
}

// rawRequest writes req, then closes its side, and returns the first
// response line.
func rawRequest(t *testing.T, path, req string) Response {
	t.Helper()
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(waitTimeout))
	go func() {
		io.WriteString(conn, req) // fails once relay has refused a long one
		conn.(*net.UnixConn).CloseWrite()
	}()
	line, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil {
		t.Fatalf("reading the response to %.40q: %v", req, err)
	}
	var resp Response
	if err := json.Unmarshal(line, &resp); err != nil {
		t.Fatalf("response %q: %v", line, err)
	}
	return resp
}

func TestAdmit(t *testing.T) {
	for _, c := range []struct {
		peer, self int
		ok         bool
	}{
		{peer: 1000, self: 1000, ok: true},
		{peer: 0, self: 1000, ok: true},
		{peer: 0, self: 0, ok: true},
		{peer: 65534, self: 1000},
		{peer: 1000, self: 0},
	} {
		err := admit(c.peer, c.self)
		if c.ok != (err == nil) {
			t.Errorf("admit(peer %d, self %d) = %v, want ok %v", c.peer, c.self, err, c.ok)
		}
		if err != nil && codeOf(err) != CodePermissionDenied {
			t.Errorf("admit(peer %d, self %d): code %s, want %s", c.peer, c.self, codeOf(err), CodePermissionDenied)
		}
	}
	// relay restart and older clients read the message: it stays.
	if got, want := admit(65534, 1000).Error(), "permission denied: uid 65534 may not control this relay (uid 1000)"; got != want {
		t.Errorf("refusal %q, want %q", got, want)
	}
}
