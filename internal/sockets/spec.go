package sockets

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/relaysh/relay/internal/sockaddr"
	"github.com/relaysh/relay/internal/unixpath"
)

// maxNameLen is systemd's limit on a file descriptor name.
const maxNameLen = 255

// Spec is one parsed --listen value.
type Spec struct {
	// Name is passed to the child in LISTEN_FDNAMES.
	Name string
	// Network is tcp, udp or unix.
	Network sockaddr.Network
	// Address is host:port for tcp and udp, and a filesystem path for unix.
	Address string
	// NameGiven reports whether the user chose Name (name=...).
	NameGiven bool
}

// String formats s the way it would be written on the command line.
func (s Spec) String() string {
	addr := s.Address
	switch s.Network {
	case sockaddr.UDP:
		addr = "udp:" + addr
	case sockaddr.Unix:
		addr = "unix:" + addr
	}
	if s.NameGiven {
		return s.Name + "=" + addr
	}
	return addr
}

// Parse parses a --listen value. The accepted forms are
//
//	host:port  :port  [::1]:port      a TCP listener
//	udp:host:port                     a UDP socket
//	unix:/path/to.sock                a unix stream listener
//
// each optionally prefixed with name= to set the name the child sees in
// LISTEN_FDNAMES. Without a name, DefaultName decides it once the socket is
// bound.
func ParseSpec(value string) (Spec, error) {
	var s Spec
	if err := checkControl(value); err != nil {
		return Spec{}, err
	}
	rest := value
	// A name prefix never contains ':' or '/', so the first '=' before any
	// of those is the name separator; '=' is not valid in any address form.
	if i := strings.IndexByte(rest, '='); i >= 0 && !strings.ContainsAny(rest[:i], ":/[") {
		s.Name, rest = rest[:i], rest[i+1:]
		s.NameGiven = true
		if err := ValidateName(s.Name); err != nil {
			return Spec{}, fmt.Errorf("--listen %q: %w", value, err)
		}
	}
	if scheme, after, ok := strings.Cut(rest, "://"); ok && isScheme(scheme) {
		return Spec{}, urlError(value, s, scheme, after)
	}
	switch {
	case strings.HasPrefix(rest, "unix:"):
		s.Network, s.Address = sockaddr.Unix, strings.TrimPrefix(rest, "unix:")
		if s.Address == "" {
			return Spec{}, fmt.Errorf("--listen %q: unix socket path is empty; use unix:/path/to/socket", value)
		}
		if !filepath.IsAbs(s.Address) {
			abs, err := filepath.Abs(s.Address)
			if err != nil {
				return Spec{}, fmt.Errorf("--listen %q: making path absolute: %w", value, err)
			}
			s.Address = abs
		}
		s.Address = filepath.Clean(s.Address)
		if err := unixpath.CheckLen(s.Address); err != nil {
			return Spec{}, fmt.Errorf("--listen %q: %w", value, err)
		}
		return s, nil
	case strings.HasPrefix(rest, "udp:"):
		s.Network, s.Address = sockaddr.UDP, strings.TrimPrefix(rest, "udp:")
	case strings.HasPrefix(rest, "tcp:"):
		s.Network, s.Address = sockaddr.TCP, strings.TrimPrefix(rest, "tcp:")
	default:
		s.Network, s.Address = sockaddr.TCP, rest
	}
	host, port, err := net.SplitHostPort(s.Address)
	if err != nil {
		return Spec{}, fmt.Errorf("--listen %q: want host:port, :port, [ipv6]:port, udp:host:port or unix:/path: %w", value, err)
	}
	if strings.ContainsAny(host, "/ ") {
		return Spec{}, fmt.Errorf("--listen %q: host %q is neither an IP address nor a host name; want host:port, :port, [ipv6]:port, udp:host:port or unix:/path", value, host)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil {
		return Spec{}, fmt.Errorf("--listen %q: port %q is not a number from 0 to 65535", value, port)
	} else if n == 0 && port != "0" {
		return Spec{}, fmt.Errorf("--listen %q: bad port %q", value, port)
	}
	if err := checkHost(host, port); err != nil {
		return Spec{}, fmt.Errorf("--listen %q: %w", value, err)
	}
	return s, nil
}

// checkControl refuses a --listen value with a control character in it (a
// newline from a script, a tab): no address or socket name holds one.
func checkControl(value string) error {
	clean := strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return -1
		}
		return r
	}, value)
	if clean == value {
		return nil
	}
	i := strings.IndexFunc(value, unicode.IsControl)
	r, _ := utf8.DecodeRuneInString(value[i:])
	return fmt.Errorf("--listen %q: holds the control character %q, which no address or socket name may; remove it: --listen %q", value, r, clean)
}

