package socketpass

import (
	"strings"
	"testing"
)

func TestChildEnvStripsInheritedActivation(t *testing.T) {
	base := []string{"PATH=/bin", "LISTEN_PID=1", "LISTEN_FDS=4", "LISTEN_FDNAMES=x", "NOTIFY_SOCKET=/run/systemd/notify", "RELAY_GENERATION=9"}
	l := []string{"a", "b"}
	got := strings.Join(ChildEnv(base, l, "NOTIFY_SOCKET=/private", "RELAY_GENERATION=2"), " ")
	want := "PATH=/bin LISTEN_FDS=2 LISTEN_FDNAMES=a:b NOTIFY_SOCKET=/private RELAY_GENERATION=2"
	if got != want {
		t.Errorf("ChildEnv = %q, want %q", got, want)
	}
}
