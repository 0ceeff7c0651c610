// Package steer gives every generation its own listening socket in one
// SO_REUSEPORT group per TCP listener, and decides with a classic BPF
// program which of them the kernel hands each new connection.
//
// With one shared socket the old and the new generation both accept until
// the old one is told to stop, so a server that stops badly (Go's plain
// http.Server.Shutdown among them) drops the requests it accepted last.
// With a group, new connections go to the serving generation's socket only:
// the old generation gets nothing new after the switch, finishes what it
// has, and only then gets its stop signal.
//
// The program (SO_ATTACH_REUSEPORT_CBPF, Linux 4.5+, no privileges needed)
// returns an index into the group's socket array. The kernel appends a
// socket at listen(2) and, when one leaves, moves the last one into its
// slot; an index past the end falls back to hashing over all of them.
// Group keeps a mirror of that array and is the only one to change it: a
// socket leaves when Group shuts it down, never when the last process that
// holds a copy closes it, so the mirror never guesses.
//
// A generation may run several copies of its command (a worker pool), each
// with a socket of its own in the group (Take's worker). The serving
// generation's copies are then all public targets, and the program picks
// one for each new connection by a hash of its source address and port
// (program.go's spread), so that one client's connections spread too.
package steer

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"sync"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
	"github.com/relaysh/relay/internal/sockopt"
)

// member is one socket of the group.
type member struct {
	file *os.File
	fd   int
	// gen is the generation using the socket; 0 when it is free. worker
	// is which of gen's copies (--workers) uses it, from 0.
	gen    int
	worker int
	// pinned: never shut down, because another process (systemd's socket
	// unit or fd store) keeps a copy that must stay a working listener.
	pinned bool
	// owned: Group closes the file. The original socket's file belongs
	// to whoever passed it in, unless Group shuts it down.
	owned bool
	// used: some generation has had it. A used socket may still be held
	// by what that generation left behind.
	used bool
	// absent: its copy has exited while its generation lives on (Absent);
	// new connections go to the generation's other copies meanwhile.
	absent bool
}

// Group is the reuseport group of one listener.
type Group struct {
	name string
	log  *slog.Logger

	mu      sync.Mutex
	sa      unix.Sockaddr
	sock    sockaddr.Socket // where sa is, and the socket's family
	backlog int
	members []*member // in the kernel's order
	// active are where public connections go: one socket, or the
	// sockets of a generation's copies, by worker, over which the
	// program spreads them.
	active []*member
	// probes send the connections from one source each to one socket: the
	// readiness probes of copies, at most one rule per socket.
	probes  []probeTarget
	applied []bpf.Instruction // the program attached last
	// evicted are the sockets taken out of the group while their
	// generation still held them (Evict); relay's copy stays open until
	// Release.
	evicted []*member
	closed  bool
}

// Options tune New.
type Options struct {
	// Name names the listener in logs.
	Name string
	// Pin keeps the original socket in the group for the group's life:
	// set it when another process holds a copy that must go on working.
	Pin bool
	Log *slog.Logger
}

// ErrNotStream is returned by New for a socket that is not a listening
// TCP socket: UDP and unix sockets keep one shared socket.
var ErrNotStream = errors.New("not a listening TCP socket")

// New makes the listening TCP socket f the first member of a group, used
// by the first generation that asks. It attaches the steering program and
// checks that a second socket can join, so that a kernel or a setting that
// refuses steering is found now, not in the middle of a restart. f stays
// owned by the caller, who must keep it open until Close.
func New(f *os.File, opts Options) (*Group, error) {
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	g := &Group{name: opts.Name, log: log}
	first := &member{file: f, pinned: opts.Pin}
	if err := control(f, func(fd int) error { first.fd = fd; return g.inspect(fd) }); err != nil {
		return nil, err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.members = []*member{first}
	g.active = []*member{first}
	if err := g.applyLocked(); err != nil {
		return nil, err
	}
	// A trial member: it gets no connection (the program sends them all
	// to index 0) and, being last, leaves without moving anyone.
	m, err := g.newMemberLocked()
	if err != nil {
		return nil, err
	}
	g.removeLocked(m)
	return g, nil
}

// inspect reads what a new member must copy from the original socket.
func (g *Group) inspect(fd int) error {
	if t, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil {
		return fmt.Errorf("reading the socket type: %w", err)
	} else if t != unix.SOCK_STREAM {
		return ErrNotStream
	}
	if on, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || on == 0 {
		return ErrNotStream
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return fmt.Errorf("reading the socket's address: %w", err)
	}
	sock, err := sockaddr.Read(fd)
	if errors.Is(err, sockaddr.ErrNotIP) {
		return ErrNotStream
	} else if err != nil {
		return err
	}
	g.sa, g.sock = sa, sock
	if dev, err := unix.GetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE); err == nil && dev != "" {
		// A socket bound to a device would not share a group with new
		// sockets that are not, and those may need CAP_NET_RAW to be.
		return fmt.Errorf("the socket is bound to device %s (BindToDevice=), which relay does not copy", dev)
	}
	if on, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT); err != nil {
		return fmt.Errorf("reading SO_REUSEPORT: %w", err)
	} else if on == 0 {
		return errors.New("the socket was created without SO_REUSEPORT, so no other socket can join it (for a systemd socket unit, set ReusePort=yes)")
	}
	// For a listener, tcpi_sacked holds the backlog it was given.
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return fmt.Errorf("reading TCP_INFO: %w", err)
	}
	g.backlog = int(info.Sacked)
	return nil
}

