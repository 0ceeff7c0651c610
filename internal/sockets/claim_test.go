package sockets

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
	"github.com/relaysh/relay/internal/takeover"
)

func openSet(t *testing.T, steerMode SteerMode, listens ...string) *Set {
	t.Helper()
	var specs []Spec
	for _, l := range listens {
		s, err := ParseSpec(l)
		if err != nil {
			t.Fatal(err)
		}
		specs = append(specs, s)
	}
	set, err := Open(Options{Specs: specs, UnixMode: 0o600, Steer: steerMode})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { set.Close() })
	return set
}

func port(t *testing.T, set *Set, i int) uint16 {
	t.Helper()
	return set.entries[i].addr.ip.Addr.Port()
}

func tcpBind(domain int, addr string) takeover.Bind {
	ap := netip.MustParseAddrPort(addr)
	fam := unix.AF_INET
	if ap.Addr().Is6() {
		fam = unix.AF_INET6
	}
	return takeover.Bind{Family: fam, Addr: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), Network: sockaddr.TCP, Domain: domain}
}

func TestClaimMatchesPortAndAddress(t *testing.T) {
	set := openSet(t, SteerAuto, "127.0.0.1:0", "udp:127.0.0.1:0")
	tcp, udp := port(t, set, 0), port(t, set, 1)
	if _, err := set.Take(1, 0); err != nil {
		t.Fatal(err)
	}
	at := func(host string, p uint16) string { return netip.AddrPortFrom(netip.MustParseAddr(host), p).String() }
	for _, c := range []struct {
		name string
		bind takeover.Bind
		want int
		own  bool
	}{
		{"the listener's own address", tcpBind(unix.AF_INET, at("127.0.0.1", tcp)), 0, true},
		{"the IPv4 wildcard", tcpBind(unix.AF_INET, at("0.0.0.0", tcp)), 0, true},
		{"the IPv6 wildcard of a dual-stack Go listener", tcpBind(unix.AF_INET6, at("::", tcp)), 0, true},
		{"another address on the port", tcpBind(unix.AF_INET, at("127.0.0.2", tcp)), -1, false},
		{"another port", tcpBind(unix.AF_INET, at("127.0.0.1", tcp+1)), -1, false},
		{"port 0", tcpBind(unix.AF_INET, at("127.0.0.1", 0)), -1, false},
		{"UDP on the TCP port", takeover.Bind{Family: unix.AF_INET, Addr: netip.MustParseAddrPort(at("127.0.0.1", tcp)), Network: sockaddr.UDP, Domain: unix.AF_INET}, -1, false},
		// The UDP listener is steered: generation 1's member is its own.
		{"the UDP listener", takeover.Bind{Family: unix.AF_INET, Addr: netip.MustParseAddrPort(at("0.0.0.0", udp)), Network: sockaddr.UDP, Domain: unix.AF_INET}, 1, true},
	} {
		d := set.Claim(1, 0, c.bind)
		if d.Refuse != nil || d.Socket != c.want || (c.want >= 0 && d.Own != c.own) {
			t.Errorf("%s (%s): got %+v, want socket %d own %v", c.name, c.bind, d, c.want, c.own)
		}
	}
	// A second generation gets a new member of the UDP group: its own.
	if _, err := set.Take(2, 0); err != nil {
		t.Fatal(err)
	}
	udpBind := takeover.Bind{Family: unix.AF_INET, Addr: netip.AddrPortFrom(netip.IPv4Unspecified(), udp), Network: sockaddr.UDP, Domain: unix.AF_INET}
	if d := set.Claim(2, 0, udpBind); d.Socket != 1 || !d.Own {
		t.Errorf("steered UDP listener, generation 2: %+v, want socket 1, own", d)
	}

	// A shared UDP socket (--steer off) with two holders is neither
	// one's own: its blocking mode must stay.
	shared := openSet(t, SteerOff, "udp:127.0.0.1:0")
	udp = port(t, shared, 0)
	udpBind.Addr = netip.AddrPortFrom(netip.IPv4Unspecified(), udp)
	for gen := 1; gen <= 2; gen++ {
		if _, err := shared.Take(gen, 0); err != nil {
			t.Fatal(err)
		}
	}
	if d := shared.Claim(2, 0, udpBind); d.Socket != 0 || d.Own {
		t.Errorf("shared UDP socket with two holders: %+v, want socket 0, not own", d)
	}
}

