package sockets

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/coreos/go-systemd/v22/activation"
	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
	"github.com/relaysh/relay/socketpass"
)

// Origin says where a Listener's socket came from.
type Origin string

// The origins of relay's sockets.
const (
	// Bound: relay bound it for a --listen address.
	Bound Origin = "bound"
	// Inherited: it was passed to relay (by a .socket unit or systemd's
	// fd store) on the address of a --listen, and serves in its place.
	Inherited Origin = "inherited"
	// Activated: it was passed to relay and matches no --listen; it is
	// passed on under the name it came with.
	Activated Origin = "activated"
)

// StoreNamePrefix starts the name under which relay keeps a socket in
// systemd's fd store ("relay/tcp-8080"). It tells a socket that comes back
// from the store apart from one a .socket unit passes.
const StoreNamePrefix = "relay/"

// ForeignListenPID reports a LISTEN_FDS meant for another process, or with
// no LISTEN_PID: relay ignores sockets whose LISTEN_PID is not its own pid,
// as the protocol asks.
func ForeignListenPID() (pid string, foreign bool) {
	if os.Getenv(socketpass.EnvListenFDs) == "" {
		return "", false
	}
	pid = os.Getenv(socketpass.EnvListenPID)
	return pid, pid != strconv.Itoa(os.Getpid())
}

// TakeActivated takes the sockets passed to relay itself by socket
// activation (LISTEN_FDS, for relay's own LISTEN_PID) and removes the
// protocol's variables from relay's environment. Each socket gets its name
// from LISTEN_FDNAMES and is left in blocking mode, outside Go's poller,
// like the sockets relay binds.
func TakeActivated() ([]*Listener, error) {
	files := activation.Files(true)
	var out []*Listener
	for i, f := range files {
		l, err := adoptFile(f, socketpass.FirstFD+i)
		if err != nil {
			for _, rest := range files[i+1:] {
				rest.Close()
			}
			CloseAll(out)
			return nil, err
		}
		out = append(out, l)
	}
	return out, nil
}

func adoptFile(f *os.File, fd int) (*Listener, error) {
	name := f.Name()
	// A non-blocking fd makes os.NewFile register it with Go's poller, and
	// Fd then switches it to blocking mode (a flag every holder of the
	// socket shares; no child runs yet). A duplicate wrapped anew stays
	// out of the poller, which would otherwise wake relay on its traffic.
	nfd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, socketpass.FirstFD)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("taking passed fd %d (%s): %w", fd, name, err)
	}
	l, err := describe(nfd, fd, name)
	if err != nil {
		unix.Close(nfd)
		return nil, err
	}
	return l, nil
}

