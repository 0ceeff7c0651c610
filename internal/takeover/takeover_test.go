package takeover

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
)

// The test binary plays the shim and the child: "shim" installs the filter
// on fd 3 and execs the binary again as "binder", which binds what its
// arguments say and reports each result as a JSON line on stdout. With
// envAllowIOURing=1 the shim installs it with Options.IOURing.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "shim" {
		runtime.LockOSThread()
		if err := Install(3, Options{Unlink: true, IOURing: os.Getenv(envAllowIOURing) == "1"}); err != nil {
			fmt.Fprintln(os.Stderr, "install:", err)
			os.Exit(3)
		}
		unix.CloseOnExec(3)
		err := unix.Exec("/proc/self/exe", append([]string{os.Args[0], "binder"}, os.Args[2:]...), os.Environ())
		fmt.Fprintln(os.Stderr, "exec:", err)
		os.Exit(4)
	}
	if len(os.Args) > 1 && os.Args[1] == "binder" {
		os.Exit(binder(os.Args[2:]))
	}
	os.Exit(m.Run())
}

// result is what the binder reports of one bind.
type result struct {
	Spec     string
	Errno    int
	Ino      uint64
	Port     int
	Nonblock bool
	Cloexec  bool
	Pid      int // the binder's, for io_uring_setup
}

// binder binds each spec "tcp4|tcp6|udp4[,nb][,cloexec] ADDR:PORT",
// listens with a backlog of 5 on stream sockets, and reports. The spec
// "io_uring_setup" sets up an io_uring (see uring_test.go).
func binder(specs []string) int {
	enc := json.NewEncoder(os.Stdout)
	for _, spec := range specs {
		kind, addr, _ := strings.Cut(spec, " ")
		if kind == "io_uring_setup" {
			enc.Encode(result{Spec: spec, Errno: int(ringSetup()), Pid: os.Getpid()})
			continue
		}
		if kind == "unlink" || kind == "unlinkat" {
			var err error
			if kind == "unlink" {
				err = unix.Unlink(addr)
			} else {
				err = unix.Unlinkat(unix.AT_FDCWD, addr, 0)
			}
			r := result{Spec: spec}
			if err != nil {
				r.Errno = int(err.(unix.Errno))
			}
			enc.Encode(r)
			continue
		}
		opts := strings.Split(kind, ",")
		family, typ := unix.AF_INET, unix.SOCK_STREAM
		switch opts[0] {
		case "tcp6":
			family = unix.AF_INET6
		case "udp4":
			typ = unix.SOCK_DGRAM
		}
		flags := 0
		for _, o := range opts[1:] {
			switch o {
			case "nb":
				flags |= unix.SOCK_NONBLOCK
			case "cloexec":
				flags |= unix.SOCK_CLOEXEC
			}
		}
		fd, err := unix.Socket(family, typ|flags, 0)
		if err != nil {
			fmt.Fprintln(os.Stderr, "socket:", err)
			return 1
		}
		ap := netip.MustParseAddrPort(addr)
		var sa unix.Sockaddr
		if family == unix.AF_INET6 {
			sa = &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
		} else {
			sa = &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
		}
		r := result{Spec: spec}
		bind := func() error { return unix.Bind(fd, sa) }
		if slices.Contains(opts, "storage") {
			// As C servers do: the address in a sockaddr_storage,
			// and its whole size as the length.
			bind = func() error {
				var buf [128]byte
				binary.NativeEndian.PutUint16(buf[:], unix.AF_INET)
				binary.BigEndian.PutUint16(buf[2:], ap.Port())
				copy(buf[4:], ap.Addr().AsSlice())
				_, _, e := unix.Syscall(unix.SYS_BIND, uintptr(fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)))
				if e != 0 {
					return e
				}
				return nil
			}
		}
		if err := bind(); err != nil {
			r.Errno = int(err.(unix.Errno))
			enc.Encode(r)
			continue
		}
		if typ == unix.SOCK_STREAM {
			if err := unix.Listen(fd, 5); err != nil {
				fmt.Fprintln(os.Stderr, "listen:", err)
				return 1
			}
		}
		var st unix.Stat_t
		unix.Fstat(fd, &st)
		r.Ino = st.Ino
		if got, err := unix.Getsockname(fd); err == nil {
			switch got := got.(type) {
			case *unix.SockaddrInet4:
				r.Port = got.Port
			case *unix.SockaddrInet6:
				r.Port = got.Port
			}
		}
		fl, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		r.Nonblock = fl&unix.O_NONBLOCK != 0
		fdfl, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		r.Cloexec = fdfl&unix.FD_CLOEXEC != 0
		enc.Encode(r)
	}
	return 0
}

