// Package udpsteer steers a UDP listener by flow: every generation gets a
// UDP socket of its own in one SO_REUSEPORT group, and an eBPF program of
// type BPF_PROG_TYPE_SK_REUSEPORT, attached with SO_ATTACH_REUSEPORT_EBPF,
// picks the socket for each datagram, so that a flow (a UDP 4-tuple) stays
// with the generation it began on while new flows go to the serving one.
//
// # Why
//
// A QUIC connection (HTTP/3) lives on a UDP 4-tuple, not on a socket of its
// own. With the one shared socket relay gives every generation today, a
// datagram of a connection the old generation holds may be read by the new
// generation, which does not know it (and answers with a stateless reset),
// and after the old generation stops, its connections are gone. With a
// socket per generation and steering by flow, the old generation keeps
// receiving the datagrams of the connections it has until they end or go
// quiet (Group.Idle tells when nothing more reaches it), and the new one gets
// every new flow from the switch on.
//
// # The model
//
//   - Take(gen) gives a generation its socket: the serving socket if no
//     generation has it (the first generation; the replacement of a serving
//     generation that exited, which inherits what waits in it), else a new
//     socket in a free slot. Take says whether the socket is fresh: no
//     generation had it before.
//   - Switch(gen) sends every new flow to gen from then on; known flows stay
//     where they are.
//   - Retire(gen), once gen's TCP sockets have drained (relay then waits
//     for Queued(gen) to be 0 before the stop signal), or at its stop
//     signal if its drain ended otherwise: its flows go to the serving
//     generation at their next datagram, except a QUIC connection's, which
//     stays with gen (see Retire below).
//   - Queued(gen) says whether datagrams wait unread in gen's socket, so
//     that relay stops gen only once gen has read what reached it.
//   - Release(gen), when gen has exited: its socket leaves the steering map
//     and its flows go to the serving generation. The serving generation's
//     socket stays, for its replacement to Take.
//   - Save and Restore carry the group over an exec of relay itself.
//
// # The program
//
// Written with cilium/ebpf's asm package (program.go, commented instruction
// by instruction); no C, no object file. For each datagram:
//
//  1. It builds the flow key: source and destination address, 16 bytes each
//     (an IPv4 address as ::ffff:a.b.c.d), read from the IP header with
//     bpf_skb_load_bytes_relative(ctx, off, buf, len, BPF_HDR_START_NET)
//     (IPv4: at 12 and 16; IPv6: at 8 and 24), and source and destination
//     port, read with bpf_skb_load_bytes(ctx, 0, buf, 4): a reuseport
//     program's packet data begins at the UDP header, so the ports need no
//     IHL and no walk over IPv6 extension headers. The IP version comes from
//     ctx->eth_protocol.
//  2. With Options.QUIC, it reads the first 5 payload bytes
//     (bpf_skb_load_bytes at 8) and tells whether the datagram is a QUIC
//     long-header packet, an Initial, or a short-header packet (see QUIC
//     below). A datagram too short for that load is none of them.
//  3. It looks the key up in "flows". With Options.QUIC, a short-header
//     packet on a QUIC connection's flow marks it established. A flow
//     found, not idle for longer than Options.IdleTimeout (and, with
//     Options.QUIC, not a new connection's Initial: see QUIC below), whose
//     slot is not retired, or is retired but the flow is a QUIC
//     connection's, goes to its slot with
//     bpf_sk_select_reuseport(ctx, &socks, &slot, 0); if that succeeds, the
//     entry's last-seen time and seen[slot] are updated and the program
//     returns SK_PASS.
//  4. Otherwise (not found, idle, a new QUIC connection, retired, or its
//     socket is gone: select fails) it is a new flow: slot = serving[0],
//     select; if that succeeds, the flow is inserted (over the old entry)
//     with that slot, the time, and flagQUIC if the datagram is a QUIC
//     long-header packet. If even that select fails (no socket in the
//     serving slot) the program returns SK_PASS without a selection and the
//     kernel hashes over the group: the behaviour of a plain SO_REUSEPORT
//     group.
//
// The program never returns SK_DROP: whatever it cannot steer is delivered
// the way an unsteered group would deliver it.
//
// # Maps and bounds
//
//   - socks: BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, Options.Slots entries (16 by
//     default): slot -> socket. The kernel clears a slot itself when its
//     socket closes.
//   - serving: ARRAY[1]: the serving slot.
//   - flows: BPF_MAP_TYPE_LRU_HASH, Options.MaxFlows entries (65536 by
//     default), key {src [16]byte, dst [16]byte, sport, dport} (36 bytes),
//     value {slot u32, flags u32, last-seen ktime u64} (16 bytes); flags bit
//     0 (flagQUIC): the datagram that made the flow was a QUIC long-header
//     packet, so the flow is a QUIC connection's; bit 2 (flagEstablished):
//     a short-header packet followed, so its handshake is over; bit 1
//     (flagProbe): relay's own readiness probe's flow. An LRU hash
//     is preallocated: about 104 bytes of kernel memory per entry plus the
//     buckets, about 7.5 MiB for 65536 entries whatever the traffic (the
//     kernel's own count, the map's memlock, is logged by the tests). It is
//     kernel memory, charged to relay's memory cgroup (Linux 5.11+) or to its
//     RLIMIT_MEMLOCK (before); relay's own heap does not grow with flows.
//     When the map is full the least recently used flow is forgotten: its
//     next datagram counts as a new flow and goes to the serving generation.
//     So more than MaxFlows flows active at once across a switch lose their
//     stickiness, the least active first. The kernel's LRU is approximate:
//     the newest entries each CPU made wait in that CPU's local list, out
//     of reach of eviction, so an old flow may outlive newer ones.
//   - seen: ARRAY[Slots] of the last time (ktime, CLOCK_MONOTONIC ns) a
//     datagram was steered to each slot, written at most once a millisecond
//     per slot so that CPUs do not fight over one cache line: Group.Idle,
//     for the drain.
//   - retired: ARRAY[Slots] of u32, 1 for a slot whose generation retired
//     (Group.Retire); cleared when the slot gets a new socket, or its
//     generation is switched to. Its memlock is 440 bytes with 16 slots (an
//     array rounds values up to 8 bytes), as is seen's; socks and serving
//     take about as little. The flow table is the memory that counts: the
//     other four maps add under 2 KiB to its 7.5 MiB.
//
// # The idle timeout
//
// A flow silent for longer than Options.IdleTimeout (30 s by default) counts
// as new. 30 s is the idle timeout of common QUIC stacks (quic-go's default
// max_idle_timeout; clients that want to keep a connection send PINGs well
// within it) and the UDP mapping lifetime of many NATs: a 4-tuple quiet for
// that long belongs to a connection that is dead at one end or in the path,
// and its next datagram most likely begins a new conversation, which belongs
// to the serving generation. It also bounds how long an old generation can
// still be reached by a flow it no longer talks to. A server whose
// connections stay alive longer without a datagram needs a larger timeout.
//
// # QUIC (Options.QUIC)
//
// With Options.QUIC (relay turns it on) the program reads the first 5
// payload bytes of each datagram. It is a QUIC long-header packet if the
// first byte has the header form and the fixed bit set ((b0 & 0xc0) ==
// 0xc0) and bytes 1-4 hold version 1 (0x00000001, RFC 9000) or version 2
// (0x6b3343cf, RFC 9369), big-endian; an Initial if its type
// ((b0 >> 4) & 3) is 0 in v1, 1 in v2 (v2 renumbers the types). The fixed
// bit keeps RTP out (its first byte is 0b10xxxxxx, version 2), the version
// keeps DNS out (bytes 1-4 are the low byte of its ID and its flags and
// counts, never one of the two versions in practice) and most else: a
// random first byte and version match one time in 2^33. Other QUIC versions
// (drafts, future ones) are not recognised: their flows are plain UDP flows
// to the program.
//
// A flow begun by a long-header packet is a QUIC connection's (flagQUIC):
// Retire lets it stay with its generation. Short-header (1-RTT) packets
// carry no version and follow their flow; the first one on a QUIC
// connection's flow marks it established (flagEstablished): the client has
// its 1-RTT keys, has finished its handshake, and never sends an Initial on
// that connection again (RFC 9001, 4.9.1: it discards its Initial keys once
// it sends a Handshake packet). A QUIC flow not yet established is a
// handshake in progress, which Group.Handshakes counts for the drain.
//
// A QUIC client may open a new connection from a 4-tuple a previous
// connection used (a client or NAT that reuses its port: Linux hands out
// ephemeral UDP ports at random from about 28,000, so a client that opens
// hundreds of connections a second meets its own recent ports). Its first
// datagram is an Initial. An Initial of a
// known flow counts as new, and goes to the serving generation, when the
// flow is established, or when it has been idle for longer than
// Options.QUICInitialIdle (3 s by default, shorter than IdleTimeout: a
// handshake abandoned). It is not "every Initial": a client sends several
// Initials during one handshake (retransmissions, ACKs), and sending a later
// one to another generation would break the handshake under way. A client's
// Initials come at most its probe timeout apart (1 s at first, then 2 s, 4 s
// ... with RFC 9002's initial RTT of 333 ms), so 3 s lets two lost rounds
// through. It matters after a switch: an Initial that stayed with a stopping
// generation would be refused (CONNECTION_REFUSED) or dropped.
//
// The option is off by default, as a package default: it reads the first
// bytes of every datagram of any protocol, and a protocol that sends
// QUIC-looking datagrams (a QUIC proxy, a tunnel) would have its flows kept
// with a retired generation. Without it no flow is a QUIC connection's and
// every flow of a retired generation moves.
//
// # Retire
//
// relay retires a generation once its TCP sockets have drained, and then
// waits until nothing waits unread in its UDP socket before its stop
// signal; a generation whose drain ended otherwise is retired at its stop
// signal. From then on a known flow of a retired generation's slot counts as
// new at its next datagram (it goes to the serving generation, and its entry
// is overwritten with the serving slot and flags recomputed from that
// datagram), unless the flow is a QUIC connection's: those datagrams stay
// with the retired generation until Release takes its socket out of socks.
// Why: a stopping server stops reading plain UDP (DNS, syslog have no
// connection to finish), so those flows are better served by the serving
// generation at once; a QUIC server ends its connections gracefully on its
// stop signal (GOAWAY, then CONNECTION_CLOSE), which needs their packets to
// keep reaching it until it exits. Initials of a QUIC connection's flow stay
// too, while the flow's handshake is in progress: the client's second
// flight of a handshake the retired generation answered is an Initial
// packet (its ACK, coalesced with Handshake data), and sending it to another
// generation broke that connection in relay's HTTP/3 tests (a handshake
// slowed down past the drain). A client that opens a new connection from
// the 4-tuple of an established connection reaches the serving generation
// at once; from the 4-tuple of an unfinished handshake, once the flow has
// been idle for QUICInitialIdle or the retired generation exits.
//
// Group.Handshakes counts a generation's QUIC flows whose handshake is in
// progress (not established, not idle for QUICInitialIdle). relay holds a
// retired generation's stop signal back until it is 0: a QUIC server refuses
// a connection whose handshake it has not finished when it stops.
//
// The serving generation cannot retire (Retire returns an error); a
// generation switched to after its retirement is retired no more. Retire of
// a generation without a socket does nothing, and Retire is idempotent.
// Flows no longer counts a retired generation's flows that are not QUIC
// connections'.
//
// # The QUIC probe
//
// Group.ProbeQUIC is a readiness check of one generation's own socket: it
// puts the flow of a loopback client socket in the flow table, naming the
// generation's slot, and sends from it a 1200-byte QUIC packet of a
// reserved version; a QUIC server answers with Version Negotiation, which
// needs no TLS and no connection state. The flow is taken out after.
//
// # Queued
//
// Group.Queued reads ioctl(SIOCINQ) on relay's copy of a generation's
// socket: for UDP the kernel returns the size of the first datagram waiting,
// not the total, so 0 means nothing waits, except that a waiting datagram of
// zero bytes reads 0 too (such a datagram carries nothing a server would
// miss). relay's drain retires the generation, then waits for Queued to read
// 0 before the stop signal, so that what reached the generation is read by
// it while it still reads. The ioctl goes through the stored fd, never
// os.File.Fd, which would change file status flags every holder of the
// socket shares.
//
// # Save and Restore
//
// relay's upgrade re-execs relay's binary, keeping listed fds open and
// passing their numbers in JSON. Group.Save describes the group (options,
// the program's fd and each map's, each member's fd, slot, generation,
// ownership, freshness and retirement, the slot bookkeeping) without closing
// anything or changing a flag; Saved.FDs lists the fds to keep open; Restore
// rebuilds the group in the new image. The kernel objects are the same, so
// steering never stops: the program stays attached to the kernel's
// reuseport group, which holds it, and the flow table keeps every flow.
// Restore checks what it is given before it uses it: Saved's layout
// version, each map's type and sizes, that the program is an SK_REUSEPORT
// program using exactly those maps, and that each slot of socks holds the
// socket Saved names (by socket cookie). It takes the maps and the program
// through close-on-exec duplicates and sets close-on-exec on the members'
// fds again, so that no child inherits them; on error it closes none of the
// saved fds. A caller's socket (FromFile) is saved by number too (the caller
// saves it on its own as well); Restore holds it through a duplicate of its
// own, since an *os.File of the caller's fd would close it when collected.
// The program restored is the old image's: a relay whose program or maps
// differ must bump Saved's layout version (savedVersion), and Restore
// refuses the old one.
//
// # Limits
//
//   - QUIC connection migration (a known connection arriving from a new
//     4-tuple: a client changing network, a NAT rebinding) is a new flow to
//     the program and goes to the serving generation. After a switch, that
//     is the wrong one for a connection the old generation holds; the new
//     generation does not know its connection ID and answers with a
//     stateless reset, and the client reconnects. Steering by connection ID
//     would need the servers' connection ID scheme.
//   - Datagrams still unread in an old generation's socket when it exits are
//     lost with the socket (a shared socket would have kept them for the
//     next generation). relay's drain retires the old generation and waits
//     until Group.Queued reads 0 before stopping it; what a retired
//     generation's QUIC connections send after that is theirs to read.
//   - A UDP socket leaves a reuseport group only when every copy is closed:
//     a released generation's socket stays in the kernel's group while its
//     process (or its children) still holds it. It is out of "socks" at
//     once, so the program never picks it; only the kernel's hash fallback
//     (no socket in the serving slot) could.
//   - Any process of relay's user may bind the same address with
//     SO_REUSEPORT and join the group; the program never selects a socket it
//     did not put in "socks", but the hash fallback may. Member sockets do
//     not set SO_REUSEADDR: for UDP it would let a socket of any user with
//     SO_REUSEADDR bind the same address.
//   - A member socket that its server connect(2)s makes the kernel prefer
//     connected sockets in lookups; servers do not connect a listening UDP
//     socket.
//
// # What the kernel needs
//
// Linux 4.19 or later (BPF_PROG_TYPE_SK_REUSEPORT, REUSEPORT_SOCKARRAY for
// UDP, bpf_skb_load_bytes_relative for this program type). Creating the
// REUSEPORT_SOCKARRAY and LRU_HASH maps and loading an SK_REUSEPORT program
// need CAP_BPF (Linux 5.8 and later) or CAP_SYS_ADMIN (any version; the
// only one before 5.8). kernel.unprivileged_bpf_disabled does not matter
// then. Nothing else: not CAP_NET_ADMIN (the kernel counts SK_REUSEPORT with
// socket filters), not CAP_PERFMON (the program reads no uninitialised
// stack, aligns every stack access, and does no pointer arithmetic the
// verifier restricts). The tests (caps_test.go) run a group, with the QUIC
// rules, and its Save and Restore, as root and as nobody with CAP_BPF
// alone, and as root with CAP_SYS_ADMIN alone. Restore reads the objects'
// info (BPF_OBJ_GET_INFO_BY_FD), the sockets' SO_COOKIE and, where mounted,
// /proc/self/fd; nothing more privileged. Before
// Linux 5.11 the maps count against RLIMIT_MEMLOCK (about 7.5 MiB with the
// default MaxFlows): raise it for relay (LimitMEMLOCK= in its unit); this
// package does not raise it, because relay's children would inherit the
// raised limit. A seccomp filter (container runtimes' default profiles) or
// an LSM may refuse bpf(2) even with the capabilities. Available says which.
// Flows and the slot sweep use batched map reads (Linux 5.6+) and fall back
// to iteration.
//
// Sockets are created blocking and wrapped with os.NewFile, so they stay out
// of Go's network poller: relay never reads them and must not wake on their
// traffic, and File.Fd never changes the status flags every holder shares.
package udpsteer
