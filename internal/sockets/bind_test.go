package sockets

import (
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
)

func reusePortOn(t *testing.T, l *Listener) bool {
	t.Helper()
	rc, err := l.File().SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var on int
	var gerr error
	if err := rc.Control(func(fd uintptr) { on, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT) }); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatal(gerr)
	}
	return on != 0
}

// bindAll binds every spec as Open does with nothing passed.
func bindAll(specs []Spec, opts BindOptions) ([]*Listener, error) {
	return openListeners(specs, nil, opts, nil)
}

// With ReusePort, a TCP socket gets SO_REUSEPORT, yet a port something else
// holds is still "in use", whether that holder has SO_REUSEPORT or not.
func TestBindReusePort(t *testing.T) {
	spec, err := ParseSpec("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ls, err := bindAll([]Spec{spec}, BindOptions{ReusePort: true})
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(ls)
	if !reusePortOn(t, ls[0]) {
		t.Fatal("SO_REUSEPORT not set with ReusePort")
	}
	if strings.HasSuffix(ls[0].Addr, ":0") {
		t.Fatalf("port 0 kept: %s", ls[0].Addr)
	}

	// A second relay on the same port, with SO_REUSEPORT too, is refused.
	again, _ := ParseSpec(ls[0].Addr)
	if second, err := bindAll([]Spec{again}, BindOptions{ReusePort: true}); err == nil {
		CloseAll(second)
		t.Fatal("a second bind with ReusePort joined the first socket's port")
	} else if !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("want an address-in-use error, got %v", err)
	}

	// A port held by another program is refused as before.
	other, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	held, _ := ParseSpec(other.Addr().String())
	if _, err := bindAll([]Spec{held}, BindOptions{ReusePort: true}); err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("want an address-in-use error, got %v", err)
	}

	// UDP and plain binds get no SO_REUSEPORT.
	udp, _ := ParseSpec("udp:127.0.0.1:0")
	tcp, _ := ParseSpec("127.0.0.1:0")
	plain, err := bindAll([]Spec{udp, tcp}, BindOptions{ReusePort: false})
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(plain)
	withOpt, err := bindAll([]Spec{udp}, BindOptions{ReusePort: true})
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(withOpt)
	for _, l := range append(plain, withOpt...) {
		if reusePortOn(t, l) {
			t.Errorf("%s: SO_REUSEPORT set", l.Spec)
		}
	}
}

// A UDP socket bound with SO_REUSEPORT that is then shared (its steering
// failed) gets it turned off: no other socket can join its port.
func TestClearReusePort(t *testing.T) {
	l, err := bindOne(Spec{Network: sockaddr.UDP, Address: "127.0.0.1:0"}, BindOptions{UDPReusePort: true})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	join := func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			t.Fatal(err)
		}
		ap := netip.MustParseAddrPort(l.Addr)
		return unix.Bind(fd, &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())})
	}
	if err := join(); err != nil {
		t.Fatalf("a second SO_REUSEPORT socket could not join before: %v", err)
	}
	if err := clearReusePort(l.File()); err != nil {
		t.Fatal(err)
	}
	if err := join(); !errors.Is(err, unix.EADDRINUSE) {
		t.Fatalf("a second SO_REUSEPORT socket joining after clearReusePort: %v, want EADDRINUSE", err)
	}
}
