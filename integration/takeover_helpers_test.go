package integration

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/procfs"
)

// The log lines of bind takeover. msgUnavailable begins the messages that
// say it is unavailable; the rest of each says what relay does instead.
const (
	msgTakenOver   = "bind taken over"
	msgUnavailable = "bind takeover unavailable"
	msgRefused     = "bind refused"
)

// lines returns relay's log lines with msg (and gen, if gen > 0), so far.
func (r *relayProc) lines(msg string, gen int) []logLine {
	return r.linesWhere(func(l logLine) bool { return l.str("msg") == msg && (gen == 0 || l.num("gen") == gen) })
}

// linesWhere returns relay's log lines for which pred holds, so far.
func (r *relayProc) linesWhere(pred func(logLine) bool) []logLine {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []logLine
	for _, l := range r.logs {
		if pred(l) {
			out = append(out, l)
		}
	}
	return out
}

// unavailable returns the lines that say bind takeover is unavailable.
func (r *relayProc) unavailable() []logLine {
	return r.linesWhere(func(l logLine) bool { return strings.HasPrefix(l.str("msg"), msgUnavailable) })
}

// freeLoopbackPort returns a TCP port that was free on 127.0.0.1 a moment
// ago, for a server that binds its own port: relay must be told the same
// port before the server starts. It is picked below the ephemeral range
// (net.ipv4.ip_local_port_range), from which the kernel gives every
// client connection of every parallel test its source port, and from which
// other tests' port-0 listeners come: nothing else takes it meanwhile.
func freeLoopbackPort(t testing.TB) int {
	t.Helper()
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 2048 {
				low = n
			}
		}
	}
	for range 100 {
		port := low/2 + rand.IntN(low/2)
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		l.Close()
		return port
	}
	t.Fatalf("no free port below %d in 100 tries", low)
	return 0
}

// requireOrSkip skips the test with why unless ok, or fails it where
// RELAY_REQUIRE_ALL=1 (.ci/run sets it): there no part of the proof may
// go missing unnoticed.
func requireOrSkip(t testing.TB, ok bool, why string) {
	t.Helper()
	if ok {
		return
	}
	if os.Getenv("RELAY_REQUIRE_ALL") == "1" {
		t.Fatal(why + " (RELAY_REQUIRE_ALL=1: nothing may be skipped)")
	}
	t.Skip(why)
}

// genState returns generation gen's state in relay status --json.
func (r *relayProc) genState(t testing.TB, gen int) string {
	t.Helper()
	state, _ := r.genStatus(t, gen)
	return state
}

