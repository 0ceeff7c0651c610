package health

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockdiag"
)

// Polling intervals of awaitAccepted: a connection that the server takes
// at once is seen within a millisecond or two, and one it takes within
// its first 100 ms within 5 ms, which decides how soon a restart switches.
// After that the interval grows with the wait, to a twentieth of it
// (acceptPollShare) and at most slowAcceptPoll: a server that takes a
// second to start is seen within 50 ms of its accept (5% of its startup),
// and a child that hangs at start is looked at 10 times a second rather
// than 200. A look is a netlink round trip and a wake-up of relay, some
// tens of microseconds of CPU.
const (
	firstAcceptPoll = time.Millisecond
	maxAcceptPoll   = 5 * time.Millisecond
	slowAcceptPoll  = 100 * time.Millisecond
	acceptPollShare = 20
)

// nextAcceptPoll is the interval after poll once waited has passed since
// the probe connected.
func nextAcceptPoll(poll, waited time.Duration) time.Duration {
	return max(min(2*poll, maxAcceptPoll), min(waited/acceptPollShare, slowAcceptPoll))
}

// queuedMsg describes a probe connection the server has not accepted.
const queuedMsg = "connected, but the server has not accepted it (it waits in the accept queue)"

// acceptState is what one look at a connection found.
type acceptState int

const (
	pending  acceptState = iota // not accepted yet
	accepted                    // accepted, and maybe closed since
)