// newMemberLocked creates a socket on the group's address and joins it to
// the group, as the last member. It receives nothing until the program
// names it.
func (g *Group) newMemberLocked() (*member, error) {
	fd, err := unix.Socket(g.sock.Family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("creating a socket for %s: %w", g.name, err)
	}
	ok := false
	defer func() {
		if !ok {
			unix.Close(fd)
		}
	}()
	if err := sockopt.Set(fd, g.sock.Family, sockopt.Options{ReuseAddr: true, ReusePort: true, V6Only: g.sock.V6Only}); err != nil {
		return nil, fmt.Errorf("a new socket for %s: %w", g.name, err)
	}
	if err := unix.Bind(fd, g.sa); err != nil {
		if errors.Is(err, unix.EADDRINUSE) {
			return nil, fmt.Errorf("joining the reuseport group of %s: %w (the socket belongs to another user, who alone may add sockets to it)", g.name, err)
		}
		return nil, fmt.Errorf("binding a new socket for %s: %w", g.name, err)
	}
	if err := unix.Listen(fd, g.backlog); err != nil {
		return nil, fmt.Errorf("listening on a new socket for %s: %w", g.name, err)
	}
	ok = true
	m := &member{file: os.NewFile(uintptr(fd), g.name), fd: fd, owned: true}
	g.members = append(g.members, m)
	return m, nil
}

// Take returns the socket copy worker (0 for the first or only one) of
// generation gen is to get. A free socket that is still a public target
// (its generation crashed, or none has used it yet) comes first: the
// connections waiting in it are the new generation's to serve. Then any
// other free socket, then a new one. A copy that has a socket already gets
// it again (a replacement of a copy that exited), with fresh false.
//
// fresh reports that no generation had the socket before, so that nothing
// but gen and relay holds it.
func (g *Group) Take(gen, worker int) (f *os.File, fresh bool, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, false, errors.New("steering group closed")
	}
	if gen == 0 || worker < 0 {
		return nil, false, fmt.Errorf("%s: no socket for generation %d, copy %d", g.name, gen, worker)
	}
	if m := g.copyLocked(gen, worker); m != nil {
		return m.file, false, nil
	}
	var m *member
	for _, x := range g.active {
		if x.gen == 0 {
			m = x
			break
		}
	}
	if m == nil {
		for _, x := range g.members {
			if x.gen == 0 {
				m = x
				break
			}
		}
	}
	if m == nil {
		if m, err = g.newMemberLocked(); err != nil {
			return nil, false, err
		}
	}
	m.gen, m.worker = gen, worker
	fresh = !m.used
	m.used = true
	return m.file, fresh, nil
}

// probeTarget is a probe rule: the connections from "from" go to m.
type probeTarget struct {
	m    *member
	from netip.AddrPort
}

// Switch sends every new connection to generation gen's sockets, spread
// over them by a hash of the connection where gen has several copies (those
// not Absent; all of them if every one is), and ends every probe rule.
func (g *Group) Switch(gen int) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	ms := g.targetsLocked(gen)
	if len(ms) == 0 {
		return fmt.Errorf("%s: generation %d has no socket", g.name, gen)
	}
	if err := g.retargetLocked(ms, nil); err != nil {
		return err
	}
	g.tidyLocked()
	return nil
}

// Copy names copy Worker of generation Gen.
type Copy struct{ Gen, Worker int }

// Spread sends every new connection to the sockets of copies, spread over
// them by a hash of the connection, whatever their generations: the
// traffic of a rolling restart, which moves from one generation's copies to
// the next one's a few at a time. Probe rules stay. A copy with no socket
// is an error, and the targets stay as they were.
func (g *Group) Spread(copies []Copy) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	var ms []*member
	for _, c := range copies {
		m := g.copyLocked(c.Gen, c.Worker)
		if m == nil {
			return fmt.Errorf("%s: generation %d, copy %d, has no socket", g.name, c.Gen, c.Worker)
		}
		ms = append(ms, m)
	}
	if len(ms) == 0 {
		return fmt.Errorf("%s: no copy to send connections to", g.name)
	}
	if err := g.retargetLocked(ms, g.probes); err != nil {
		return err
	}
	g.tidyLocked()
	return nil
}

