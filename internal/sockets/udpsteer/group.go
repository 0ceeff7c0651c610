package udpsteer

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
	"github.com/relaysh/relay/internal/sockopt"
)

// Defaults of Options.
const (
	defaultSlots           = 16
	defaultMaxFlows        = 65536
	defaultIdleTimeout     = 30 * time.Second
	defaultQUICInitialIdle = 3 * time.Second
)

// Options tune New and FromFile.
type Options struct {
	// Name names the listener in errors and logs.
	Name string
	Log  *slog.Logger
	// Slots is how many sockets the group holds at most at once: one per
	// generation alive (serving, starting, draining). 16 by default.
	Slots int
	// MaxFlows bounds the flow table: 65536 by default, about 7.5 MiB of
	// kernel memory, preallocated (see the package doc).
	MaxFlows int
	// IdleTimeout: a flow silent for longer counts as new and goes to the
	// serving generation. 30 s by default (see the package doc).
	IdleTimeout time.Duration
	// QUIC: the program recognises QUIC v1 and v2 long-header packets
	// (it reads the first 5 payload bytes of every datagram): a flow
	// begun by one is a QUIC connection's, which stays with a retired
	// generation (Retire), and an Initial packet of a known flow counts as
	// a new flow once a short-header packet followed on it, or it was idle
	// for longer than QUICInitialIdle (3 s by default).
	// Off by default; relay turns it on.
	QUIC            bool
	QUICInitialIdle time.Duration
}

// member is one socket of the group.
type member struct {
	file *os.File
	fd   int
	slot uint32
	// gen is the generation using the socket; 0 when it is free.
	gen int
	// owned: Group closes the file. FromFile's socket belongs to its
	// caller.
	owned bool
	// callers: the socket is the caller's (FromFile's), or Restore's
	// duplicate of it (then owned): a copy of it outlives the group.
	callers bool
	// given: a generation has had the socket, so the next one to take
	// it is not the first to read from it.
	given bool
	// fresh is what Take told gen: no generation had the socket before.
	fresh bool
	// retired: Retire(gen); only QUIC connections' flows still reach it.
	retired bool
}

// Group is the reuseport group of one UDP listener, steered by flow.
type Group struct {
	name string
	log  *slog.Logger
	opts Options
	sa   unix.Sockaddr
	sock sockaddr.Socket

	mu      sync.Mutex
	maps    *maps
	prog    *ebpf.Program
	insns   int       // the program's length in 8-byte instructions
	members []*member // by slot; nil for a free slot
	// dirty: a socket had the slot since the last sweep, so flows may
	// still name it.
	dirty   []bool
	next    int     // where the search for a free slot starts
	serving *member // where new flows go
	// first is the socket New bound or FromFile was given: the program
	// was attached through it.
	first *member
	// detach: the caller's socket (FromFile) is in the kernel's group
	// and stays after Close, so Close takes the program off the group.
	detach bool
	// settle are fds of the earlier image's that Restore left open, for
	// Settle to close.
	settle []int
	closed bool
}

// New binds a UDP socket on addr (port 0 picks one) and makes it the first
// member of a group, for the first generation that asks. An unspecified
// IPv6 address makes a dual-stack socket, as relay's --listen :port does.
// The address must be free: a plain bind checks that first, so that the
// group never joins a reuseport group someone else made.
func New(addr netip.AddrPort, opts Options) (*Group, error) {
	family, sa, v6only := unix.AF_INET6, unix.Sockaddr(nil), true
	if a := addr.Addr().Unmap(); a.Is4() {
		family, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: a.As4(), Port: int(addr.Port())}
	} else {
		sa = &unix.SockaddrInet6{Addr: a.As16(), Port: int(addr.Port()), ZoneId: zone(a)}
		v6only = !a.IsUnspecified()
	}
	// The check: no SO_REUSEPORT, no SO_REUSEADDR (for UDP it would share
	// the address with any socket that has it).
	fd, err := socket(family, sockopt.Options{V6Only: v6only})
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("binding %s: %w", addr, err)
	}
	sa, err = unix.Getsockname(fd)
	unix.Close(fd)
	if err != nil {
		return nil, fmt.Errorf("reading the bound address: %w", err)
	}
	if fd, err = socket(family, sockopt.Options{ReusePort: true, V6Only: v6only}); err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("binding %s: %w", sockaddr.String(sa), err)
	}
	f := os.NewFile(uintptr(fd), sockaddr.String(sa))
	g, err := makeGroup(f, fd, true, opts)
	if err != nil {
		f.Close()
		return nil, err
	}
	return g, nil
}

