// Package sockdiag reads TCP sockets through the kernel's socket
// diagnostics (NETLINK_SOCK_DIAG, the interface ss(8) uses): one socket by
// its 4-tuple (Lookup), the handshakes in progress towards a local port
// (Handshakes), and those with the connections on the port and what each
// holds unread (List, or Look for given 4-tuples). It needs no privilege.
//
// A handshake in progress is a request socket: made when a SYN reached a
// listener, it stays in state SYN_RECV until the client's ACK completes
// the connection into that listener's accept queue (or until the SYN-ACK
// retransmissions give up). The kernel does not say which listener a
// request socket belongs to, so a caller that needs to know tells them
// apart by when they appeared.
package sockdiag

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// TCP states as the kernel numbers them (include/net/tcp_states.h), in
// Socket.State and in tcpi_state.
const (
	StateEstablished = 1
	StateSynSent     = 2
	StateSynRecv     = 3
	StateFinWait1    = 4
	StateFinWait2    = 5
	StateTimeWait    = 6
	StateClose       = 7
	StateCloseWait   = 8
	StateLastAck     = 9
	StateListen      = 10
	StateClosing     = 11
	StateNewSynRecv  = 12
)

// StateName names a TCP state for messages.
func StateName(s uint8) string {
	names := [...]string{
		StateEstablished: "ESTABLISHED", StateSynSent: "SYN_SENT", StateSynRecv: "SYN_RECV",
		StateFinWait1: "FIN_WAIT1", StateFinWait2: "FIN_WAIT2", StateTimeWait: "TIME_WAIT",
		StateClose: "CLOSE", StateCloseWait: "CLOSE_WAIT", StateLastAck: "LAST_ACK",
		StateListen: "LISTEN", StateClosing: "CLOSING", StateNewSynRecv: "NEW_SYN_RECV",
	}
	if int(s) < len(names) && names[s] != "" {
		return names[s]
	}
	return fmt.Sprintf("state %d", s)
}

// Handshake is one handshake in progress towards a local listener.
type Handshake struct {
	Local, Remote netip.AddrPort // IPv4-mapped addresses unmapped
}

// Conn is a socket diagnostics connection. It is safe for concurrent use.
type Conn struct {
	c *netlink.Conn
	// replyTimeout bounds a wait for the answer to an exact lookup.
	replyTimeout time.Duration
}

// Socket is what the kernel reports of one TCP socket.
type Socket struct {
	State uint8
	// Inode is 0 while the socket has no struct file: a connection
	// still in its listener's accept queue, a request or time-wait
	// socket, an orphan its process closed.
	Inode uint32
}

// Found is what a Lookup found.
type Found int

// What a Lookup can find.
const (
	FoundNone     Found = iota // no socket has that 4-tuple, not even a listener
	FoundListener              // only the listener on the local address and port
	FoundSocket                // the socket of that 4-tuple
)

// replyTimeout bounds a wait for the kernel's answer to an exact lookup,
// which it gives at once.
const replyTimeout = time.Second

// Dial opens a socket diagnostics connection. It needs no privilege.
func Dial() (*Conn, error) {
	c, err := netlink.Dial(unix.NETLINK_SOCK_DIAG, nil)
	if err != nil {
		return nil, fmt.Errorf("opening a NETLINK_SOCK_DIAG socket: %w", err)
	}
	return &Conn{c: c, replyTimeout: replyTimeout}, nil
}

// Close closes the connection.
func (c *Conn) Close() error { return c.c.Close() }

// Handshakes lists the handshakes in progress towards local port port,
// for family unix.AF_INET or unix.AF_INET6. IPv4 connections to a
// dual-stack IPv6 listener may be listed under either (kernel 6.18 lists
// them under AF_INET6), so ask for both there. Addresses are unmapped:
// ::ffff:127.0.0.1 comes back as 127.0.0.1.
func (c *Conn) Handshakes(family uint8, port uint16) ([]Handshake, error) {
	msgs, err := c.c.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.SOCK_DIAG_BY_FAMILY, Flags: netlink.Request | netlink.Dump},
		Data:   append(request(family, 1<<StateSynRecv, netip.AddrPort{}, netip.AddrPort{}, 0), localPortFilter(port)...),
	})
	if err != nil {
		return nil, fmt.Errorf("listing the TCP handshakes in progress: %w", err)
	}
	var out []Handshake
	for _, m := range msgs {
		_, h, err := parse(m.Data)
		if err != nil {
			return nil, err
		}
		if h.Local.Port() == port {
			out = append(out, h)
		}
	}
	return out, nil
}

