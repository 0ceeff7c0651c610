package integration

// The tests of relay under a real systemd: the example units in
// examples/systemd, as shipped (paths and ports substituted), under systemd
// 254 as PID 1 of a container (nspawn_test.go).

import (
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestSystemdRealBoot: the harness boots the systemd the units need
// (Type=notify-reload: 253; $FDSTORE, FileDescriptorStorePreserve=: 254).
func TestSystemdRealBoot(t *testing.T) {
	c := bootSystemd(t)
	major, _, _ := strings.Cut(c.version, ".")
	if n, err := strconv.Atoi(major); err != nil || n < 254 {
		t.Fatalf("the container's manager is systemd %q, want 254 or later", c.version)
	}
	if out, err := c.run("test", "-x", "/usr/local/bin/relay", "-a", "-x", "/usr/local/bin/myapp", "-a", "-x", "/usr/local/bin/testchild"); err != nil {
		t.Fatalf("the binaries are not installed in the container: %v %s", err, out)
	}
}

// relayServiceUnit is examples/systemd/relay.service with relay listening on
// 127.0.0.1:port and myapp (examples/hello) started without the example's
// config file, which hello does not read.
func relayServiceUnit(t *testing.T, port int) string {
	t.Helper()
	return exampleUnit(t, "relay.service",
		"--listen http=:8080", "--listen http=127.0.0.1:"+strconv.Itoa(port),
		"/usr/local/bin/myapp --config /etc/myapp.yaml", "/usr/local/bin/myapp")
}

// startRelayService installs relay.service (relayServiceUnit) in c, starts
// it, and returns its URL and the pid of the myapp that answers it.
func startRelayService(t *testing.T, c *sdContainer) (url string, serving int) {
	t.Helper()
	port := freeLoopbackPort(t)
	c.installUnit("relay.service", relayServiceUnit(t, port))
	c.mustSystemctl("start", "relay.service")
	url = httpURL("127.0.0.1:" + strconv.Itoa(port))
	serving, err := get(newConnClient(), url)
	if err != nil {
		t.Fatalf("relay.service started, but does not serve: %v\n%s", err, c.journal("relay.service"))
	}
	return url, serving
}

// TestSystemdRealReloadUnderLoad: relay.service (Type=notify-reload) as
// shipped. systemctl reload, ten times under load that opens a connection
// per request, fails no request; each reload succeeds, returns only once
// the new generation serves (the next request is answered by a new pid),
// and leaves relay the unit's main process; StatusText shows the
// generations.
func TestSystemdRealReloadUnderLoad(t *testing.T) {
	c := bootSystemd(t)
	url, serving := startRelayService(t, c)
	client := newConnClient()
	mainPID := c.show("relay.service", "MainPID")
	t.Logf("relay.service started: MainPID %s, StatusText %q, myapp pid %d", mainPID, c.show("relay.service", "StatusText"), serving)

	ld := startLoad(url, 4, 5*time.Minute)
	var durations []time.Duration
	for i := range 10 {
		start := time.Now()
		out, err := c.systemctl("reload", "relay.service")
		d := time.Since(start)
		durations = append(durations, d)
		if err != nil {
			ld.stop()
			t.Fatalf("reload %d: %v: %s\n%s", i+1, err, out, c.journal("relay.service"))
		}
		// Right after systemctl reload returns, the new generation serves.
		now, err := get(client, url)
		if err != nil {
			t.Errorf("reload %d: a request right after systemctl reload returned failed: %v", i+1, err)
		} else if now == serving {
			t.Errorf("reload %d: systemctl reload returned, but the old generation (pid %d) still answers", i+1, serving)
		}
		serving = now
		if r := c.show("relay.service", "ReloadResult"); r != "success" {
			t.Errorf("reload %d: ReloadResult=%s, want success", i+1, r)
		}
		if p := c.show("relay.service", "MainPID"); p != mainPID {
			t.Errorf("reload %d: MainPID %s, want relay's %s still", i+1, p, mainPID)
		}
		status := c.show("relay.service", "StatusText")
		if want := fmt.Sprintf("gen %d pid %d serving", i+2, serving); !strings.Contains(status, want) {
			t.Errorf("reload %d: StatusText %q does not say %q", i+1, status, want)
		}
		if a := c.show("relay.service", "ActiveState"); a != "active" {
			t.Errorf("reload %d: ActiveState %s, want active", i+1, a)
		}
		t.Logf("reload %d: systemctl reload took %s; StatusText %q", i+1, d.Round(time.Millisecond), status)
	}
	ld.stop()
	requests, failures := ld.summary()
	var longest time.Duration
	for _, d := range durations {
		longest = max(longest, d)
	}
	t.Logf("10 reloads under load: %d requests, %d failed; systemctl reload took %v (longest %s)", requests, len(failures), roundAll(durations), longest.Round(time.Millisecond))
	noFailures(t, failures, requests)
	if requests == 0 {
		t.Error("the load sent no request")
	}
}

func roundAll(ds []time.Duration) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.Round(time.Millisecond).String()
	}
	return out
}

