// Package listen reads what relay is asked to listen on: the --listen
// values, the names the children see them under, and --socket-mode.
package listen

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Network is the kind of socket a Spec describes.
type Network string

// The networks relay can listen on.
const (
	TCP  Network = "tcp"
	UDP  Network = "udp"
	Unix Network = "unix"
)

// maxNameLen is systemd's limit on a file descriptor name.
const maxNameLen = 255

// Spec is one parsed --listen value.
type Spec struct {
	// Name is passed to the child in LISTEN_FDNAMES.
	Name string
	// Network is tcp, udp or unix.
	Network Network
	// Address is host:port for tcp and udp, and a filesystem path for unix.
	Address string
	// NameGiven reports whether the user chose Name (name=...).
	NameGiven bool
}

// String formats s the way it would be written on the command line.
func (s Spec) String() string {
	addr := s.Address
	switch s.Network {
	case UDP:
		addr = "udp:" + addr
	case Unix:
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
func Parse(value string) (Spec, error) {
	var s Spec
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
	switch {
	case strings.HasPrefix(rest, "unix:"):
		s.Network, s.Address = Unix, strings.TrimPrefix(rest, "unix:")
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
		return s, nil
	case strings.HasPrefix(rest, "udp:"):
		s.Network, s.Address = UDP, strings.TrimPrefix(rest, "udp:")
	case strings.HasPrefix(rest, "tcp:"):
		s.Network, s.Address = TCP, strings.TrimPrefix(rest, "tcp:")
	default:
		s.Network, s.Address = TCP, rest
	}
	_, port, err := net.SplitHostPort(s.Address)
	if err != nil {
		return Spec{}, fmt.Errorf("--listen %q: want host:port, :port, [ipv6]:port, udp:host:port or unix:/path: %w", value, err)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil {
		return Spec{}, fmt.Errorf("--listen %q: port %q is not a number from 0 to 65535", value, port)
	} else if n == 0 && port != "0" {
		return Spec{}, fmt.Errorf("--listen %q: bad port %q", value, port)
	}
	return s, nil
}

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
func DefaultName(network Network, boundAddr string) string {
	switch network {
	case Unix:
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
func FileMode(value string) (os.FileMode, error) {
	n, err := strconv.ParseUint(value, 8, 32)
	if err != nil || n > 0o777 {
		return 0, fmt.Errorf("--socket-mode %q: want an octal permission such as 0660", value)
	}
	return os.FileMode(n), nil
}
