package health

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
)

func TestParse(t *testing.T) {
	for _, c := range []struct {
		in      string
		kind    Kind
		wantErr string
	}{
		{"notify", Notify, ""},
		{"accept", Accept, ""},
		{"auto", Auto, ""},
		{"http://{health_addr}/healthz", HTTP, ""},
		{"https://127.0.0.1:8443/", HTTP, ""},
		{"tcp://{health_addr}", TCP, ""},
		{"tcp://127.0.0.1:9000", TCP, ""},
		{"exec:true", Exec, ""},
		{"delay:1.5s", Delay, ""},
		{"delay:-1s", "", "delay:2s"},
		{"tcp://nohost", "", "tcp://host:port"},
		{"exec:", "", "needs a command"},
		{"exec:/no/such/check", "", "not found"},
		{"ready", "", "unknown check"},
		{"acceptx", "", "use auto, notify, accept,"},
	} {
		s, err := Parse(c.in)
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("Parse(%q) error = %v, want one mentioning %q", c.in, err, c.wantErr)
			}
			continue
		}
		if err != nil || s.Kind != c.kind {
			t.Errorf("Parse(%q) = %v, %v; want kind %s", c.in, s.Kind, err, c.kind)
		}
		if _, _, ok := s.hostPort(); ok && c.kind != HTTP && c.kind != TCP {
			t.Errorf("Parse(%q).hostPort() ok = true for kind %s", c.in, c.kind)
		}
		if got := s.needsListeners(); got != (c.kind == Accept || c.kind == Auto) {
			t.Errorf("Parse(%q).needsListeners() = %v", c.in, got)
		}
	}
}

func TestSharedTarget(t *testing.T) {
	listeners := []ListenerFact{
		{Name: "tcp-8080", IP: sockaddr.Socket{Addr: netip.MustParseAddrPort("[::]:8080"), Family: unix.AF_INET6}},
		{Name: "tcp-9090", IP: sockaddr.Socket{Addr: netip.MustParseAddrPort("127.0.0.1:9090"), Family: unix.AF_INET}},
		{Name: "unix-a.sock"},
	}
	for _, c := range []struct {
		check, want string
	}{
		{"http://127.0.0.1:8080/healthz", "[::]:8080"},
		{"http://localhost:9090/", "127.0.0.1:9090"},
		{"tcp://127.0.0.1:9090", "127.0.0.1:9090"},
		{"http://{health_addr}/healthz", ""},
		{"http://127.0.0.1:7000/", ""},
		{"notify", ""},
		{"accept", ""},
		{"auto", ""},
	} {
		s, err := Parse(c.check)
		if err != nil {
			t.Fatal(err)
		}
		if got := s.sharedTarget(listeners); got != c.want {
			t.Errorf("sharedTarget(%q) = %q, want %q", c.check, got, c.want)
		}
	}
}

func TestVarsEnv(t *testing.T) {
	child := Vars{Generation: 3, Worker: 1, HealthAddr: "127.0.0.1:4000"}
	want := []string{"RELAY_GENERATION=3", "RELAY_WORKER=1", "RELAY_HEALTH_ADDR=127.0.0.1:4000", "RELAY_HEALTH_PORT=4000"}
	if got := child.Env(); !slices.Equal(got, want) {
		t.Errorf("a child's Env() = %q, want %q", got, want)
	}
	check := child
	check.Pid = 42
	want = append([]string{"RELAY_CHILD_PID=42"}, want...)
	if got := check.Env(); !slices.Equal(got, want) {
		t.Errorf("an exec check's Env() = %q, want %q", got, want)
	}
}

// The HTTP check probes the child's private address and retries until the
// child answers 2xx.
func TestHTTPCheckWaitsForThePrivateAddress(t *testing.T) {
	addr, err := PickHealthAddr()
	if err != nil {
		t.Fatal(err)
	}
	spec, err := Parse("http://{health_addr}/healthz")
	if err != nil {
		t.Fatal(err)
	}
	c := NewChecker(spec, nil, nil)
	done := make(chan error, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go func() { done <- c.Wait(ctx, Child{Vars: Vars{HealthAddr: addr, Generation: 1}}) }()

	// Nothing listens yet: the check must keep trying, not succeed.
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-ready:
		default:
			http.Error(w, "starting", http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusOK)
	})}
	go srv.Serve(l)
	defer srv.Close()
	select {
	case err := <-done:
		t.Fatalf("check finished (%v) while the child answered 503", err)
	default:
	}
	close(ready)
	if err := <-done; err != nil {
		t.Fatalf("check failed: %v", err)
	}
}

// The health port comes from below the ephemeral range, outside the
// reserved ports, and is free.
func TestPickHealthAddrAvoidsTheEphemeralRange(t *testing.T) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		t.Skipf("no ip_local_port_range: %v", err)
	}
	low, _ := strconv.Atoi(strings.Fields(string(b))[0])
	if low <= 1024+healthPortTries {
		t.Skipf("ephemeral range starts at %d: no room below it", low)
	}
	for range 20 {
		addr, err := PickHealthAddr()
		if err != nil {
			t.Fatal(err)
		}
		_, port, _ := net.SplitHostPort(addr)
		if p, _ := strconv.Atoi(port); p < 1024 || p >= low {
			t.Fatalf("health address %s: port outside 1024..%d", addr, low-1)
		}
		l, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatalf("the picked address %s is not free: %v", addr, err)
		}
		l.Close()
	}
}

func TestCandidatePorts(t *testing.T) {
	seq := 0
	next := func(n int) int { seq++; return (seq * 7) % n }
	got := candidatePorts("32768\t60999\n", "1031,1038-1040\n", next)
	if len(got) == 0 || len(got) > healthPortTries {
		t.Fatalf("%d candidates, want 1..%d", len(got), healthPortTries)
	}
	for _, p := range got {
		if p < 1024 || p >= 32768 || p == 1031 || (p >= 1038 && p <= 1040) {
			t.Errorf("candidate %d: outside 1024..32767 or reserved", p)
		}
	}
	if got := candidatePorts("1024 60999", "", next); got != nil {
		t.Errorf("no room below the range, got %v", got)
	}
	if got := candidatePorts("garbage", "", next); got != nil {
		t.Errorf("an unreadable range gave %v", got)
	}
}