// genStatus returns generation gen's state and how it took each listener's
// socket ("bind" or "fd", by listener name), from relay status --json;
// the state is "absent" for a generation relay does not list.
func (r *relayProc) genStatus(t testing.TB, gen int) (string, map[string]string) {
	t.Helper()
	out, errOut, code := r.client("status", "--json")
	if code != 0 {
		t.Fatalf("relay status --json: exit %d\n%s%s", code, out, errOut)
	}
	var doc struct {
		Generations []struct {
			Generation int               `json:"generation"`
			State      string            `json:"state"`
			Sockets    map[string]string `json:"sockets"`
		} `json:"generations"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("relay status --json is not JSON: %v\n%s", err, out)
	}
	for _, g := range doc.Generations {
		if g.Generation == gen {
			return g.State, g.Sockets
		}
	}
	return "absent", nil
}

// listenSock is a TCP socket in LISTEN state.
type listenSock struct {
	local   string // its address and port
	inode   string
	queued  int // connections waiting in its accept queue
	backlog int // the most that may wait there
}

// listening lists the listening TCP sockets on port, IPv4 and IPv6, in
// this network namespace: what `ss -ltn sport = :PORT` shows. Like ss it
// asks the kernel through sock_diag for the listening sockets alone;
// /proc/net/tcp would list every socket, and a load that opens a new
// connection per request leaves tens of thousands in TIME_WAIT, which take
// it seconds to print.
func listening(t testing.TB, port int) []listenSock {
	t.Helper()
	var out []listenSock
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		msgs, err := dumpListeners(family)
		if err != nil {
			t.Fatalf("sock_diag: %v", err)
		}
		for _, m := range msgs {
			if int(binary.BigEndian.Uint16(m.ID.Sport[:])) != port {
				continue
			}
			ip := net.IP(m.ID.Src[:16])
			if family == unix.AF_INET {
				ip = net.IP(m.ID.Src[:4])
			}
			out = append(out, listenSock{
				local: net.JoinHostPort(ip.String(), strconv.Itoa(port)), inode: strconv.FormatUint(uint64(m.Inode), 10),
				queued: int(m.RQueue), backlog: int(m.WQueue),
			})
		}
	}
	return out
}

// The structs of linux/inet_diag.h.
type inetDiagSockID struct {
	Sport, Dport [2]byte // network byte order
	Src, Dst     [16]byte
	If           uint32
	Cookie       [2]uint32
}

type inetDiagReqV2 struct {
	Family, Protocol, Ext, Pad uint8
	States                     uint32
	ID                         inetDiagSockID
}

// inetDiagMsg is one socket. For a listener, RQueue is the length of its
// accept queue and WQueue its backlog.
type inetDiagMsg struct {
	Family, State, Timer, Retrans       uint8
	ID                                  inetDiagSockID
	Expires, RQueue, WQueue, UID, Inode uint32
}

// dumpListeners asks sock_diag for the TCP sockets of family in LISTEN.
func dumpListeners(family uint8) ([]inetDiagMsg, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	const tcpListen = 10 // TCP_LISTEN in the kernel's states
	req := inetDiagReqV2{Family: family, Protocol: unix.IPPROTO_TCP, States: 1 << tcpListen}
	var b bytes.Buffer
	hdr := unix.NlMsghdr{Type: unix.SOCK_DIAG_BY_FAMILY, Flags: unix.NLM_F_REQUEST | unix.NLM_F_DUMP, Seq: 1}
	hdr.Len = uint32(unix.SizeofNlMsghdr + binary.Size(req))
	binary.Write(&b, binary.NativeEndian, hdr)
	binary.Write(&b, binary.NativeEndian, req)
	if err := unix.Sendto(fd, b.Bytes(), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, err
	}
	var out []inetDiagMsg
	buf := make([]byte, 64<<10)
	// Bounded: a dump of the listeners takes a few reads at most.
	for range 10000 {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, err
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				return nil, fmt.Errorf("sock_diag answered an error: %v", m.Data)
			}
			var d inetDiagMsg
			if err := binary.Read(bytes.NewReader(m.Data), binary.NativeEndian, &d); err != nil {
				return nil, err
			}
			out = append(out, d)
		}
	}
	return nil, errors.New("sock_diag: no end to the dump")
}

// socketInodes maps the inodes of pid's sockets to its fds for them.
func socketInodes(t testing.TB, pid int) map[string][]int {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("fds of pid %d: %v", pid, err)
	}
	out := map[string][]int{}
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if inode, ok := strings.CutPrefix(target, "socket:["); err == nil && ok {
			fd, _ := strconv.Atoi(e.Name())
			inode = strings.TrimSuffix(inode, "]")
			out[inode] = append(out[inode], fd)
		}
	}
	return out
}

// fdInode returns the inode of the socket pid has at fd.
func fdInode(t testing.TB, pid, fd int) string {
	t.Helper()
	target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", pid, fd))
	if err != nil {
		t.Fatalf("fd %d of pid %d: %v", fd, pid, err)
	}
	inode, ok := strings.CutPrefix(target, "socket:[")
	if !ok {
		t.Fatalf("fd %d of pid %d is %s, not a socket", fd, pid, target)
	}
	return strings.TrimSuffix(inode, "]")
}

// checkListeners checks that the listening sockets on port number want
// and are all relay's own: each one's inode is among relay's fds. It
// returns them.
func checkListeners(t testing.TB, r *relayProc, port, want int, when string) []listenSock {
	t.Helper()
	socks := listening(t, port)
	return checkSockets(t, socks, socketInodes(t, r.pid()), port, want, when)
}

// checkSockets is checkListeners for sockets already listed, and relay's
// sockets (socketInodes) read after them.
func checkSockets(t testing.TB, socks []listenSock, relays map[string][]int, port, want int, when string) []listenSock {
	t.Helper()
	if len(socks) != want {
		t.Errorf("%s: %d listening sockets on port %d, want %d (one per live generation): %v", when, len(socks), port, want, socks)
	}
	for _, s := range socks {
		if relays[s.inode] == nil {
			t.Errorf("%s: the listening socket %s (inode %s) on port %d is not relay's: relay's sockets are %v", when, s.local, s.inode, port, relays)
		}
	}
	return socks
}

// somaxconn is net.core.somaxconn, the backlog relay gives its sockets.
func somaxconn(t testing.TB) int {
	t.Helper()
	b, err := os.ReadFile("/proc/sys/net/core/somaxconn")
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// procStatus returns the value of a field of /proc/PID/status.
func procStatus(t testing.TB, pid int, field string) string {
	t.Helper()
	st, err := procfs.ReadStatus(pid)
	if err != nil {
		t.Fatal(err)
	}
	v, ok := st[field]
	if !ok {
		t.Fatalf("no %s in the status of pid %d", field, pid)
	}
	return v
}

// ident tells who answered a response: a pid, a generation number, ...
type ident func(resp *http.Response, body []byte) (int, error)

func pidHeader(resp *http.Response, _ []byte) (int, error) {
	return strconv.Atoi(resp.Header.Get("X-Pid"))
}

// bodyNumber reads the body as a number.
func bodyNumber(_ *http.Response, body []byte) (int, error) {
	return strconv.Atoi(strings.TrimSpace(string(body)))
}

// getIdent does one request and returns who answered. An error says when
// the request was sent and failed, and from which local address, so that
// it can be lined up with relay's log.
func getIdent(client *http.Client, url string, id ident) (who int, err error) {
	sent := time.Now()
	var local string
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w (sent %s from %s, failed %s)", err,
				sent.UTC().Format(time.RFC3339Nano), local, time.Now().UTC().Format(time.RFC3339Nano))
		}
	}()
	trace := &httptrace.ClientTrace{GotConn: func(c httptrace.GotConnInfo) { local = c.Conn.LocalAddr().String() }}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, fmt.Errorf("reading body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("status %s: %s", resp.Status, body)
	}
	n, err := id(resp, body)
	if err != nil {
		return 0, fmt.Errorf("who answered %q: %w", body, err)
	}
	return n, nil
}

// startLoadIdent is startLoad for servers that say who they are in their
// own way: workers send requests, a new connection each, until stopped or
// limit passes, and count them by id.
func startLoadIdent(url string, workers int, limit time.Duration, id ident) *load {
	return startLoadBy(newConnClient(), url, workers, limit, id)
}

// answered lists who answered so far.
func (ld *load) answered() []int {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	var out []int
	for who := range ld.pids {
		out = append(out, who)
	}
	slices.Sort(out)
	return out
}

// startRelayAs starts relay as uid:gid, unprivileged, through setpriv
// (util-linux), with its control socket in a directory of that user's.
// The test process stays root, so it can still signal relay and read
// its /proc files.
func startRelayAs(t *testing.T, uid, gid int, args ...string) *relayProc {
	t.Helper()
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		requireOrSkip(t, false, fmt.Sprintf("no setpriv (util-linux) to drop privileges with: %v", err))
	}
	base := tempDirOf(t, uid, gid)
	ctl := filepath.Join(base, "ctl", "relay.sock")
	wrap := []string{setpriv, "--reuid", strconv.Itoa(uid), "--regid", strconv.Itoa(gid), "--clear-groups", "--"}
	// The later --control wins over the harness's, which is in a
	// directory of root's.
	r := startRelayWrapped(t, wrap, built.relay, nil, nil, append([]string{"--control", ctl}, args...)...)
	r.control = ctl
	return r
}
