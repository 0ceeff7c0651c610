package listener

import (
	"net"

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
