package udpsteer

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
)

// savedVersion numbers Saved's layout and the maps' (flowValue, the maps
// there are): a relay that finds another number after an exec knows it
// cannot use the group, and says so.
const savedVersion = 1

// Saved is a group as Save found it, to be given to Restore after relay
// execs itself (an upgrade): the kernel objects (sockets, maps, program)
// live on through file descriptors kept open across the exec, named here
// by number. It marshals to JSON.
type Saved struct {
	Version int          `json:"version"`
	Name    string       `json:"name"`
	Options SavedOptions `json:"options"`
	// Program is the steering program's fd; it is attached to the
	// kernel's reuseport group, which needs nothing from relay to keep it.
	Program      int       `json:"program"`
	Maps         SavedMaps `json:"maps"`
	Instructions int       `json:"instructions"`
	// Members are the sockets in the group's slots.
	Members []SavedMember `json:"members"`
	// Dirty are the slots flows may still name (see Group.dirty).
	Dirty []int `json:"dirty"`
	// Next is where the search for a free slot starts.
	Next int `json:"next"`
	// Serving is the serving socket's slot, -1 for none.
	Serving int `json:"serving"`
	// First is the slot of the socket New bound or FromFile was given,
	// -1 if it has left the group.
	First int `json:"first"`
	// Detach: the caller's socket (FromFile) is in the kernel's group;
	// Close takes the program off the group.
	Detach bool `json:"detach"`
}

// SavedOptions are the Options a group was made with, defaults applied.
type SavedOptions struct {
	Slots           int           `json:"slots"`
	MaxFlows        int           `json:"max_flows"`
	IdleTimeout     time.Duration `json:"idle_timeout"`
	QUIC            bool          `json:"quic"`
	QUICInitialIdle time.Duration `json:"quic_initial_idle"`
}

// SavedMaps are the fds of the program's maps.
type SavedMaps struct {
	Socks   int `json:"socks"`
	Serving int `json:"serving"`
	Flows   int `json:"flows"`
	Seen    int `json:"seen"`
	Retired int `json:"retired"`
}

// byName lists the fields with the names mapSpecs gives the maps.
func (s *SavedMaps) byName() []struct {
	name string
	fd   *int
} {
	return []struct {
		name string
		fd   *int
	}{{"socks", &s.Socks}, {"serving", &s.Serving}, {"flows", &s.Flows}, {"seen", &s.Seen}, {"retired", &s.Retired}}
}

// SavedMember is one socket of the group.
type SavedMember struct {
	FD   int `json:"fd"`
	Slot int `json:"slot"`
	// Gen is the generation using the socket; 0 when it is free.
	Gen int `json:"gen"`
	// Owned: the group's own socket. False: the caller's (FromFile's),
	// which the caller saves and restores on its own; FD is that socket
	// (the caller's fd, or Dup).
	Owned bool `json:"owned"`
	// Dup: FD is the group's duplicate of the caller's socket, which an
	// earlier Restore made, the group's to close.
	Dup     bool `json:"dup,omitempty"`
	Given   bool `json:"given"`
	Fresh   bool `json:"fresh"`
	Retired bool `json:"retired"`
}

// Save describes the group as it is, for Restore after an exec. Nothing is
// closed and no flag changes: the fds are close-on-exec, which the caller
// clears for the exec (FDs lists them). The group keeps working; the
// caller must not use it once it has exec'd.
func (g *Group) Save() (Saved, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return Saved{}, errors.New("steering group closed")
	}
	s := Saved{
		Version: savedVersion,
		Name:    g.name,
		Options: SavedOptions{
			Slots:           g.opts.Slots,
			MaxFlows:        g.opts.MaxFlows,
			IdleTimeout:     g.opts.IdleTimeout,
			QUIC:            g.opts.QUIC,
			QUICInitialIdle: g.opts.QUICInitialIdle,
		},
		Program:      g.prog.FD(),
		Instructions: g.insns,
		Next:         g.next,
		Serving:      -1,
		First:        -1,
		Detach:       g.detach,
	}
	m := g.maps.byName()
	for i, f := range s.Maps.byName() {
		*f.fd = (*m[i].m).FD()
	}
	for slot, m := range g.members {
		if m == nil {
			continue
		}
		s.Members = append(s.Members, SavedMember{
			FD:      m.fd,
			Slot:    slot,
			Gen:     m.gen,
			Owned:   !m.callers,
			Dup:     m.callers && m.owned,
			Given:   m.given,
			Fresh:   m.fresh,
			Retired: m.retired,
		})
		if m == g.serving {
			s.Serving = slot
		}
		if m == g.first {
			s.First = slot
		}
	}
	for slot, d := range g.dirty {
		if d {
			s.Dirty = append(s.Dirty, slot)
		}
	}
	return s, nil
}

