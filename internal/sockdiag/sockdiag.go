// Package sockdiag lists the TCP handshakes in progress towards a local
// port, through the kernel's socket diagnostics (NETLINK_SOCK_DIAG, the
// interface ss(8) uses).
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

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Handshake is one handshake in progress towards a local listener.
type Handshake struct {
	Local, Remote netip.AddrPort // IPv4-mapped addresses unmapped
}

// Conn is a socket diagnostics connection. It is safe for concurrent use.
type Conn struct{ c *netlink.Conn }

// Dial opens a socket diagnostics connection. It needs no privilege.
func Dial() (*Conn, error) {
	c, err := netlink.Dial(unix.NETLINK_SOCK_DIAG, nil)
	if err != nil {
		return nil, fmt.Errorf("opening a NETLINK_SOCK_DIAG socket: %w", err)
	}
	return &Conn{c: c}, nil
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
		Data:   request(family),
	})
	if err != nil {
		return nil, fmt.Errorf("listing the TCP handshakes in progress: %w", err)
	}
	var out []Handshake
	for _, m := range msgs {
		h, err := parse(m.Data)
		if err != nil {
			return nil, err
		}
		if h.Local.Port() == port {
			out = append(out, h)
		}
	}
	return out, nil
}

// The layout of struct inet_diag_req_v2 and struct inet_diag_msg
// (linux/inet_diag.h): a socket id is the two ports in network order, two
// 16-byte addresses, an interface index and a 64-bit cookie.
const (
	sizeofReq    = 56
	sizeofMsg    = 72
	offsetMsgID  = 4
	tcpSynRecv   = 3 // TCP_SYN_RECV: the kernel lists request sockets under it
	sizeofSockID = 48
)

func request(family uint8) []byte {
	b := make([]byte, sizeofReq)
	b[0] = family
	b[1] = unix.IPPROTO_TCP
	binary.NativeEndian.PutUint32(b[4:8], 1<<tcpSynRecv)
	return b
}

// errShort reports a reply too short to be an inet_diag_msg.
var errShort = errors.New("short inet_diag_msg from the kernel")

func parse(b []byte) (Handshake, error) {
	if len(b) < sizeofMsg {
		return Handshake{}, errShort
	}
	family := b[0]
	id := b[offsetMsgID : offsetMsgID+sizeofSockID]
	local := addr(family, id[4:20], binary.BigEndian.Uint16(id[0:2]))
	remote := addr(family, id[20:36], binary.BigEndian.Uint16(id[2:4]))
	return Handshake{Local: local, Remote: remote}, nil
}

func addr(family uint8, b []byte, port uint16) netip.AddrPort {
	if family == unix.AF_INET {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[:4])), port)
	}
	return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[:16])).Unmap(), port)
}
