package udpsteer

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// What the package needs, tried: this test binary again under setpriv, as
// root with CAP_BPF alone, as nobody with CAP_BPF alone (as systemd's
// AmbientCapabilities=CAP_BPF gives it), as root with CAP_SYS_ADMIN alone,
// and as root and as nobody with no capability, where Available must name
// the missing one.
func TestCapabilities(t *testing.T) {
	if os.Getenv("UDPSTEER_CHILD") != "" {
		t.Skip("in the child")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to drop capabilities from")
	}
	if err := Available(); err != nil {
		t.Skipf("eBPF steering unavailable here even as root: %v", err)
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("no setpriv (util-linux) here")
	}
	// A copy of the test binary that nobody may run: t.TempDir makes
	// TMPDIR/TestName.../001, both 0700.
	dir := t.TempDir()
	must(t, os.Chmod(dir, 0o755))
	must(t, os.Chmod(filepath.Dir(dir), 0o755))
	bin := filepath.Join(dir, "udpsteer.test")
	copyFile(t, os.Args[0], bin)

	nobody := []string{"--reuid=65534", "--regid=65534", "--clear-groups"}
	for _, tc := range []struct {
		name string
		args []string
		ok   bool
	}{
		{"root with CAP_BPF only", []string{"--bounding-set=-all,+bpf"}, true},
		{"nobody with CAP_BPF only", append(nobody, "--inh-caps=-all,+bpf", "--ambient-caps=-all,+bpf"), true},
		{"root with CAP_SYS_ADMIN only", []string{"--bounding-set=-all,+sys_admin"}, true},
		{"root with no capability", []string{"--bounding-set=-all"}, false},
		{"nobody with no capability", append(nobody, "--inh-caps=-all"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append(append([]string{}, tc.args...), bin, "-test.run=^TestChild$", "-test.v", "-test.count=1")
			cmd := exec.Command(setpriv, args...)
			cmd.Env = append(os.Environ(), "UDPSTEER_CHILD=1")
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("the child failed: %v\n%s", err, out)
			}
			for _, line := range strings.Split(string(out), "\n") {
				if strings.Contains(line, "child:") {
					t.Log(strings.TrimSpace(line))
				}
			}
			switch {
			case tc.ok && !strings.Contains(string(out), ": steered"):
				t.Fatalf("the child did not steer:\n%s", out)
			case !tc.ok && !strings.Contains(string(out), "needs CAP_BPF (Linux 5.8+) or CAP_SYS_ADMIN, and this process has neither"):
				t.Fatalf("Available did not name the missing capability:\n%s", out)
			}
		})
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	must(t, err)
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY, 0o755)
	must(t, err)
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	must(t, out.Close())
}

// TestChild is TestCapabilities's child: it reports Available and, if it
// is, steers a flow through a switch.
func TestChild(t *testing.T) {
	if os.Getenv("UDPSTEER_CHILD") == "" {
		t.Skip("run by TestCapabilities")
	}
	caps, _ := effectiveCaps()
	if err := Available(); err != nil {
		t.Logf("child: uid %d, CapEff %#x: Available: %v", os.Geteuid(), caps, err)
		return
	}
	g := newGroup(t, "127.0.0.1:0", Options{QUIC: true})
	socks := gens{}
	take(t, g, 1, socks)
	must(t, g.Switch(1))
	a := newClient(t, g)
	expect(t, "gen 1 serving", landsOn(t, a, socks, 0), 1)
	take(t, g, 2, socks)
	must(t, g.Switch(2))
	expect(t, "a known flow", landsOn(t, a, socks, 0), 1)
	expect(t, "a new flow", landsOn(t, newClient(t, g), socks, 0), 2)
	// Save and Restore need nothing more.
	s, err := g.Save()
	must(t, err)
	r := restoreAcross(t, s)
	defer r.Close()
	rs := restoredSocks(t, r, map[int]bool{1: true, 2: true})
	expect(t, "a known flow, restored", landsOn(t, a, rs, 0), 1)
	t.Logf("child: uid %d, CapEff %#x: steered", os.Geteuid(), caps)
}
