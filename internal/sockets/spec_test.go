package sockets

import (
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/relaysh/relay/internal/sockaddr"
)

func TestParse(t *testing.T) {
	for _, c := range []struct {
		in      string
		want    Spec
		wantErr string
	}{
		{in: ":8080", want: Spec{Network: sockaddr.TCP, Address: ":8080"}},
		{in: "127.0.0.1:0", want: Spec{Network: sockaddr.TCP, Address: "127.0.0.1:0"}},
		{in: "[::1]:443", want: Spec{Network: sockaddr.TCP, Address: "[::1]:443"}},
		{in: "web=[::1]:443", want: Spec{Name: "web", NameGiven: true, Network: sockaddr.TCP, Address: "[::1]:443"}},
		{in: "udp:127.0.0.1:53", want: Spec{Network: sockaddr.UDP, Address: "127.0.0.1:53"}},
		{in: "dns=udp::53", want: Spec{Name: "dns", NameGiven: true, Network: sockaddr.UDP, Address: ":53"}},
		{in: "unix:/run/a.sock", want: Spec{Network: sockaddr.Unix, Address: "/run/a.sock"}},
		{in: "api=unix:/run/a=b.sock", want: Spec{Name: "api", NameGiven: true, Network: sockaddr.Unix, Address: "/run/a=b.sock"}},
		{in: "localhost", wantErr: "host:port"},
		{in: ":http", wantErr: "not a number"},
		{in: ":70000", wantErr: "not a number"},
		{in: "unix:", wantErr: "empty"},
		{in: "a:b=:80", wantErr: "host:port"},
		{in: "=:80", wantErr: "empty"},
		{in: "unix:/run//a/../b.sock", want: Spec{Network: sockaddr.Unix, Address: "/run/b.sock"}},
		{in: "tcp://127.0.0.1:8080", wantErr: `not a URL; write 127.0.0.1:8080 or tcp:127.0.0.1:8080`},
		{in: "TCP://[::1]:8080/", wantErr: `not a URL; write [::1]:8080 or tcp:[::1]:8080`},
		{in: "web=http://127.0.0.1:8080/x", wantErr: `not a URL; write web=127.0.0.1:8080 or web=tcp:127.0.0.1:8080`},
		{in: "http://localhost", wantErr: `not a URL; write localhost:80 or tcp:localhost:80`},
		{in: "https://[::1]", wantErr: `not a URL; write [::1]:443 or tcp:[::1]:443`},
		{in: "udp://127.0.0.1:53", wantErr: `not a URL; write udp:127.0.0.1:53`},
		{in: "unix:///run/a.sock", wantErr: `not a URL; write unix:/run/a.sock`},
		{in: "ftp://127.0.0.1:21", wantErr: `not a URL; want host:port`},
		{in: "tcp:/x:80", wantErr: `neither an IP address nor a host name`},
		{in: "unix:/" + strings.Repeat("s", 107), wantErr: "the socket path is 108 bytes, longer than the 107 a unix socket address holds; choose a shorter path"},
		// A control character, anywhere: in the address, the name, a path.
		{in: "127.0.0.1:8080\n", wantErr: `--listen "127.0.0.1:8080\n": holds the control character '\n', which no address or socket name may; remove it: --listen "127.0.0.1:8080"`},
		{in: "\x00:8080", wantErr: `holds the control character '\x00'`},
		{in: "a\rb=:8080", wantErr: `holds the control character '\r'`},
		{in: "unix:/run/a\u0085.sock", wantErr: `holds the control character '\u0085'`},
		{in: "udp:127.0.0.1:53\x7f", wantErr: `holds the control character '\x7f'`},
		// Digits and dots are an IPv4 address, never a name to look up.
		{in: "256.1.1.1:8080", wantErr: `host "256.1.1.1" is not an IPv4 address (four numbers from 0 to 255, no leading zeros); write one such as 127.0.0.1:8080, or 0.0.0.0:8080 for every IPv4 address`},
		{in: "127.1:8080", wantErr: `host "127.1" is not an IPv4 address`},
		{in: "010.0.0.1:8080", wantErr: `host "010.0.0.1" is not an IPv4 address`},
		{in: "1.2.3.4.5:80", wantErr: `host "1.2.3.4.5" is not an IPv4 address`},
		{in: "udp:300.0.0.1:53", wantErr: `host "300.0.0.1" is not an IPv4 address`},
		{in: "0.0.0.0:8080", want: Spec{Network: sockaddr.TCP, Address: "0.0.0.0:8080"}},
		{in: "localhost:8080", want: Spec{Network: sockaddr.TCP, Address: "localhost:8080"}},
		{in: "host-1.example:8080", want: Spec{Network: sockaddr.TCP, Address: "host-1.example:8080"}},
		// ':' and '%' are IPv6, never a name.
		{in: "[::g]:8080", wantErr: `host "::g" is not an IP address; write an IPv6 address in brackets`},
		{in: "127.0.0.1%lo:8080", wantErr: `host "127.0.0.1%lo" is not an IP address`},
		{in: "[fe80::1%nosuchif]:8080", wantErr: `zone "nosuchif" of fe80::1 names no network interface of this machine (it has `},
		{in: "[fe80::1%999999]:8080", wantErr: `zone "999999" of fe80::1 names no network interface`},
	} {
		got, err := ParseSpec(c.in)
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("ParseSpec(%q) error = %v, want one mentioning %q", c.in, err, c.wantErr)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("ParseSpec(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
		}
	}
}

