package steer

import (
	"fmt"
	"net/netip"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// netOff is the kernel's SKF_NET_OFF: a load at netOff+k reads byte k of
// the packet's network header. A reuseport program's packet data starts
// past the transport header, so the addresses and ports are only in reach
// through it.
const netOff = 0xfff00000 // uint32(-0x100000)

// probeRule sends the connections from one source address and port to
// another socket of the group than the public traffic.
type probeRule struct {
	from  netip.AddrPort
	index uint32
}

// program builds the classic BPF program for a group: every connection goes
// to one of the sockets at the indices in active, except those from the
// source of one of rules, which go to that rule's index. With one index in
// active that is all; with several, a hash of the connection's source
// address and port picks one (see spread), so that the connections of one
// client spread over them too.
//
// A load out of the packet's bounds would end the program with 0, the
// first socket; the loads here are all within the IP and TCP headers of any
// packet that reaches a TCP listener.
//
// For a rule on an IPv4 source the program reads the IP version, the
// source address and, past the IHL, the source port. For an IPv6 source it
// reads the address and the port right after the fixed 40-byte header: a
// probe's SYN carries no extension headers, and a packet that does only
// misses the rule and goes to the active socket.
func program(active []uint32, rules ...probeRule) ([]bpf.Instruction, error) {
	if len(active) == 0 {
		return nil, fmt.Errorf("steering program: no socket to send connections to")
	}
	if len(active) > maxSpread {
		return nil, fmt.Errorf("steering program: %d sockets to spread over, at most %d", len(active), maxSpread)
	}
	if len(rules) > maxSpread {
		return nil, fmt.Errorf("steering program: %d probe rules, at most %d", len(rules), maxSpread)
	}
	var prog []bpf.Instruction
	for _, rule := range rules {
		block, err := ruleBlock(rule)
		if err != nil {
			return nil, err
		}
		prog = append(prog, block...)
	}
	return append(prog, spread(active)...), nil
}

// ruleBlock is the part of the program that sends the connections from
// rule.from to rule.index; a connection from elsewhere goes on to the
// instruction after the block.
func ruleBlock(rule probeRule) ([]bpf.Instruction, error) {
	addr := rule.from.Addr().Unmap()
	port := uint32(rule.from.Port())
	// Each check jumps to the first instruction after the rule's "ret
	// rule.index" when it fails; the jumps are filled in once the length
	// is known.
	var prog []bpf.Instruction
	var misses []int // indices of the JumpIfs to fix up
	check := func(val uint32) {
		misses = append(misses, len(prog))
		prog = append(prog, bpf.JumpIf{Cond: bpf.JumpEqual, Val: val})
	}
	prog = append(prog,
		bpf.LoadAbsolute{Off: netOff, Size: 1},
		bpf.ALUOpConstant{Op: bpf.ALUOpShiftRight, Val: 4},
	)
	if addr.Is4() {
		check(4)
		a := addr.As4()
		prog = append(prog, bpf.LoadAbsolute{Off: netOff + 12, Size: 4})
		check(be32(a[:]))
		prog = append(prog,
			bpf.LoadMemShift{Off: netOff},          // X = IHL*4
			bpf.LoadIndirect{Off: netOff, Size: 2}, // the source port
		)
		check(port)
	} else {
		check(6)
		a := addr.As16()
		for i := 0; i < 16; i += 4 {
			prog = append(prog, bpf.LoadAbsolute{Off: netOff + 8 + uint32(i), Size: 4})
			check(be32(a[i : i+4]))
		}
		prog = append(prog, bpf.LoadAbsolute{Off: netOff + 40, Size: 2})
		check(port)
	}
	prog = append(prog, bpf.RetConstant{Val: rule.index})
	next := len(prog)
	for _, i := range misses {
		skip := next - i - 1
		if skip > 255 {
			return nil, fmt.Errorf("steering program too long")
		}
		j := prog[i].(bpf.JumpIf)
		j.SkipFalse = uint8(skip)
		prog[i] = j
	}
	return prog, nil
}

// maxSpread bounds how many sockets one program spreads connections over:
// a worker pool's copies (each compare-and-return is two instructions, and
// a jump reaches at most 255 ahead).
const maxSpread = 64

// spreadMultiplier mixes the hash's bits (2^32 divided by the golden
// ratio, odd: Knuth's multiplicative hashing).
const spreadMultiplier = 0x9e3779b1

// spread returns the instructions that send a connection to one of the
// sockets at the indices in active: the one index itself, or, for several,
// index hash % len(active), where hash mixes the last 32 bits of the source
// address with the source port. The port alone would not do: Linux gives
// connect(2) even ports first, so a modulus of 2 would send every
// connection of a Linux client to one socket.
func spread(active []uint32) []bpf.Instruction {
	if len(active) == 1 {
		return []bpf.Instruction{bpf.RetConstant{Val: active[0]}}
	}
	prog := []bpf.Instruction{
		bpf.LoadAbsolute{Off: netOff, Size: 1},
		bpf.ALUOpConstant{Op: bpf.ALUOpShiftRight, Val: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: 4, SkipFalse: 5}, // to the IPv6 loads
		// IPv4: M[0] = the source address; A = the source port, past
		// the IHL.
		bpf.LoadAbsolute{Off: netOff + 12, Size: 4},
		bpf.StoreScratch{Src: bpf.RegA, N: 0},
		bpf.LoadMemShift{Off: netOff},
		bpf.LoadIndirect{Off: netOff, Size: 2},
		bpf.Jump{Skip: 3}, // to the mix
		// IPv6: M[0] = the last 32 bits of the source address; A = the
		// source port right after the fixed header (a SYN with extension
		// headers hashes on other bytes, and still lands on one of them).
		bpf.LoadAbsolute{Off: netOff + 8 + 12, Size: 4},
		bpf.StoreScratch{Src: bpf.RegA, N: 0},
		bpf.LoadAbsolute{Off: netOff + 40, Size: 2},
		// The mix: A = (M[0] ^ port*0x10001) * spreadMultiplier >> 16,
		// then the modulus.
		bpf.ALUOpConstant{Op: bpf.ALUOpMul, Val: 0x10001},
		bpf.TAX{},
		bpf.LoadScratch{Dst: bpf.RegA, N: 0},
		bpf.ALUOpX{Op: bpf.ALUOpXor},
		bpf.ALUOpConstant{Op: bpf.ALUOpMul, Val: spreadMultiplier},
		bpf.ALUOpConstant{Op: bpf.ALUOpShiftRight, Val: 16},
		bpf.ALUOpConstant{Op: bpf.ALUOpMod, Val: uint32(len(active))},
	}
	for i, idx := range active[:len(active)-1] {
		prog = append(prog,
			bpf.JumpIf{Cond: bpf.JumpEqual, Val: uint32(i), SkipFalse: 1},
			bpf.RetConstant{Val: idx},
		)
	}
	return append(prog, bpf.RetConstant{Val: active[len(active)-1]})
}

func be32(b []byte) uint32 {
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

// attach assembles prog and makes it the group's program: it applies to
// the whole reuseport group of the socket fd, replacing any before it.
func attach(fd int, prog []bpf.Instruction) error {
	filter, err := assemble(prog)
	if err != nil {
		return err
	}
	fprog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_CBPF, &fprog); err != nil {
		return fmt.Errorf("attaching the steering program (SO_ATTACH_REUSEPORT_CBPF): %w", err)
	}
	return nil
}

// assemble turns prog into the kernel's struct sock_filter array.
func assemble(prog []bpf.Instruction) ([]unix.SockFilter, error) {
	raw, err := bpf.Assemble(prog)
	if err != nil {
		return nil, fmt.Errorf("assembling the steering program: %w", err)
	}
	filter := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		filter[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	return filter, nil
}
