// Package sockopt sets the options of the listening IP sockets relay
// creates: the ones it binds for --listen and the members it adds to a
// steering group. It is the one place that decides them.
package sockopt

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Options are the options a new socket gets before bind(2).
type Options struct {
	// ReuseAddr (SO_REUSEADDR) lets a TCP socket bind while old
	// connections on its address sit in TIME_WAIT. It lets no second
	// listener join the address.
	ReuseAddr bool
	// ReusePort (SO_REUSEPORT) lets more sockets of the same user bind
	// the address and form a group.
	ReusePort bool
	// V6Only (IPV6_V6ONLY) keeps an IPv6 socket off IPv4 addresses; it is
	// set, on or off, on every AF_INET6 socket and ignored on others.
	V6Only bool
}

// Set sets o on fd, a socket of family (unix.AF_INET or unix.AF_INET6) not
// bound yet. The error names the option that failed.
func Set(fd, family int, o Options) error {
	if o.ReuseAddr {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return fmt.Errorf("setting SO_REUSEADDR: %w", err)
		}
	}
	if o.ReusePort {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			return fmt.Errorf("setting SO_REUSEPORT: %w", err)
		}
	}
	if family == unix.AF_INET6 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, boolInt(o.V6Only)); err != nil {
			return fmt.Errorf("setting IPV6_V6ONLY: %w", err)
		}
	}
	return nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
