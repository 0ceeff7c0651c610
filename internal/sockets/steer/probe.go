package steer

import (
	"fmt"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
)

// Addr is the group's bound address.
func (g *Group) Addr() netip.AddrPort { return sockaddr.AddrPort(g.sa) }

// Covers reports whether a probe dialled to dst reaches this group, so
// that ProbeControl steers it: dst is an address the group's socket covers
// (package sockaddr), and one that is surely on this host, since the probe
// is told apart by a source address of dst's own: the group's address or,
// for a group on all addresses, a loopback one (any other local address
// would do too, but relay cannot tell local from remote here).
func (g *Group) Covers(dst netip.AddrPort) bool {
	da := dst.Addr().Unmap()
	if da.IsUnspecified() || (g.sock.Addr.Addr().IsUnspecified() && !da.IsLoopback()) {
		return false
	}
	return g.sock.Covers(dst)
}

// ProbeControl returns a dialer Control function for the readiness probes
// of copy worker of generation gen (0 for the first or only one). A probe
// to the address of one of groups is bound to a source port of its own
// first, and that group is told to send the connections from it to that
// copy's socket; other probes pass untouched.
func ProbeControl(groups []*Group, gen, worker int) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		dst, err := netip.ParseAddrPort(address)
		if err != nil {
			return nil // not an IP address: nothing to steer
		}
		var target *Group
		for _, g := range groups {
			if g != nil && g.Covers(dst) {
				target = g
				break
			}
		}
		if target == nil {
			return nil
		}
		var inner error
		err = c.Control(func(fd uintptr) { inner = bindProbe(int(fd), dst, target, gen, worker) })
		if err != nil {
			return fmt.Errorf("steering the probe: %w", err)
		}
		return inner
	}
}

// bindProbe binds the probe's socket to the destination's own address (it
// is local) and a port the kernel picks, then steers that source.
func bindProbe(fd int, dst netip.AddrPort, g *Group, gen, worker int) error {
	var sa unix.Sockaddr
	if dst.Addr().Is4() {
		sa = &unix.SockaddrInet4{Addr: dst.Addr().As4()}
	} else {
		sa = &unix.SockaddrInet6{Addr: dst.Addr().As16()}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fmt.Errorf("binding the probe's source address: %w", err)
	}
	bound, err := unix.Getsockname(fd)
	if err != nil {
		return fmt.Errorf("reading the probe's source port: %w", err)
	}
	return g.Probe(gen, worker, sockaddr.AddrPort(bound))
}
