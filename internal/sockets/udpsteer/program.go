package udpsteer

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// The kernel's constants the program uses (include/uapi/linux/bpf.h).
const (
	// offsetof(struct sk_reuseport_md, eth_protocol): after the data and
	// data_end pointers (8 bytes each) and len (4 bytes).
	ctxEthProtocol = 20
	// BPF_HDR_START_NET: bpf_skb_load_bytes_relative counts from the start
	// of the network (IP) header.
	hdrStartNet = 1
	// SK_PASS: deliver the datagram, to the selected socket if one was
	// selected, else to the one the kernel hashes to.
	skPass = 1
	// BPF_ANY: insert or replace.
	bpfAny = 0
	// udpHeaderLen: the first payload byte is past the 8-byte UDP header.
	udpHeaderLen = 8
	// quicHeaderLen: what the program reads of the payload to recognise
	// a QUIC long-header packet: the first byte and the 32-bit version.
	quicHeaderLen = 5
	// seenEvery: seen[slot] is rewritten when it is older than this, not
	// at every datagram: one cache line shared by every CPU.
	seenEvery = time.Millisecond
)

// ETH_P_IP and ETH_P_IPV6 as the context field holds them: the kernel
// loads skb->protocol, a big-endian 16-bit number, as it lies in memory.
func ethPIP() int32   { return int32(binary.NativeEndian.Uint16([]byte{0x08, 0x00})) }
func ethPIPv6() int32 { return int32(binary.NativeEndian.Uint16([]byte{0x86, 0xdd})) }

// QUIC versions, as the 32 bits after a long header's first byte carry
// them, read from the stack as a native-endian word.
func quicV1() int64 { return int64(binary.NativeEndian.Uint32([]byte{0x00, 0x00, 0x00, 0x01})) } // RFC 9000
func quicV2() int64 { return int64(binary.NativeEndian.Uint32([]byte{0x6b, 0x33, 0x43, 0xcf})) } // RFC 9369

// The program's stack, below the frame pointer (r10). Every byte a helper
// or a map reads is written first, so the verifier needs no CAP_PERFMON to
// allow uninitialised reads. The verifier wants stack accesses aligned to
// their size: hence the QUIC header's odd place, which puts the version
// on a 4-byte boundary.
const (
	keyOff   = -40          // flowKey, 36 bytes: fp-40 .. fp-5
	keySrc   = keyOff       // source address, 16 bytes
	keyDst   = keyOff + 16  // destination address, 16 bytes
	keyPorts = keyOff + 32  // source and destination port, as on the wire
	valOff   = -56          // flowValue, 16 bytes: fp-56 .. fp-41
	valSlot  = valOff       // u32: also the key into socks, seen and retired
	valFlags = valOff + 4   // u32: flagQUIC
	valLast  = valOff + 8   // u64, ktime ns
	zeroOff  = -64          // u32 0: the key of serving
	quicOff  = -73          // the payload's first 5 bytes: fp-73 .. fp-69
	verOff   = quicOff + 1  // the version, big-endian, 4-byte aligned
	kindOff  = -80          // u32: kindQUIC, kindInitial: what the datagram is
	v4Mapped = 10           // where ffff goes in an IPv4-mapped address
	v4Addr   = v4Mapped + 2 // where the IPv4 address goes in it
)

// What the program makes of a datagram (kindOff), with Options.QUIC.
const (
	// kindQUIC: a QUIC v1 or v2 long-header packet. The same bit as
	// flagQUIC, so that the flag is kind & flagQUIC.
	kindQUIC = flagQUIC
	// kindInitial: and an Initial packet.
	kindInitial = 2
	// kindShort: a short-header packet (header form bit clear), which a
	// QUIC connection's flow carries once the client has its 1-RTT keys.
	kindShort = 4
)

// flagQUIC, in flowValue.Flags: the datagram that made the flow was a QUIC
// long-header packet (Options.QUIC): the flow is a QUIC connection's, and
// stays with a retired generation (Group.Retire).
const flagQUIC = 1

// flagProbe, in flowValue.Flags: the flow is a readiness probe's, put in
// the table by ProbeQUIC (the program never sets it, and keeps it while the
// flow is known). Flows does not count it, and Restore removes any left by
// an earlier image that stopped in the middle of a probe.
const flagProbe = 2