// The copies of a generation (--workers) each own their member of a TCP
// group, a socket apart; the UDP member they share is none's own, and a
// replacement copy's taking again gives it the same sockets.
func TestClaimOfCopies(t *testing.T) {
	set := openSet(t, SteerAuto, "127.0.0.1:0", "udp:127.0.0.1:0")
	tcp, udp := port(t, set, 0), port(t, set, 1)
	var socks [2][]*os.File
	for w := range 2 {
		files, err := set.Take(1, w)
		if err != nil {
			t.Fatal(err)
		}
		socks[w] = files
	}
	if socks[0][0] == socks[1][0] {
		t.Fatal("two copies got the same TCP socket")
	}
	if socks[0][1] != socks[1][1] {
		t.Fatal("two copies got different UDP sockets")
	}
	tcpB := tcpBind(unix.AF_INET, netip.AddrPortFrom(netip.IPv4Unspecified(), tcp).String())
	udpB := takeover.Bind{Family: unix.AF_INET, Addr: netip.AddrPortFrom(netip.IPv4Unspecified(), udp), Network: sockaddr.UDP, Domain: unix.AF_INET}
	for w := range 2 {
		if d := set.Claim(1, w, tcpB); d.Socket != 0 || !d.Own {
			t.Errorf("copy %d's TCP bind: %+v, want socket 0, own", w, d)
		}
		if d := set.Claim(1, w, udpB); d.Socket != 1 || d.Own {
			t.Errorf("copy %d's UDP bind: %+v, want socket 1, not own", w, d)
		}
	}
	again, err := set.Take(1, 1)
	if err != nil {
		t.Fatal(err)
	}
	if again[0] != socks[1][0] || again[1] != socks[1][1] {
		t.Fatal("a replacement copy got other sockets")
	}
	held, err := set.Held(1, 1)
	if err != nil || held[0] != socks[1][0] {
		t.Fatalf("Held(1, 1): %v", err)
	}
}

func TestClaimRefusesAnIPv4SocketOnAnIPv6Listener(t *testing.T) {
	if !ipv6Loopback() {
		t.Skip("no IPv6 loopback")
	}
	set := openSet(t, SteerAuto, "[::1]:0")
	p := port(t, set, 0)
	d := set.Claim(1, 0, tcpBind(unix.AF_INET, netip.AddrPortFrom(netip.IPv4Unspecified(), p).String()))
	if d.Refuse == nil || !strings.Contains(d.Refuse.Error(), "--listen 127.0.0.1:") {
		t.Errorf("IPv4 wildcard bind on an IPv6 loopback listener: %+v, want a refusal naming the loopback --listen to use", d)
	}
	// An IPv6 socket on the same wildcard is fine.
	if d := set.Claim(1, 0, tcpBind(unix.AF_INET6, netip.AddrPortFrom(netip.IPv6Unspecified(), p).String())); d.Refuse != nil || d.Socket != 0 {
		t.Errorf("IPv6 wildcard bind: %+v, want socket 0", d)
	}
}

func TestClaimUnixPath(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.sock")
	set := openSet(t, SteerAuto, "unix:"+path)
	set.Take(1, 0)
	if d := set.Claim(1, 0, takeover.Bind{Family: unix.AF_UNIX, Path: path, Network: sockaddr.Unix, Domain: unix.AF_UNIX}); d.Socket != 0 || d.Refuse != nil {
		t.Errorf("bind of the listener's path: %+v, want socket 0", d)
	}
	if d := set.Claim(1, 0, takeover.Bind{Family: unix.AF_UNIX, Path: path + ".other", Network: sockaddr.Unix, Domain: unix.AF_UNIX}); d.Socket != -1 {
		t.Errorf("bind of another path: %+v, want pass", d)
	}
	// The same socket reached through a symlinked directory.
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(filepath.Dir(path), link); err != nil {
		t.Fatal(err)
	}
	via := filepath.Join(link, "app.sock")
	dir, err := takeover.DirID(via)
	if err != nil {
		t.Fatal(err)
	}
	if d := set.Claim(1, 0, takeover.Bind{Family: unix.AF_UNIX, Path: via, Dir: dir, Network: sockaddr.Unix, Domain: unix.AF_UNIX}); d.Socket != 0 {
		t.Errorf("bind of the path through a symlink: %+v, want socket 0", d)
	}
}