// TestSystemdRealTemplateReloadRolledBack: relay@.service as shipped
// (Type=notify, ExecReload=relay restart) with /etc/relay/api.conf. A
// restart whose new generation exits before it is ready is rolled back:
// systemctl reload fails, the journal says why, and the old generation
// serves on without a failed request. The next reload, with the fault
// gone, succeeds.
func TestSystemdRealTemplateReloadRolledBack(t *testing.T) {
	c := bootSystemd(t)
	port := freeLoopbackPort(t)
	c.writeFile("/etc/relay/mode", "serve\n")
	c.writeFile("/etc/relay/api.conf", fmt.Sprintf(
		"RELAY_LISTEN=127.0.0.1:%d\nRELAY_OPTIONS=--drain 1s\nAPP_COMMAND=/usr/local/bin/testchild -mode-file /etc/relay/mode\n", port))
	c.installUnit("relay@.service", exampleUnit(t, "relay@.service"))
	c.mustSystemctl("start", "relay@api.service")
	const unit = "relay@api.service"
	url := httpURL("127.0.0.1:" + strconv.Itoa(port))
	client := newConnClient()
	serving, err := get(client, url)
	if err != nil {
		t.Fatalf("%s started, but does not serve: %v\n%s", unit, err, c.journal(unit))
	}
	mainPID := c.show(unit, "MainPID")

	ld := startLoad(url, 4, 5*time.Minute)
	// The next generation cannot open its database: it exits 3 at start.
	c.writeFile("/etc/relay/mode", "exit\n")
	out, err := c.systemctl("reload", unit)
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() == 0 {
		ld.stop()
		t.Fatalf("systemctl reload of a restart that was rolled back: %v, want a non-zero exit: %s", err, out)
	}
	t.Logf("systemctl reload exited %d: %s", exit.ExitCode(), strings.TrimSpace(out))
	now, err := get(client, url)
	ld.stop()
	if err != nil || now != serving {
		t.Errorf("after the rollback, pid %d answered (%v), want the old generation's %d", now, err, serving)
	}
	requests, failures := ld.summary()
	t.Logf("a rolled-back reload under load: %d requests, %d failed", requests, len(failures))
	noFailures(t, failures, requests)
	journal := c.journal(unit)
	for _, want := range []string{
		"restart rolled back: ",                                        // relay restart, the ExecReload= command
		"cannot open database: exiting with 3 on purpose",              // the new generation's stderr, quoted
		"Control process exited, code=exited, status=3/NOTIMPLEMENTED", // systemd's verdict
	} {
		if !strings.Contains(journal, want) {
			t.Errorf("the journal of %s does not say %q:\n%s", unit, want, journal)
		}
	}
	if a, p := c.show(unit, "ActiveState"), c.show(unit, "MainPID"); a != "active" || p != mainPID {
		t.Errorf("after the rollback: ActiveState %s MainPID %s, want active and relay's %s still", a, p, mainPID)
	}
	if s := c.show(unit, "StatusText"); !strings.Contains(s, fmt.Sprintf("pid %d serving", serving)) || !strings.Contains(s, "rolled back") {
		t.Errorf("StatusText %q, want the old generation serving and the rollback", s)
	}

	// The fault gone, a reload succeeds and a new generation serves.
	c.writeFile("/etc/relay/mode", "serve\n")
	if out, err := c.systemctl("reload", unit); err != nil {
		t.Fatalf("systemctl reload after the fault was fixed: %v: %s\n%s", err, out, c.journal(unit))
	}
	if now, err := get(client, url); err != nil || now == serving {
		t.Errorf("after a successful reload, pid %d answered (%v), want a new generation, not %d", now, err, serving)
	}
}