// FDs lists every fd that must stay open across the exec, each once: the
// program's, the maps', and the members' (the caller's socket too, which
// the caller may list again on its own).
func (s Saved) FDs() []int {
	fds := []int{s.Program}
	for _, f := range s.Maps.byName() {
		fds = append(fds, *f.fd)
	}
	for _, m := range s.Members {
		fds = append(fds, m.FD)
	}
	slices.Sort(fds)
	return slices.Compact(fds)
}

// Restore rebuilds a group from s, after an exec: the sockets, maps and
// program are the kernel's same objects, which go on steering meanwhile.
// It checks what the fds are (the maps' types and sizes against s's
// options, the program's type and maps, each slot's socket) before it
// uses them.
//
// On success the group owns s's fds, except the caller's socket (a member
// not Owned and not Dup): it holds the program and the maps through
// close-on-exec duplicates and closes s's fds of them, and sets
// close-on-exec on the members' fds again, so that no child relay starts
// inherits them. The caller's socket it holds through a duplicate of its
// own: an *os.File of the caller's fd would close it when collected. On
// error it has closed none of s's fds, and the error says what failed.
func Restore(s Saved, log *slog.Logger) (*Group, error) {
	return restore(s, log, true)
}

// Check checks what Restore would: s's layout, options and every fd it
// names (map types and sizes, the program and its maps, each socket's
// address and its place in its slot), through duplicates it closes again.
// It takes nothing: s's fds stay open and unchanged, for a set that checks
// all of its listeners before it takes any.
func (s Saved) Check() error {
	_, err := restore(s, nil, false)
	return err
}