func describe(nfd, fd int, name string) (*Listener, error) {
	if err := unix.SetNonblock(nfd, false); err != nil {
		return nil, fmt.Errorf("passed fd %d (%s): making it blocking: %w", fd, name, err)
	}
	typ, err := unix.GetsockoptInt(nfd, unix.SOL_SOCKET, unix.SO_TYPE)
	if errors.Is(err, unix.ENOTSOCK) {
		return nil, fmt.Errorf("passed fd %d (%s) is not a socket; relay passes on sockets only (ListenStream=, ListenDatagram=)", fd, name)
	} else if err != nil {
		return nil, fmt.Errorf("passed fd %d (%s): reading its type: %w", fd, name, err)
	}
	family, err := unix.GetsockoptInt(nfd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return nil, fmt.Errorf("passed fd %d (%s): reading its family: %w", fd, name, err)
	}
	var network sockaddr.Network
	switch {
	case typ == unix.SOCK_STREAM && family == unix.AF_UNIX:
		network = sockaddr.Unix
	case typ == unix.SOCK_STREAM && (family == unix.AF_INET || family == unix.AF_INET6):
		network = sockaddr.TCP
	case typ == unix.SOCK_DGRAM && (family == unix.AF_INET || family == unix.AF_INET6):
		network = sockaddr.UDP
	default:
		return nil, fmt.Errorf("passed fd %d (%s) is a socket of family %d and type %d; relay passes on TCP, UDP and unix stream sockets", fd, name, family, typ)
	}
	if typ == unix.SOCK_STREAM {
		acc, err := unix.GetsockoptInt(nfd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
		if err != nil {
			return nil, fmt.Errorf("passed fd %d (%s): reading SO_ACCEPTCONN: %w", fd, name, err)
		}
		if acc == 0 {
			return nil, fmt.Errorf("passed fd %d (%s) is a connection, not a listening socket; set Accept=no in the .socket unit", fd, name)
		}
	}
	sa, err := unix.Getsockname(nfd)
	if err != nil {
		return nil, fmt.Errorf("passed fd %d (%s): reading its address: %w", fd, name, err)
	}
	addr := sockaddr.String(sa)
	if name == "" || ValidateName(name) != nil {
		name = DefaultName(network, addr)
	}
	return &Listener{
		Spec:       Spec{Name: name, Network: network, Address: addr, NameGiven: true},
		Addr:       addr,
		Origin:     Activated,
		PassedName: name,
		file:       os.NewFile(uintptr(nfd), name),
	}, nil
}

// openListeners returns relay's listeners, in the order the children get them:
//
//  1. the passed sockets that no --listen spec claims, in the order they
//     were passed, under the names they came with;
//  2. one socket per spec, in --listen order.
//
// A spec claims a passed socket of the same network on the same address
// (port 0 never matches; a unix socket only while its file is there) and
// uses it instead of binding a new one, under the spec's name. That is how
// sockets come back from systemd's fd store after a restart, and how a
// .socket unit and --listen may name the same address.
//
// Passed sockets whose name starts with StoreNamePrefix that no spec claims
// were stored for a --listen that is gone or changed. openListeners closes them and,
// before it binds anything, calls dropStale with their names, so that the
// caller can have them removed from the store: the store's copy would
// otherwise keep the address busy. dropStale may be nil.
func openListeners(specs []Spec, passed []*Listener, opts BindOptions, dropStale func(names []string)) ([]*Listener, error) {
	claimed := make([]*Listener, len(specs))
	taken := make(map[*Listener]bool)
	for i, s := range specs {
		for _, p := range passed {
			if !taken[p] && matches(s, p) {
				claimed[i], taken[p] = p, true
				break
			}
		}
	}
	var out []*Listener
	var stale []string
	for _, p := range passed {
		switch {
		case taken[p]:
		case strings.HasPrefix(p.PassedName, StoreNamePrefix):
			stale = append(stale, p.PassedName)
			p.Close()
		default:
			out = append(out, p)
		}
	}
	if len(stale) > 0 && dropStale != nil {
		dropStale(stale)
	}
	fail := func(i int, err error) ([]*Listener, error) {
		CloseAll(out)
		for _, p := range claimed[i:] {
			if p != nil {
				p.Close()
			}
		}
		return nil, err
	}
	for i, s := range specs {
		if p := claimed[i]; p != nil {
			if err := p.inherit(s); err != nil {
				return fail(i, err)
			}
			out = append(out, p)
			continue
		}
		l, err := bindOne(s, opts)
		if err != nil {
			return fail(i+1, err)
		}
		out = append(out, l)
	}
	return out, nil
}

// inherit makes a passed socket serve in the place of spec s.
func (l *Listener) inherit(s Spec) error {
	l.Origin = Inherited
	l.Spec = s
	if !s.NameGiven {
		l.Spec.Name = DefaultName(s.Network, l.Addr)
	}
	if s.Network == sockaddr.Unix {
		// Hold the path's lock, as for a socket relay binds, so that no
		// other relay replaces the file under this one.
		lock, err := lockPath(s, l.Addr+".lock")
		if err != nil {
			return err
		}
		l.lock = lock
	}
	return nil
}

// matches reports whether the passed socket p listens where s asks: on
// the address s names, not on one that merely covers it.
func matches(s Spec, p *Listener) bool {
	if s.Network != p.Spec.Network {
		return false
	}
	if s.Network == sockaddr.Unix {
		if filepath.Clean(s.Address) != filepath.Clean(p.Addr) {
			return false
		}
		// A socket whose file is gone (a RuntimeDirectory= wiped while
		// relay was down) is unreachable: bind a new one instead.
		st, err := os.Lstat(p.Addr)
		return err == nil && st.Mode()&os.ModeSocket != 0
	}
	host, port, err := net.SplitHostPort(s.Address)
	phost, pport, perr := net.SplitHostPort(p.Addr)
	if err != nil || perr != nil || port == "0" || port != pport {
		return false
	}
	pip := net.ParseIP(phost)
	if pip == nil {
		return false
	}
	if host == "" {
		return pip.IsUnspecified()
	}
	ip, err := sockaddr.Resolve(host)
	return err == nil && ip.Equal(pip)
}