// flagEstablished, in flowValue.Flags: a short-header (1-RTT) packet came
// on the QUIC connection's flow, so the client has finished its handshake
// and will send no Initial on it again: an Initial on the 4-tuple is a new
// connection's, and goes to the serving generation. A QUIC flow without it
// is a handshake in progress (Group.Handshakes).
const flagEstablished = 4

// flowKey is the key of the flows map, as the program builds it.
type flowKey struct {
	Src   [16]byte // IPv4 as ::ffff:a.b.c.d
	Dst   [16]byte
	Ports [4]byte // source and destination port, big-endian, as in the UDP header
}

// flowValue is the value of the flows map.
type flowValue struct {
	Slot  uint32
	Flags uint32 // flagQUIC, flagProbe, flagEstablished
	Last  uint64 // ktime (CLOCK_MONOTONIC) ns of the flow's last datagram
}

// maps are the program's maps.
type maps struct {
	socks, serving, flows, seen, retired *ebpf.Map
}

// mapSpecs are the maps a group of slots sockets and maxFlows flows has.
// Restore checks the maps it is given against them.
func mapSpecs(slots, maxFlows int) map[string]*ebpf.MapSpec {
	return map[string]*ebpf.MapSpec{
		// Value size 8: a lookup from user space returns the socket's
		// cookie.
		"socks":   {Name: "udpsteer_socks", Type: ebpf.ReusePortSockArray, KeySize: 4, ValueSize: 8, MaxEntries: uint32(slots)},
		"serving": {Name: "udpsteer_serving", Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1},
		"flows":   {Name: "udpsteer_flows", Type: ebpf.LRUHash, KeySize: 36, ValueSize: 16, MaxEntries: uint32(maxFlows)},
		"seen":    {Name: "udpsteer_seen", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: uint32(slots)},
		"retired": {Name: "udpsteer_retired", Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: uint32(slots)},
	}
}

// byName lists the maps with the names mapSpecs gives them.
func (m *maps) byName() []namedMap {
	return []namedMap{{"socks", &m.socks}, {"serving", &m.serving}, {"flows", &m.flows}, {"seen", &m.seen}, {"retired", &m.retired}}
}

type namedMap struct {
	name string
	m    **ebpf.Map
}

func newMaps(slots, maxFlows int) (*maps, error) {
	var m maps
	specs := mapSpecs(slots, maxFlows)
	for _, nm := range m.byName() {
		spec := specs[nm.name]
		x, err := ebpf.NewMap(spec)
		if err != nil {
			m.close()
			return nil, explain(fmt.Sprintf("creating the %s map (%s)", nm.name, spec.Type), err)
		}
		*nm.m = x
	}
	return &m, nil
}

func (m *maps) close() {
	for _, nm := range m.byName() {
		if *nm.m != nil {
			(*nm.m).Close()
		}
	}
}

// programOptions are what the program is built for.
type programOptions struct {
	idle     time.Duration
	quic     bool
	quicIdle time.Duration
}

