package sockopt

import (
	"testing"

	"golang.org/x/sys/unix"
)

func get(t *testing.T, fd, level, opt int) bool {
	t.Helper()
	v, err := unix.GetsockoptInt(fd, level, opt)
	if err != nil {
		t.Fatal(err)
	}
	return v != 0
}

func TestSet(t *testing.T) {
	for _, o := range []Options{{}, {ReuseAddr: true}, {ReusePort: true, V6Only: true}, {ReuseAddr: true, ReusePort: true}} {
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Skip("no IPv6:", err)
		}
		if err := Set(fd, unix.AF_INET6, o); err != nil {
			t.Fatal(err)
		}
		got := Options{
			ReuseAddr: get(t, fd, unix.SOL_SOCKET, unix.SO_REUSEADDR),
			ReusePort: get(t, fd, unix.SOL_SOCKET, unix.SO_REUSEPORT),
			V6Only:    get(t, fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY),
		}
		unix.Close(fd)
		if got != o {
			t.Errorf("Set(%+v): the socket has %+v", o, got)
		}
	}
	// An IPv4 socket has no IPV6_V6ONLY to set.
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := Set(fd, unix.AF_INET, Options{V6Only: true}); err != nil {
		t.Errorf("V6Only on an IPv4 socket: %v", err)
	}
}
