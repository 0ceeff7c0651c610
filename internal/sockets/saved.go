package sockets

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
	"github.com/relaysh/relay/internal/sockets/steer"
	"github.com/relaysh/relay/internal/sockets/udpsteer"
	"github.com/relaysh/relay/internal/takeover"
)

// The set crosses relay's exec of its next image (relay upgrade) as Saved:
// every socket, and the lock of every unix path, by fd number, which stay
// open across the exec, and what relay knows of each. Restore rebuilds the
// set from them without binding, storing or shutting anything down.

// SavedListener is one listener as it crosses the exec.
type SavedListener struct {
	// Name, Network, Address and NameGiven are its Spec.
	Name      string           `json:"name"`
	Network   sockaddr.Network `json:"network"`
	Address   string           `json:"address"`
	NameGiven bool             `json:"name_given"`
	// Addr is the bound address (Listener.Addr).
	Addr       string `json:"addr"`
	Origin     Origin `json:"origin"`
	PassedName string `json:"passed_name,omitempty"`
	// FD is relay's socket; -1 for a steered listener whose socket has
	// left its group.
	FD int `json:"fd"`
	// LockFD holds the lock on a unix path's PATH.lock; -1 for none.
	LockFD int `json:"lock_fd"`
	// Dev and Ino are those of the unix socket file Close removes; 0 to
	// leave it.
	Dev    uint64 `json:"dev"`
	Ino    uint64 `json:"ino"`
	Stored bool   `json:"stored"`
	// Holders are the generations holding the shared socket; Fresh those
	// whose member of the group no generation had before them.
	Holders []int `json:"holders,omitempty"`
	Fresh   []int `json:"fresh,omitempty"`
	// Group is the steering group of a TCP listener; UDP that of a UDP
	// one, whose first socket is FD. Both nil for a shared socket.
	Group *steer.Saved    `json:"group,omitempty"`
	UDP   *udpsteer.Saved `json:"udp,omitempty"`
}

// Saved is the set as it crosses the exec.
type Saved struct {
	Listeners []SavedListener `json:"listeners"`
	// Migrates is Set.Migrates.
	Migrates bool `json:"migrates"`
}

// fds are the fds of l that must cross the exec, each once.
func (l SavedListener) fds() []int {
	var fds []int
	if l.FD >= 0 {
		fds = append(fds, l.FD)
	}
	if l.LockFD >= 0 {
		fds = append(fds, l.LockFD)
	}
	if l.Group != nil {
		for _, fd := range l.Group.FDs() {
			if fd != l.FD {
				fds = append(fds, fd)
			}
		}
	}
	if l.UDP != nil {
		for _, fd := range l.UDP.FDs() {
			if fd != l.FD {
				fds = append(fds, fd)
			}
		}
	}
	return fds
}

// Save returns the set as it is, for the exec, and every fd that must
// cross it: the sockets, the groups' sockets and the unix paths' locks.
// The fds stay open and the set's; nothing about them changes (no flag is
// read through os.File.Fd). Call it while no generation starts or ends.
func (s *Set) Save() (Saved, []int, error) {
	out := Saved{Migrates: s.migrates}
	var fds []int
	for _, e := range s.entries {
		l, err := s.saveEntry(e)
		if err != nil {
			return Saved{}, nil, fmt.Errorf("saving listener %s: %w", e.Listener.Spec.Name, err)
		}
		out.Listeners = append(out.Listeners, l)
		fds = append(fds, l.fds()...)
	}
	return out, fds, nil
}

// saveEntry saves one listener.
func (s *Set) saveEntry(e *entry) (SavedListener, error) {
	l := e.Listener
	out := SavedListener{Name: l.Spec.Name, Network: l.Spec.Network, Address: l.Spec.Address, NameGiven: l.Spec.NameGiven,
		Addr: l.Addr, Origin: l.Origin, PassedName: l.PassedName, FD: -1, LockFD: -1, Dev: l.dev, Ino: l.ino, Stored: e.Stored}
	var err error
	if e.Group != nil {
		// The listener's socket is the group's original, or closed.
		g, gerr := e.Group.Save()
		out.Group, out.FD, err = &g, g.Original(), gerr
	} else {
		out.FD, err = fileFD(l.file)
	}
	if err == nil && e.UDP != nil {
		var g udpsteer.Saved
		if g, err = e.UDP.Save(); err == nil {
			out.UDP = &g
		}
	}
	if err == nil && l.lock != nil {
		out.LockFD, err = fileFD(l.lock)
	}
	if err != nil {
		return SavedListener{}, err
	}
	s.mu.Lock()
	out.Holders, out.Fresh = gens(e.holders), gens(e.fresh)
	s.mu.Unlock()
	return out, nil
}

