package health

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockdiag"
)

// failAfter bounds each wait a test expects to end; it is never reached
// when the code works.
const failAfter = 5 * time.Second

// family is one way a probe reaches a listener on loopback.
type family struct {
	name   string
	listen func(t *testing.T) *net.TCPListener
	host   string // the address to dial
}

func families() []family {
	return []family{
		{"AF_INET on 127.0.0.1", func(t *testing.T) *net.TCPListener { return goListener(t, "tcp4", "127.0.0.1:0", unix.AF_INET) }, "127.0.0.1"},
		{"AF_INET6 dual-stack over 127.0.0.1", dualStackListener, "127.0.0.1"},
		{"AF_INET6 on [::1]", func(t *testing.T) *net.TCPListener { return goListener(t, "tcp6", "[::1]:0", unix.AF_INET6) }, "::1"},
	}
}

func goListener(t *testing.T, network, addr string, domain int) *net.TCPListener {
	t.Helper()
	l, err := net.Listen(network, addr)
	if err != nil {
		if domain == unix.AF_INET6 {
			t.Skipf("no IPv6 loopback: %v", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	tl := l.(*net.TCPListener)
	if got := socketDomain(t, tl); got != domain {
		t.Fatalf("listener on %s has domain %d, want %d", addr, got, domain)
	}
	return tl
}

// dualStackListener listens with an AF_INET6 socket that takes IPv4
// connections (IPV6_V6ONLY off), bound to ::ffff:127.0.0.1 to stay on
// loopback: its connections are the v4-mapped ones of a listener on [::].
func dualStackListener(t *testing.T) *net.TCPListener {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		t.Skipf("no AF_INET6: %v", err)
	}
	f := os.NewFile(uintptr(fd), "dual-stack listener")
	defer f.Close()
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
		t.Fatal(err)
	}
	sa := &unix.SockaddrInet6{Addr: [16]byte{10: 0xff, 11: 0xff, 12: 127, 15: 1}}
	if err := unix.Bind(fd, sa); err != nil {
		t.Skipf("binding ::ffff:127.0.0.1: %v", err)
	}
	if err := unix.Listen(fd, 16); err != nil {
		t.Fatal(err)
	}
	l, err := net.FileListener(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	tl := l.(*net.TCPListener)
	if got := socketDomain(t, tl); got != unix.AF_INET6 {
		t.Fatalf("dual-stack listener has domain %d", got)
	}
	return tl
}

func socketDomain(t *testing.T, l *net.TCPListener) int {
	t.Helper()
	rc, err := l.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var domain int
	var serr error
	if err := rc.Control(func(fd uintptr) { domain, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
	return domain
}

// addrOf is the address to dial for l.
func (f family) addrOf(l *net.TCPListener) string {
	return net.JoinHostPort(f.host, strconv.Itoa(l.Addr().(*net.TCPAddr).Port))
}

func dialTCP(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), failAfter)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// acceptOne accepts one connection on l and checks that it is conn's.
func acceptOne(t *testing.T, l *net.TCPListener, conn *net.TCPConn) *net.TCPConn {
	t.Helper()
	l.SetDeadline(time.Now().Add(failAfter))
	s, err := l.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if got, want := s.RemoteAddr().(*net.TCPAddr).Port, conn.LocalAddr().(*net.TCPAddr).Port; got != want {
		t.Fatalf("accepted a connection from port %d, want %d", got, want)
	}
	return s
}

func shortCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// A connection the server has not accepted is reported as queued until
// the server accepts it.
func TestAwaitAcceptedQueuedThenAccepted(t *testing.T) {
	for _, f := range families() {
		t.Run(f.name, func(t *testing.T) {
			l := f.listen(t)
			conn := dialTCP(t, f.addrOf(l))
			err := awaitAccepted(shortCtx(t, 50*time.Millisecond), conn)
			if err == nil || !strings.Contains(err.Error(), "waits in the accept queue") || !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("awaitAccepted before Accept = %v, want the queued error after the deadline", err)
			}
			acceptOne(t, l, conn)
			if err := awaitAccepted(shortCtx(t, failAfter), conn); err != nil {
				t.Fatalf("awaitAccepted after Accept: %v", err)
			}
		})
	}
}

// A server that accepted and closed at once accepted: its end is an
// orphan in FIN_WAIT2, with no inode, and the client reads EOF.
func TestAwaitAcceptedAcceptedAndClosed(t *testing.T) {
	for _, f := range families() {
		t.Run(f.name, func(t *testing.T) {
			l := f.listen(t)
			conn := dialTCP(t, f.addrOf(l))
			acceptOne(t, l, conn).Close()
			conn.SetReadDeadline(time.Now().Add(failAfter))
			if n, err := conn.Read(make([]byte, 1)); n != 0 || err != io.EOF {
				t.Fatalf("client read = %d, %v; want EOF", n, err)
			}
			if err := awaitAccepted(shortCtx(t, failAfter), conn); err != nil {
				t.Fatalf("awaitAccepted after the server closed: %v", err)
			}
		})
	}
}

// A queued connection that the kernel resets (its listener closed) was
// never accepted: awaitAccepted says so without waiting for ctx.
func TestAwaitAcceptedReset(t *testing.T) {
	for _, f := range families() {
		t.Run(f.name, func(t *testing.T) {
			l := f.listen(t)
			conn := dialTCP(t, f.addrOf(l))
			l.Close()
			conn.SetReadDeadline(time.Now().Add(failAfter))
			if _, err := conn.Read(make([]byte, 1)); !errors.Is(err, unix.ECONNRESET) {
				t.Fatalf("client read after the listener closed: %v, want a reset", err)
			}
			err := awaitAccepted(shortCtx(t, failAfter), conn)
			if err == nil || !strings.Contains(err.Error(), "not accepted") || errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("awaitAccepted on a reset connection = %v, want a prompt not-accepted error", err)
			}
		})
	}
}

// The kernel answers an exact lookup of a 4-tuple with no socket with the
// listener of its local end; lookup must not take that for the socket.
func TestSockDiagListenerFallback(t *testing.T) {
	for _, f := range families() {
		t.Run(f.name, func(t *testing.T) {
			l := f.listen(t)
			conn := dialTCP(t, f.addrOf(l))
			local, remote, ifindex, err := tcpTuple(conn)
			if err != nil {
				t.Fatal(err)
			}
			d, err := sockdiag.Dial()
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			bogus := netip.AddrPortFrom(local.Addr(), local.Port()+1)
			if _, found, err := d.Lookup(remote, bogus, ifindex); err != nil || found != sockdiag.FoundListener {
				t.Errorf("lookup of a tuple with no socket = %v, %v; want the listener", found, err)
			}
			s, found, err := d.Lookup(remote, local, ifindex)
			if err != nil || found != sockdiag.FoundSocket || s.State != sockdiag.StateEstablished || s.Inode != 0 {
				t.Errorf("lookup of the queued server end = %+v, %v, %v; want ESTABLISHED with no inode", s, found, err)
			}
			acceptOne(t, l, conn)
			if s, found, err := d.Lookup(remote, local, ifindex); err != nil || found != sockdiag.FoundSocket || s.Inode == 0 {
				t.Errorf("lookup of the accepted server end = %+v, %v, %v; want an inode", s, found, err)
			}
			if s, found, err := d.Lookup(local, remote, ifindex); err != nil || found != sockdiag.FoundSocket || s.Inode == 0 {
				t.Errorf("lookup of the client end = %+v, %v, %v; want an inode", s, found, err)
			}
		})
	}
}

// serve accepts on l until the test ends, closing each connection.
func serve(t *testing.T, l *net.TCPListener) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		<-done
	})
}