// Lookup asks for the TCP socket whose local end is local and whose peer
// is remote; ifindex is the interface of a link-local address, else 0.
//
// For a 4-tuple with no socket, the kernel falls back to a listener on
// local's address and port and reports that one: Lookup checks the
// answer's 4-tuple and reports such an answer as FoundListener.
func (c *Conn) Lookup(local, remote netip.AddrPort, ifindex uint32) (Socket, Found, error) {
	data, found, err := c.exact(local, remote, ifindex, 0)
	if found != FoundSocket {
		return Socket{}, found, err
	}
	s, _, err := parse(data)
	return s, found, err
}

// Look finds each of tuples, a connection's local and remote ends, as
// List would list it: a handshake in progress, a connection with what it
// holds unread, or neither, for one that has gone (or is closing). Each is
// a lookup by its 4-tuple, which costs the kernel a hash lookup where List
// walks its whole table.
func (c *Conn) Look(tuples []Handshake) (Listing, error) {
	var l Listing
	for _, t := range tuples {
		data, found, err := c.exact(t.Local, t.Remote, 0, 1<<(inetDiagInfo-1))
		if err != nil {
			return Listing{}, err
		}
		if found != FoundSocket {
			continue
		}
		switch data[1] {
		case StateSynRecv:
			l.Handshakes = append(l.Handshakes, t)
		case StateEstablished, StateCloseWait:
			conn, err := parseConnection(data)
			if err != nil {
				return Listing{}, err
			}
			l.Connections = append(l.Connections, conn)
		}
	}
	return l, nil
}

// exact asks for the socket of one 4-tuple, with the extensions ext
// (idiag_ext bits), and returns the kernel's inet_diag_msg for it. found
// says whether it is that socket's, the fallback listener's (then data is
// nil), or there is none.
func (c *Conn) exact(local, remote netip.AddrPort, ifindex uint32, ext uint8) (data []byte, found Found, err error) {
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	if local.Addr().Is4() != remote.Addr().Is4() {
		return nil, FoundNone, fmt.Errorf("looking up TCP socket %s-%s: mixed address families", local, remote)
	}
	family := uint8(unix.AF_INET6)
	if local.Addr().Is4() {
		family = unix.AF_INET
	}
	// The deadline is the lookup's alone: a walk of the table, on the
	// same connection, may take longer.
	if err := c.c.SetReadDeadline(time.Now().Add(c.replyTimeout)); err != nil {
		return nil, FoundNone, fmt.Errorf("looking up TCP socket %s-%s: %w", local, remote, err)
	}
	defer c.c.SetReadDeadline(time.Time{})
	req := request(family, ^uint32(0), local, remote, ifindex)
	req[2] = ext
	msgs, err := c.c.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.SOCK_DIAG_BY_FAMILY, Flags: netlink.Request},
		Data:   req,
	})
	if errors.Is(err, unix.ENOENT) {
		return nil, FoundNone, nil
	} else if err != nil {
		return nil, FoundNone, fmt.Errorf("looking up TCP socket %s-%s with sock_diag: %w", local, remote, err)
	}
	if len(msgs) == 0 {
		return nil, FoundNone, nil
	}
	s, h, err := parse(msgs[0].Data)
	if err != nil {
		return nil, FoundNone, fmt.Errorf("looking up TCP socket %s-%s with sock_diag: %w", local, remote, err)
	}
	switch {
	case s.State == StateListen:
		return nil, FoundListener, nil // the kernel's fallback
	case h.Local != local || h.Remote != remote:
		return nil, FoundNone, nil
	}
	return msgs[0].Data, FoundSocket, nil
}

// The layout of struct inet_diag_req_v2 and struct inet_diag_msg
// (linux/inet_diag.h): a socket id is the two ports in network order, two
// 16-byte addresses, an interface index and a 64-bit cookie.
const (
	sizeofReq    = 56
	sizeofMsg    = 72
	offsetMsgID  = 4
	offsetReqID  = 8
	sizeofSockID = 48
	noCookie     = ^uint32(0)                     // INET_DIAG_NOCOOKIE
	offsetRqueue = offsetMsgID + sizeofSockID + 4 // idiag_rqueue, after idiag_expires
)

