package health

import (
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/sockaddr"
)

func mustParse(t *testing.T, v string) Spec {
	t.Helper()
	s, err := Parse(v)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// said returns the advice at level whose message holds text.
func said(advice []Advice, level slog.Level, text string) bool {
	for _, a := range advice {
		if a.Level == level && strings.Contains(a.Msg, text) {
			return true
		}
	}
	return false
}

func TestAdviseOnProbesOfThePublicAddress(t *testing.T) {
	web := ListenerFact{Name: "tcp-8080", IP: sockaddr.Socket{Addr: netip.MustParseAddrPort("127.0.0.1:8080"), Family: unix.AF_INET}}
	steered := func(host, port string) bool { return host == "127.0.0.1" && port == "8080" }
	for _, c := range []struct {
		check   string
		steered func(string, string) bool
		level   slog.Level
		text    string
	}{
		{"http://127.0.0.1:8080/healthz", steered, slog.LevelInfo, "relay steers each probe"},
		{"http://127.0.0.1:8080/healthz", nil, slog.LevelWarn, "cannot tell generations apart"},
		{"tcp://127.0.0.1:8080", func(string, string) bool { return false }, slog.LevelWarn, "cannot tell generations apart"},
	} {
		advice, err := Advise(mustParse(t, c.check), Facts{Listeners: []ListenerFact{web}, Binds: true, Steered: c.steered})
		if err != nil {
			t.Fatalf("%s: %v", c.check, err)
		}
		if !said(advice, c.level, c.text) {
			t.Errorf("%s: advice %+v, want %v %q", c.check, advice, c.level, c.text)
		}
	}
	advice, err := Advise(mustParse(t, "http://{health_addr}/healthz"), Facts{Listeners: []ListenerFact{web}, Steered: steered})
	if err != nil || len(advice) != 0 {
		t.Errorf("a check of the private address: advice %+v, %v; want none", advice, err)
	}
}

func TestAdviseOnWeakChecks(t *testing.T) {
	if advice, _ := Advise(mustParse(t, "delay:1s"), Facts{}); !said(advice, slog.LevelWarn, "proves nothing") {
		t.Errorf("delay: advice %+v, want a warning", advice)
	}
	if advice, _ := Advise(mustParse(t, "notify"), Facts{}); !said(advice, slog.LevelInfo, "READY=1") {
		t.Errorf("notify: advice %+v, want a note on READY=1", advice)
	}
}

func TestAdviseOnListenersNoProbeReaches(t *testing.T) {
	steered := ListenerFact{Name: "tcp-8080", Probed: true}
	shared := ListenerFact{Name: "udp-5353"}

	// accept with nothing to accept on, or only what it cannot check
	// alone, is refused.
	if _, err := Advise(mustParse(t, "accept"), Facts{Binds: true}); err == nil || !strings.Contains(err.Error(), "needs a listener") {
		t.Errorf("accept without listeners: %v, want a refusal", err)
	}
	_, err := Advise(mustParse(t, "accept"), Facts{Listeners: []ListenerFact{steered, shared}})
	if err == nil || !strings.Contains(err.Error(), "udp-5353") || strings.Contains(err.Error(), "tcp-8080") {
		t.Errorf("accept on a shared socket with --takeover off: %v, want a refusal naming udp-5353 alone", err)
	}

	// auto waits for READY=1 there instead, and says so.
	advice, err := Advise(mustParse(t, "auto"), Facts{Listeners: []ListenerFact{steered, shared}})
	if err != nil || !said(advice, slog.LevelInfo, "READY=1 only") {
		t.Errorf("auto on a shared socket with --takeover off: %+v, %v; want a note that only READY=1 counts", advice, err)
	}
	// With the takeover, the child's own bind shows it.
	advice, err = Advise(mustParse(t, "auto"), Facts{Listeners: []ListenerFact{steered, shared}, Binds: true})
	if err != nil || !said(advice, slog.LevelInfo, "binding them itself") || said(advice, slog.LevelInfo, "READY=1 only") {
		t.Errorf("auto on a shared socket with the takeover: %+v, %v; want a note on the child's own bind", advice, err)
	}
	advice, err = Advise(mustParse(t, "accept"), Facts{Listeners: []ListenerFact{steered}})
	if err != nil || !said(advice, slog.LevelDebug, "READY=1") {
		t.Errorf("accept on a steered listener: %+v, %v; want one debug line", advice, err)
	}
}

// A UDP listener that a QUIC probe reaches is said so, and --health accept
// can check it without the takeover.
func TestAdviseQUICProbedListener(t *testing.T) {
	spec, err := Parse("accept")
	if err != nil {
		t.Fatal(err)
	}
	advice, err := Advise(spec, Facts{Listeners: []ListenerFact{{Name: "udp-443", QUIC: true}}})
	if err != nil {
		t.Fatalf("Advise(accept, a QUIC-probed UDP listener, takeover off) = %v, want no error", err)
	}
	found := false
	for _, a := range advice {
		if strings.Contains(a.Msg, "QUIC probe") {
			found = true
		}
	}
	if !found {
		t.Errorf("advice %v; want a line on the QUIC probe", advice)
	}
}