func TestClaimRefusesWhatItCannotInspect(t *testing.T) {
	set := openSet(t, SteerAuto, "127.0.0.1:0")
	p := port(t, set, 0)
	b := takeover.Bind{Family: unix.AF_INET, Addr: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), p), Err: unix.EPERM}
	if d := set.Claim(1, 0, b); d.Refuse == nil {
		t.Errorf("uninspectable bind of relay's address: %+v, want a refusal", d)
	}
	b.Addr = netip.AddrPortFrom(b.Addr.Addr(), p+1)
	if d := set.Claim(1, 0, b); d.Socket != -1 || d.Refuse != nil {
		t.Errorf("uninspectable bind of another port: %+v, want pass", d)
	}
}

func ipv6Loopback() bool {
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	return unix.Bind(fd, &unix.SockaddrInet6{Addr: netip.IPv6Loopback().As16()}) == nil
}

func TestClaimWildcardOverSeveralListeners(t *testing.T) {
	if !ipv6Loopback() {
		t.Skip("no IPv6 loopback")
	}
	first := openSet(t, SteerAuto, "127.0.0.1:0")
	p := port(t, first, 0)
	first.Close()
	set := openSet(t, SteerAuto, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), p).String(), netip.AddrPortFrom(netip.IPv6Loopback(), p).String())
	set.Take(1, 0)
	v4 := tcpBind(unix.AF_INET, netip.AddrPortFrom(netip.IPv4Unspecified(), p).String())
	if d := set.Claim(1, 0, v4); d.Refuse != nil || d.Socket != 0 {
		t.Errorf("IPv4 wildcard over an IPv4 and an IPv6 listener: %+v, want the IPv4 one", d)
	}
	v6only := tcpBind(unix.AF_INET6, netip.AddrPortFrom(netip.IPv6Unspecified(), p).String())
	v6only.V6Only = true
	if d := set.Claim(1, 0, v6only); d.Refuse != nil || d.Socket != 1 {
		t.Errorf("IPv6-only wildcard: %+v, want the IPv6 listener", d)
	}
	dual := tcpBind(unix.AF_INET6, netip.AddrPortFrom(netip.IPv6Unspecified(), p).String())
	if d := set.Claim(1, 0, dual); d.Refuse == nil || !strings.Contains(d.Refuse.Error(), "one socket can serve only one") {
		t.Errorf("dual-stack wildcard over two listeners: %+v, want a refusal", d)
	}
}

// A UDP bind of a TCP listener's port that no --listen covers passes, with
// a note naming the --listen to add (HTTP/3 beside HTTPS); one of another
// port passes without a word.
func TestClaimNotesAnUncoveredUDPPort(t *testing.T) {
	set := openSet(t, SteerAuto, "127.0.0.1:0")
	tcp := port(t, set, 0)
	udp := func(addr string) takeover.Bind {
		b := tcpBind(unix.AF_INET, addr)
		b.Network = sockaddr.UDP
		return b
	}
	addr := fmt.Sprintf("127.0.0.1:%d", tcp)
	d := set.Claim(1, 0, udp(addr))
	if d.Socket != -1 || d.Refuse != nil || !strings.Contains(d.Note, "add --listen udp:"+addr) {
		t.Errorf("Claim(UDP %s) = %+v; want a pass with a note naming --listen udp:%s", addr, d, addr)
	}
	if d := set.Claim(1, 0, udp(fmt.Sprintf("127.0.0.1:%d", tcp+1))); d.Socket != -1 || d.Note != "" {
		t.Errorf("Claim(UDP of another port) = %+v; want a pass and no note", d)
	}
}
