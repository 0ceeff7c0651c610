// Package sockaddr says where an IP socket listens and which addresses
// that covers: the one rule relay uses to decide whether a bind, a probe
// or a connection reaches one of its listeners.
package sockaddr

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"

	"golang.org/x/sys/unix"
)

// String formats an address as host:port, or a unix socket path.
func String(sa unix.Sockaddr) string {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port))
	case *unix.SockaddrInet6:
		return net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port))
	case *unix.SockaddrUnix:
		return a.Name
	}
	return "?"
}

// AddrPort converts an IP socket address, as it is (a v4-mapped IPv6
// address stays mapped); other kinds give the zero value.
func AddrPort(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return netip.AddrPort{}
}

// Socket is where an IP socket is bound, and what its family lets it
// hold.
type Socket struct {
	// Addr is the bound address, a v4-mapped one unmapped.
	Addr netip.AddrPort
	// Family is unix.AF_INET or unix.AF_INET6.
	Family int
	// V6Only is IPV6_V6ONLY of an AF_INET6 socket.
	V6Only bool
}

// ErrNotIP is returned by Read for a socket that is not bound to an IP
// address.
var ErrNotIP = errors.New("not an IP socket")

// Read reads the bound address and family of the socket fd.
func Read(fd int) (Socket, error) {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return Socket{}, fmt.Errorf("reading the socket's address: %w", err)
	}
	s := Socket{Addr: AddrPort(sa)}
	switch sa.(type) {
	case *unix.SockaddrInet4:
		s.Family = unix.AF_INET
	case *unix.SockaddrInet6:
		s.Family = unix.AF_INET6
		s.Addr = netip.AddrPortFrom(s.Addr.Addr().Unmap(), s.Addr.Port())
		v, err := unix.GetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY)
		if err != nil {
			return Socket{}, fmt.Errorf("reading IPV6_V6ONLY: %w", err)
		}
		s.V6Only = v != 0
	default:
		return Socket{}, ErrNotIP
	}
	return s, nil
}

// Covers reports whether address a is s's: the same port, and the same
// address or a wildcard on either side, as far as s's family can hold a.
// The family rule: a wildcard s holds no IPv4 address if it is IPv6-only,
// and no single IPv6 address if it is IPv4 (a dual-stack IPv6 wildcard
// holds both); a wildcard a takes in any address s is bound to. The zero
// Socket covers nothing.
func (s Socket) Covers(a netip.AddrPort) bool {
	if !s.Addr.IsValid() || s.Addr.Port() != a.Port() {
		return false
	}
	sa, aa := s.Addr.Addr().Unmap(), a.Addr().Unmap()
	switch {
	case !sa.IsUnspecified():
		return sa == aa || aa.IsUnspecified()
	case aa.Is4():
		return s.Family != unix.AF_INET6 || !s.V6Only
	default:
		return s.Family != unix.AF_INET || aa.IsUnspecified()
	}
}

// Resolve returns the IP in host, or for a name the address net.Listen
// would bind: the first IPv4 one, else the first.
func Resolve(host string) (net.IP, error) {
	if ip := net.ParseIP(host); ip != nil {
		return ip, nil
	}
	addrs, err := net.DefaultResolver.LookupIPAddr(context.Background(), host)
	if err == nil && len(addrs) == 0 {
		err = errors.New("no address")
	}
	if err != nil {
		return nil, fmt.Errorf("cannot resolve host %q: %w", host, err)
	}
	for _, a := range addrs {
		if a.IP.To4() != nil {
			return a.IP, nil
		}
	}
	return addrs[0].IP, nil
}

// FromIP returns the family and socket address of ip and port.
func FromIP(ip net.IP, port int) (int, unix.Sockaddr) {
	if ip4 := ip.To4(); ip4 != nil {
		sa := &unix.SockaddrInet4{Port: port}
		copy(sa.Addr[:], ip4)
		return unix.AF_INET, sa
	}
	sa := &unix.SockaddrInet6{Port: port}
	copy(sa.Addr[:], ip.To16())
	return unix.AF_INET6, sa
}
