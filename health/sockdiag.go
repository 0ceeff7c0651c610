package health

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// TCP states as the kernel numbers them (include/net/tcp_states.h), in
// idiag_state and tcpi_state.
const (
	tcpEstablished = 1
	tcpSynSent     = 2
	tcpSynRecv     = 3
	tcpFinWait1    = 4
	tcpFinWait2    = 5
	tcpTimeWait    = 6
	tcpClose       = 7
	tcpCloseWait   = 8
	tcpLastAck     = 9
	tcpListen      = 10
	tcpClosing     = 11
	tcpNewSynRecv  = 12
)

// tcpStateName names a TCP state for messages.
func tcpStateName(s uint8) string {
	names := [...]string{
		tcpEstablished: "ESTABLISHED", tcpSynSent: "SYN_SENT", tcpSynRecv: "SYN_RECV",
		tcpFinWait1: "FIN_WAIT1", tcpFinWait2: "FIN_WAIT2", tcpTimeWait: "TIME_WAIT",
		tcpClose: "CLOSE", tcpCloseWait: "CLOSE_WAIT", tcpLastAck: "LAST_ACK",
		tcpListen: "LISTEN", tcpClosing: "CLOSING", tcpNewSynRecv: "NEW_SYN_RECV",
	}
	if int(s) < len(names) && names[s] != "" {
		return names[s]
	}
	return fmt.Sprintf("state %d", s)
}

// The layout of struct inet_diag_req_v2 and struct inet_diag_msg
// (include/uapi/linux/inet_diag.h), which x/sys/unix does not define.
const (
	sizeofInetDiagSockID = 48 // sport, dport (big endian), src[4], dst[4], if, cookie[2]
	sizeofInetDiagReqV2  = 8 + sizeofInetDiagSockID
	sizeofInetDiagMsg    = 4 + sizeofInetDiagSockID + 20
	inetDiagNoCookie     = ^uint32(0)
	// diagReplyTimeout bounds a wait for the kernel's answer, which an
	// exact request gets at once.
	diagReplyTimeout = time.Second
)

// diagFound is what an exact lookup found.
type diagFound int

const (
	foundNone     diagFound = iota // no socket has that address, not even a listener
	foundListener                  // only the listener on the local address and port
	foundSocket                    // the socket of that 4-tuple
)

// diagSock is what sock_diag reports of one socket.
type diagSock struct {
	state uint8
	// inode is 0 while the socket has no struct file: a connection still
	// in its listener's accept queue, a request or a time-wait socket, an
	// orphan the server closed.
	inode uint32
}

// sockDiag is a NETLINK_SOCK_DIAG socket for exact lookups of TCP sockets.
type sockDiag struct {
	fd  int
	seq uint32
	buf []byte
}

func openSockDiag() (*sockDiag, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("opening a NETLINK_SOCK_DIAG socket: %w", err)
	}
	tv := unix.NsecToTimeval(diagReplyTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("setting the receive timeout of the NETLINK_SOCK_DIAG socket: %w", err)
	}
	return &sockDiag{fd: fd, buf: make([]byte, 8192)}, nil
}

func (d *sockDiag) Close() error { return unix.Close(d.fd) }

// lookup asks for the TCP socket whose local end is local and whose peer
// is remote; ifindex is the interface of a link-local address, else 0.
//
// For a tuple with no socket, the kernel falls back to a listener on
// local's address and port and reports that one: lookup checks the
// answer's tuple and reports such an answer as foundListener.
func (d *sockDiag) lookup(local, remote netip.AddrPort, ifindex uint32) (s diagSock, found diagFound, err error) {
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	if local.Addr().Is4() != remote.Addr().Is4() {
		return diagSock{}, foundNone, fmt.Errorf("looking up TCP socket %s-%s: mixed address families", local, remote)
	}
	d.seq++
	req := d.request(local, remote, ifindex)
	if err := sendNetlink(d.fd, req); err != nil {
		return diagSock{}, foundNone, fmt.Errorf("sending sock_diag request for TCP socket %s-%s: %w", local, remote, err)
	}
	for {
		n, err := recvNetlink(d.fd, d.buf)
		if err != nil {
			return diagSock{}, foundNone, fmt.Errorf("reading sock_diag answer for TCP socket %s-%s: %w", local, remote, err)
		}
		s, ok, mine, err := d.parse(d.buf[:n], local, remote)
		if err != nil {
			return diagSock{}, foundNone, fmt.Errorf("looking up TCP socket %s-%s with sock_diag: %w", local, remote, err)
		}
		if mine {
			return s, ok, nil
		}
		// An answer to an earlier request, left unread: skip it.
	}
}