// gens are the generations whose first copy m marks true, in order.
func gens(m map[copyKey]bool) []int {
	var out []int
	for k, on := range m {
		if on && k.worker == 0 {
			out = append(out, k.gen)
		}
	}
	slices.Sort(out)
	return out
}

// fileFD returns f's descriptor without os.File.Fd, which could change
// its file status flags.
func fileFD(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("reaching %s: %w", f.Name(), err)
	}
	n := -1
	if err := rc.Control(func(fd uintptr) { n = int(fd) }); err != nil {
		return -1, fmt.Errorf("reaching %s: %w", f.Name(), err)
	}
	return n, nil
}

// Restore rebuilds the set an earlier image saved, from the fds saved
// names, which it takes: no socket is bound, stored in systemd's fd store,
// shut down, closed or given to a generation, and no flag changes. It
// opens the drain observer anew where a listener is steered, as Open does.
// Of opts, only Log is used: the listeners are those saved.
//
// Every fd is checked, by reading it, before any is taken: on such an
// error, every fd is left open and untouched, for the return to the
// earlier image.
func Restore(saved Saved, opts Options) (*Set, error) {
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	addrs, err := saved.check()
	if err != nil {
		return nil, fmt.Errorf("restoring relay's listeners: %w", err)
	}
	s := &Set{log: log, migrates: saved.Migrates}
	for i, l := range saved.Listeners {
		e, err := restoreEntry(l, addrs[i], log)
		if err != nil {
			// Check passed: only a socket changed meanwhile fails here.
			return nil, fmt.Errorf("restoring relay's listeners: %s: %w", l.Name, err)
		}
		s.entries = append(s.entries, e)
	}
	if len(s.steered()) > 0 {
		s.observe()
	}
	return s, nil
}

// check checks every listener of saved (see checkListener), and that no
// fd is named twice. It returns the listeners' addresses. It only reads.
func (saved Saved) check() ([]addr, error) {
	seen := map[int]bool{}
	addrs := make([]addr, len(saved.Listeners))
	for i, l := range saved.Listeners {
		for _, fd := range l.fds() {
			if seen[fd] {
				return nil, fmt.Errorf("fd %d is named twice", fd)
			}
			seen[fd] = true
		}
		a, err := l.check()
		if err != nil {
			return nil, fmt.Errorf("listener %s: %w", l.Name, err)
		}
		addrs[i] = a
	}
	return addrs, nil
}

// check checks that l's fds are what it says: its socket one of its
// network listening on Addr, its group's sockets a group on that address
// with the socket as its original, its lock a file. It returns l's
// address as Claim compares it.
func (l SavedListener) check() (addr, error) {
	fd := l.FD
	if l.Group != nil {
		if l.Network != sockaddr.TCP {
			return addr{}, fmt.Errorf("a steering group on a %s listener", l.Network)
		}
		if err := l.Group.Check(); err != nil {
			return addr{}, err
		}
		if orig := l.Group.Original(); orig != l.FD {
			return addr{}, fmt.Errorf("its socket is fd %d, but its group's original is fd %d", l.FD, orig)
		}
		fd = l.Group.Members[0].FD
	}
	if l.UDP != nil {
		if l.Network != sockaddr.UDP {
			return addr{}, fmt.Errorf("a UDP steering group on a %s listener", l.Network)
		}
		if err := l.UDP.Check(); err != nil {
			return addr{}, err
		}
	}
	a, err := checkSocket(fd, l.Network, l.Addr)
	if err != nil {
		return addr{}, fmt.Errorf("fd %d: %w", fd, err)
	}
	if l.LockFD >= 0 {
		if l.Network != sockaddr.Unix {
			return addr{}, fmt.Errorf("a lock on a %s listener", l.Network)
		}
		var st unix.Stat_t
		if err := unix.Fstat(l.LockFD, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
			return addr{}, fmt.Errorf("lock fd %d is not an open file (%v)", l.LockFD, err)
		}
	}
	return a, nil
}

