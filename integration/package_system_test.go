package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// buildPackage runs make package into a temporary directory and returns the
// .deb. Where make or dpkg-deb is missing it skips (fails where the real
// systemd tests are required: .ci/run installs both).
func buildPackage(t *testing.T) string {
	t.Helper()
	for _, tool := range []string{"make", "dpkg-deb", "git"} {
		if _, err := exec.LookPath(tool); err != nil {
			sdSkip(t, tool+" not found: make package needs it")
		}
	}
	tmp := t.TempDir()
	dist := filepath.Join(tmp, "dist")
	cmd := exec.Command("make", "-C", "..", "package", "PKG_BUILD="+filepath.Join(tmp, "build"), "DIST="+dist)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make package: %v\n%s", err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(dist, "relay_*.deb"))
	if len(debs) != 1 {
		t.Fatalf("make package made %v, want one relay_*.deb", debs)
	}
	return debs[0]
}

// The Debian package under a real systemd: dpkg -i installs it,
// `systemctl enable --now relay@api` runs, from /etc/relay/api.conf, a
// plain server that binds a privileged port itself as nobody under a root
// relay (the bind lands on relay's socket: the server has no capability),
// five `systemctl reload` under load lose no request, and dpkg -r removes
// every file the package installed.
func TestSystemdRealPackage(t *testing.T) {
	c := bootSystemdVolatile(t, "overlay") // dpkg writes /usr and /var
	deb := buildPackage(t)
	// The container sees the host directory of its /usr/local/bin.
	if err := linkOrCopy(deb, filepath.Join(c.dir, "bin", "relay.deb")); err != nil {
		t.Fatal(err)
	}
	if out, err := c.run("dpkg", "-i", "/usr/local/bin/relay.deb"); err != nil {
		t.Fatalf("dpkg -i: %v\n%s", err, out)
	}
	listed, err := c.run("dpkg", "-L", "relay")
	if err != nil {
		t.Fatalf("dpkg -L relay: %v\n%s", err, listed)
	}
	var files []string
	for _, p := range strings.Fields(listed) {
		if _, err := c.run("test", "-d", p); err != nil {
			files = append(files, p) // not a directory
		}
	}
	t.Logf("dpkg -i installed %d files", len(files))
	if out, err := c.run("/usr/bin/relay", "version"); err != nil || !strings.HasPrefix(out, "relay ") {
		t.Fatalf("/usr/bin/relay version: %v: %s", err, out)
	}

	addr := freePrivilegedAddr(t)
	c.writeFile("/etc/relay/api.conf", fmt.Sprintf(`RELAY_LISTEN=%s
RELAY_OPTIONS=--user nobody
APP_COMMAND=/usr/local/bin/myapp -bind -addr %s -lame-duck 200ms
`, addr, addr))
	c.mustSystemctl("enable", "--now", "relay@api")
	url := httpURL(addr)
	client := newConnClient()
	serving, err := get(client, url)
	if err != nil {
		t.Fatalf("relay@api started, but does not serve on %s: %v\n%s", addr, err, c.journal("relay@api"))
	}
	// The server, as the container sees it: a plain server on port
	// <1024, as nobody, with no capability.
	checkServer := func(pid int) {
		t.Helper()
		status, err := c.run("cat", "/proc/"+strconv.Itoa(pid)+"/status")
		if err != nil {
			t.Fatalf("reading the server's status (pid %d in the container): %v\n%s", pid, err, status)
		}
		fields := map[string]string{}
		for _, l := range strings.Split(status, "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok {
				fields[k] = strings.Join(strings.Fields(v), " ")
			}
		}
		t.Logf("server pid %d: Uid %s, CapEff %s, NoNewPrivs %s", pid, fields["Uid"], fields["CapEff"], fields["NoNewPrivs"])
		if fields["Uid"] != "65534 65534 65534 65534" || fields["CapEff"] != "0000000000000000" {
			t.Errorf("the server (pid %d) runs with Uid %q and CapEff %q; want nobody (65534) with an empty effective set", pid, fields["Uid"], fields["CapEff"])
		}
	}
	checkServer(serving)
	if mainPID := c.show("relay@api", "MainPID"); mainPID == strconv.Itoa(serving) {
		t.Errorf("the unit's main process is the server, want relay")
	}

	ld := startLoad(url, 4, 5*time.Minute)
	for i := range 5 {
		start := time.Now()
		if out, err := c.systemctl("reload", "relay@api"); err != nil {
			ld.stop()
			t.Fatalf("reload %d: %v: %s\n%s", i+1, err, out, c.journal("relay@api"))
		}
		now, err := get(client, url)
		if err != nil || now == serving {
			t.Errorf("reload %d: after systemctl reload, answered by pid %d (%v); want a new generation's", i+1, now, err)
		}
		serving = now
		t.Logf("reload %d: systemctl reload took %s", i+1, time.Since(start).Round(time.Millisecond))
	}
	ld.stop()
	requests, failures := ld.summary()
	t.Logf("5 reloads of the packaged relay@api under load: %d requests, %d failed", requests, len(failures))
	noFailures(t, failures, requests)
	checkServer(serving)

	c.mustSystemctl("disable", "--now", "relay@api")
	if out, err := c.run("rm", "/etc/relay/api.conf"); err != nil {
		t.Fatalf("removing the instance file: %v\n%s", err, out)
	}
	if out, err := c.run("dpkg", "-r", "relay"); err != nil {
		t.Fatalf("dpkg -r: %v\n%s", err, out)
	}
	var left []string
	for _, p := range append(files, "/etc/relay") {
		if _, err := c.run("test", "-e", p); err == nil {
			left = append(left, p)
		}
	}
	if len(left) > 0 {
		t.Errorf("dpkg -r left %v", left)
	}
	if _, err := os.Stat(c.hostPath("/usr/bin/relay")); err == nil {
		t.Errorf("/usr/bin/relay is still there after dpkg -r")
	}
}