// targetsLocked are the sockets of gen that new connections go to: those
// of its copies that are not absent, or, when every copy is, all of them,
// where connections then wait for the copies' replacements.
func (g *Group) targetsLocked(gen int) []*member {
	ms := g.copiesLocked(gen)
	present := slices.DeleteFunc(slices.Clone(ms), func(m *member) bool { return m.absent })
	if len(present) == 0 {
		return ms
	}
	return present
}

// Absent marks the socket of copy worker of generation gen absent (its
// copy exited; a replacement is to take it) or present again. An absent
// socket leaves the targets of new connections, unless it is the last one
// (connections then wait on it for the replacement); a socket present again
// joins them while they hold a socket of its generation. Either way the
// other targets stay, whatever their generations (a rolling restart's
// spread). The socket stays in the group: the connections queued on it wait
// there for the replacement, which Take gives the same socket. Switch reads
// the mark too. Nothing changes where the copy has no socket.
func (g *Group) Absent(gen, worker int, absent bool) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	m := g.copyLocked(gen, worker)
	if m == nil || m.absent == absent {
		return nil
	}
	m.absent = absent
	active := g.active
	switch {
	case absent && g.isActiveLocked(m) && len(g.active) > 1:
		active = slices.DeleteFunc(slices.Clone(g.active), func(a *member) bool { return a == m })
	case !absent && !g.isActiveLocked(m) && slices.ContainsFunc(g.active, func(a *member) bool { return a.gen == gen }):
		active = append(slices.Clone(g.active), m)
		slices.SortFunc(active, func(a, b *member) int { return cmp.Or(a.gen-b.gen, a.worker-b.worker) })
	default:
		return nil
	}
	if err := g.retargetLocked(active, g.probes); err != nil {
		m.absent = !absent
		return err
	}
	return nil
}

// Probe sends the connections from "from" to the socket of copy worker of
// generation gen, so that a readiness probe aimed at the public address
// reaches that copy and nothing else. It replaces the copy's earlier rule;
// the other copies' rules stay.
func (g *Group) Probe(gen, worker int, from netip.AddrPort) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	m := g.copyLocked(gen, worker)
	if m == nil {
		return fmt.Errorf("%s: generation %d, copy %d, has no socket (it has exited)", g.name, gen, worker)
	}
	if len(g.probes) >= maxSpread && !g.isProbeLocked(m) {
		return fmt.Errorf("%s: %d readiness probes at once, at most %d", g.name, len(g.probes), maxSpread)
	}
	probes := slices.DeleteFunc(slices.Clone(g.probes), func(p probeTarget) bool { return p.m == m })
	return g.retargetLocked(g.active, append(probes, probeTarget{m: m, from: from}))
}

// isProbeLocked reports whether some probe rule sends connections to m.
func (g *Group) isProbeLocked(m *member) bool {
	return slices.ContainsFunc(g.probes, func(p probeTarget) bool { return p.m == m })
}

// retargetLocked points public connections at active and those of each
// probe rule at its socket, and attaches the program for it. If the kernel
// refuses it, the targets stay as they were.
func (g *Group) retargetLocked(active []*member, probes []probeTarget) error {
	prevActive, prevProbes := g.active, g.probes
	g.active, g.probes = active, probes
	if err := g.applyLocked(); err != nil {
		g.active, g.probes = prevActive, prevProbes
		return err
	}
	return nil
}

// Release tells the group that generation gen has exited, all its copies.
// Its sockets leave the group, unless they are still public targets: then
// they keep queueing connections for the next generation to take. A socket
// Evict took out has left already: Release only closes relay's copy.
func (g *Group) Release(gen int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if gen == 0 {
		return // the mark of a free socket, no generation's
	}
	g.evicted = slices.DeleteFunc(g.evicted, func(m *member) bool {
		if m.gen == gen {
			m.file.Close()
			return true
		}
		return false
	})
	ms := g.copiesLocked(gen)
	if len(ms) == 0 {
		return
	}
	probes := len(g.probes)
	for _, m := range ms {
		m.gen, m.worker, m.absent = 0, 0, false
		g.probes = slices.DeleteFunc(g.probes, func(p probeTarget) bool { return p.m == m })
	}
	if len(g.probes) != probes {
		if err := g.applyLocked(); err != nil {
			g.log.Error("removing the probe rule", "listener", g.name, "err", err)
		}
	}
	g.tidyLocked()
}

// Close closes the sockets Group created. The original stays with its
// owner.
func (g *Group) Close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closed = true
	for _, m := range g.members {
		if m.owned {
			m.file.Close()
		}
	}
	for _, m := range g.evicted {
		m.file.Close()
	}
	g.members, g.evicted = nil, nil
}

