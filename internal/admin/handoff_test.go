package admin

import (
	"bufio"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// serveUntilClosed runs s.Serve and returns its result channel; the test
// fails if Serve has not returned nil within 10s of the test's end.
func serveUntilClosed(t *testing.T, s *Server) <-chan error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- s.Serve() }()
	t.Cleanup(func() {
		s.Close()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after Close")
		}
	})
	return done
}

// A connection made while the Server is paused waits in the backlog and is
// answered after Resume; Serve waits meanwhile. The socket Pause keeps
// serves in ListenFD's Server, as in the next image.
func TestPauseResumeListenFD(t *testing.T) {
	src := &fakeSource{}
	src.set(serving(), nil)
	o := Options{Status: src, Build: testBuild, StatusTimeout: time.Second}
	s, err := Listen("127.0.0.1:0", o)
	if err != nil {
		t.Fatal(err)
	}
	done := serveUntilClosed(t, s)
	base := "http://" + s.Addr().String()
	if code, _ := getCode(t, "GET", base+"/healthz"); code != 200 {
		t.Fatalf("GET /healthz: %d", code)
	}

	fd, err := s.Pause()
	if err != nil {
		t.Fatal(err)
	}
	if again, err := s.Pause(); again != fd || err != nil {
		t.Errorf("a second Pause: %d, %v; want %d", again, err, fd)
	}
	if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
		t.Errorf("the paused socket's flags: %#x, %v; want close-on-exec", fl, err)
	}
	conn, err := net.DialTimeout("tcp", s.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatalf("connecting while paused: %v", err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, err := conn.Read(make([]byte, 64)); n > 0 || err == nil || !strings.Contains(err.Error(), "timeout") {
		t.Fatalf("read while paused: %d bytes, %v; want no answer", n, err)
	}
	select {
	case err := <-done:
		t.Fatalf("Serve returned while paused: %v", err)
	default:
	}

	if err := s.Resume(); err != nil {
		t.Fatal(err)
	}
	if err := s.Resume(); err != nil {
		t.Errorf("Resume of a Server that serves: %v", err)
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "HTTP/1.1 200") {
		t.Fatalf("the connection made while paused, after Resume: %q, %v; want 200", line, err)
	}
	if code, _ := getCode(t, "GET", base+"/healthz"); code != 200 {
		t.Fatalf("GET /healthz after Resume: %d", code)
	}

	if again, err := s.Pause(); err != nil || again != fd {
		t.Fatalf("Pause after Resume: %d, %v; want the kept fd %d", again, err, fd)
	}
	// As across the exec: the socket at an fd without close-on-exec.
	crossed, err := unix.Dup(fd)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := ListenFD(crossed, o)
	if err != nil {
		t.Fatal(err)
	}
	serveUntilClosed(t, s2)
	// The fd that crossed stays open at its number, close-on-exec, and
	// is the one the next handoff names.
	if fl, err := unix.FcntlInt(uintptr(crossed), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
		t.Errorf("the crossed fd's flags: %#x, %v; want open, close-on-exec", fl, err)
	}
	if s2.Addr().String() != s.Addr().String() {
		t.Errorf("ListenFD's Server is at %s, want %s", s2.Addr(), s.Addr())
	}
	if code, body := getCode(t, "GET", "http://"+s2.Addr().String()+"/healthz"); code != 200 {
		t.Errorf("GET /healthz from ListenFD's Server: %d %q", code, body)
	}
	if again, err := s2.Pause(); err != nil || again != crossed {
		t.Errorf("Pause of ListenFD's Server: %d, %v; want the fd that crossed, %d", again, err, crossed)
	}
}

// ListenFD refuses an fd that is no listening socket, and leaves it open,
// for the return to the earlier image;
// Pause and Resume refuse a closed Server.
func TestListenFDRefusesAndClosedServer(t *testing.T) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	if _, err := ListenFD(p[0], Options{Status: &fakeSource{}}); err == nil || !strings.Contains(err.Error(), "not a listening socket") {
		t.Errorf("ListenFD of a pipe: %v, want a refusal", err)
	}
	if _, err := unix.FcntlInt(uintptr(p[0]), unix.F_GETFD, 0); err != nil {
		t.Errorf("ListenFD closed the fd it refused: %v", err)
	}

	s, err := Listen("127.0.0.1:0", Options{Status: &fakeSource{}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Pause(); err != nil {
		t.Fatal(err)
	}
	s.Close() // closes the paused socket
	if _, err := s.Pause(); err == nil {
		t.Error("Pause of a closed Server succeeded")
	}
	if err := s.Resume(); err == nil {
		t.Error("Resume of a closed Server succeeded")
	}
	if err := s.Serve(); err != nil {
		t.Errorf("Serve of a closed Server: %v", err)
	}
}