// Connection is one connection accepted, or waiting to be, on a local
// listener, as the kernel reports it.
type Connection struct {
	Local, Remote netip.AddrPort // IPv4-mapped addresses unmapped
	// Inode is 0 while the connection waits in its listener's accept
	// queue: no process has it yet.
	Inode uint32
	// Unread is how many bytes arrived that the server has not read.
	Unread uint32
	// Received is how many bytes arrived in all (tcpi_bytes_received).
	Received uint64
	// SinceReceived is how long ago the last data arrived or, where
	// none has, how long ago the connection was made (tcpi_last_data_recv,
	// in the kernel's ticks of 1 to 10 ms).
	SinceReceived time.Duration
}

// Listing is what the kernel has on one local port: the handshakes in
// progress and the connections.
type Listing struct {
	Handshakes  []Handshake
	Connections []Connection
}

// List lists, in one walk of the kernel's table, the handshakes in
// progress towards local port port and the connections on it that are
// established or that the client has half-closed (CLOSE_WAIT), with what
// they hold unread, for family unix.AF_INET or unix.AF_INET6. As with
// Handshakes, ask for both families on a dual-stack listener. The port is
// matched in the kernel, which still walks its whole table: on a host
// with a large one, a walk is the costly part.
func (c *Conn) List(family uint8, port uint16) (Listing, error) {
	req := request(family, 1<<StateSynRecv|1<<StateEstablished|1<<StateCloseWait, netip.AddrPort{}, netip.AddrPort{}, 0)
	req[2] = 1 << (inetDiagInfo - 1) // idiag_ext: add the tcp_info
	msgs, err := c.c.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.SOCK_DIAG_BY_FAMILY, Flags: netlink.Request | netlink.Dump},
		Data:   append(req, localPortFilter(port)...),
	})
	if err != nil {
		return Listing{}, fmt.Errorf("listing the TCP handshakes and connections on port %d: %w", port, err)
	}
	var l Listing
	for _, m := range msgs {
		if len(m.Data) > 1 && m.Data[1] == StateSynRecv {
			// A request socket: it has no tcp_info.
			_, h, err := parse(m.Data)
			if err != nil {
				return Listing{}, err
			}
			if h.Local.Port() == port {
				l.Handshakes = append(l.Handshakes, h)
			}
			continue
		}
		conn, err := parseConnection(m.Data)
		if err != nil {
			return Listing{}, err
		}
		if conn.Local.Port() == port {
			l.Connections = append(l.Connections, conn)
		}
	}
	return l, nil
}

// Numbers of include/uapi/linux/inet_diag.h that x/sys/unix lacks.
const (
	inetDiagReqBytecode = 1 // INET_DIAG_REQ_BYTECODE, a request attribute
	inetDiagInfo        = 2 // INET_DIAG_INFO, a reply attribute: struct tcp_info
	inetDiagBCSourceGE  = 2 // INET_DIAG_BC_S_GE: local port >= operand
	inetDiagBCSourceLE  = 3 // INET_DIAG_BC_S_LE: local port <= operand
)

// The parts of struct tcp_info (include/uapi/linux/tcp.h) that Connection
// reads, by offset, and the length that holds them all (Linux 4.1+).
const (
	offsetLastDataRecv  = 52  // __u32 tcpi_last_data_recv, ms
	offsetBytesReceived = 128 // __u64 tcpi_bytes_received
	sizeofTCPInfoUsed   = 136
)

// parseConnection reads an inet_diag_msg and its INET_DIAG_INFO
// attribute.
func parseConnection(b []byte) (Connection, error) {
	sock, h, err := parse(b)
	if err != nil {
		return Connection{}, err
	}
	ne := binary.NativeEndian
	conn := Connection{Local: h.Local, Remote: h.Remote, Inode: sock.Inode, Unread: ne.Uint32(b[offsetRqueue:])}
	for attrs := b[sizeofMsg:]; len(attrs) >= unix.SizeofRtAttr; {
		n := int(ne.Uint16(attrs[0:2]))
		if n < unix.SizeofRtAttr || n > len(attrs) {
			break
		}
		if ne.Uint16(attrs[2:4]) == inetDiagInfo {
			info := attrs[unix.SizeofRtAttr:n]
			if len(info) < sizeofTCPInfoUsed {
				return Connection{}, fmt.Errorf("the kernel's tcp_info of %s-%s has %d bytes, want %d or more (Linux 4.1+)", h.Local, h.Remote, len(info), sizeofTCPInfoUsed)
			}
			conn.SinceReceived = time.Duration(ne.Uint32(info[offsetLastDataRecv:])) * time.Millisecond
			conn.Received = ne.Uint64(info[offsetBytesReceived:])
			return conn, nil
		}
		attrs = attrs[(n+unix.RTA_ALIGNTO-1)&^(unix.RTA_ALIGNTO-1):]
	}
	return Connection{}, fmt.Errorf("the kernel sent no tcp_info for %s-%s", h.Local, h.Remote)
}

