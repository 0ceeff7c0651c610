package control

import (
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakeUpgrader plays relay's upgrader: it reports a phase, then hands the
// connection to the test, as the exec would carry it, or ends with its
// refusal.
type fakeUpgrader struct {
	paths  chan string
	refuse string
	srv    *Server
	fds    chan int
}

func (u *fakeUpgrader) Upgrade(path string, c *UpgradeConn) UpgradeEvent {
	u.paths <- path
	c.Send(UpgradeEvent{Phase: UpgradeChecked, Path: path, From: "old", To: "new"})
	if u.refuse != "" {
		return UpgradeEvent{Phase: UpgradeRefused, Reason: u.refuse}
	}
	// The exec: the connection's fd crosses, and the new image answers
	// on it. Here a copy stands for it.
	fd, err := c.FD()
	if err != nil {
		return UpgradeEvent{Phase: UpgradeRefused, Reason: err.Error()}
	}
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return UpgradeEvent{Phase: UpgradeRefused, Reason: err.Error()}
	}
	u.fds <- dup
	// The old image is gone: its fd of the connection with it.
	c.conn.Close()
	return UpgradeEvent{Phase: UpgradeDone}
}

func TestUpgradeRequestAnsweredByTheNextImage(t *testing.T) {
	up := &fakeUpgrader{paths: make(chan string, 1), fds: make(chan int, 1)}
	srv := serve(t, newFake(), func(s *Server) { s.SetUpgrader(up) })
	got := make(chan []Response, 1)
	go func() {
		rs, _ := collect(srv.Path(), Request{Op: OpUpgrade, Path: "/usr/bin/relay"})
		got <- rs
	}()
	if p := <-up.paths; p != "/usr/bin/relay" {
		t.Errorf("upgrader got path %q", p)
	}
	var fd int
	select {
	case fd = <-up.fds:
	case <-time.After(waitTimeout):
		t.Fatal("the upgrader never carried the connection")
	}
	if err := FinishUpgrade(fd, UpgradeEvent{Phase: UpgradeDone, From: "old", To: "new", GapMs: 12.5}); err != nil {
		t.Fatal(err)
	}
	var rs []Response
	select {
	case rs = <-got:
	case <-time.After(waitTimeout):
		t.Fatal("the client never got its answer")
	}
	if len(rs) != 2 || rs[0].Upgrade.Phase != UpgradeChecked || rs[1].Upgrade.Phase != UpgradeDone || rs[1].Upgrade.GapMs != 12.5 {
		t.Fatalf("responses %+v", rs)
	}
}

func TestUpgradeRefusedAndUnknown(t *testing.T) {
	srv := serve(t, newFake(), nil)
	_, err := collect(srv.Path(), Request{Op: OpUpgrade})
	wantCode(t, "upgrade without an upgrader", err, CodeUnknownOp)

	up := &fakeUpgrader{paths: make(chan string, 1), refuse: "busy: a restart is under way"}
	srv2 := serve(t, newFake(), func(s *Server) { s.SetUpgrader(up) })
	rs, err := collect(srv2.Path(), Request{Op: OpUpgrade})
	if err != nil {
		t.Fatal(err)
	}
	if last := rs[len(rs)-1].Upgrade; last == nil || last.Phase != UpgradeRefused || !strings.Contains(last.Reason, "busy") {
		t.Fatalf("responses %+v, want refused busy", rs)
	}
	if p := <-up.paths; p != "" {
		t.Errorf("path %q, want empty: relay's own", p)
	}
}

func TestUpgradeRequestChecks(t *testing.T) {
	srv := serve(t, newFake(), nil)
	for _, req := range []Request{
		{Op: OpRestart, Path: "/x"},
		{Op: OpStatus, Path: "/x"},
		{Op: OpUpgrade, Command: []string{"x"}},
		{Op: OpUpgrade, NoWait: true},
	} {
		_, err := collect(srv.Path(), req)
		wantCode(t, req.Op+" with the wrong arguments", err, CodeBadRequest)
	}
}

// Pause leaves new connections in the backlog, and Resume answers them;
// Save and Adopt hand the socket and its lock to another Server, which
// answers what came during the pause.
func TestPauseResumeSaveAdopt(t *testing.T) {
	f := newFake()
	srv := serve(t, f, nil)
	if err := srv.Pause(time.Second, 0); err != nil {
		t.Fatal(err)
	}
	srv.Resume()
	if _, err := collect(srv.Path(), Request{Op: OpStatus}); err != nil {
		t.Fatalf("status after Resume: %v", err)
	}

	if err := srv.Pause(time.Second, 0); err != nil {
		t.Fatal(err)
	}
	// A request made during the pause: connected, waiting in the backlog.
	conn, err := net.Dial("unix", srv.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, `{"v":1,"op":"status"}`+"\n"); err != nil {
		t.Fatal(err)
	}
	sv, err := srv.Save()
	if err != nil {
		t.Fatal(err)
	}
	// The next image's fds: copies, as the exec leaves them.
	for _, fd := range []*int{&sv.FD, &sv.LockFD} {
		if *fd, err = unix.FcntlInt(uintptr(*fd), unix.F_DUPFD_CLOEXEC, 0); err != nil {
			t.Fatal(err)
		}
	}
	info := sampleInfo()
	info.Name = "next"
	next, err := Adopt(sv, f, info, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	next.Settle()
	done := make(chan error, 1)
	go func() { done <- next.Serve() }()
	defer func() { next.Close(); <-done }()
	// Answered by the adopting Server: the paused one took nothing.
	if resp := readResponse(t, conn); resp.Status == nil || resp.Status.Name != "next" {
		t.Fatalf("the request made during the pause was answered %+v, want the adopting Server's status", resp)
	}
	if next.info.Started != sv.Started {
		t.Errorf("started %v, want the first image's %v", next.info.Started, sv.Started)
	}
}
