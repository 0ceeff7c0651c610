package steer

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
)

// A group crosses relay's exec of its next image (relay upgrade) as
// Saved: its sockets by fd number, which stay open across the exec, and
// the mirror of the kernel's array. The kernel's order cannot be read back,
// so the mirror is carried as it is, and Restore rebuilds the Group from it
// without binding, shutting down, closing or attaching anything: the
// program the earlier image attached stays attached.

// SavedMember is one socket of a saved group.
type SavedMember struct {
	FD int `json:"fd"`
	// Gen is the generation using it; 0 when it is free. Worker is which
	// of Gen's copies uses it.
	Gen    int  `json:"gen"`
	Worker int  `json:"worker,omitempty"`
	Pinned bool `json:"pinned"`
	Owned  bool `json:"owned"`
	Used   bool `json:"used"`
}

// Saved is a group as it crosses the exec.
type Saved struct {
	// Members are the group's sockets, in the kernel's order.
	Members []SavedMember `json:"members"`
	// Evicted are the sockets Evict took out while their generation
	// still holds them.
	Evicted []SavedMember `json:"evicted,omitempty"`
	// Active is the index in Members of the public target; Probe that of
	// the probe's target, -1 for none, and ProbeFrom the source address
	// the probe rule matches. Actives, when a generation's copies are the
	// targets, are their indexes by worker, Active the first of them (an
	// image that knows no Actives reads Active alone).
	Active    int    `json:"active"`
	Actives   []int  `json:"actives,omitempty"`
	Probe     int    `json:"probe"`
	ProbeFrom string `json:"probe_from,omitempty"`
}

// FDs are the fds of s's sockets: every one must cross the exec.
func (s Saved) FDs() []int {
	var fds []int
	for _, m := range s.all() {
		fds = append(fds, m.FD)
	}
	return fds
}

// Original is the fd of the socket the group was made from (see
// Group.Original); -1 once it has left.
func (s Saved) Original() int {
	for _, m := range s.all() {
		if !m.Owned {
			return m.FD
		}
	}
	return -1
}

// all are the members, then the evicted sockets.
func (s Saved) all() []SavedMember {
	return append(append([]SavedMember(nil), s.Members...), s.Evicted...)
}

// Save returns the group as it is, for the exec. The fds it names are the
// group's own copies, which stay open and the group's; nothing about the
// sockets changes.
func (g *Group) Save() (Saved, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return Saved{}, fmt.Errorf("saving the steering group of %s: closed", g.name)
	}
	s := Saved{Active: g.indexLocked(g.active[0]), Probe: -1}
	if len(g.active) > 1 {
		for _, m := range g.active {
			s.Actives = append(s.Actives, g.indexLocked(m))
		}
	}
	for _, m := range g.members {
		s.Members = append(s.Members, m.saved())
	}
	for _, m := range g.evicted {
		s.Evicted = append(s.Evicted, m.saved())
	}
	switch len(g.probes) {
	case 0:
	case 1:
		s.Probe, s.ProbeFrom = g.indexLocked(g.probes[0].m), g.probes[0].from.String()
	default:
		return Saved{}, fmt.Errorf("%s: %d readiness probes under way; an image carries at most one", g.name, len(g.probes))
	}
	return s, nil
}

// saved is m as it crosses the exec.
func (m *member) saved() SavedMember {
	return SavedMember{FD: m.fd, Gen: m.gen, Worker: m.worker, Pinned: m.pinned, Owned: m.owned, Used: m.used}
}

// Check reports whether Restore can rebuild a group from s: every member
// a listening TCP socket with SO_REUSEPORT on one address, every evicted
// one a TCP socket of the same family, no socket twice, and targets and
// generations that make sense. It only reads the sockets.
func (s Saved) Check() error {
	_, err := s.check()
	return err
}

// check is Check; it returns a Group with no members, its address, family
// and backlog read from the first member.
func (s Saved) check() (*Group, error) {
	if len(s.Members) == 0 {
		return nil, errors.New("the saved group has no socket")
	}
	if err := s.checkTargets(); err != nil {
		return nil, err
	}
	var g *Group
	seen := map[uint64]int{} // inode: fd
	for i, m := range s.Members {
		x := &Group{}
		if err := x.inspect(m.FD); err != nil {
			return nil, fmt.Errorf("member %d (fd %d): %w", i, m.FD, err)
		}
		if g == nil {
			g = x
		} else if x.sock != g.sock {
			return nil, fmt.Errorf("member %d (fd %d) listens on %v, member 0 on %v: not one group", i, m.FD, x.sock.Addr, g.sock.Addr)
		}
		if err := distinct(seen, m.FD); err != nil {
			return nil, err
		}
	}
	for i, m := range s.Evicted {
		if err := checkEvicted(m.FD, g.sock.Family); err != nil {
			return nil, fmt.Errorf("evicted socket %d (fd %d): %w", i, m.FD, err)
		}
		if err := distinct(seen, m.FD); err != nil {
			return nil, err
		}
	}
	return g, nil
}