// relaySock is a listening socket on 127.0.0.1 standing in for relay's.
func relaySock(t *testing.T, backlog int) (*os.File, int, uint64) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, backlog); err != nil {
		t.Fatal(err)
	}
	sa, _ := unix.Getsockname(fd)
	var st unix.Stat_t
	unix.Fstat(fd, &st)
	f := os.NewFile(uintptr(fd), "relay")
	t.Cleanup(func() { f.Close() })
	return f, sa.(*unix.SockaddrInet4).Port, st.Ino
}

type run struct {
	results []result
	events  []Event
	stderr  string
}

// runChild runs the binder with specs under the filter, serving its
// notifications with claim, and returns what it reported.
func runChild(t *testing.T, socks []*os.File, claim func(Bind) Decision, specs ...string) run {
	t.Helper()
	return runWith(t, Config{Sockets: socks, Claim: claim}, specs...)
}

// startShim starts this test binary as the exec shim's binder with specs
// (see TestMain), its stderr to stderr, and returns it, its stdout and
// relay's end of its filter.
func startShim(t *testing.T, stderr *strings.Builder, specs ...string) (*exec.Cmd, io.Reader, *Notifier) {
	t.Helper()
	hs, childEnd, err := NewHandshake()
	if err != nil {
		t.Fatal(err)
	}
	defer hs.Close()
	cmd := exec.Command(os.Args[0], append([]string{"shim"}, specs...)...)
	cmd.ExtraFiles = []*os.File{childEnd}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	childEnd.Close()
	nt, err := hs.Receive()
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("receive: %v (stderr: %s)", err, stderr.String())
	}
	return cmd, out, nt
}

// runWith is runChild with a whole Config; its Event is replaced.
func runWith(t *testing.T, cfg Config, specs ...string) run {
	t.Helper()
	var stderr strings.Builder
	cmd, out, nt := startShim(t, &stderr, specs...)
	var r run
	var mu sync.Mutex
	served := make(chan error, 1)
	go func() {
		cfg.Event = func(e Event) {
			mu.Lock()
			r.events = append(r.events, e)
			mu.Unlock()
		}
		served <- nt.Serve(cfg)
	}()
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		var res result
		if err := json.Unmarshal(sc.Bytes(), &res); err != nil {
			t.Fatalf("bad line %q: %v", sc.Text(), err)
		}
		r.results = append(r.results, res)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("binder: %v (stderr: %s)", err, stderr.String())
	}
	servedNil(t, served, "after the child tree exited")
	nt.Close()
	if len(r.results) != len(specs) {
		t.Fatalf("got %d results for %d binds (stderr: %s)", len(r.results), len(specs), stderr.String())
	}
	r.stderr = stderr.String()
	return r
}

func backlogOf(t *testing.T, f *os.File) int {
	t.Helper()
	var backlog int
	control(f, func(fd int) error {
		info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			t.Fatal(err)
		}
		backlog = int(info.Sacked) // a listener's backlog
		return nil
	})
	return backlog
}

func claimPort(port int, own bool) func(Bind) Decision {
	return func(b Bind) Decision {
		if b.Network == sockaddr.TCP && int(b.Addr.Port()) == port {
			return Decision{Socket: 0, Own: own}
		}
		return Pass
	}
}

func TestCoveredBindLandsOnRelaysSocket(t *testing.T) {
	sock, port, ino := relaySock(t, 128)
	other, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	r := runChild(t, []*os.File{sock}, claimPort(port, true),
		fmt.Sprintf("tcp4,nb 127.0.0.1:%d", port),
		fmt.Sprintf("tcp6,cloexec [::]:%d", port),
		fmt.Sprintf("tcp4,storage 127.0.0.1:%d", port),
		fmt.Sprintf("tcp4 127.0.0.1:%d", other),
		"tcp4 127.0.0.1:0",
	)
	for i, res := range r.results[:3] {
		if res.Errno != 0 || res.Ino != ino || res.Port != port {
			t.Errorf("covered bind %d (%s): %+v, want relay's socket (inode %d, port %d)", i, res.Spec, res, ino, port)
		}
	}
	if !r.results[0].Nonblock {
		t.Errorf("a non-blocking child socket was replaced by a blocking one: %+v", r.results[0])
	}
	if r.results[1].Nonblock || !r.results[1].Cloexec {
		t.Errorf("a blocking close-on-exec child socket got other flags: %+v", r.results[1])
	}
	if res := r.results[3]; res.Errno != 0 || res.Ino == ino || res.Port != other {
		t.Errorf("bind of another port: %+v, want the child's own socket on port %d", res, other)
	}
	if res := r.results[4]; res.Errno != 0 || res.Ino == ino || res.Port == 0 || res.Port == port {
		t.Errorf("bind of port 0: %+v, want the child's own socket on a port the kernel picked", res)
	}
	if got := backlogOf(t, sock); got != 128 {
		t.Errorf("relay's backlog is %d after the child's listen(5), want 128", got)
	}
	var bound, listened int
	for _, e := range r.events {
		switch e.Kind {
		case Bound:
			bound++
		case Listened:
			listened++
		case Refused:
			t.Errorf("unexpected refusal: %v", e.Err)
		}
	}
	if bound != 3 || listened != 3 {
		t.Errorf("events: %d bound, %d listened; want 3 and 3", bound, listened)
	}
}

