package sockets

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
	"github.com/relaysh/relay/internal/takeover"
)

// addr is what Claim compares a child's bind with: the listener's bound
// address and its socket's family.
type addr struct {
	network sockaddr.Network
	ip      sockaddr.Socket // IP listeners
	path    string          // unix listeners
	dir     takeover.FileID // the directory of path; zero if unknown
}

// family is the listener's socket family.
func (a addr) family() int {
	if a.network == sockaddr.Unix {
		return unix.AF_UNIX
	}
	return a.ip.Family
}

// readAddr reads a listener's address and family from its socket.
func readAddr(l *Listener) (addr, error) {
	a := addr{network: l.Spec.Network}
	if a.network == sockaddr.Unix {
		a.path = l.Addr
		a.dir, _ = takeover.DirID(l.Addr) // zero: compare paths as strings
		return a, nil
	}
	rc, err := l.File().SyscallConn()
	if err != nil {
		return a, fmt.Errorf("reaching %s: %w", l.Spec.Name, err)
	}
	var inner error
	err = rc.Control(func(fd uintptr) { a.ip, inner = sockaddr.Read(int(fd)) })
	if err == nil {
		err = inner
	}
	if err != nil {
		return a, fmt.Errorf("reading the address of %s: %w", l.Spec.Name, err)
	}
	return a, nil
}

// covers reports whether a bind of b's address is this listener's: the
// same kind of socket (if known), and an address the listener covers
// (package sockaddr: the same port, and the same address or a wildcard on
// either side). The public address stays what --listen says: a child
// binding the wildcard gets a listener on one address, and one binding one
// address of a wildcard listener gets the wildcard.
func (a addr) covers(b takeover.Bind) bool {
	if b.Family == unix.AF_UNIX || a.network == sockaddr.Unix {
		if b.Family != unix.AF_UNIX || a.network != sockaddr.Unix || (b.Network != sockaddr.Unix && b.Err == nil) {
			return false
		}
		if b.Dir != (takeover.FileID{}) && a.dir != (takeover.FileID{}) {
			// The same name in the same directory, however the child
			// reaches it (symlinks, its own root).
			return b.Dir == a.dir && filepath.Base(b.Path) == filepath.Base(a.path)
		}
		return b.Path == a.path
	}
	switch b.Network {
	case sockaddr.TCP:
		if a.network != sockaddr.TCP {
			return false
		}
	case sockaddr.UDP:
		if a.network != sockaddr.UDP {
			return false
		}
	case sockaddr.Other:
		if b.Err == nil {
			return false // another protocol: the port is not relay's
		}
	default:
		return false
	}
	return a.ip.Covers(b.Addr)
}