// program builds the steering program for m.
//
// Registers: r6 holds the context, r7 the flow's map entry, r8 the flow's
// idle time, r9 the time now; the helpers clobber r1-r5 and return in r0.
// What the datagram is (kindOff) stays on the stack: no register that
// survives a helper call is left for it.
func program(m *maps, o programOptions) asm.Instructions {
	// call helper(ctx, off, fp+to, len[, BPF_HDR_START_NET])
	loadBytes := func(fn asm.BuiltinFunc, off int32, to int16, n int32, relative bool) asm.Instructions {
		in := asm.Instructions{
			asm.Mov.Reg(asm.R1, asm.R6),
			asm.Mov.Imm(asm.R2, off),
			asm.Mov.Reg(asm.R3, asm.RFP),
			asm.Add.Imm(asm.R3, int32(to)),
			asm.Mov.Imm(asm.R4, n),
		}
		if relative {
			in = append(in, asm.Mov.Imm(asm.R5, hdrStartNet))
		}
		return append(in, fn.Call())
	}
	// r1 = map, r2 = fp+key
	mapKey := func(mp *ebpf.Map, key int16) asm.Instructions {
		return asm.Instructions{
			asm.LoadMapPtr(asm.R1, mp.FD()),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, int32(key)),
		}
	}
	// bpf_sk_select_reuseport(ctx, &socks, fp+valSlot, 0)
	selectSlot := asm.Instructions{
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.LoadMapPtr(asm.R2, m.socks.FD()),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, valSlot),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnSkSelectReuseport.Call(),
	}

	var p asm.Instructions
	add := func(in ...asm.Instruction) { p = append(p, in...) }

	// Keep the context: every helper call clobbers r1.
	add(asm.Mov.Reg(asm.R6, asm.R1))
	// r9 = now, in CLOCK_MONOTONIC nanoseconds.
	add(asm.FnKtimeGetNs.Call(), asm.Mov.Reg(asm.R9, asm.R0))

	// The ports: the packet data of a reuseport program begins at the
	// UDP header, source port then destination port.
	add(loadBytes(asm.FnSkbLoadBytes, 0, keyPorts, 4, false)...)
	add(asm.JNE.Imm(asm.R0, 0, "pass")) // shorter than a UDP header: cannot be

	// The IP version, from skb->protocol.
	ethProtocol := asm.LoadMem(asm.R2, asm.R6, ctxEthProtocol, asm.Word)

	if o.quic {
		// What the datagram is. A QUIC long-header packet (RFC 8999,
		// 9000) begins with the header form and fixed bits set (0xc0),
		// then a 32-bit version; only v1 and v2 are recognised, which
		// keeps other protocols out: RTP's first byte is 0b10xxxxxx
		// (fixed bit clear), a DNS message's bytes 1-4 (ID, flags) are no
		// QUIC version. kind = 0 until it is shown to be QUIC.
		add(asm.StoreImm(asm.RFP, kindOff, 0, asm.Word))
		add(loadBytes(asm.FnSkbLoadBytes, udpHeaderLen, quicOff, quicHeaderLen, false)...)
		add(
			asm.JNE.Imm(asm.R0, 0, "classified"), // fewer than 5 bytes: not QUIC
			asm.LoadMem(asm.R1, asm.RFP, quicOff, asm.Byte),
			// A short header: kindShort (it means something on a QUIC
			// connection's flow only).
			asm.Mov.Reg(asm.R2, asm.R1),
			asm.And.Imm(asm.R2, 0x80),
			asm.JNE.Imm(asm.R2, 0, "longform"),
			asm.StoreImm(asm.RFP, kindOff, kindShort, asm.Word),
			asm.Ja.Label("classified"),
			asm.Mov.Reg(asm.R2, asm.R1).WithSymbol("longform"),
			asm.And.Imm(asm.R2, 0xc0),
			asm.JNE.Imm(asm.R2, 0xc0, "classified"), // a short header, or not QUIC
			asm.RSh.Imm(asm.R1, 4),
			asm.And.Imm(asm.R1, 3), // r1 = the long packet type
			// r2 = the version; r4 = the type its Initial has: 0 in
			// v1, 1 in v2 (RFC 9369 renumbers the types).
			asm.LoadMem(asm.R2, asm.RFP, verOff, asm.Word),
			asm.Mov.Imm(asm.R4, 0),
			// 64-bit loads: v2 as a word has its top bit set, which a
			// 32-bit immediate would sign-extend (and JMP32 needs
			// Linux 5.1).
			asm.LoadImm(asm.R3, quicV1(), asm.DWord),
			asm.JEq.Reg(asm.R2, asm.R3, "long"),
			asm.Mov.Imm(asm.R4, 1),
			asm.LoadImm(asm.R3, quicV2(), asm.DWord),
			asm.JNE.Reg(asm.R2, asm.R3, "classified"), // another version
			asm.Mov.Imm(asm.R3, kindQUIC).WithSymbol("long"),
			asm.JNE.Reg(asm.R1, asm.R4, "kind"),
			asm.Mov.Imm(asm.R3, kindQUIC|kindInitial),
			asm.StoreMem(asm.RFP, kindOff, asm.R3, asm.Word).WithSymbol("kind"),
		)
		ethProtocol = ethProtocol.WithSymbol("classified")
	}

	add(ethProtocol)
	add(asm.JEq.Imm(asm.R2, ethPIPv6(), "ipv6"))
	add(asm.JNE.Imm(asm.R2, ethPIP(), "pass")) // neither: leave it to the kernel

	// IPv4: both addresses as ::ffff:a.b.c.d, ten zero bytes and ffff ...
	// (cilium's asm has no 64-bit store of an immediate: r1 = 0)
	add(asm.Mov.Imm(asm.R1, 0))
	for _, at := range []int16{keySrc, keyDst} {
		add(
			asm.StoreMem(asm.RFP, at, asm.R1, asm.DWord),
			asm.StoreImm(asm.RFP, at+8, 0, asm.Half),
			asm.StoreImm(asm.RFP, at+v4Mapped, 0xffff, asm.Half),
		)
	}
	// ... then the source address (IP header offset 12) and the
	// destination address (offset 16) after them.
	add(loadBytes(asm.FnSkbLoadBytesRelative, 12, keySrc+v4Addr, 4, true)...)
	add(asm.JNE.Imm(asm.R0, 0, "pass"))
	add(loadBytes(asm.FnSkbLoadBytesRelative, 16, keyDst+v4Addr, 4, true)...)
	add(asm.JNE.Imm(asm.R0, 0, "pass"))
	add(asm.Ja.Label("lookup"))

	// IPv6: source (offset 8) and destination (offset 24) are adjacent in
	// the header as in the key: one 32-byte load.
	ipv6 := loadBytes(asm.FnSkbLoadBytesRelative, 8, keySrc, 32, true)
	ipv6[0] = ipv6[0].WithSymbol("ipv6")
	add(ipv6...)
	add(asm.JNE.Imm(asm.R0, 0, "pass"))

	// r0 = flows[key]
	lookup := mapKey(m.flows, keyOff)
	lookup[0] = lookup[0].WithSymbol("lookup")
	add(lookup...)
	add(asm.FnMapLookupElem.Call())
	add(asm.JEq.Imm(asm.R0, 0, "new")) // an unknown flow
	add(asm.Mov.Reg(asm.R7, asm.R0))   // r7 = the entry; it stays valid to the end

	// r8 = now - entry.last. Signed: another CPU may have written a time
	// later than our now, which makes it negative, not idle.
	add(
		asm.LoadMem(asm.R1, asm.R7, 8, asm.DWord),
		asm.Mov.Reg(asm.R8, asm.R9),
		asm.Sub.Reg(asm.R8, asm.R1),
		asm.LoadImm(asm.R1, int64(o.idle), asm.DWord),
		asm.JSGT.Reg(asm.R8, asm.R1, "new"), // idle too long: a new flow
	)

	if o.quic {
		// A short-header packet on a QUIC connection's flow: the client
		// has finished its handshake; mark the flow established.
		add(
			asm.LoadMem(asm.R1, asm.R7, 4, asm.Word), // r1 = entry.flags
			asm.Mov.Reg(asm.R2, asm.R1),
			asm.And.Imm(asm.R2, flagQUIC|flagEstablished),
			asm.JNE.Imm(asm.R2, flagQUIC, "initial"), // not QUIC, or marked
			asm.LoadMem(asm.R2, asm.RFP, kindOff, asm.Word),
			asm.And.Imm(asm.R2, kindShort),
			asm.JEq.Imm(asm.R2, 0, "initial"),
			asm.Or.Imm(asm.R1, flagEstablished),
			asm.StoreMem(asm.R7, 4, asm.R1, asm.Word),
			asm.Ja.Label("known"), // a short header is no Initial
		)
		// A QUIC Initial is a new connection on an old 4-tuple when the
		// flow's connection finished its handshake, or when the flow was
		// idle for longer than quicIdle (a handshake abandoned). Else it
		// belongs to the handshake going on: the client's second flight
		// (an ACK in an Initial), or a retransmission.
		add(
			asm.LoadMem(asm.R1, asm.RFP, kindOff, asm.Word).WithSymbol("initial"),
			asm.And.Imm(asm.R1, kindInitial),
			asm.JEq.Imm(asm.R1, 0, "known"),
			asm.LoadMem(asm.R1, asm.R7, 4, asm.Word),
			asm.And.Imm(asm.R1, flagEstablished),
			asm.JNE.Imm(asm.R1, 0, "new"),
			asm.LoadImm(asm.R1, int64(o.quicIdle), asm.DWord),
			asm.JSGT.Reg(asm.R8, asm.R1, "new"),
		)
	}

	// A known flow: its slot.
	add(
		asm.LoadMem(asm.R1, asm.R7, 0, asm.Word).WithSymbol("known"), // r1 = entry.slot
		asm.StoreMem(asm.RFP, valSlot, asm.R1, asm.Word),
	)
	// Its slot retired (Group.Retire): a new flow, unless it is a QUIC
	// connection's flow. An Initial that got here stays too: it belongs
	// to a handshake the retired generation is answering (above), and
	// sending it elsewhere would break a connection the retired
	// generation accepted.
	add(mapKey(m.retired, valSlot)...)
	add(asm.FnMapLookupElem.Call())
	add(asm.JEq.Imm(asm.R0, 0, "select")) // cannot be: every slot is in the array
	add(asm.LoadMem(asm.R1, asm.R0, 0, asm.Word))
	if o.quic {
		add(
			asm.JEq.Imm(asm.R1, 0, "select"),         // not retired
			asm.LoadMem(asm.R1, asm.R7, 4, asm.Word), // entry.flags
			asm.And.Imm(asm.R1, flagQUIC),
			asm.JEq.Imm(asm.R1, 0, "new"), // not a QUIC connection's flow
		)
	} else {
		add(asm.JNE.Imm(asm.R1, 0, "new")) // no QUIC flow without the option
	}
	// Select its slot's socket.
	sel := append(asm.Instructions{}, selectSlot...)
	sel[0] = sel[0].WithSymbol("select")
	add(sel...)
	add(asm.JNE.Imm(asm.R0, 0, "new"))              // its socket is gone: a new flow
	add(asm.StoreMem(asm.R7, 8, asm.R9, asm.DWord)) // entry.last = now
	add(asm.Ja.Label("seen"))

	// A new flow: r0 = &serving[0].
	add(asm.StoreImm(asm.RFP, zeroOff, 0, asm.Word).WithSymbol("new"))
	add(mapKey(m.serving, zeroOff)...)
	add(asm.FnMapLookupElem.Call())
	add(asm.JEq.Imm(asm.R0, 0, "pass")) // cannot be: an array of one
	// The entry to insert: {serving slot, flags, now}.
	add(
		asm.LoadMem(asm.R1, asm.R0, 0, asm.Word),
		asm.StoreMem(asm.RFP, valSlot, asm.R1, asm.Word),
	)
	if o.quic {
		// flagQUIC if this datagram is a QUIC long-header packet.
		add(
			asm.LoadMem(asm.R1, asm.RFP, kindOff, asm.Word),
			asm.And.Imm(asm.R1, flagQUIC),
			asm.StoreMem(asm.RFP, valFlags, asm.R1, asm.Word),
		)
	} else {
		add(asm.StoreImm(asm.RFP, valFlags, 0, asm.Word))
	}
	add(asm.StoreMem(asm.RFP, valLast, asm.R9, asm.DWord))
	add(selectSlot...)
	add(asm.JNE.Imm(asm.R0, 0, "pass")) // no socket serving: the kernel hashes
	// flows[key] = entry, evicting the least recently used flow when the
	// map is full. Should the update fail, the datagram is steered anyway.
	add(mapKey(m.flows, keyOff)...)
	add(
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, valOff),
		asm.Mov.Imm(asm.R4, bpfAny),
		asm.FnMapUpdateElem.Call(),
	)

	// seen[slot] = now, unless it was written within seenEvery.
	seen := mapKey(m.seen, valSlot)
	seen[0] = seen[0].WithSymbol("seen")
	add(seen...)
	add(asm.FnMapLookupElem.Call())
	add(asm.JEq.Imm(asm.R0, 0, "pass"))
	add(
		asm.LoadMem(asm.R1, asm.R0, 0, asm.DWord),
		asm.Mov.Reg(asm.R2, asm.R9),
		asm.Add.Imm(asm.R2, -int32(seenEvery)),
		asm.JSGT.Reg(asm.R1, asm.R2, "pass"),
		asm.StoreMem(asm.R0, 0, asm.R9, asm.DWord),
	)

	// Deliver: to the selected socket if any, else where the kernel hashes.
	add(
		asm.Mov.Imm(asm.R0, skPass).WithSymbol("pass"),
		asm.Return(),
	)
	return p
}

// load loads the program for m.
func load(m *maps, o programOptions) (*ebpf.Program, asm.Instructions, error) {
	insns := program(m, o)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "udpsteer",
		Type: ebpf.SkReuseport,
		// No AttachType: kernels before 5.14 have none for this type, and
		// later ones take 0 as BPF_SK_REUSEPORT_SELECT (not _OR_MIGRATE,
		// which would run the program for TCP request migration).
		Instructions: insns,
		// No helper the program calls is GPL-only; the license string is
		// what the kernel reads to decide that.
		License: "",
	})
	if err != nil {
		return nil, insns, explain("loading the SK_REUSEPORT program", err)
	}
	return prog, insns, nil
}