// probeAccepted connects to addr with dial, so with the Control ctx
// carries, waits until the server accepts the connection, and closes it.
func probeAccepted(ctx context.Context, addr string) error {
	conn, err := dial(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	tc, ok := conn.(*net.TCPConn)
	if !ok {
		return fmt.Errorf("probe of %s: not a TCP connection (%T)", addr, conn)
	}
	if err := awaitAccepted(ctx, tc); err != nil {
		return fmt.Errorf("probe %v→%v: %w", conn.LocalAddr(), conn.RemoteAddr(), err)
	}
	return nil
}

// awaitAccepted returns nil once the server has accepted conn, the client
// end of a TCP connection: the server's end of it has left the listener's
// accept queue. It polls the server's end with sock_diag until then, and
// fails when the connection is reset before that or when ctx ends.
func awaitAccepted(ctx context.Context, conn *net.TCPConn) error {
	local, remote, ifindex, err := tcpTuple(conn)
	if err != nil {
		return err
	}
	diag, err := sockdiag.Dial()
	if err != nil {
		return err
	}
	defer diag.Close()
	if err := checkOwnEnd(diag, conn, local, remote, ifindex); err != nil {
		return err
	}
	poll, start := firstAcceptPoll, time.Now()
	for {
		st, detail, err := lookAtAccept(diag, conn, local, remote, ifindex)
		if err != nil {
			return err
		}
		if st == accepted {
			return nil
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			if detail != "" {
				return fmt.Errorf("connected, but the server has not accepted it (%s): %w", detail, ctx.Err())
			}
			return fmt.Errorf("%s: %w", queuedMsg, ctx.Err())
		case <-t.C:
		}
		poll = nextAcceptPoll(poll, time.Since(start))
	}
}

// checkOwnEnd looks up conn's own end, which exists unless conn was reset:
// when sock_diag does not find it, it cannot tell about the server's end
// either (no tcp_diag in this kernel, say), and waiting would only end in
// a misleading timeout.
func checkOwnEnd(diag *sockdiag.Conn, conn *net.TCPConn, local, remote netip.AddrPort, ifindex uint32) error {
	_, found, err := diag.Lookup(local, remote, ifindex)
	if err != nil || found == sockdiag.FoundSocket {
		return err
	}
	if st, err := tcpInfoState(conn); err != nil {
		return err
	} else if st == sockdiag.StateClose {
		return fmt.Errorf("not accepted: the connection was reset")
	}
	return fmt.Errorf("NETLINK_SOCK_DIAG does not report TCP connection %s→%s (is tcp_diag missing from the kernel?), so relay cannot see whether the server accepted it", local, remote)
}

// lookAtAccept looks once at the server's end of a connection (from local
// to remote) and, when that is not to be found, at the client's end.
// detail says more about a pending connection that is not plainly queued.
func lookAtAccept(diag *sockdiag.Conn, conn *net.TCPConn, local, remote netip.AddrPort, ifindex uint32) (st acceptState, detail string, err error) {
	server, found, err := diag.Lookup(remote, local, ifindex)
	if err != nil {
		return pending, "", err
	}
	if found == sockdiag.FoundSocket {
		switch {
		case server.Inode != 0:
			return accepted, "", nil
		case server.State == sockdiag.StateFinWait1, server.State == sockdiag.StateFinWait2, server.State == sockdiag.StateClosing,
			server.State == sockdiag.StateTimeWait, server.State == sockdiag.StateLastAck:
			// Accepted and closed: an orphan, or a time-wait socket.
			return accepted, "", nil
		case server.State == sockdiag.StateEstablished, server.State == sockdiag.StateCloseWait:
			return pending, "", nil
		}
		// SYN_RECV, NEW_SYN_RECV: the server has not taken the
		// handshake's last ACK, as when the accept queue is full.
		return pending, "server side in " + sockdiag.StateName(server.State), nil
	}
	// No server end: the handshake's last ACK may still be on its way
	// (connect returns when the client sends it), or the server reset
	// the connection.
	client, err := tcpInfoState(conn)
	if err != nil {
		return pending, "", err
	}
	switch {
	case client == sockdiag.StateEstablished && found == sockdiag.FoundNone:
		// Not even a listener: the server is not on this host, or
		// not in relay's network namespace.
		return pending, fmt.Sprintf("no socket of this host has address %s", remote), nil
	case client == sockdiag.StateEstablished:
		return pending, "server side not found yet", nil
	case client == sockdiag.StateCloseWait:
		// The server sent its FIN: it accepted and closed.
		return accepted, "", nil
	}
	return pending, "", fmt.Errorf("not accepted: the connection is %s and the server has no end of it (reset)", sockdiag.StateName(client))
}

// tcpTuple returns conn's addresses and, for a link-local peer, the index
// of its interface.
func tcpTuple(conn *net.TCPConn) (local, remote netip.AddrPort, ifindex uint32, err error) {
	la, lok := conn.LocalAddr().(*net.TCPAddr)
	ra, rok := conn.RemoteAddr().(*net.TCPAddr)
	if !lok || !rok {
		return local, remote, 0, fmt.Errorf("reading the addresses of connection %v→%v: not TCP", conn.LocalAddr(), conn.RemoteAddr())
	}
	local, remote = la.AddrPort(), ra.AddrPort()
	local = netip.AddrPortFrom(local.Addr().Unmap().WithZone(""), local.Port())
	remote = netip.AddrPortFrom(remote.Addr().Unmap().WithZone(""), remote.Port())
	if ra.Zone != "" {
		if n, err := strconv.ParseUint(ra.Zone, 10, 32); err == nil {
			ifindex = uint32(n)
		} else if ifi, err := net.InterfaceByName(ra.Zone); err == nil {
			ifindex = uint32(ifi.Index)
		} else {
			return local, remote, 0, fmt.Errorf("finding the interface of %v: %w", ra, err)
		}
	}
	return local, remote, ifindex, nil
}

// tcpInfoState returns the TCP state of conn's own end.
func tcpInfoState(conn *net.TCPConn) (uint8, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("reading the state of connection %v→%v: %w", conn.LocalAddr(), conn.RemoteAddr(), err)
	}
	var info *unix.TCPInfo
	var infoErr error
	if err := rc.Control(func(fd uintptr) {
		info, infoErr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); err != nil {
		return 0, fmt.Errorf("reading the state of connection %v→%v: %w", conn.LocalAddr(), conn.RemoteAddr(), err)
	}
	if infoErr != nil {
		return 0, fmt.Errorf("reading the state of connection %v→%v: TCP_INFO: %w", conn.LocalAddr(), conn.RemoteAddr(), infoErr)
	}
	return info.State, nil
}