// localPortFilter is an INET_DIAG_REQ_BYTECODE attribute that keeps the
// sockets whose local port is port, so that the kernel sends no others.
// The program is two comparisons, each followed by the operand the kernel
// reads from its "no" field: a "yes" steps to the next instruction, and
// the last one to the end, which keeps the socket; a "no" jumps 4 bytes
// past the end, which drops it.
func localPortFilter(port uint16) []byte {
	const sizeofOp = 4 // struct inet_diag_bc_op: u8 code, u8 yes, u16 no
	ne := binary.NativeEndian
	prog := make([]byte, 0, 4*sizeofOp)
	op := func(code, yes uint8, no uint16) {
		prog = append(prog, code, yes)
		prog = ne.AppendUint16(prog, no)
	}
	op(inetDiagBCSourceGE, 2*sizeofOp, 5*sizeofOp)
	op(0, 0, port)
	op(inetDiagBCSourceLE, 2*sizeofOp, 3*sizeofOp)
	op(0, 0, port)
	attr := make([]byte, unix.SizeofRtAttr, unix.SizeofRtAttr+len(prog))
	ne.PutUint16(attr[0:2], uint16(unix.SizeofRtAttr+len(prog)))
	ne.PutUint16(attr[2:4], inetDiagReqBytecode)
	return append(attr, prog...)
}

// request encodes an inet_diag_req_v2 for the sockets of family in
// states (a bit per state; the kernel lists request sockets under
// StateSynRecv). An exact lookup names local, remote and ifindex; a dump
// leaves them zero.
func request(family uint8, states uint32, local, remote netip.AddrPort, ifindex uint32) []byte {
	ne := binary.NativeEndian
	b := make([]byte, sizeofReq)
	b[0] = family
	b[1] = unix.IPPROTO_TCP
	ne.PutUint32(b[4:8], states)
	id := b[offsetReqID:]
	binary.BigEndian.PutUint16(id[0:], local.Port())
	binary.BigEndian.PutUint16(id[2:], remote.Port())
	putAddr(id[4:20], local.Addr())
	putAddr(id[20:36], remote.Addr())
	ne.PutUint32(id[36:], ifindex)
	ne.PutUint32(id[40:], noCookie)
	ne.PutUint32(id[44:], noCookie)
	return b
}

// putAddr writes an address as idiag_src or idiag_dst holds it: an IPv4
// address in the first four bytes, an IPv6 address in all sixteen; the
// zero Addr as zeros.
func putAddr(b []byte, a netip.Addr) {
	switch {
	case a.Is4():
		v := a.As4()
		copy(b, v[:])
	case a.Is6():
		v := a.As16()
		copy(b, v[:])
	}
}

// errShort reports a reply too short to be an inet_diag_msg.
var errShort = errors.New("short inet_diag_msg from the kernel")

// parse reads an inet_diag_msg: the socket's state and inode, and its
// 4-tuple.
func parse(b []byte) (Socket, Handshake, error) {
	if len(b) < sizeofMsg {
		return Socket{}, Handshake{}, errShort
	}
	family := b[0]
	id := b[offsetMsgID : offsetMsgID+sizeofSockID]
	local := addr(family, id[4:20], binary.BigEndian.Uint16(id[0:2]))
	remote := addr(family, id[20:36], binary.BigEndian.Uint16(id[2:4]))
	inode := binary.NativeEndian.Uint32(b[offsetMsgID+sizeofSockID+16:])
	return Socket{State: b[1], Inode: inode}, Handshake{Local: local, Remote: remote}, nil
}

func addr(family uint8, b []byte, port uint16) netip.AddrPort {
	if family == unix.AF_INET {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[:4])), port)
	}
	return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[:16])).Unmap(), port)
}