// tcp:// is ready when the server accepts, not when the kernel completed
// the handshake.
func TestTCPCheckWaitsForAccept(t *testing.T) {
	l := goListener(t, "tcp4", "127.0.0.1:0", unix.AF_INET)
	spec, err := Parse("tcp://" + l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c := NewChecker(spec, nil, nil)
	err = c.Wait(shortCtx(t, 100*time.Millisecond), Child{})
	if err == nil || !strings.Contains(err.Error(), "waits in the accept queue") || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("tcp check of a listener that never accepts = %v, want the queued error", err)
	}
	t.Logf("not ready, as it should be: %v", err)
	serve(t, l)
	if err := c.Wait(shortCtx(t, failAfter), Child{}); err != nil {
		t.Fatalf("tcp check of a listener that accepts: %v", err)
	}
}

// The probe is looked at every few milliseconds at first, then at an
// interval that grows with the wait to a twentieth of it, never more than
// slowAcceptPoll: a silent child costs a few looks a second.
func TestAcceptPollGrowsWithTheWait(t *testing.T) {
	for _, c := range []struct {
		poll, waited, want time.Duration
	}{
		{firstAcceptPoll, 0, 2 * time.Millisecond},
		{2 * time.Millisecond, 3 * time.Millisecond, 4 * time.Millisecond},
		{4 * time.Millisecond, 7 * time.Millisecond, maxAcceptPoll},
		{maxAcceptPoll, 90 * time.Millisecond, maxAcceptPoll},
		{maxAcceptPoll, 300 * time.Millisecond, 15 * time.Millisecond},
		{15 * time.Millisecond, time.Second, 50 * time.Millisecond},
		{50 * time.Millisecond, 5 * time.Second, slowAcceptPoll},
		{slowAcceptPoll, time.Hour, slowAcceptPoll},
	} {
		if got := nextAcceptPoll(c.poll, c.waited); got != c.want {
			t.Errorf("nextAcceptPoll(%v, %v) = %v, want %v", c.poll, c.waited, got, c.want)
		}
	}
	// Over a 5 s wait (one attempt), some 110 looks rather than 1,000.
	looks, poll := 0, firstAcceptPoll
	for waited := time.Duration(0); waited < 5*time.Second; waited += poll {
		looks++
		poll = nextAcceptPoll(poll, waited+poll)
	}
	if looks > 150 {
		t.Errorf("%d looks over 5s, want at most 150", looks)
	}
}