// checkSocket checks that fd is a socket of network bound to boundAddr,
// and listening if it is a stream, and returns its address.
func checkSocket(fd int, network sockaddr.Network, boundAddr string) (addr, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return addr{}, fmt.Errorf("reading the socket type: %w", err)
	}
	want := unix.SOCK_STREAM
	if network == sockaddr.UDP {
		want = unix.SOCK_DGRAM
	}
	if typ != want {
		return addr{}, fmt.Errorf("a %s socket, not a %s one", typeName(typ), network)
	}
	if typ == unix.SOCK_STREAM {
		if on, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || on == 0 {
			return addr{}, errors.New("not a listening socket")
		}
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return addr{}, fmt.Errorf("reading the socket's address: %w", err)
	}
	if got := sockaddr.String(sa); got != boundAddr {
		return addr{}, fmt.Errorf("bound to %s, not %s", got, boundAddr)
	}
	a := addr{network: network}
	if network == sockaddr.Unix {
		a.path = boundAddr
		a.dir, _ = takeover.DirID(boundAddr) // zero: compare paths as strings
		return a, nil
	}
	if a.ip, err = sockaddr.Read(fd); err != nil {
		return addr{}, err
	}
	return a, nil
}

// typeName names a socket type for a message.
func typeName(typ int) string {
	switch typ {
	case unix.SOCK_STREAM:
		return "stream"
	case unix.SOCK_DGRAM:
		return "datagram"
	}
	return fmt.Sprintf("type %d", typ)
}

// restoreEntry makes the entry of a listener l.check passed, its address
// a: it wraps the fds, or restores the group, whose original is the
// listener's socket.
func restoreEntry(l SavedListener, a addr, log *slog.Logger) (*entry, error) {
	spec := Spec{Name: l.Name, Network: l.Network, Address: l.Address, NameGiven: l.NameGiven}
	ln := &Listener{Spec: spec, Addr: l.Addr, Origin: l.Origin, PassedName: l.PassedName, dev: l.Dev, ino: l.Ino}
	e := &entry{Listener: ln, Stored: l.Stored, holders: marks(l.Holders), fresh: marks(l.Fresh), addr: a}
	if l.Group != nil {
		g, err := steer.Restore(spec.Name, *l.Group, log)
		if err != nil {
			return nil, err
		}
		e.Group, ln.file = g, g.Original()
	} else {
		// Blocking and outside Go's poller as relay made it, or, made
		// non-blocking by a bind takeover, in the poller; os.NewFile
		// changes neither, and no Fd call follows.
		ln.file = os.NewFile(uintptr(l.FD), spec.String())
	}
	if l.UDP != nil {
		g, err := udpsteer.Restore(*l.UDP, log)
		if err != nil {
			return nil, err
		}
		e.UDP = g
	}
	if l.LockFD >= 0 {
		ln.lock = os.NewFile(uintptr(l.LockFD), l.Addr+".lock")
	}
	return e, nil
}

// marks is the set of the first copies of gens.
func marks(gens []int) map[copyKey]bool {
	m := make(map[copyKey]bool, len(gens))
	for _, gen := range gens {
		m[copyKey{gen: gen}] = true
	}
	return m
}

// Settle closes what Restore kept of the earlier image for the way back
// of a failed upgrade (the UDP groups' program and map fds), once relay
// stays this image.
func (s *Set) Settle() {
	for _, g := range s.udp() {
		g.Settle()
	}
}

// Held returns the sockets copy worker of generation gen took (Take) and
// still holds, in fd order, as Take returned them: for a generation an
// earlier image started, once Restore has rebuilt the set. Nothing is taken
// anew.
func (s *Set) Held(gen, worker int) ([]*os.File, error) {
	files := make([]*os.File, len(s.entries))
	for i, e := range s.entries {
		if e.Group != nil {
			files[i] = e.Group.Held(gen, worker)
		} else if e.UDP != nil {
			files[i] = e.UDP.Held(gen)
		} else {
			s.mu.Lock()
			if e.holders[copyKey{gen, worker}] {
				files[i] = e.Listener.File()
			}
			s.mu.Unlock()
		}
		if files[i] == nil {
			return nil, fmt.Errorf("generation %d holds no socket of %s", gen, e.Listener.Spec.Name)
		}
	}
	return files, nil
}
