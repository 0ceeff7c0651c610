package listen

import (
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	for _, c := range []struct {
		in      string
		want    Spec
		wantErr string
	}{
		{in: ":8080", want: Spec{Network: TCP, Address: ":8080"}},
		{in: "127.0.0.1:0", want: Spec{Network: TCP, Address: "127.0.0.1:0"}},
		{in: "[::1]:443", want: Spec{Network: TCP, Address: "[::1]:443"}},
		{in: "web=[::1]:443", want: Spec{Name: "web", NameGiven: true, Network: TCP, Address: "[::1]:443"}},
		{in: "udp:127.0.0.1:53", want: Spec{Network: UDP, Address: "127.0.0.1:53"}},
		{in: "dns=udp::53", want: Spec{Name: "dns", NameGiven: true, Network: UDP, Address: ":53"}},
		{in: "unix:/run/a.sock", want: Spec{Network: Unix, Address: "/run/a.sock"}},
		{in: "api=unix:/run/a=b.sock", want: Spec{Name: "api", NameGiven: true, Network: Unix, Address: "/run/a=b.sock"}},
		{in: "localhost", wantErr: "host:port"},
		{in: ":http", wantErr: "not a number"},
		{in: ":70000", wantErr: "not a number"},
		{in: "unix:", wantErr: "empty"},
		{in: "a:b=:80", wantErr: "host:port"},
		{in: "=:80", wantErr: "empty"},
	} {
		got, err := Parse(c.in)
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("Parse(%q) error = %v, want one mentioning %q", c.in, err, c.wantErr)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("Parse(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
		}
	}
}

func TestDefaultName(t *testing.T) {
	for _, c := range []struct {
		network Network
		addr    string
		want    string
	}{
		{TCP, "[::]:8080", "tcp-8080"},
		{UDP, "127.0.0.1:5353", "udp-5353"},
		{Unix, "/run/app/api.sock", "unix-api.sock"},
		{Unix, "/run/a:b", "unix-a_b"},
	} {
		if got := DefaultName(c.network, c.addr); got != c.want {
			t.Errorf("DefaultName(%s, %q) = %q, want %q", c.network, c.addr, got, c.want)
		}
	}
}