// request encodes a netlink header and an exact inet_diag_req_v2.
func (d *sockDiag) request(local, remote netip.AddrPort, ifindex uint32) []byte {
	ne := binary.NativeEndian
	b := make([]byte, unix.SizeofNlMsghdr+sizeofInetDiagReqV2)
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint16(b[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(b[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(b[8:], d.seq)
	// b[12:16], the port id: 0 is the kernel.
	r := b[unix.SizeofNlMsghdr:]
	family := byte(unix.AF_INET6)
	if local.Addr().Is4() {
		family = unix.AF_INET
	}
	r[0], r[1] = family, unix.IPPROTO_TCP
	// r[2], idiag_ext: no extensions; r[3]: padding.
	ne.PutUint32(r[4:], ^uint32(0)) // idiag_states: all
	id := r[8:]
	binary.BigEndian.PutUint16(id[0:], local.Port())
	binary.BigEndian.PutUint16(id[2:], remote.Port())
	putAddr(id[4:20], local.Addr())
	putAddr(id[20:36], remote.Addr())
	ne.PutUint32(id[36:], ifindex)
	ne.PutUint32(id[40:], inetDiagNoCookie)
	ne.PutUint32(id[44:], inetDiagNoCookie)
	return b
}

// putAddr writes an address as idiag_src or idiag_dst holds it: an IPv4
// address in the first four bytes, an IPv6 address in all sixteen.
func putAddr(b []byte, a netip.Addr) {
	if a.Is4() {
		v := a.As4()
		copy(b, v[:])
		return
	}
	v := a.As16()
	copy(b, v[:])
}

// getAddr reads idiag_src or idiag_dst of a socket of family.
func getAddr(b []byte, family byte) netip.Addr {
	if family == unix.AF_INET {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16([16]byte(b[:16])).Unmap()
}

// parse reads one datagram from the kernel. mine is false when it answers
// another request.
func (d *sockDiag) parse(b []byte, local, remote netip.AddrPort) (s diagSock, found diagFound, mine bool, err error) {
	ne := binary.NativeEndian
	for len(b) >= unix.SizeofNlMsghdr {
		msgLen := int(ne.Uint32(b[0:]))
		typ := ne.Uint16(b[4:])
		seq := ne.Uint32(b[8:])
		if msgLen < unix.SizeofNlMsghdr || msgLen > len(b) {
			return diagSock{}, foundNone, false, fmt.Errorf("malformed netlink message (length %d of %d bytes)", msgLen, len(b))
		}
		body := b[unix.SizeofNlMsghdr:msgLen]
		b = b[min(nlmAlign(msgLen), len(b)):]
		if seq != d.seq {
			continue
		}
		switch typ {
		case unix.NLMSG_ERROR:
			if len(body) < 4 {
				return diagSock{}, foundNone, false, errors.New("short netlink error message")
			}
			errno := -int32(ne.Uint32(body))
			switch {
			case errno == 0:
				continue // an acknowledgment
			case unix.Errno(errno) == unix.ENOENT:
				return diagSock{}, foundNone, true, nil
			default:
				return diagSock{}, foundNone, true, unix.Errno(errno)
			}
		case unix.SOCK_DIAG_BY_FAMILY:
			if len(body) < sizeofInetDiagMsg {
				return diagSock{}, foundNone, false, fmt.Errorf("short inet_diag_msg (%d bytes)", len(body))
			}
			family, state := body[0], body[1]
			id := body[4:]
			gotLocal := netip.AddrPortFrom(getAddr(id[4:20], family), binary.BigEndian.Uint16(id[0:]))
			gotRemote := netip.AddrPortFrom(getAddr(id[20:36], family), binary.BigEndian.Uint16(id[2:]))
			switch {
			case state == tcpListen:
				// The kernel's fallback to the listener.
				return diagSock{}, foundListener, true, nil
			case gotLocal != local || gotRemote != remote:
				return diagSock{}, foundNone, true, nil
			}
			return diagSock{state: state, inode: ne.Uint32(body[4+sizeofInetDiagSockID+16:])}, foundSocket, true, nil
		case unix.NLMSG_DONE:
			return diagSock{}, foundNone, true, nil
		}
	}
	return diagSock{}, foundNone, false, nil
}

func nlmAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

func sendNetlink(fd int, b []byte) error {
	for {
		err := unix.Sendto(fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		if err != unix.EINTR {
			return err
		}
	}
}

func recvNetlink(fd int, b []byte) (int, error) {
	for {
		n, _, err := unix.Recvfrom(fd, b, 0)
		if err != unix.EINTR {
			return n, err
		}
	}
}
