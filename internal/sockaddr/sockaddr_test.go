package sockaddr

import (
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

func TestCovers(t *testing.T) {
	v4 := func(a string) Socket { return Socket{Addr: netip.MustParseAddrPort(a), Family: unix.AF_INET} }
	v6 := func(a string, only bool) Socket {
		return Socket{Addr: netip.MustParseAddrPort(a), Family: unix.AF_INET6, V6Only: only}
	}
	for _, c := range []struct {
		name string
		s    Socket
		a    string
		want bool
	}{
		{"the same address", v4("127.0.0.1:80"), "127.0.0.1:80", true},
		{"another port", v4("127.0.0.1:80"), "127.0.0.1:81", false},
		{"another address", v4("127.0.0.1:80"), "127.0.0.2:80", false},
		{"the IPv4 wildcard over an address", v4("127.0.0.1:80"), "0.0.0.0:80", true},
		{"the IPv6 wildcard over an IPv4 address", v4("127.0.0.1:80"), "[::]:80", true},
		{"an IPv4 wildcard over an address", v4("0.0.0.0:80"), "10.1.2.3:80", true},
		{"an IPv4 wildcard over IPv6 loopback", v4("0.0.0.0:80"), "[::1]:80", false},
		{"an IPv4 wildcard over the IPv6 wildcard", v4("0.0.0.0:80"), "[::]:80", true},
		{"a dual-stack wildcard over IPv4", v6("[::]:80", false), "127.0.0.1:80", true},
		{"a dual-stack wildcard over IPv6", v6("[::]:80", false), "[::1]:80", true},
		{"an IPv6-only wildcard over IPv4", v6("[::]:80", true), "127.0.0.1:80", false},
		{"an IPv6-only wildcard over the IPv4 wildcard", v6("[::]:80", true), "0.0.0.0:80", false},
		{"an IPv6-only wildcard over IPv6", v6("[::]:80", true), "[::1]:80", true},
		{"a v4-mapped address", v4("127.0.0.1:80"), "[::ffff:127.0.0.1]:80", true},
		{"IPv6 loopback", v6("[::1]:80", true), "[::1]:80", true},
		{"IPv6 loopback over IPv4 loopback", v6("[::1]:80", true), "127.0.0.1:80", false},
		{"the zero socket", Socket{}, "0.0.0.0:0", false},
	} {
		if got := c.s.Covers(netip.MustParseAddrPort(c.a)); got != c.want {
			t.Errorf("%s: %v covers %s: got %v, want %v", c.name, c.s, c.a, got, c.want)
		}
	}
}

func TestRead(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	s, err := Read(fd)
	if err != nil {
		t.Fatal(err)
	}
	if s.Family != unix.AF_INET || s.Addr.Addr() != netip.MustParseAddr("127.0.0.1") || s.Addr.Port() == 0 {
		t.Errorf("Read: %+v, want 127.0.0.1 with the port the kernel chose", s)
	}
	if got := String(&unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: int(s.Addr.Port())}); got != s.Addr.String() {
		t.Errorf("String: %s, want %s", got, s.Addr)
	}

	ufd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(ufd)
	if _, err := Read(ufd); err != ErrNotIP {
		t.Errorf("Read of a unix socket: %v, want ErrNotIP", err)
	}
}

func TestReadV6Only(t *testing.T) {
	for _, only := range []bool{false, true} {
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Skip("no IPv6:", err)
		}
		v := 0
		if only {
			v = 1
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, v); err != nil {
			t.Fatal(err)
		}
		if err := unix.Bind(fd, &unix.SockaddrInet6{}); err != nil {
			unix.Close(fd)
			t.Skip("no IPv6 wildcard:", err)
		}
		s, err := Read(fd)
		unix.Close(fd)
		if err != nil {
			t.Fatal(err)
		}
		if s.Family != unix.AF_INET6 || s.V6Only != only || !s.Addr.Addr().IsUnspecified() {
			t.Errorf("Read with IPV6_V6ONLY %v: %+v", only, s)
		}
	}
}
