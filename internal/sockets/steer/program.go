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
// to the socket at index active, except those from rule.from (when rule is
// set), which go to rule.index.
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
func program(active uint32, rule *probeRule) ([]bpf.Instruction, error) {
	retActive := bpf.RetConstant{Val: active}
	if rule == nil {
		return []bpf.Instruction{retActive}, nil
	}
	addr := rule.from.Addr().Unmap()
	port := uint32(rule.from.Port())
	// Each check jumps to the last instruction, "ret active", when it
	// fails; the jumps are filled in once the length is known.
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
	prog = append(prog, bpf.RetConstant{Val: rule.index}, retActive)
	last := len(prog) - 1
	for _, i := range misses {
		skip := last - i - 1
		if skip > 255 {
			return nil, fmt.Errorf("steering program too long")
		}
		j := prog[i].(bpf.JumpIf)
		j.SkipFalse = uint8(skip)
		prog[i] = j
	}
	return prog, nil
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