// TestSystemdRealStop: systemctl stop of relay.service as shipped
// (KillMode=mixed, Delegate=yes). relay contains each generation in a
// gen-N cgroup under the unit's, stops its generations itself, before
// TimeoutStopSec, and exits with the serving child's status (0 for myapp,
// 3 for a child that exits 3 on SIGTERM, under relay@.service); nothing is
// left in the unit's cgroup.
func TestSystemdRealStop(t *testing.T) {
	c := bootSystemd(t)
	_, gen1 := startRelayService(t, c)
	mainPID, cg := c.show("relay.service", "MainPID"), c.show("relay.service", "ControlGroup")

	// Under Delegate=yes, relay divides the unit's cgroup: itself in
	// relay-NAME.PID/supervisor, generation 1 in relay-NAME.PID/gen-1.
	relayCg := cg + "/relay-relay." + mainPID
	procCgroup := func(pid string) string {
		out, err := c.run("cat", "/proc/"+pid+"/cgroup")
		if err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		for _, line := range strings.Split(out, "\n") {
			if p, ok := strings.CutPrefix(line, "0::"); ok {
				return p
			}
		}
		t.Fatalf("pid %s is in no cgroup v2: %s", pid, out)
		return ""
	}
	if got, want := procCgroup(strconv.Itoa(gen1)), relayCg+"/gen-1"; got != want {
		t.Errorf("generation 1 (pid %d) is in cgroup %s, want %s", gen1, got, want)
	}
	if got, want := procCgroup(mainPID), relayCg+"/supervisor"; got != want {
		t.Errorf("relay (pid %s) is in cgroup %s, want %s", mainPID, got, want)
	}
	journal := c.journal("relay.service")
	if !strings.Contains(journal, `msg="containment cgroup" path=`) || !strings.Contains(journal, relayCg+"\n") {
		t.Errorf("relay did not log its containment cgroup %s:\n%s", relayCg, journal)
	}
	t.Logf("relay (pid %s) in %s/supervisor, generation 1 (pid %d) in %s/gen-1", mainPID, relayCg, gen1, relayCg)

	c.mustSystemctl("stop", "relay.service")
	checkStopped(t, c, "relay.service", cg, "inactive", "success", "0", gen1)
	journal = c.journal("relay.service")
	for _, want := range []string{
		fmt.Sprintf(`msg="stopping generation" gen=1 pid=%d signal=TERM`, gen1),
		fmt.Sprintf(`msg="generation exited" gen=1 pid=%d status="exit status 0"`, gen1),
		`msg="relay exiting" child_status="exit status 0" exit_code=0`,
	} {
		if !strings.Contains(journal, want) {
			t.Errorf("the journal of relay.service does not say %q:\n%s", want, journal)
		}
	}

	// A serving child that exits 3 on SIGTERM: relay exits 3, and systemd
	// records it (and, as for any main process that exits non-zero, marks
	// the unit failed).
	port := freeLoopbackPort(t)
	c.writeFile("/etc/relay/three.conf", fmt.Sprintf(
		"RELAY_LISTEN=127.0.0.1:%d\nRELAY_OPTIONS=\nAPP_COMMAND=/usr/local/bin/testchild -exit-on-term 3\n", port))
	c.installUnit("relay@.service", exampleUnit(t, "relay@.service"))
	c.mustSystemctl("start", "relay@three.service")
	child, err := get(newConnClient(), httpURL("127.0.0.1:"+strconv.Itoa(port)))
	if err != nil {
		t.Fatalf("relay@three.service does not serve: %v\n%s", err, c.journal("relay@three.service"))
	}
	cg = c.show("relay@three.service", "ControlGroup")
	c.mustSystemctl("stop", "relay@three.service")
	checkStopped(t, c, "relay@three.service", cg, "failed", "exit-code", "3", child)
	if j := c.journal("relay@three.service"); !strings.Contains(j, `msg="relay exiting" child_status="exit status 3" exit_code=3`) {
		t.Errorf("relay did not exit with its child's status 3:\n%s", j)
	}
}

// checkStopped checks a unit systemctl stop has stopped: its ActiveState,
// Result and the main process's exit status as wanted, not killed by
// systemd on a timeout, its child pid gone, nothing left in its cgroup cg.
func checkStopped(t *testing.T, c *sdContainer, unit, cg, state, result, status string, child int) {
	t.Helper()
	if a := c.show(unit, "ActiveState"); a != state {
		t.Errorf("%s after systemctl stop: ActiveState %s, want %s", unit, a, state)
	}
	if r := c.show(unit, "Result"); r != result {
		t.Errorf("%s after systemctl stop: Result %s, want %s (timeout: TimeoutStopSec passed)", unit, r, result)
	}
	if s := c.show(unit, "ExecMainStatus"); s != status {
		t.Errorf("%s after systemctl stop: ExecMainStatus %s, want %s", unit, s, status)
	}
	j := c.journal(unit)
	for _, bad := range []string{"timed out", "Killing process", "remains running"} {
		if strings.Contains(j, bad) {
			t.Errorf("%s: systemd had to step in (%q):\n%s", unit, bad, j)
		}
	}
	if out, err := c.run("test", "-e", "/proc/"+strconv.Itoa(child)); err == nil {
		t.Errorf("%s stopped, but its child pid %d still runs: %s", unit, child, out)
	}
	for _, dir := range c.cgroupDirs(cg) {
		if procs := cgroupProcs(dir); len(procs) > 0 {
			t.Errorf("%s stopped, but its cgroup %s holds %v", unit, dir, procs)
		}
	}
	t.Logf("%s stopped: ActiveState=%s Result=%s ExecMainStatus=%s, nothing left in cgroup %s", unit, state, result, status, cg)
}