// A zone that names an interface of this machine, by name or by index,
// is taken.
func TestParseZone(t *testing.T) {
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Skipf("no loopback interface: %v", err)
	}
	for _, in := range []string{"[fe80::1%lo]:8080", fmt.Sprintf("udp:[fe80::1%%%d]:53", lo.Index)} {
		if _, err := ParseSpec(in); err != nil {
			t.Errorf("ParseSpec(%q): %v", in, err)
		}
	}
}

func TestDefaultName(t *testing.T) {
	for _, c := range []struct {
		network sockaddr.Network
		addr    string
		want    string
	}{
		{sockaddr.TCP, "[::]:8080", "tcp-8080"},
		{sockaddr.UDP, "127.0.0.1:5353", "udp-5353"},
		{sockaddr.Unix, "/run/app/api.sock", "unix-api.sock"},
		{sockaddr.Unix, "/run/a:b", "unix-a_b"},
	} {
		if got := DefaultName(c.network, c.addr); got != c.want {
			t.Errorf("DefaultName(%s, %q) = %q, want %q", c.network, c.addr, got, c.want)
		}
	}
}

// Two --listen values that would bind one socket are refused before
// either is bound; ones that can be bound side by side are not.
func TestCheckDistinct(t *testing.T) {
	for _, c := range []struct {
		a, b    string
		wantErr string // "" for none
	}{
		{"127.0.0.1:8080", "127.0.0.1:8080", "is given twice"},
		{":8080", "tcp::8080", "is given twice"},
		{"unix:/run/a.sock", "unix:/run/./a.sock", "are the same socket /run/a.sock"},
		{":8080", "127.0.0.1:8080", "overlap"},
		{":8080", "[::1]:8080", "overlap"},
		{"0.0.0.0:8080", "127.0.0.1:8080", "overlap"},
		{"0.0.0.0:8080", ":8080", "overlap"},
		{"[::]:8080", "[::1]:8080", "overlap"},
		{"[::ffff:127.0.0.1]:8080", "127.0.0.1:8080", "overlap"},
		{"LocalHost:8080", "localhost:8080", "overlap"},
		{"udp:127.0.0.1:53", "udp::53", "overlap"},
		{"0.0.0.0:8080", "[::]:8080", ""},
		{"0.0.0.0:8080", "[::1]:8080", ""},
		{"[::]:8080", "127.0.0.1:8080", ""},
		{"127.0.0.1:8080", "127.0.0.2:8080", ""},
		{"127.0.0.1:8080", "127.0.0.1:8081", ""},
		{"127.0.0.1:0", "127.0.0.1:0", ""},
		{"127.0.0.1:53", "udp:127.0.0.1:53", ""},
		{"localhost:8080", "127.0.0.1:8080", ""}, // names are not resolved here
		{"unix:/run/a.sock", "unix:/run/b.sock", ""},
		// Names: chosen ones may not repeat, default ones may.
		{"a=127.0.0.1:8080", "a=127.0.0.1:8081", `--listen "a=127.0.0.1:8080" and --listen "a=127.0.0.1:8081" use the same name "a"; give each listener its own name`},
		{"a=127.0.0.1:8080", "a=unix:/run/a.sock", `use the same name "a"`},
		{"a=127.0.0.1:8080", "A=127.0.0.1:8081", ""},
		{"127.0.0.1:8080", "[::1]:8080", ""}, // both tcp-8080
		{"a=127.0.0.1:8080", "a=127.0.0.1:8080", "is given twice"},
	} {
		var specs []Spec
		for _, v := range []string{c.a, c.b} {
			s, err := ParseSpec(v)
			if err != nil {
				t.Fatalf("ParseSpec(%q): %v", v, err)
			}
			specs = append(specs, s)
		}
		err := CheckDistinct(specs)
		switch {
		case c.wantErr == "" && err != nil:
			t.Errorf("%s and %s: %v, want them accepted", c.a, c.b, err)
		case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
			t.Errorf("%s and %s: %v, want an error mentioning %q", c.a, c.b, err, c.wantErr)
		}
	}
}