func zone(a netip.Addr) uint32 {
	if a.Zone() == "" {
		return 0
	}
	ifi, err := net.InterfaceByName(a.Zone())
	if err != nil {
		return 0
	}
	return uint32(ifi.Index)
}

// FromFile makes the bound UDP socket f, which must have SO_REUSEPORT, the
// first member of a group, for the first generation that asks. f stays
// its caller's, who must keep it open until Close. A socket another process
// keeps a copy of (systemd's) stays in the kernel's group after its
// generation is released: the program no longer picks it.
func FromFile(f *os.File, opts Options) (*Group, error) {
	var fd int
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("reaching the socket: %w", err)
	}
	if err := rc.Control(func(x uintptr) { fd = int(x) }); err != nil {
		return nil, fmt.Errorf("reaching the socket: %w", err)
	}
	return makeGroup(f, fd, false, opts)
}

func makeGroup(f *os.File, fd int, owned bool, opts Options) (*Group, error) {
	if opts.Slots == 0 {
		opts.Slots = defaultSlots
	}
	if opts.MaxFlows == 0 {
		opts.MaxFlows = defaultMaxFlows
	}
	if opts.IdleTimeout == 0 {
		opts.IdleTimeout = defaultIdleTimeout
	}
	if opts.QUICInitialIdle == 0 {
		opts.QUICInitialIdle = defaultQUICInitialIdle
	}
	if opts.Slots < 2 || opts.MaxFlows < 1 || opts.IdleTimeout < 0 || opts.QUICInitialIdle < 0 {
		return nil, fmt.Errorf("udpsteer: bad options: %d slots, %d flows, idle timeout %v, QUIC Initial idle %v", opts.Slots, opts.MaxFlows, opts.IdleTimeout, opts.QUICInitialIdle)
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	g := &Group{name: opts.Name, log: log, opts: opts, members: make([]*member, opts.Slots), dirty: make([]bool, opts.Slots), next: 1}
	if err := g.inspect(fd); err != nil {
		return nil, err
	}
	if g.name == "" {
		g.name = sockaddr.String(g.sa)
	}
	m, err := newMaps(opts.Slots, opts.MaxFlows)
	if err != nil {
		return nil, err
	}
	g.maps = m
	prog, insns, err := load(m, programOptions{idle: opts.IdleTimeout, quic: opts.QUIC, quicIdle: opts.QUICInitialIdle})
	if err != nil {
		m.close()
		return nil, err
	}
	g.prog, g.insns = prog, int(insns.Size()/insnSize)

	g.mu.Lock()
	defer g.mu.Unlock()
	fail := func(err error) (*Group, error) {
		g.closeLocked()
		return nil, err
	}
	first := &member{file: f, fd: fd, slot: 0, owned: owned, callers: !owned}
	if err := g.placeLocked(first); err != nil {
		first.owned = false // the caller closes f on error
		return fail(err)
	}
	if err := g.serveLocked(first); err != nil {
		first.owned = false
		return fail(err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, prog.FD()); err != nil {
		first.owned = false
		return fail(fmt.Errorf("%s: attaching the steering program (SO_ATTACH_REUSEPORT_EBPF): %w", g.name, err))
	}
	g.first, g.detach = first, !owned
	// A trial member: it joins the kernel's group and a slot, gets
	// nothing (no flow names its slot), and leaves.
	trial, err := g.newMemberLocked()
	if err != nil {
		first.owned = false
		return fail(err)
	}
	g.removeLocked(trial)
	g.dirty[trial.slot] = false
	g.next = 1
	return g, nil
}

// insnSize is the size of one eBPF instruction; a 64-bit immediate load
// takes two.
const insnSize = 8

// inspect reads what a new member must copy from the first socket.
func (g *Group) inspect(fd int) error {
	if t, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil {
		return fmt.Errorf("reading the socket type: %w", err)
	} else if t != unix.SOCK_DGRAM {
		return errors.New("not a UDP socket")
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return fmt.Errorf("reading the socket's address: %w", err)
	}
	sock, err := sockaddr.Read(fd)
	if err != nil {
		return err
	}
	if sock.Addr.Port() == 0 {
		return errors.New("the UDP socket is not bound")
	}
	g.sa, g.sock = sa, sock
	if dev, err := unix.GetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE); err == nil && dev != "" {
		return fmt.Errorf("the socket is bound to device %s (BindToDevice=), which udpsteer does not copy", dev)
	}
	if on, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT); err != nil {
		return fmt.Errorf("reading SO_REUSEPORT: %w", err)
	} else if on == 0 {
		return errors.New("the socket was created without SO_REUSEPORT, so no other socket can join it (for a systemd socket unit, set ReusePort=yes)")
	}
	return nil
}