// copiesLocked are generation gen's sockets in the group, by worker; none
// for gen 0, the mark of the free ones.
func (g *Group) copiesLocked(gen int) []*member {
	if gen == 0 {
		return nil
	}
	var ms []*member
	for _, m := range g.members {
		if m.gen == gen {
			ms = append(ms, m)
		}
	}
	slices.SortFunc(ms, func(a, b *member) int { return a.worker - b.worker })
	return ms
}

// copyLocked is the socket of copy worker of generation gen in the group,
// or nil.
func (g *Group) copyLocked(gen, worker int) *member {
	for _, m := range g.copiesLocked(gen) {
		if m.worker == worker {
			return m
		}
	}
	return nil
}

func (g *Group) indexLocked(m *member) int { return slices.Index(g.members, m) }

// isActiveLocked reports whether m is a public target.
func (g *Group) isActiveLocked(m *member) bool { return slices.Contains(g.active, m) }

// applyLocked attaches the program that matches the active and probe
// members' current indices, if it differs from the one attached. A probe
// rule whose socket is the one public target needs no rule.
func (g *Group) applyLocked() error {
	var rules []probeRule
	for _, p := range g.probes {
		if !(len(g.active) == 1 && p.m == g.active[0]) {
			rules = append(rules, probeRule{from: p.from, index: uint32(g.indexLocked(p.m))})
		}
	}
	active := make([]uint32, len(g.active))
	for i, m := range g.active {
		active[i] = uint32(g.indexLocked(m))
	}
	prog, err := program(active, rules...)
	if err != nil {
		return err
	}
	if slices.Equal(prog, g.applied) {
		return nil
	}
	if err := attach(g.members[0].fd, prog); err != nil {
		return err
	}
	g.applied = prog
	return nil
}

// tidyLocked shuts down the free sockets that can leave now.
func (g *Group) tidyLocked() {
	for again := true; again; {
		again = false
		for _, m := range g.members {
			if m.gen == 0 && !g.isActiveLocked(m) && !m.pinned && g.canRemoveLocked(m) {
				g.removeLocked(m)
				again = true
				break
			}
		}
	}
}

// canRemoveLocked reports whether m can leave without misdirecting a
// connection. Its leaving moves the last socket into its slot; that is
// harmless unless the program names the last socket. Then, until the
// program is rewritten, the old index is past the end and the kernel
// hashes over the group, which only lands right if every socket left is a
// public target and there is no probe rule. Otherwise m stays, free, until
// a later change.
func (g *Group) canRemoveLocked(m *member) bool {
	last := g.members[len(g.members)-1]
	if last == m || (!g.isActiveLocked(last) && !g.isProbeLocked(last)) {
		return true
	}
	if slices.ContainsFunc(g.probes, func(p probeTarget) bool { return !g.isActiveLocked(p.m) }) {
		return false
	}
	for _, x := range g.members {
		if x != m && !g.isActiveLocked(x) {
			return false
		}
	}
	return true
}

// removeLocked takes m out of the group for good and closes relay's copy.
func (g *Group) removeLocked(m *member) {
	queued, err := g.detachLocked(m)
	if err != nil {
		g.log.Warn("shutting down a retired socket", "listener", g.name, "err", err)
	}
	m.file.Close()
	if queued > 0 {
		g.log.Warn("a retired socket still had connections queued", "listener", g.name, "queued", queued)
	}
}

// detachLocked takes m out of the group: shutdown(2) on a listening socket
// unhashes it at once, whoever else holds a copy. Connections still queued
// on it are reset, or moved to another socket of the group where
// net.ipv4.tcp_migrate_req is on. The mirror drops m and the program
// follows the socket the kernel moved into m's slot. queued is how many
// connections were in m's accept queue just before.
//
// The mirror drops m even if shutdown fails: it fails only for a socket
// that was not listening, which is in no group's array.
func (g *Group) detachLocked(m *member) (queued int, err error) {
	i := g.indexLocked(m)
	if info, err := unix.GetsockoptTCPInfo(m.fd, unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
		queued = int(info.Unacked)
	}
	err = unix.Shutdown(m.fd, unix.SHUT_RD)
	last := len(g.members) - 1
	g.members[i] = g.members[last]
	g.members = g.members[:last]
	if len(g.members) > 0 {
		if err := g.applyLocked(); err != nil {
			g.log.Error("re-attaching the steering program", "listener", g.name, "err", err)
		}
	}
	return queued, err
}

// control runs fn on f's descriptor without changing its blocking mode.
func control(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("reaching the socket: %w", err)
	}
	var inner error
	if err := rc.Control(func(fd uintptr) { inner = fn(int(fd)) }); err != nil {
		return fmt.Errorf("reaching the socket: %w", err)
	}
	return inner
}