// checkHost refuses, before any lookup, a host that can only be meant as
// an IP address and is not a valid one. relay takes host names (they are
// resolved at bind), but a name is never made of digits and dots alone
// (an IPv4 address, such as 256.1.1.1, with a field out of range), nor
// holds ':' (IPv6) or '%' (an IPv6 zone). A zone must name a network
// interface of this machine, by name or index.
func checkHost(host, port string) error {
	if host == "" {
		return nil
	}
	digitsAndDots := strings.Trim(host, "0123456789.") == ""
	if !digitsAndDots && !strings.ContainsAny(host, ":%") {
		return nil // a host name
	}
	ip, err := netip.ParseAddr(host)
	switch {
	case err != nil && digitsAndDots:
		return fmt.Errorf("host %q is not an IPv4 address (four numbers from 0 to 255, no leading zeros); write one such as 127.0.0.1:%s, or 0.0.0.0:%s for every IPv4 address", host, port, port)
	case err != nil || ip.Is4() && ip.Zone() != "":
		return fmt.Errorf("host %q is not an IP address; write an IPv6 address in brackets, with its zone if it has one, such as [::1]:%s or [fe80::1%%eth0]:%s", host, port, port)
	case ip.Zone() != "":
		return checkZone(ip, port)
	}
	return nil
}

// checkZone refuses an IPv6 zone that names no network interface.
func checkZone(ip netip.Addr, port string) error {
	zone := ip.Zone()
	var err error
	if n, nerr := strconv.Atoi(zone); nerr == nil {
		_, err = net.InterfaceByIndex(n)
	} else {
		_, err = net.InterfaceByName(zone)
	}
	if err == nil {
		return nil
	}
	var names []string
	suggest := "eth0"
	ifs, _ := net.Interfaces()
	for _, in := range ifs {
		names = append(names, in.Name)
	}
	for _, in := range ifs {
		if in.Flags&net.FlagUp != 0 && in.Flags&net.FlagLoopback == 0 {
			suggest = in.Name // the first that could carry the address
			break
		}
	}
	have := strings.Join(names, ", ")
	if have == "" {
		have = "none"
	}
	example := net.JoinHostPort(ip.WithZone(suggest).String(), port)
	return fmt.Errorf("zone %q of %s names no network interface of this machine (it has %s); write the interface the address is on, such as %s",
		zone, ip.WithZone(""), have, example)
}

// isScheme reports whether s is a URL scheme: a letter, then letters,
// digits, '+', '-' or '.'.
func isScheme(s string) bool {
	for i, c := range s {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
		case i > 0 && (c >= '0' && c <= '9' || c == '+' || c == '-' || c == '.'):
		default:
			return false
		}
	}
	return s != ""
}

// urlError says that a --listen value written as a URL is not one, and
// how to write the address it names.
func urlError(value string, s Spec, scheme, after string) error {
	prefix := ""
	if s.NameGiven {
		prefix = s.Name + "="
	}
	scheme = strings.ToLower(scheme)
	if scheme == "unix" {
		return fmt.Errorf("--listen %q: not a URL; write %sunix:%s", value, prefix, after)
	}
	hostport, _, _ := strings.Cut(after, "/")
	if _, _, err := net.SplitHostPort(hostport); err != nil {
		switch scheme {
		case "http", "ws":
			hostport = net.JoinHostPort(strings.Trim(hostport, "[]"), "80")
		case "https", "wss":
			hostport = net.JoinHostPort(strings.Trim(hostport, "[]"), "443")
		default:
			hostport = net.JoinHostPort(strings.Trim(hostport, "[]"), "PORT")
		}
	}
	switch scheme {
	case "udp":
		return fmt.Errorf("--listen %q: not a URL; write %sudp:%s", value, prefix, hostport)
	case "tcp", "http", "https", "ws", "wss":
		return fmt.Errorf("--listen %q: not a URL; write %s%s or %stcp:%s", value, prefix, hostport, prefix, hostport)
	}
	return fmt.Errorf("--listen %q: not a URL; want host:port, :port, [ipv6]:port, udp:host:port or unix:/path", value)
}