// restore is Restore, or with keep false Check.
func restore(s Saved, log *slog.Logger, keep bool) (*Group, error) {
	if s.Version != savedVersion {
		return nil, fmt.Errorf("udpsteer: restoring %s: saved by a relay of layout %d; this one knows %d", s.Name, s.Version, savedVersion)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	o := s.Options
	opts := Options{Name: s.Name, Log: log, Slots: o.Slots, MaxFlows: o.MaxFlows, IdleTimeout: o.IdleTimeout, QUIC: o.QUIC, QUICInitialIdle: o.QUICInitialIdle}
	fail := func(format string, a ...any) (*Group, error) {
		return nil, fmt.Errorf("udpsteer: restoring %s: "+format, append([]any{s.Name}, a...)...)
	}
	if o.Slots < 2 || o.MaxFlows < 1 || o.IdleTimeout <= 0 || o.QUICInitialIdle <= 0 {
		return fail("bad options: %d slots, %d flows, idle timeout %v, QUIC Initial idle %v", o.Slots, o.MaxFlows, o.IdleTimeout, o.QUICInitialIdle)
	}
	if s.Next < 0 || s.Next >= o.Slots {
		return fail("next slot %d out of %d", s.Next, o.Slots)
	}
	g := &Group{name: s.Name, log: log, opts: opts, insns: s.Instructions, members: make([]*member, o.Slots), dirty: make([]bool, o.Slots), next: s.Next, detach: s.Detach}

	// The members, from the saved numbers; files come last, once nothing
	// can fail.
	gens := map[int]bool{}
	for _, sm := range s.Members {
		switch {
		case sm.Slot < 0 || sm.Slot >= o.Slots:
			return fail("member fd %d: slot %d out of %d", sm.FD, sm.Slot, o.Slots)
		case g.members[sm.Slot] != nil:
			return fail("two members in slot %d", sm.Slot)
		case sm.FD < 0:
			return fail("slot %d: bad fd %d", sm.Slot, sm.FD)
		case sm.Gen < 0 || (sm.Gen != 0 && gens[sm.Gen]):
			return fail("slot %d: bad generation %d (negative, or another slot's)", sm.Slot, sm.Gen)
		case sm.Owned && sm.Dup:
			return fail("slot %d: a duplicate of the caller's socket cannot be the group's own", sm.Slot)
		}
		gens[sm.Gen] = sm.Gen != 0
		g.members[sm.Slot] = &member{fd: sm.FD, slot: uint32(sm.Slot), gen: sm.Gen, owned: sm.Owned || sm.Dup, callers: !sm.Owned, given: sm.Given, fresh: sm.Fresh, retired: sm.Retired}
	}
	if s.Serving < 0 || s.Serving >= o.Slots || g.members[s.Serving] == nil {
		return fail("the serving slot %d has no member", s.Serving)
	}
	g.serving = g.members[s.Serving]
	if s.First >= 0 {
		if s.First >= o.Slots || g.members[s.First] == nil {
			return fail("the first socket's slot %d has no member", s.First)
		}
		g.first = g.members[s.First]
	}
	for _, slot := range s.Dirty {
		if slot < 0 || slot >= o.Slots {
			return fail("dirty slot %d out of %d", slot, o.Slots)
		}
		g.dirty[slot] = true
	}
	if err := g.inspect(g.serving.fd); err != nil {
		return fail("the serving socket, fd %d: %w", g.serving.fd, err)
	}
	if g.name == "" {
		g.name = sockaddr.String(g.sa)
	}
	for _, m := range g.members {
		if m == nil || m == g.serving {
			continue
		}
		if err := g.sameSocket(m.fd); err != nil {
			return fail("slot %d, fd %d: %w", m.slot, m.fd, err)
		}
	}

	// The maps and the program, through duplicates: cilium's *FromFD
	// take the fd they are given, and close it when it is not what they
	// expect.
	ok := false
	g.maps = &maps{}
	var dups []int // duplicates of the caller's socket
	defer func() {
		if !ok {
			g.maps.close()
			if g.prog != nil {
				g.prog.Close()
			}
			for _, fd := range dups {
				unix.Close(fd)
			}
		}
	}()
	specs := mapSpecs(o.Slots, o.MaxFlows)
	saved := s.Maps.byName()
	for i, nm := range g.maps.byName() {
		fd := *saved[i].fd
		if err := isBPF(fd, "bpf-map"); err != nil {
			return fail("the %s map, fd %d: %w", nm.name, fd, err)
		}
		dup, err := dupCloexec(fd)
		if err != nil {
			return fail("the %s map, fd %d: %w", nm.name, fd, err)
		}
		mp, err := ebpf.NewMapFromFD(dup)
		if err != nil {
			return fail("the %s map, fd %d: %w", nm.name, fd, err)
		}
		*nm.m = mp
		want := specs[nm.name]
		if mp.Type() != want.Type || mp.KeySize() != want.KeySize || mp.ValueSize() != want.ValueSize || mp.MaxEntries() != want.MaxEntries {
			return fail("the %s map, fd %d: type %s, %d entries, key %d, value %d bytes; want %s, %d, %d, %d", nm.name, fd,
				mp.Type(), mp.MaxEntries(), mp.KeySize(), mp.ValueSize(), want.Type, want.MaxEntries, want.KeySize, want.ValueSize)
		}
	}
	if err := isBPF(s.Program, "bpf-prog"); err != nil {
		return fail("the program, fd %d: %w", s.Program, err)
	}
	dup, err := dupCloexec(s.Program)
	if err != nil {
		return fail("the program, fd %d: %w", s.Program, err)
	}
	if g.prog, err = ebpf.NewProgramFromFD(dup); err != nil {
		return fail("the program, fd %d: %w", s.Program, err)
	}
	if g.prog.Type() != ebpf.SkReuseport {
		return fail("the program, fd %d: a %s program, not SK_REUSEPORT", s.Program, g.prog.Type())
	}
	if err := g.checkProgramMaps(); err != nil {
		return fail("the program, fd %d: %w", s.Program, err)
	}
	// Each slot of socks holds its member's socket: the kernel gives a
	// socket's cookie for it.
	for _, m := range g.members {
		if m == nil {
			continue
		}
		var inMap uint64
		if err := g.maps.socks.Lookup(m.slot, &inMap); err != nil {
			return fail("slot %d of the socket map: %w", m.slot, err)
		}
		cookie, err := unix.GetsockoptUint64(m.fd, unix.SOL_SOCKET, unix.SO_COOKIE)
		if err != nil {
			return fail("slot %d, fd %d: reading the socket's cookie: %w", m.slot, m.fd, err)
		}
		if cookie != inMap {
			return fail("slot %d: the socket map holds another socket than fd %d", m.slot, m.fd)
		}
	}
	// The maps agree with s on the serving slot and the retired ones.
	var serving uint32
	if err := g.maps.serving.Lookup(uint32(0), &serving); err != nil {
		return fail("reading the serving map: %w", err)
	}
	if serving != g.serving.slot {
		return fail("the serving map names slot %d, not %d", serving, g.serving.slot)
	}
	for _, m := range g.members {
		if m == nil {
			continue
		}
		var retired uint32
		if err := g.maps.retired.Lookup(m.slot, &retired); err != nil {
			return fail("reading slot %d of the retired map: %w", m.slot, err)
		}
		if (retired != 0) != m.retired {
			return fail("slot %d: retired %v in the map, %v in the saved group", m.slot, retired != 0, m.retired)
		}
	}
	// The caller's socket (not the group's, and not yet duplicated),
	// through a duplicate of the group's own, close-on-exec already.
	for _, m := range g.members {
		if m == nil || m.owned {
			continue
		}
		fd, err := dupCloexec(m.fd)
		if err != nil {
			return fail("slot %d: the caller's socket, fd %d: %w", m.slot, m.fd, err)
		}
		m.fd, m.owned = fd, true
		dups = append(dups, fd)
	}

	if !keep {
		return nil, nil // the deferred cleanup closes what was made
	}
	// Nothing fails from here on.
	ok = true
	for _, m := range g.members {
		if m == nil {
			continue
		}
		// The exec cleared it; a child must not inherit the socket.
		unix.CloseOnExec(m.fd)
		m.file = os.NewFile(uintptr(m.fd), g.name)
	}
	// A probe the earlier image had under way when it exec'd left its
	// flow in the table: take it out, so that no client reusing that
	// loopback port later is sent to the probed generation. (Best effort:
	// an entry that stays expires with the idle timeout.)
	g.mu.Lock()
	g.unpinAllLocked()
	g.mu.Unlock()
	// The earlier image's fds of the program and the maps stay open until
	// Settle: an upgrade that fails after this returns to that image,
	// which needs them.
	g.settle = append(g.settle, s.Program)
	for _, f := range saved {
		g.settle = append(g.settle, *f.fd)
	}
	return g, nil
}

// Settle closes the fds of the program and maps that Restore took over
// from the earlier image (it works through duplicates of its own), once
// relay stays this image. Before, a failed upgrade hands them back.
func (g *Group) Settle() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, fd := range g.settle {
		unix.Close(fd)
	}
	g.settle = nil
}

