package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
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
// port before the server starts.
func freeLoopbackPort(t testing.TB) int {
	t.Helper()
	l, _ := mustFreeTCPAddr(t)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// listenSock is a TCP socket in LISTEN state, as /proc/net/tcp{,6} shows it.
type listenSock struct {
	local  string // address:port in the kernel's hex
	inode  string
	queued int // connections waiting in its accept queue
}

// listening lists the listening TCP sockets on port, IPv4 and IPv6, in
// this network namespace: what `ss -ltn sport = :PORT` shows.
func listening(t testing.TB, port int) []listenSock {
	t.Helper()
	want := fmt.Sprintf(":%04X", port)
	var out []listenSock
	for _, path := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		f, err := os.Open(path)
		if err != nil {
			continue // no IPv6
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			// sl local rem st tx_queue:rx_queue tr:when retrnsmt uid timeout inode
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 || !strings.HasSuffix(fields[1], want) || fields[3] != "0A" {
				continue
			}
			// For a listener, rx_queue is the accept queue's length.
			_, rx, _ := strings.Cut(fields[4], ":")
			queued, _ := strconv.ParseInt(rx, 16, 64)
			out = append(out, listenSock{local: fields[1], inode: fields[9], queued: int(queued)})
		}
		f.Close()
	}
	return out
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
	return checkSockets(t, r, listening(t, port), port, want, when)
}

// checkSockets is checkListeners for sockets already listed.
func checkSockets(t testing.TB, r *relayProc, socks []listenSock, port, want int, when string) []listenSock {
	t.Helper()
	if len(socks) != want {
		t.Errorf("%s: %d listening sockets on port %d, want %d (one per live generation): %v", when, len(socks), port, want, socks)
	}
	relays := socketInodes(t, r.pid())
	for _, s := range socks {
		if relays[s.inode] == nil {
			t.Errorf("%s: the listening socket %s (inode %s) on port %d is not relay's: relay's sockets are %v", when, s.local, s.inode, port, relays)
		}
	}
	return socks
}

// backlogs returns the accept backlog of each listening socket on port, by
// inode, as ss shows it (Send-Q of a listener), or nil without ss.
func backlogs(t testing.TB, port int) map[string]int {
	t.Helper()
	ss, err := exec.LookPath("ss")
	if err != nil {
		t.Logf("no ss here: the backlogs go unchecked")
		return nil
	}
	out, err := exec.Command(ss, "-Hltne", fmt.Sprintf("sport = :%d", port)).Output()
	if err != nil {
		t.Fatalf("ss: %v", err)
	}
	m := map[string]int{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 {
			continue
		}
		n, _ := strconv.Atoi(f[2])
		for _, x := range f[5:] {
			if ino, ok := strings.CutPrefix(x, "ino:"); ok {
				m[ino] = n
			}
		}
	}
	return m
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
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no %s in the status of pid %d", field, pid)
	return ""
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

// getIdent does one request and returns who answered.
func getIdent(client *http.Client, url string, id ident) (int, error) {
	resp, err := client.Get(url)
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
	client := newConnClient()
	ld := &load{pids: map[int]int{}, firstAt: map[int]time.Time{}, lastStart: map[int]time.Time{}, stopC: make(chan struct{})}
	deadline := time.Now().Add(limit)
	for range workers {
		ld.wg.Add(1)
		go func() {
			defer ld.wg.Done()
			for time.Now().Before(deadline) {
				select {
				case <-ld.stopC:
					return
				default:
				}
				start := time.Now()
				who, err := getIdent(client, url, id)
				ld.mu.Lock()
				ld.requests++
				if err != nil {
					ld.failures = append(ld.failures, err)
				} else {
					if ld.pids[who] == 0 {
						ld.firstAt[who] = time.Now()
					}
					if start.After(ld.lastStart[who]) {
						ld.lastStart[who] = start
					}
					ld.pids[who]++
				}
				ld.mu.Unlock()
			}
		}()
	}
	return ld
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
		t.Skipf("no setpriv (util-linux) to drop privileges with: %v", err)
	}
	base := t.TempDir()
	for dir := base; dir != os.TempDir() && dir != "/"; dir = filepath.Dir(dir) {
		if err := os.Chmod(dir, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chown(base, uid, gid); err != nil {
		t.Fatal(err)
	}
	ctl := filepath.Join(base, "ctl", "relay.sock")
	wrap := []string{setpriv, "--reuid", strconv.Itoa(uid), "--regid", strconv.Itoa(gid), "--clear-groups", "--"}
	// The later --control wins over the harness's, which is in a
	// directory of root's.
	r := startRelayWrapped(t, wrap, built.relay, nil, nil, append([]string{"--control", ctl}, args...)...)
	r.control = ctl
	return r
}