// CheckDistinct refuses --listen values that would bind the same socket
// twice: the same unix path, or tcp or udp addresses of the same port
// where one takes in the other (":8080" takes in "127.0.0.1:8080"; a host
// name is compared as written). relay binds each, so the second would
// fail with "address already in use", relay itself holding the first.
func CheckDistinct(specs []Spec) error {
	for i, a := range specs {
		for _, b := range specs[:i] {
			if a.Network != b.Network {
				continue
			}
			if a.Network == sockaddr.Unix {
				if a.Address == b.Address {
					return fmt.Errorf("--listen %q and --listen %q are the same socket %s; give each address once", b, a, a.Address)
				}
				continue
			}
			if overlap(a.Address, b.Address) {
				if a.Address == b.Address {
					return fmt.Errorf("--listen %q is given twice; give each address once", a)
				}
				return fmt.Errorf("--listen %q and --listen %q overlap: both take connections to one address, and one socket cannot be bound twice; drop one, or give them different ports", b, a)
			}
		}
	}
	// The child tells its sockets apart by name (LISTEN_FDNAMES). Default
	// names may repeat (127.0.0.1:8080 and [::1]:8080 are both tcp-8080);
	// names chosen with NAME= may not.
	for i, a := range specs {
		for _, b := range specs[:i] {
			if a.NameGiven && b.NameGiven && a.Name == b.Name {
				return fmt.Errorf("--listen %q and --listen %q use the same name %q; give each listener its own name", b, a, a.Name)
			}
		}
	}
	return nil
}

// overlap reports whether two host:port addresses, bound as relay binds
// them, would share an address: the same port (not 0), and hosts whose
// address sets meet. An empty host is a dual-stack wildcard, "0.0.0.0"
// every IPv4 address and "::" every IPv6 one (relay binds it IPv6-only).
func overlap(a, b string) bool {
	ha, pa, _ := net.SplitHostPort(a)
	hb, pb, _ := net.SplitHostPort(b)
	if pa != pb || pa == "0" {
		return false
	}
	ra, okA := reachOf(ha)
	rb, okB := reachOf(hb)
	if !okA || !okB {
		return strings.EqualFold(ha, hb) // a host name: only the same one
	}
	switch {
	case ra.addr.IsValid() && rb.addr.IsValid():
		return ra.addr == rb.addr
	case ra.addr.IsValid():
		return rb.takes(ra.addr)
	case rb.addr.IsValid():
		return ra.takes(rb.addr)
	}
	return ra.any4 && rb.any4 || ra.any6 && rb.any6
}

// reach is what a host binds: one address, or a wildcard of one or both
// families.
type reach struct {
	addr       netip.Addr
	any4, any6 bool
}

func reachOf(host string) (reach, bool) {
	if host == "" {
		return reach{any4: true, any6: true}, true
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return reach{}, false
	}
	switch ip = ip.Unmap(); {
	case ip == netip.IPv4Unspecified():
		return reach{any4: true}, true
	case ip == netip.IPv6Unspecified():
		return reach{any6: true}, true
	}
	return reach{addr: ip}, true
}

func (r reach) takes(ip netip.Addr) bool { return ip.Is4() && r.any4 || ip.Is6() && r.any6 }

// ValidateName checks a socket name against systemd's rules for
// FileDescriptorName=: at most 255 printable ASCII characters, no ':'.
func ValidateName(name string) error {
	if name == "" {
		return fmt.Errorf("socket name is empty")
	}
	if len(name) > maxNameLen {
		return fmt.Errorf("socket name %q is longer than %d characters", name, maxNameLen)
	}
	for _, r := range name {
		if r <= ' ' || r > '~' || r == ':' {
			return fmt.Errorf("socket name %q may only hold printable ASCII without spaces or ':'", name)
		}
	}
	return nil
}

// DefaultName is the name given to a socket whose --listen value has none:
// the network and the bound port for tcp and udp ("tcp-8080", "udp-5353"),
// and "unix-" plus the file name for unix sockets ("unix-app.sock").
func DefaultName(network sockaddr.Network, boundAddr string) string {
	switch network {
	case sockaddr.Unix:
		return "unix-" + sanitizeName(filepath.Base(boundAddr))
	default:
		_, port, err := net.SplitHostPort(boundAddr)
		if err != nil {
			port = sanitizeName(boundAddr)
		}
		return string(network) + "-" + port
	}
}

func sanitizeName(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c <= ' ' || c > '~' || c == ':' {
			b[i] = '_'
		}
	}
	if len(b) > maxNameLen-5 {
		b = b[:maxNameLen-5]
	}
	return string(b)
}

// FileMode parses a --socket-mode value such as "0660".
func ParseFileMode(value string) (os.FileMode, error) {
	n, err := strconv.ParseUint(value, 8, 32)
	if err != nil || n > 0o777 {
		return 0, fmt.Errorf("--socket-mode %q: want an octal permission such as 0660", value)
	}
	return os.FileMode(n), nil
}