// Addr is the group's address.
func (g *Group) Addr() netip.AddrPort { return g.sock.Addr }

// Instructions is the length of the steering program, in 8-byte eBPF
// instructions.
func (g *Group) Instructions() int { return g.insns }

// socket makes a blocking, close-on-exec UDP socket with o set.
func socket(family int, o sockopt.Options) (int, error) {
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("creating a UDP socket: %w", err)
	}
	if err := sockopt.Set(fd, family, o); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// newMemberLocked creates a socket on the group's address, joins it to the
// kernel's group and puts it in a free slot. It gets no datagram until the
// group serves it, or a flow names its slot.
//
// No SO_REUSEADDR: UDP has no TIME_WAIT for it to help with, and on a UDP
// socket it lets any socket with it, of any user, bind the same address.
func (g *Group) newMemberLocked() (*member, error) {
	slot := -1
	for i := range g.members {
		s := (g.next + i) % len(g.members)
		if g.members[s] == nil {
			slot = s
			break
		}
	}
	if slot < 0 {
		return nil, fmt.Errorf("%s: no free slot: %d sockets in use (Options.Slots)", g.name, len(g.members))
	}
	fd, err := socket(g.sock.Family, sockopt.Options{ReusePort: true, V6Only: g.sock.V6Only})
	if err != nil {
		return nil, fmt.Errorf("a new socket for %s: %w", g.name, err)
	}
	if err := unix.Bind(fd, g.sa); err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.EADDRINUSE) {
			return nil, fmt.Errorf("joining the reuseport group of %s: %w (the socket belongs to another user, who alone may add sockets to it)", g.name, err)
		}
		return nil, fmt.Errorf("binding a new socket for %s: %w", g.name, err)
	}
	m := &member{file: os.NewFile(uintptr(fd), g.name), fd: fd, slot: uint32(slot), owned: true}
	if g.dirty[slot] {
		if err := g.sweepLocked(uint32(slot)); err != nil {
			m.file.Close()
			return nil, err
		}
	}
	if err := g.placeLocked(m); err != nil {
		m.file.Close()
		return nil, err
	}
	g.next = slot + 1
	return m, nil
}

// placeLocked puts m's socket in its slot of socks, not retired, and
// starts its idle clock.
func (g *Group) placeLocked(m *member) error {
	// Not retired: the slot's previous socket may have been.
	if err := g.maps.retired.Update(m.slot, uint32(0), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("%s: clearing slot %d of the retired map: %w", g.name, m.slot, err)
	}
	m.retired = false
	if err := g.maps.socks.Update(m.slot, uint64(m.fd), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("%s: putting a socket in slot %d of the REUSEPORT_SOCKARRAY: %w", g.name, m.slot, err)
	}
	if err := g.maps.seen.Update(m.slot, monotonic(), ebpf.UpdateAny); err != nil {
		g.maps.socks.Delete(m.slot)
		return fmt.Errorf("%s: starting slot %d's idle clock in the seen map: %w", g.name, m.slot, err)
	}
	g.members[m.slot] = m
	g.dirty[m.slot] = true
	return nil
}

// serveLocked sends new flows to m.
func (g *Group) serveLocked(m *member) error {
	if err := g.maps.serving.Update(uint32(0), m.slot, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("%s: setting the serving slot: %w", g.name, err)
	}
	g.serving = m
	return nil
}

// removeLocked takes m out of socks and closes relay's copy. The program
// no longer picks it; the kernel's group drops it when the last copy
// closes.
func (g *Group) removeLocked(m *member) {
	if err := g.maps.socks.Delete(m.slot); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		g.log.Warn("taking a socket out of the steering map", "listener", g.name, "slot", m.slot, "err", err)
	}
	g.members[m.slot] = nil
	if m.owned {
		m.file.Close()
	}
}

// Take returns the socket generation gen is to get: the serving socket if
// no generation has it (the first generation, or the replacement of a
// serving one that exited: the datagrams waiting in it are the new
// generation's), else a new socket in a free slot. It gets no new flow
// until Switch.
//
// fresh is true when no generation had the socket before: a new socket,
// or the group's first socket the first time it is taken. The serving
// socket taken again by a replacement is not fresh: datagrams (and
// flows) of the generation before may wait in it. Taking again for a
// generation that has a socket returns that socket and the same fresh.
func (g *Group) Take(gen int) (f *os.File, fresh bool, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, false, errors.New("steering group closed")
	}
	if gen == 0 {
		return nil, false, errors.New("generation 0 is no generation")
	}
	if m := g.memberLocked(gen); m != nil {
		return m.file, m.fresh, nil
	}
	m := g.serving
	if m == nil || m.gen != 0 {
		if m, err = g.newMemberLocked(); err != nil {
			return nil, false, err
		}
	}
	m.gen = gen
	m.fresh, m.given = !m.given, true
	return m.file, m.fresh, nil
}

