package socketpass

import (
	"net"
	"strconv"

	"golang.org/x/sys/unix"
)

// parseHost returns the IP in host, or nil when host is a name.
func parseHost(host string) net.IP {
	if host == "" {
		return nil
	}
	return net.ParseIP(host)
}

// pickAddr prefers an IPv4 address, as Go's net.Listen does for names.
func pickAddr(addrs []net.IPAddr) net.IP {
	for _, a := range addrs {
		if a.IP.To4() != nil {
			return a.IP
		}
	}
	return addrs[0].IP
}

func inetSockaddr(ip net.IP, port int) (int, unix.Sockaddr) {
	if ip4 := ip.To4(); ip4 != nil {
		sa := &unix.SockaddrInet4{Port: port}
		copy(sa.Addr[:], ip4)
		return unix.AF_INET, sa
	}
	sa := &unix.SockaddrInet6{Port: port}
	copy(sa.Addr[:], ip.To16())
	return unix.AF_INET6, sa
}

// SockaddrString formats an address as host:port, or a unix socket path.
func SockaddrString(sa unix.Sockaddr) string {
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

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
