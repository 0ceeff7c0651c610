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
//  2. It looks the key up in "flows". A flow found, not idle for longer
//     than Options.IdleTimeout, goes to its slot with
//     bpf_sk_select_reuseport(ctx, &socks, &slot, 0); if that succeeds, the
//     entry's last-seen time and seen[slot] are updated and the program
//     returns SK_PASS.
//  3. Otherwise (not found, idle, or its socket is gone: select fails) it is
//     a new flow: slot = serving[0], select; if that succeeds, the flow is
//     inserted with that slot and the time. If even that select fails (no
//     socket in the serving slot) the program returns SK_PASS without a
//     selection and the kernel hashes over the group: the behaviour of a
//     plain SO_REUSEPORT group.
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
//     value {slot u32, pad u32, last-seen ktime u64} (16 bytes). An LRU hash
//     is preallocated: about 104 bytes of kernel memory per entry plus the
//     buckets, about 7.5 MiB for 65536 entries whatever the traffic (the
//     kernel's own count, the map's memlock, is logged by the tests). It is
//     kernel memory, charged to relay's memory cgroup (Linux 5.11+) or to its
//     RLIMIT_MEMLOCK (before); relay's own heap does not grow with flows.
//     When the map is full the least recently used flow is forgotten: its
//     next datagram counts as a new flow and goes to the serving generation.
//     So more than MaxFlows flows active at once across a switch lose their
//     stickiness, the least active first.
//   - seen: ARRAY[Slots] of the last time (ktime, CLOCK_MONOTONIC ns) a
//     datagram was steered to each slot, written at most once a millisecond
//     per slot so that CPUs do not fight over one cache line: Group.Idle,
//     for the drain.
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
// # QUIC Initials (Options.QUIC)
//
// A QUIC client may open a new connection from a 4-tuple a previous
// connection used (a client or NAT that reuses its port, quic-go's Transport
// dialing one server twice). Its first datagram is a long-header Initial
// packet (QUIC v1: first byte & 0x80 set, (byte & 0x30) >> 4 == 0). With
// Options.QUIC, an Initial of a known flow counts as new only if the flow has
// been idle for longer than Options.QUICInitialIdle (3 s by default), which
// is shorter than IdleTimeout. It is not "every Initial": a client sends
// several Initials during one handshake (retransmissions, ACKs), and sending
// a later one to another generation would break the handshake already
// under way. A client's Initials come at most its probe timeout apart (1 s
// at first, then 2 s, 4 s ... with RFC 9002's initial RTT of 333 ms), so 3 s
// lets two lost rounds through. It only matters after a switch: while the
// flow's generation is the serving one, a new flow lands there anyway.
//
// The option is off by default because the test reads one byte of any UDP
// protocol: RTP's first byte is 0x80 (version 2), which reads as a QUIC
// Initial. QUIC v2 (RFC 9369) numbers its Initial 0b01 and is not
// recognised: its Initials follow the flow like any datagram.
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
//     next generation). Relay's drain should wait for Group.Idle of the old
//     generation before stopping it.
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
// stack and does no pointer arithmetic the verifier restricts). The tests
// (caps_test.go) run a group as root and as nobody with CAP_BPF alone, and
// as root with CAP_SYS_ADMIN alone. Before
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