func TestRefusedBindFailsClosed(t *testing.T) {
	sock, port, _ := relaySock(t, 128)
	why := errors.New("not safe")
	r := runChild(t, []*os.File{sock}, func(b Bind) Decision {
		if int(b.Addr.Port()) == port {
			return Decision{Socket: -1, Refuse: why}
		}
		return Pass
	}, fmt.Sprintf("tcp4 0.0.0.0:%d", port))
	if r.results[0].Errno != int(unix.EADDRINUSE) {
		t.Errorf("refused bind returned %+v, want EADDRINUSE", r.results[0])
	}
	if len(r.events) != 1 || r.events[0].Kind != Refused || !errors.Is(r.events[0].Err, why) {
		t.Errorf("events %+v, want one Refused carrying the reason", r.events)
	}
}

func TestSharedSocketKeepsItsBlockingMode(t *testing.T) {
	sock, port, _ := relaySock(t, 128)
	r := runChild(t, []*os.File{sock}, claimPort(port, false), fmt.Sprintf("tcp4,nb 127.0.0.1:%d", port))
	if r.results[0].Errno != int(unix.EADDRINUSE) {
		t.Errorf("a non-blocking bind of a blocking shared socket returned %+v, want EADDRINUSE", r.results[0])
	}
	if len(r.events) != 1 || r.events[0].Kind != Refused || !strings.Contains(r.events[0].Err.Error(), "blocking") {
		t.Errorf("events %+v, want one Refused naming the blocking mode", r.events)
	}
	var nb bool
	control(sock, func(fd int) error { nb, _ = isNonblock(fd); return nil })
	if nb {
		t.Error("relay's shared socket was switched to non-blocking")
	}
}

func TestUDPAndUnclaimedBindsPass(t *testing.T) {
	sock, port, ino := relaySock(t, 128)
	r := runChild(t, []*os.File{sock}, claimPort(port, true), fmt.Sprintf("udp4 127.0.0.1:%d", port))
	if res := r.results[0]; res.Errno != 0 || res.Ino == ino {
		t.Errorf("UDP bind on the TCP listener's port: %+v, want the child's own socket", res)
	}
}

func TestUnlinkOfRelaysPathKeepsIt(t *testing.T) {
	dir := t.TempDir()
	kept, other := dir+"/relay.sock", dir+"/other"
	for _, p := range []string{kept, other} {
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	r := runWith(t, Config{Paths: []string{kept}, Claim: func(Bind) Decision { return Pass }},
		"unlink "+kept, "unlinkat "+kept, "unlink "+other)
	for _, res := range r.results {
		if res.Errno != 0 {
			t.Errorf("%s: errno %d, want success", res.Spec, res.Errno)
		}
	}
	kepts := 0
	for _, e := range r.events {
		if e.Kind == Kept && e.Path == kept {
			kepts++
		}
	}
	if _, err := os.Stat(kept); err != nil {
		t.Errorf("relay's path was removed: %v", err)
	}
	if _, err := os.Stat(other); err == nil {
		t.Error("another path was kept")
	}
	if kepts != 2 {
		t.Errorf("%d Kept events, want 2 (unlink and unlinkat)", kepts)
	}
}

func freePort() (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return 0, err
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return 0, err
	}
	return sa.(*unix.SockaddrInet4).Port, nil
}

func TestKernelVersionCheck(t *testing.T) {
	for release, want := range map[string]bool{
		"5.8.18": false, "5.9.0": true, "4.19.0-27-amd64": false, "6.18.44-fc-v669": true, "5.10": true, "weird": true,
	} {
		if got := atLeast(release, 5, 9); got != want {
			t.Errorf("atLeast(%q, 5, 9) = %v, want %v", release, got, want)
		}
	}
}
