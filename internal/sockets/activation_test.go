package sockets

import (
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
	"github.com/relaysh/relay/internal/unixpath"
)

// passedSocket binds spec and dresses the socket up as one passed to relay
// under name.
func passedSocket(t *testing.T, spec string, name string) *Listener {
	t.Helper()
	s, err := ParseSpec(spec)
	if err != nil {
		t.Fatal(err)
	}
	l, err := bindOne(s, BindOptions{UnixMode: 0o600})
	if err != nil {
		t.Fatal(err)
	}
	if l.lock != nil {
		l.lock.Close() // a passed socket comes without relay's lock
	}
	l.dev, l.ino, l.lock = 0, 0, nil
	l.Origin, l.PassedName, l.Spec.Name = Activated, name, name
	return l
}

func TestOpenTakesPassedSocketsForMatchingSpecs(t *testing.T) {
	dir := t.TempDir()
	tcp := passedSocket(t, "127.0.0.1:0", StoreNamePrefix+"tcp-x")
	sock := filepath.Join(dir, "a.sock")
	unixL := passedSocket(t, "unix:"+sock, StoreNamePrefix+"unix-a.sock")
	other := passedSocket(t, "127.0.0.1:0", "web")
	stale := passedSocket(t, "127.0.0.1:0", StoreNamePrefix+"gone")
	_, port, _ := net.SplitHostPort(tcp.Addr)

	var specs []Spec
	for _, v := range []string{"127.0.0.1:" + port, "unix:" + sock, "admin=127.0.0.1:0"} {
		s, err := ParseSpec(v)
		if err != nil {
			t.Fatal(err)
		}
		specs = append(specs, s)
	}
	var staleNames []string
	ls, err := openListeners(specs, []*Listener{tcp, unixL, other, stale}, BindOptions{UnixMode: 0o600}, func(names []string) {
		staleNames = names
		if _, err := unix.FcntlInt(stale.file.Fd(), unix.F_GETFD, 0); err == nil {
			t.Errorf("the stale socket is still open when the store is asked to drop it")
		}
	})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer CloseAll(ls)
	var got []string
	for _, l := range ls {
		got = append(got, l.Spec.Name+" "+string(l.Origin))
	}
	want := []string{"web activated", "tcp-" + port + " inherited", "unix-a.sock inherited", "admin bound"}
	if !slices.Equal(got, want) {
		t.Errorf("listeners %q, want %q", got, want)
	}
	if ls[1] != tcp || ls[2] != unixL {
		t.Errorf("the specs did not take the passed sockets")
	}
	if !slices.Equal(staleNames, []string{StoreNamePrefix + "gone"}) {
		t.Errorf("stale %q", staleNames)
	}
}

// When a spec cannot be bound, Open leaves nothing behind: no socket open,
// no unix socket file, no lock held.
func TestOpenCleansUpOnError(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "a.sock")
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	later := passedSocket(t, "127.0.0.1:0", StoreNamePrefix+"tcp-later")
	var specs []Spec
	for _, v := range []string{"unix:" + sock, taken.Addr().String(), later.Addr} {
		s, err := ParseSpec(v)
		if err != nil {
			t.Fatal(err)
		}
		specs = append(specs, s)
	}
	if _, err := openListeners(specs, []*Listener{later}, BindOptions{UnixMode: 0o600}, nil); err == nil {
		t.Fatal("Open succeeded on an address in use")
	}
	if _, err := os.Lstat(sock); err == nil {
		t.Errorf("the unix socket bound before the failure is still there")
	}
	if lock, err := unixpath.Lock(sock + ".lock"); err != nil {
		t.Errorf("the lock of the unix socket is still held: %v", err)
	} else {
		lock.Close()
	}
	if _, err := unix.FcntlInt(later.file.Fd(), unix.F_GETFD, 0); err == nil {
		t.Errorf("a passed socket claimed by a later spec is still open")
	}
}

func TestSpecMatches(t *testing.T) {
	p := func(network sockaddr.Network, addr string) *Listener {
		return &Listener{Spec: Spec{Network: network}, Addr: addr}
	}
	for _, c := range []struct {
		spec string
		l    *Listener
		want bool
	}{
		{"127.0.0.1:8080", p(sockaddr.TCP, "127.0.0.1:8080"), true},
		{":8080", p(sockaddr.TCP, "[::]:8080"), true},
		{":8080", p(sockaddr.TCP, "0.0.0.0:8080"), true},
		{":8080", p(sockaddr.TCP, "127.0.0.1:8080"), false},
		{"127.0.0.1:8080", p(sockaddr.TCP, "127.0.0.1:8081"), false},
		{"127.0.0.1:0", p(sockaddr.TCP, "127.0.0.1:0"), false},
		{"udp:127.0.0.1:53", p(sockaddr.TCP, "127.0.0.1:53"), false},
		{"udp:127.0.0.1:53", p(sockaddr.UDP, "127.0.0.1:53"), true},
		{"[::1]:80", p(sockaddr.TCP, "[::1]:80"), true},
		{"unix:/nonexistent/a.sock", p(sockaddr.Unix, "/nonexistent/a.sock"), false}, // its file is gone
		{"unix:/run/a.sock", p(sockaddr.Unix, "/run/b.sock"), false},
	} {
		s, err := ParseSpec(c.spec)
		if err != nil {
			t.Fatal(err)
		}
		if got := matches(s, c.l); got != c.want {
			t.Errorf("%s matches %s %s: %v, want %v", c.spec, c.l.Spec.Network, c.l.Addr, got, c.want)
		}
	}
}

// A passed socket in non-blocking mode is taken in blocking mode, outside
// Go's poller, like the sockets relay binds.
func TestAdoptFileMakesItBlocking(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 16); err != nil {
		t.Fatal(err)
	}
	l, err := adoptFile(os.NewFile(uintptr(fd), "web"), 3)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	flags, err := unix.FcntlInt(l.file.Fd(), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.O_NONBLOCK != 0 {
		t.Errorf("the taken socket is still non-blocking")
	}
	if l.Spec.Name != "web" || l.Spec.Network != sockaddr.TCP || l.Origin != Activated {
		t.Errorf("taken as %+v", l.Spec)
	}
	// A connected socket is refused with a hint.
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pair[1])
	if _, err := adoptFile(os.NewFile(uintptr(pair[0]), "conn"), 4); err == nil {
		t.Errorf("a connected socket was taken as a listener")
	}
}