// checkTargets checks the indexes, the probe's address, the generations
// and that only one socket, the original, is not the group's own.
func (s Saved) checkTargets() error {
	n := len(s.Members)
	if s.Active < 0 || s.Active >= n || s.Probe < -1 || s.Probe >= n {
		return fmt.Errorf("the saved group's targets (active %d, probe %d) are not among its %d sockets", s.Active, s.Probe, n)
	}
	for _, a := range s.Actives {
		if a < 0 || a >= n {
			return fmt.Errorf("the saved group's targets (actives %v) are not among its %d sockets", s.Actives, n)
		}
	}
	if len(s.Actives) > 0 && s.Actives[0] != s.Active {
		return fmt.Errorf("the saved group's first target %d is not its active %d", s.Actives[0], s.Active)
	}
	if s.Probe >= 0 {
		if _, err := netip.ParseAddrPort(s.ProbeFrom); err != nil {
			return fmt.Errorf("the saved group's probe source: %w", err)
		}
	}
	type copyKey struct{ gen, worker int }
	copies := map[copyKey]bool{}
	original := 0
	for _, m := range s.all() {
		k := copyKey{m.Gen, m.Worker}
		if m.Gen != 0 && copies[k] {
			return fmt.Errorf("the saved group gives generation %d, copy %d, two sockets", m.Gen, m.Worker)
		}
		copies[k] = m.Gen != 0
		if !m.Owned {
			original++
		}
	}
	for _, m := range s.Evicted {
		if m.Gen == 0 {
			return fmt.Errorf("the saved group has an evicted socket (fd %d) of no generation", m.FD)
		}
	}
	if original > 1 {
		return fmt.Errorf("the saved group has %d sockets it does not own; only the original may be", original)
	}
	return nil
}

// distinct checks that fd is a socket not seen before under another fd.
func distinct(seen map[uint64]int, fd int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("fd %d: %w", fd, err)
	}
	if prev, ok := seen[st.Ino]; ok {
		return fmt.Errorf("fds %d and %d are the same socket", prev, fd)
	}
	seen[st.Ino] = fd
	return nil
}

// checkEvicted checks that fd is a TCP socket of family, which Evict shut
// down: it listens no more.
func checkEvicted(fd, family int) error {
	if t, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil {
		return fmt.Errorf("reading the socket type: %w", err)
	} else if t != unix.SOCK_STREAM {
		return ErrNotStream
	}
	if d, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN); err != nil {
		return fmt.Errorf("reading the socket family: %w", err)
	} else if d != family {
		return fmt.Errorf("a socket of family %d in a group of family %d", d, family)
	}
	return nil
}

// Restore rebuilds the group name saved as s, from the fds s names, which
// it takes: the members in s's order, its targets, its evicted sockets.
// It changes nothing the kernel sees: no socket is bound, shut down,
// closed or has its flags changed, and the program stays as attached (the
// next change of target attaches it anew). On error (see Check), every fd
// is left open and untouched.
//
// The original socket's file (Original), if the group still has it, stays
// the caller's to close, as for New. log may be nil.
func Restore(name string, s Saved, log *slog.Logger) (*Group, error) {
	g, err := s.check()
	if err != nil {
		return nil, fmt.Errorf("restoring the steering group of %s: %w", name, err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	g.name, g.log = name, log
	for _, m := range s.Members {
		g.members = append(g.members, restoreMember(name, m))
	}
	for _, m := range s.Evicted {
		g.evicted = append(g.evicted, restoreMember(name, m))
	}
	g.active = []*member{g.members[s.Active]}
	if len(s.Actives) > 0 {
		g.active = nil
		for _, a := range s.Actives {
			g.active = append(g.active, g.members[a])
		}
	}
	if s.Probe >= 0 {
		g.probes = []probeTarget{{m: g.members[s.Probe], from: netip.MustParseAddrPort(s.ProbeFrom)}}
	}
	// applied stays nil: what the earlier image attached is not read
	// back, so the next applyLocked attaches whatever it computes.
	return g, nil
}

// restoreMember wraps a saved member's fd. os.NewFile leaves the flags
// alone: a socket a child made non-blocking joins Go's poller, but Fd
// then still leaves O_NONBLOCK as it is, since os did not set it.
func restoreMember(name string, m SavedMember) *member {
	return &member{file: os.NewFile(uintptr(m.FD), name), fd: m.FD, gen: m.Gen, worker: m.Worker, pinned: m.Pinned, owned: m.Owned, used: m.Used}
}

// Original returns the file of the socket the group was made from (New's
// f), while the group has it, in the group or evicted; nil once it has
// left. It is the caller's to close.
func (g *Group) Original() *os.File {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, m := range g.allLocked() {
		if !m.owned {
			return m.file
		}
	}
	return nil
}

// Held returns the socket copy worker of generation gen took (Take), in
// the group or evicted; nil where it holds none.
func (g *Group) Held(gen, worker int) *os.File {
	g.mu.Lock()
	defer g.mu.Unlock()
	if gen == 0 {
		return nil
	}
	for _, m := range g.allLocked() {
		if m.gen == gen && m.worker == worker {
			return m.file
		}
	}
	return nil
}

// allLocked are the members, then the evicted sockets.
func (g *Group) allLocked() []*member {
	return append(append([]*member(nil), g.members...), g.evicted...)
}

// Socket is where the group listens, and its sockets' family.
func (g *Group) Socket() sockaddr.Socket { return g.sock }