// Held returns the socket generation gen took (Take) and still has, as
// Take returned it; nil where it has none. Nothing is taken anew: after
// Restore, it gives a generation the earlier image started its socket.
func (g *Group) Held(gen int) *os.File {
	g.mu.Lock()
	defer g.mu.Unlock()
	if m := g.memberLocked(gen); m != nil {
		return m.file
	}
	return nil
}

// Switch sends every new flow to generation gen's socket. Known flows stay
// where they are. A retired generation switched to is retired no more: a
// generation that serves takes every flow it is given.
func (g *Group) Switch(gen int) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return errors.New("steering group closed")
	}
	m := g.memberLocked(gen)
	if m == nil {
		return fmt.Errorf("%s: generation %d has no socket", g.name, gen)
	}
	if m.retired {
		if err := g.maps.retired.Update(m.slot, uint32(0), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("%s: clearing slot %d of the retired map: %w", g.name, m.slot, err)
		}
		m.retired = false
	}
	return g.serveLocked(m)
}

// ErrServes is Retire's error for the generation new flows go to.
var ErrServes = errors.New("a generation that serves cannot retire")

// Retire tells the group that generation gen is stopping (relay retires a
// generation when its drain ends, or at its stop signal). From then
// on a datagram of one of its flows counts as a new flow and goes to the
// serving generation, unless the flow is a QUIC connection's (Options.QUIC:
// begun by a QUIC long-header packet): those stay with gen until Release,
// Initials included (see the package doc). A stopping server stops reading
// plain UDP, which has no connection to finish; a QUIC server closes its
// connections gracefully.
//
// The serving generation cannot retire: Retire returns an error. A
// generation without a socket has nothing to retire: nil. Retiring twice
// is retiring once.
func (g *Group) Retire(gen int) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return errors.New("steering group closed")
	}
	m := g.memberLocked(gen)
	if m == nil || m.retired {
		return nil
	}
	if m == g.serving {
		return fmt.Errorf("%s: generation %d: %w", g.name, gen, ErrServes)
	}
	if err := g.maps.retired.Update(m.slot, uint32(1), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("%s: retiring slot %d (generation %d): %w", g.name, m.slot, gen, err)
	}
	m.retired = true
	return nil
}

// Queued is how many bytes wait unread in generation gen's socket, read
// with ioctl SIOCINQ through relay's copy of it. For UDP the kernel gives
// the size of the first waiting datagram only: 0 means nothing waits,
// except that a waiting datagram of zero bytes reads 0 too. It is 0 for a
// generation without a socket.
func (g *Group) Queued(gen int) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return 0, errors.New("steering group closed")
	}
	m := g.memberLocked(gen)
	if m == nil {
		return 0, nil
	}
	// m.fd, not m.file.Fd(): Fd would put the socket in blocking mode,
	// a flag every holder of the socket shares (it is blocking already,
	// but FromFile's caller may hand over a socket in any mode).
	n, err := unix.IoctlGetInt(m.fd, unix.SIOCINQ)
	if err != nil {
		return 0, fmt.Errorf("%s: reading what waits in generation %d's socket (SIOCINQ): %w", g.name, gen, err)
	}
	return n, nil
}

// Release tells the group that generation gen has exited. Its socket
// leaves the steering map and relay's copy is closed (FromFile's socket
// stays its caller's): its flows count as new at their next datagram and
// go to the serving generation. The serving generation's socket stays, to
// queue datagrams for the next generation to Take.
func (g *Group) Release(gen int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	m := g.memberLocked(gen)
	if m == nil {
		return
	}
	m.gen = 0
	if m != g.serving {
		g.removeLocked(m)
	}
}

// Idle is how long ago the last datagram was steered to generation gen's
// socket, or it was taken if none was since (to the millisecond). It is 0
// for a generation without a socket.
func (g *Group) Idle(gen int) time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	m := g.memberLocked(gen)
	if m == nil {
		return 0
	}
	var last uint64
	if err := g.maps.seen.Lookup(m.slot, &last); err != nil {
		return 0
	}
	if d := int64(monotonic() - last); d > 0 {
		return time.Duration(d)
	}
	return 0
}