// sameSocket checks that fd is a UDP socket on the group's address, as
// inspect found it on another.
func (g *Group) sameSocket(fd int) error {
	if t, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil {
		return fmt.Errorf("reading the socket type: %w", err)
	} else if t != unix.SOCK_DGRAM {
		return errors.New("not a UDP socket")
	}
	sock, err := sockaddr.Read(fd)
	if err != nil {
		return err
	}
	if sock != g.sock {
		return fmt.Errorf("a socket on %v (family %d, v6only %v), not on the group's %v (family %d, v6only %v)", sock.Addr, sock.Family, sock.V6Only, g.sock.Addr, g.sock.Family, g.sock.V6Only)
	}
	return nil
}

// checkProgramMaps checks that the program uses the group's maps, where
// the kernel says which maps a program uses (Linux 4.15+).
func (g *Group) checkProgramMaps() error {
	info, err := g.prog.Info()
	if err != nil {
		return fmt.Errorf("reading the program's info: %w", err)
	}
	ids, ok := info.MapIDs()
	if !ok {
		return nil
	}
	for _, nm := range g.maps.byName() {
		mi, err := (*nm.m).Info()
		if err != nil {
			return fmt.Errorf("reading the %s map's info: %w", nm.name, err)
		}
		id, ok := mi.ID()
		if !ok {
			return nil
		}
		if !slices.Contains(ids, id) {
			return fmt.Errorf("it does not use the %s map given (map id %d; it uses %v)", nm.name, id, ids)
		}
	}
	return nil
}

// isBPF checks that fd is a BPF object of the kind given (bpf-map,
// bpf-prog), where /proc tells: cilium's *FromFD read any BPF object's
// info as theirs, so that a map given as the program passes for a
// program of another type.
func isBPF(fd int, kind string) error {
	what, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	switch {
	case errors.Is(err, unix.ENOENT):
		return fmt.Errorf("no such fd: %w", unix.EBADF)
	case err != nil:
		return nil // no /proc: the checks after will do
	case what != "anon_inode:"+kind:
		return fmt.Errorf("it is %s, not %s", what, kind)
	}
	return nil
}

// dupCloexec duplicates fd, close-on-exec.
func dupCloexec(fd int) (int, error) {
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("duplicating fd %d: %w", fd, err)
	}
	return dup, nil
}
