package sdnotify

import (
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func listen(t *testing.T) *net.UnixConn {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv(EnvNotifySocket, path)
	return conn
}

func TestMessagesArriveInOrder(t *testing.T) {
	conn := listen(t)
	n := New(slog.New(slog.DiscardHandler))
	n.Ready()
	for _, s := range []string{"a", "b", "c"} {
		n.Status(s)
	}
	n.Reloading()
	n.Ready()
	n.Stopping()
	n.Status("last")
	n.Close(5 * time.Second)

	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	var got, statuses []string
	buf := make([]byte, 1024)
	for len(got) == 0 || got[len(got)-1] != "STATUS=last" {
		m, _, err := conn.ReadFromUnix(buf)
		if err != nil {
			t.Fatalf("after %q: %v", got, err)
		}
		msg := string(buf[:m])
		if strings.HasPrefix(msg, "STATUS=") {
			statuses = append(statuses, msg)
		} else if strings.HasPrefix(msg, "RELOADING=1\nMONOTONIC_USEC=") {
			msg = "RELOADING=1"
		}
		got = append(got, msg)
	}
	var milestones []string
	for _, m := range got {
		if !strings.HasPrefix(m, "STATUS=") {
			milestones = append(milestones, m)
		}
	}
	if want := []string{"READY=1", "RELOADING=1", "READY=1", "STOPPING=1"}; !slices.Equal(milestones, want) {
		t.Errorf("got %q, want %q in that order", milestones, want)
	}
	// Waiting STATUS lines may be replaced by newer ones, never reordered.
	if !slices.IsSortedFunc(statuses[:len(statuses)-1], strings.Compare) || !slices.Contains(statuses, "STATUS=c") {
		t.Errorf("statuses %q", statuses)
	}
}

func TestStoreFDPassesTheSocket(t *testing.T) {
	conn := listen(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := New(slog.New(slog.DiscardHandler))
	defer n.Close(time.Second)
	if err := n.StoreFD("relay/web", f); err != nil {
		t.Fatal(err)
	}
	buf, oob := make([]byte, 256), make([]byte, unix.CmsgSpace(4))
	m, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(buf[:m]); got != "FDSTORE=1\nFDNAME=relay/web" {
		t.Errorf("message %q", got)
	}
	cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(cmsgs) != 1 {
		t.Fatalf("control messages %v %v", cmsgs, err)
	}
	fds, err := unix.ParseUnixRights(&cmsgs[0])
	if err != nil || len(fds) != 1 {
		t.Fatalf("rights %v %v", fds, err)
	}
	got := os.NewFile(uintptr(fds[0]), "stored")
	defer got.Close()
	sa, err := unix.Getsockname(int(got.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	if a := sa.(*unix.SockaddrInet4); a.Port != l.Addr().(*net.TCPAddr).Port {
		t.Errorf("stored a socket on port %d, want %s", a.Port, l.Addr())
	}
	if err := n.RemoveFD("relay/web"); err != nil {
		t.Fatal(err)
	}
	if m, _, err := conn.ReadFromUnix(buf); err != nil || string(buf[:m]) != "FDSTOREREMOVE=1\nFDNAME=relay/web" {
		t.Errorf("remove: %q %v", buf[:m], err)
	}
}

func TestDisabledWithoutNotifySocket(t *testing.T) {
	t.Setenv(EnvNotifySocket, "")
	n := New(slog.New(slog.DiscardHandler))
	n.Ready()
	n.Close(time.Second)
	if n.Enabled() {
		t.Error("enabled without NOTIFY_SOCKET")
	}
	if err := n.StoreFD("x", os.Stdin); err == nil {
		t.Error("StoreFD without NOTIFY_SOCKET succeeded")
	}
}

// A watchdog too short to keep is refused with the fix, and relay never
// pings faster than its floor, whatever it is given.
func TestWatchdogIntervalIsBounded(t *testing.T) {
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	for usec, want := range map[string]time.Duration{"30000000": 30 * time.Second, "100000": MinWatchdog} {
		t.Setenv("WATCHDOG_USEC", usec)
		if got, err := WatchdogInterval(); err != nil || got != want {
			t.Errorf("WATCHDOG_USEC=%s: %s, %v; want %s", usec, got, err, want)
		}
	}
	for _, usec := range []string{"5", "1", "99999"} {
		t.Setenv("WATCHDOG_USEC", usec)
		got, err := WatchdogInterval()
		if err == nil || got != 0 || !strings.Contains(err.Error(), "WATCHDOG_USEC="+usec+" ") || !strings.Contains(err.Error(), "set WatchdogSec= to 1s or more") {
			t.Errorf("WATCHDOG_USEC=%s: %s, %v; want 0 and an error naming the value and the fix", usec, got, err)
		}
	}
	t.Setenv("WATCHDOG_USEC", "")
	if got, err := WatchdogInterval(); err != nil || got != 0 {
		t.Errorf("no WATCHDOG_USEC: %s, %v; want 0, nil", got, err)
	}
	for watchdog, want := range map[time.Duration]time.Duration{
		5 * time.Microsecond: MinWatchdog / 2, 0: MinWatchdog / 2, MinWatchdog: MinWatchdog / 2, 3 * time.Second: 1500 * time.Millisecond,
	} {
		if got := PingInterval(watchdog); got != want {
			t.Errorf("PingInterval(%s) = %s, want %s", watchdog, got, want)
		}
	}
}

func TestWatchdogPingsOncePerTickWhileAlive(t *testing.T) {
	if got := PingInterval(30 * time.Second); got != 15*time.Second {
		t.Errorf("PingInterval(30s) = %s, want half", got)
	}
	conn := listen(t)
	n := New(slog.New(slog.DiscardHandler))
	tick := make(chan time.Time)
	alive := make(chan bool)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.RunWatchdog(ctx, tick, func() bool { return <-alive })
	}()
	buf := make([]byte, 64)
	next := func() string {
		t.Helper()
		conn.SetReadDeadline(time.Now().Add(10 * time.Second)) // bounds a failure only
		m, _, err := conn.ReadFromUnix(buf)
		if err != nil {
			t.Fatal(err)
		}
		return string(buf[:m])
	}
	// A ping at once and then one per tick, each read before the next, and
	// none while the supervisor does not answer.
	for _, a := range []bool{true, false, true, true} {
		alive <- a
		if a {
			if got := next(); got != "WATCHDOG=1" {
				t.Fatalf("got %q, want a ping", got)
			}
		}
		tick <- time.Now()
	}
	alive <- false
	cancel()
	<-done
	n.Close(5 * time.Second)
	// Nothing else came: the next datagram is the test's own.
	if _, err := conn.WriteToUnix([]byte("END"), conn.LocalAddr().(*net.UnixAddr)); err != nil {
		t.Fatal(err)
	}
	if got := next(); got != "END" {
		t.Errorf("got %q after the last ping, want nothing", got)
	}
}