// Flows counts the flows each generation has: those that sent a datagram
// within the idle timeout. A free serving socket's are counted under 0;
// flows whose socket has left, and a retired generation's flows that are
// not QUIC connections', are not counted (they will go to the serving
// generation).
func (g *Group) Flows() map[int]int {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := map[int]int{}
	if g.closed {
		return out
	}
	now := monotonic()
	idle := uint64(g.opts.IdleTimeout)
	err := g.eachFlowLocked(func(_ flowKey, v flowValue) {
		if v.Last < now && now-v.Last > idle {
			return
		}
		if int(v.Slot) >= len(g.members) {
			return
		}
		if v.Flags&flagProbe != 0 {
			return // relay's own readiness probe
		}
		if m := g.members[v.Slot]; m != nil && (!m.retired || v.Flags&flagQUIC != 0) {
			out[m.gen]++
		}
	})
	if err != nil {
		g.log.Warn("reading the flow table", "listener", g.name, "err", err)
	}
	return out
}

// Handshakes counts generation gen's QUIC connections whose handshake is in
// progress: flows begun by a QUIC long-header packet that no short-header
// packet has followed yet, and that sent a datagram within
// Options.QUICInitialIdle (an older one is an abandoned handshake). 0
// without Options.QUIC, or for a generation without a socket.
func (g *Group) Handshakes(gen int) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	m := g.memberLocked(gen)
	if m == nil || g.closed || !g.opts.QUIC {
		return 0, nil
	}
	now := monotonic()
	idle := uint64(g.opts.QUICInitialIdle)
	n := 0
	err := g.eachFlowLocked(func(_ flowKey, v flowValue) {
		if v.Slot != m.slot || v.Flags&(flagQUIC|flagEstablished|flagProbe) != flagQUIC {
			return
		}
		if v.Last < now && now-v.Last > idle {
			return
		}
		n++
	})
	if err != nil {
		return 0, fmt.Errorf("%s: reading the flow table: %w", g.name, err)
	}
	return n, nil
}

// Close closes the sockets and the maps Group made, and takes the program
// off the caller's socket.
func (g *Group) Close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closeLocked()
}

func (g *Group) closeLocked() {
	if g.closed {
		return
	}
	g.closed = true
	if g.detach && g.serving != nil {
		// The caller's socket stays: take the program off its group
		// (Linux 5.8+). Before, the program stays until the group's
		// last socket closes, and hands everything to the kernel's hash
		// once the sockets Group made are gone. Any socket of the group
		// reaches it; the serving one is always open.
		unix.SetsockoptInt(g.serving.fd, unix.SOL_SOCKET, unix.SO_DETACH_REUSEPORT_BPF, 0)
	}
	for _, m := range g.members {
		if m != nil && m.owned {
			m.file.Close()
		}
	}
	g.members = nil
	if g.prog != nil {
		g.prog.Close()
	}
	if g.maps != nil {
		g.maps.close()
	}
}

func (g *Group) memberLocked(gen int) *member {
	if gen == 0 {
		return nil // 0 marks the free sockets
	}
	for _, m := range g.members {
		if m != nil && m.gen == gen {
			return m
		}
	}
	return nil
}

// sweepLocked deletes the flows that name slot, before a new socket takes
// it: a flow of the socket that left would otherwise reach the newcomer.
// No flow can name the slot meanwhile: the program inserts the serving
// slot only, and an empty slot never serves.
func (g *Group) sweepLocked(slot uint32) error {
	var stale []flowKey
	if err := g.eachFlowLocked(func(k flowKey, v flowValue) {
		if v.Slot == slot {
			stale = append(stale, k)
		}
	}); err != nil {
		return fmt.Errorf("%s: reading the flow table: %w", g.name, err)
	}
	for _, k := range stale {
		if err := g.maps.flows.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("%s: deleting a stale flow: %w", g.name, err)
		}
	}
	g.dirty[slot] = false
	return nil
}

// eachFlowLocked calls fn for every entry of the flow table: in batches
// (Linux 5.6+), else by iteration.
func (g *Group) eachFlowLocked(fn func(flowKey, flowValue)) error {
	const batch = 512 // 26 KiB of buffers
	keys := make([]flowKey, batch)
	vals := make([]flowValue, batch)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := g.maps.flows.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			fn(keys[i], vals[i])
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, unix.EINVAL) {
			if n == 0 {
				break // no batch operations: iterate
			}
		}
		if err != nil {
			return err
		}
	}
	var k flowKey
	var v flowValue
	it := g.maps.flows.Iterate()
	for it.Next(&k, &v) {
		fn(k, v)
	}
	return it.Err()
}

// monotonic is CLOCK_MONOTONIC in nanoseconds: the clock of
// bpf_ktime_get_ns.
func monotonic() uint64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}