// Claim decides which socket generation gen's bind b lands on: the
// generation's own member of a steered listener's group, or a shared
// listener's socket. A bind no listener covers proceeds untouched. One
// relay cannot complete safely is refused, and the generation's bind
// fails rather than take a socket of its own beside relay's.
//
// Families: a child's IPv6 socket may get an IPv4 listener (its address
// buffers hold IPv4 addresses; Go, nginx and Python read the family of
// what accept returns), but a child's IPv4 socket never gets an IPv6
// listener, whose peer addresses would not fit an IPv4 socket's buffers.
// A wildcard bind that several listeners on one port cover gets the one of
// the child's own family, and is refused where that is not one listener or
// the child's socket is dual-stack (it would leave a listener unserved).
func (s *Set) Claim(gen, worker int, b takeover.Bind) takeover.Decision {
	var covered, ownFamily []int
	for i, e := range s.entries {
		if e.addr.covers(b) {
			covered = append(covered, i)
			if e.addr.family() == b.Domain {
				ownFamily = append(ownFamily, i)
			}
		}
	}
	if len(covered) == 0 {
		return s.uncovered(b)
	}
	pick := covered[0]
	if len(covered) > 1 {
		// One socket can be only one listener. An IPv4 and an IPv6
		// wildcard bind (nginx's "listen 8080; listen [::]:8080;") each
		// take the listener of their family; a dual-stack one, or one
		// that several listeners of its family share, cannot be split.
		dual := b.Domain == unix.AF_INET6 && !b.V6Only && b.Addr.Addr().IsUnspecified()
		if len(ownFamily) != 1 || (dual && len(ownFamily) < len(covered)) {
			var names []string
			for _, i := range covered {
				names = append(names, s.entries[i].Listener.Spec.String())
			}
			return takeover.Decision{Socket: covered[0], Refuse: fmt.Errorf(
				"the child's bind of %s covers --listen %s, and one socket can serve only one of them; give one --listen for the address the server binds, or make the server bind each address",
				b.Addr, strings.Join(names, ", "))}
		}
		pick = ownFamily[0]
	}
	e := s.entries[pick]
	if b.Err != nil {
		return takeover.Decision{Socket: pick, Refuse: fmt.Errorf("this is %s's address, and relay cannot inspect the child's socket: %w", e.Listener.Spec.Name, b.Err)}
	}
	if b.Domain == unix.AF_INET && e.addr.family() == unix.AF_INET6 {
		return takeover.Decision{Socket: pick, Refuse: fmt.Errorf(
			"the child binds an IPv4 socket to %s, but --listen %s is an IPv6 socket, whose peer addresses do not fit an IPv4 socket; use --listen %s",
			b.Addr, e.Listener.Spec, ipv4Listen(b, e))}
	}
	// Own: nothing but this generation (and relay) holds the socket, so
	// its O_NONBLOCK may follow the child's. A member that an earlier
	// generation had may still be held by what that one left behind.
	k := copyKey{gen, worker}
	s.mu.Lock()
	var own bool
	switch {
	case e.Group != nil: // the copy's own member
		own = e.fresh[k]
	case e.UDP != nil: // its generation's member, which its copies share
		own = e.fresh[k] && alone(e.holders, k, func(h copyKey) bool { return h.gen == gen })
	default: // the one socket every generation shares
		own = e.holders[k] && alone(e.holders, k, func(copyKey) bool { return true })
	}
	s.mu.Unlock()
	return takeover.Decision{Socket: pick, Own: own}
}

// alone reports whether k is the only holder that matches.
func alone(holders map[copyKey]bool, k copyKey, match func(copyKey) bool) bool {
	for h := range holders {
		if h != k && match(h) {
			return false
		}
	}
	return true
}

// uncovered lets a bind no listener covers pass, with a note for a UDP one
// on the port of a TCP listener: a server's HTTP/3 beside its HTTPS
// (caddy), which then binds a socket of its own that no restart keeps.
func (s *Set) uncovered(b takeover.Bind) takeover.Decision {
	if b.Network != sockaddr.UDP || b.Family == unix.AF_UNIX {
		return takeover.Pass
	}
	for _, e := range s.entries {
		if e.addr.network == sockaddr.TCP && e.addr.ip.Addr.Port() == b.Addr.Port() {
			d := takeover.Pass
			d.Note = fmt.Sprintf("the child binds UDP %s, which no --listen covers, beside --listen %s on the same port (HTTP/3 beside HTTPS?): its socket is its own and a restart does not keep it; add --listen udp:%s",
				b.Addr, e.Listener.Spec, b.Addr)
			return d
		}
	}
	return takeover.Pass
}

// ipv4Listen is the --listen that would give an IPv4 child what the
// listener serves, no wider: loopback for IPv6 loopback, all addresses for
// the IPv6 wildcard, else the address the child asked for.
func ipv4Listen(b takeover.Bind, e *entry) string {
	host := b.Addr.Addr()
	port := e.addr.ip.Addr.Port()
	switch la := e.addr.ip.Addr.Addr(); {
	case la.IsLoopback():
		host = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	case la.IsUnspecified():
		host = netip.IPv4Unspecified()
	case host.IsUnspecified():
		return "IPV4ADDR:" + fmt.Sprint(port) + " (the IPv4 address to serve on)"
	}
	return netip.AddrPortFrom(host, port).String()
}
