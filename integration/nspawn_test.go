package integration

// The real-systemd harness: a systemd 254 booted as PID 1 of a
// systemd-nspawn container, driven with the real systemctl. .ci/run
// provides the payload (RELAY_SYSTEMD_LAYER, systemd 254 from
// bookworm-backports laid out for a merged /usr) and sets
// RELAY_REQUIRE_SYSTEMD_REAL=1; elsewhere the tests skip, saying why.
//
// Each container is made of, and cleaned up with:
//   - a state directory $TMPDIR/relay-sd.PID.N (PID is the test process's):
//     a copy of the host's /etc with no enabled units, a fresh machine-id
//     and an empty fstab, bound at the container's /etc; a directory of the
//     binaries bound read-only at /usr/local/bin; the mount points below;
//   - the root: an overlay of the layer (copied onto a tmpfs, since a lower
//     layer on the root file system would overlap "/" and fail with ELOOP)
//     over the host's "/". Both mounts live in a private mount namespace of
//     systemd-nspawn's own, so they vanish with it, however it ends; the host
//     never sees them;
//   - a cgroup relay-sd.PID.N at the root of the cgroup2 hierarchy and of the
//     name=systemd v1 one (the host has hybrid cgroups), both found through
//     /proc/self/mountinfo: nspawn starts in them, so containers never share
//     one.
//
// nspawn gets SIGTERM (a clean poweroff of the container) when the test
// process dies, and every boot first removes what a killed earlier run left:
// state directories and cgroups named after a pid that is gone.

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/procfs"
)

// sdPrefix names every state directory and cgroup the harness makes:
// sdPrefix + PID + "." + N.
const sdPrefix = "relay-sd."

// sdSeq numbers the containers of this test process.
var sdSeq atomic.Int64

// sdContainer is a real systemd 254 booted as PID 1 of a systemd-nspawn
// container that shares the host's network namespace (tests reach its
// services on 127.0.0.1), with relay at /usr/local/bin/relay, examples/hello
// at /usr/local/bin/myapp and testchild at /usr/local/bin/testchild
// (read-only binds).
type sdContainer struct {
	t       *testing.T
	name    string   // relay-sd.PID.N: the machine name, state directory and cgroups
	dir     string   // the state directory
	etc     string   // the container's /etc, on the host
	cgroups []string // the cgroups nspawn runs in, v2 first
	nspawn  *os.Process
	exited  chan struct{} // closed once nspawn has exited
	// pid1 is the container's systemd, as the host sees it.
	pid1 int
	// Version is the manager's version, as systemctl show -p Version says.
	version string
	// bootTime is how long the boot took, to is-system-running running/degraded.
	bootTime time.Duration
}

// sdSkip skips t with why, or fails it where RELAY_REQUIRE_SYSTEMD_REAL=1
// (.ci/run sets it): there the real-systemd tests may not go missing.
func sdSkip(t *testing.T, why string) {
	t.Helper()
	if os.Getenv("RELAY_REQUIRE_SYSTEMD_REAL") == "1" {
		t.Fatal(why + " (RELAY_REQUIRE_SYSTEMD_REAL=1: the real-systemd tests may not skip)")
	}
	t.Skip(why)
}

// bootSystemd boots a container for t and waits until its systemd has
// finished booting (is-system-running: running or degraded). It skips t
// with a clear reason when that cannot be done here (no layer, not root, no
// systemd-nspawn, no cgroup2), unless RELAY_REQUIRE_SYSTEMD_REAL=1; then it
// fails. t.Cleanup powers the container off and removes all of it.
func bootSystemd(t *testing.T) *sdContainer {
	t.Helper()
	return bootSystemdVolatile(t, "yes")
}

// bootSystemdVolatile is bootSystemd with nspawn's --volatile=mode: "yes",
// a tmpfs root with the tree's /usr read-only; "overlay", the whole tree
// writable, its changes kept on a tmpfs (for a package installed with dpkg
// in /usr and its database in /var).
func bootSystemdVolatile(t *testing.T, volatile string) *sdContainer {
	t.Helper()
	layer := os.Getenv("RELAY_SYSTEMD_LAYER")
	if layer == "" {
		sdSkip(t, "RELAY_SYSTEMD_LAYER is not set: run `bash .ci/run --provision` and export what it prints (docs/development.md)")
	}
	if _, err := os.Stat(filepath.Join(layer, "usr/lib/systemd/systemd")); err != nil {
		sdSkip(t, fmt.Sprintf("RELAY_SYSTEMD_LAYER=%s holds no usr/lib/systemd/systemd: run `bash .ci/run --provision` again", layer))
	}
	if os.Geteuid() != 0 {
		sdSkip(t, "the real-systemd tests need root (systemd-nspawn, mounts, cgroups)")
	}
	for _, tool := range []string{"systemd-nspawn", "nsenter", "cp"} {
		if _, err := exec.LookPath(tool); err != nil {
			sdSkip(t, tool+" not found: install Debian's systemd-container and util-linux")
		}
	}
	v2, v1, err := cgroupMounts()
	if err != nil {
		sdSkip(t, "no cgroups for a container: "+err.Error())
	}
	removeStaleContainers(t, v2, v1)

	c := &sdContainer{t: t, exited: make(chan struct{})}
	c.name = fmt.Sprintf("%s%d.%d", sdPrefix, os.Getpid(), sdSeq.Add(1))
	c.dir = filepath.Join(os.TempDir(), c.name)
	c.etc = filepath.Join(c.dir, "etc")
	if err := os.Mkdir(c.dir, 0o700); err != nil {
		t.Fatalf("creating the container's state directory: %v", err)
	}
	t.Cleanup(c.down)
	for _, d := range []string{"layer", "root", "bin"} {
		if err := os.Mkdir(filepath.Join(c.dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	c.prepareEtc()
	for dst, src := range map[string]string{"relay": built.relay, "myapp": built.hello, "testchild": built.testchild} {
		if err := linkOrCopy(src, filepath.Join(c.dir, "bin", dst)); err != nil {
			t.Fatalf("installing %s in the container: %v", dst, err)
		}
	}
	for _, h := range []string{v2, v1} {
		if h == "" {
			continue
		}
		cg := filepath.Join(h, c.name)
		if err := os.Mkdir(cg, 0o755); err != nil {
			t.Fatalf("creating the container's cgroup: %v", err)
		}
		c.cgroups = append(c.cgroups, cg)
	}
	c.start(layer, volatile)
	c.waitBooted()
	t.Logf("systemd %s booted as PID 1 of %s (host pid %d) in %s", c.version, c.name, c.pid1, c.bootTime.Round(time.Millisecond))
	return c
}

// prepareEtc copies the host's /etc for the container: no enabled units (a
// copy with them would start the host's services; an empty /etc would be a
// first boot, whose presets enable everything and whose firstboot waits for
// input), a fresh machine-id, and no fstab (nothing of the host is mounted).
func (c *sdContainer) prepareEtc() {
	c.t.Helper()
	if out, err := exec.Command("cp", "-a", "/etc", c.etc).CombinedOutput(); err != nil {
		c.t.Fatalf("copying /etc for the container: %v: %s", err, out)
	}
	units := filepath.Join(c.etc, "systemd", "system")
	if err := os.RemoveAll(units); err != nil {
		c.t.Fatalf("removing the host's enabled units from the container's /etc: %v", err)
	}
	if err := os.MkdirAll(units, 0o755); err != nil {
		c.t.Fatal(err)
	}
	id := make([]byte, 16)
	rand.Read(id)
	for path, content := range map[string]string{
		"machine-id": fmt.Sprintf("%x\n", id),
		"fstab":      "",
	} {
		p := filepath.Join(c.etc, path)
		os.Remove(p) // a symlink on some hosts: never write through it
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			c.t.Fatal(err)
		}
	}
}

// mountScript runs as nspawn's process before it execs it, in a private
// mount namespace (Unshareflags: both mounts vanish with the namespace):
// it joins the v1 cgroup (the v2 one was joined at clone), puts the layer
// on a tmpfs and the overlay root together, then execs nspawn.
// Arguments: DIR LAYER [V1-CGROUP.PROCS] -- NSPAWN ARGS...
const mountScript = `set -e
d=$1 l=$2; shift 2
while [ "$1" != -- ]; do echo $$ >"$1"; shift; done; shift
mount -t tmpfs -o mode=0755 relay-sd-layer "$d/layer"
cp -a "$l/." "$d/layer/"
mount -t overlay -o "lowerdir=$d/layer:/" relay-sd-root "$d/root"
exec "$@"`

// start starts systemd-nspawn and finds the container's PID 1.
func (c *sdContainer) start(layer, volatile string) {
	c.t.Helper()
	logf, err := os.Create(filepath.Join(c.dir, "nspawn.log"))
	if err != nil {
		c.t.Fatal(err)
	}
	args := []string{"-ec", mountScript, "sh", c.dir, layer}
	for _, cg := range c.cgroups[1:] {
		args = append(args, filepath.Join(cg, "cgroup.procs"))
	}
	args = append(args, "--", "systemd-nspawn",
		"--quiet", "--register=no", "--keep-unit", "--machine="+c.name, "--console=pipe",
		"--directory="+filepath.Join(c.dir, "root"), "--volatile="+volatile,
		"--bind="+c.etc+":/etc", "--bind-ro="+filepath.Join(c.dir, "bin")+":/usr/local/bin",
		// nspawn's own seccomp allow-list (Debian 12's systemd 252)
		// refuses pidfd_getfd, with which relay inspects the socket a
		// child binds: the bind takeover would fail every covered bind.
		"--system-call-filter=pidfd_getfd",
		"--boot")
	cgfd, err := os.Open(c.cgroups[0])
	if err != nil {
		c.t.Fatal(err)
	}
	defer cgfd.Close()
	cmd := exec.Command("sh", args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, logf, logf
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// A clean poweroff when the test process dies, whatever kills it.
		Pdeathsig:    syscall.SIGTERM,
		Unshareflags: syscall.CLONE_NEWNS,
		UseCgroupFD:  true,
		CgroupFD:     int(cgfd.Fd()),
	}
	// The parent-death signal follows the thread that started the process:
	// this goroutine keeps it locked until nspawn has exited.
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer close(c.exited)
		defer logf.Close()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		cmd.Wait()
	}()
	if err := <-started; err != nil {
		c.t.Fatalf("starting systemd-nspawn: %v", err)
	}
	c.nspawn = cmd.Process
}

// waitBooted finds the container's PID 1 among nspawn's children and waits
// for its boot to end, bounded by a minute.
func (c *sdContainer) waitBooted() {
	c.t.Helper()
	start := time.Now()
	deadline := start.Add(time.Minute)
	for c.pid1 == 0 {
		for _, p := range procfs.Children(c.nspawn.Pid) {
			if nsPidIsOne(p) {
				c.pid1 = p
			}
		}
		if c.pid1 != 0 {
			break
		}
		c.checkAlive(deadline, "PID 1 of the container")
		time.Sleep(5 * time.Millisecond)
	}
	for {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		out, _ := c.runCtx(ctx, "systemctl", "is-system-running", "--wait")
		cancel()
		switch state := strings.TrimSpace(out); state {
		case "running", "degraded":
			c.bootTime = time.Since(start)
			if state == "degraded" {
				failed, _ := c.systemctl("list-units", "--failed", "--plain", "--no-legend")
				c.t.Logf("the container's boot is degraded; failed units:\n%s", failed)
			}
			c.version = c.show("", "Version")
			return
		}
		// Before systemd listens, systemctl fails at once.
		c.checkAlive(deadline, "the end of the container's boot")
		time.Sleep(20 * time.Millisecond)
	}
}

// checkAlive fails the test if nspawn has exited or deadline has passed.
func (c *sdContainer) checkAlive(deadline time.Time, what string) {
	c.t.Helper()
	select {
	case <-c.exited:
		c.t.Fatalf("systemd-nspawn exited while waiting for %s:\n%s", what, c.nspawnLog())
	default:
	}
	if time.Now().After(deadline) {
		c.t.Fatalf("timed out waiting for %s:\n%s", what, c.nspawnLog())
	}
}

func (c *sdContainer) nspawnLog() string {
	b, _ := os.ReadFile(filepath.Join(c.dir, "nspawn.log"))
	return string(b)
}

// nsPidIsOne reports whether pid is PID 1 of the pid namespace it is in.
func nsPidIsOne(pid int) bool {
	st, err := procfs.ReadStatus(pid)
	if err != nil {
		return false
	}
	f := strings.Fields(st["NSpid"])
	return len(f) > 1 && f[len(f)-1] == "1"
}

// run runs a command inside the container (nsenter into all of PID 1's
// namespaces), bounded by two minutes, and returns its combined output.
func (c *sdContainer) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return c.runCtx(ctx, args...)
}

func (c *sdContainer) runCtx(ctx context.Context, args ...string) (string, error) {
	argv := append([]string{"-t", strconv.Itoa(c.pid1), "-a", "--"}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", argv...)
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0"}
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s in the container: %w", strings.Join(args, " "), err)
	}
	return string(out), nil
}

// systemctl runs systemctl inside the container.
func (c *sdContainer) systemctl(args ...string) (string, error) {
	return c.run(append([]string{"systemctl", "--no-pager"}, args...)...)
}

// mustSystemctl runs systemctl inside the container and fails the test if
// it fails.
func (c *sdContainer) mustSystemctl(args ...string) string {
	c.t.Helper()
	out, err := c.systemctl(args...)
	if err != nil {
		c.t.Fatalf("%v: %s", err, out)
	}
	return out
}

// show returns a property of unit (of the manager if unit is ""):
// systemctl show -p PROP --value. It fails the test if systemctl does.
func (c *sdContainer) show(unit, prop string) string {
	c.t.Helper()
	args := []string{"show", "-p", prop, "--value"}
	if unit != "" {
		args = append(args, unit)
	}
	return strings.TrimSpace(c.mustSystemctl(args...))
}

// hostPath is the host's path of path in the container's file system.
func (c *sdContainer) hostPath(path string) string {
	return filepath.Join(fmt.Sprintf("/proc/%d/root", c.pid1), path)
}

// cgroupDirs returns the host paths of the container's cgroup cg (a
// ControlGroup= value) in its cgroup2 hierarchy and its name=systemd one
// (if it has one).
func (c *sdContainer) cgroupDirs(cg string) []string {
	c.t.Helper()
	v2, v1, err := cgroupMountsIn(fmt.Sprintf("/proc/%d/mountinfo", c.pid1))
	if err != nil {
		c.t.Fatalf("the container's cgroup mounts: %v", err)
	}
	dirs := []string{c.hostPath(filepath.Join(v2, cg))}
	if v1 != "" {
		dirs = append(dirs, c.hostPath(filepath.Join(v1, cg)))
	}
	return dirs
}

// journal returns unit's journal since boot, messages only.
func (c *sdContainer) journal(unit string) string {
	out, err := c.run("journalctl", "--no-pager", "-b", "-o", "cat", "-u", unit)
	if err != nil {
		return out + "\n(" + err.Error() + ")"
	}
	return out
}

// writeFile writes a file in the container's /etc (path is absolute and
// under /etc, e.g. /etc/systemd/system/relay.service or
// /etc/relay/api.conf), creating its directories.
func (c *sdContainer) writeFile(path, content string) {
	c.t.Helper()
	rel, ok := strings.CutPrefix(filepath.Clean(path), "/etc/")
	if !ok || strings.HasPrefix(rel, "../") {
		c.t.Fatalf("writeFile(%q): only files under /etc can be written", path)
	}
	// The copy of /etc may hold symlinks to absolute paths, which the
	// host would resolve to its own files: never write through one.
	p := c.etc
	for _, name := range strings.Split(rel, "/") {
		p = filepath.Join(p, name)
		fi, err := os.Lstat(p)
		if err == nil && fi.Mode()&os.ModeSymlink != 0 {
			c.t.Fatalf("writeFile(%q): %s is a symlink in the container's /etc; write elsewhere", path, p)
		}
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		c.t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_NOFOLLOW, 0o644)
	if err != nil {
		c.t.Fatalf("writing the container's %s: %v", path, err)
	}
	_, err = f.WriteString(content)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		c.t.Fatalf("writing the container's %s: %v", path, err)
	}
}

// installUnit writes a unit into /etc/systemd/system and reloads systemd.
func (c *sdContainer) installUnit(name, content string) {
	c.t.Helper()
	c.writeFile("/etc/systemd/system/"+name, content)
	c.daemonReload()
}

// daemonReload runs systemctl daemon-reload and fails the test if it fails.
func (c *sdContainer) daemonReload() {
	c.t.Helper()
	c.mustSystemctl("daemon-reload")
}

// exampleUnit returns examples/systemd/NAME with each old,new pair of
// replace replaced. It fails the test if an old string is not in the unit,
// so the units tested stay the examples as shipped.
func exampleUnit(t *testing.T, name string, replace ...string) string {
	t.Helper()
	if len(replace)%2 != 0 {
		t.Fatalf("exampleUnit(%s): replace needs old,new pairs", name)
	}
	b, err := os.ReadFile(filepath.Join("..", "examples", "systemd", name))
	if err != nil {
		t.Fatalf("reading the example unit: %v", err)
	}
	s := string(b)
	for i := 0; i < len(replace); i += 2 {
		if !strings.Contains(s, replace[i]) {
			t.Fatalf("examples/systemd/%s no longer contains %q: update the test", name, replace[i])
		}
		s = strings.ReplaceAll(s, replace[i], replace[i+1])
	}
	return s
}

// down powers the container off (SIGTERM to nspawn: a clean shutdown of
// its systemd), kills what is left after 30s, and removes the cgroups and
// the state directory. The mounts went with nspawn's mount namespace.
func (c *sdContainer) down() {
	t := c.t
	if t.Failed() && c.pid1 != 0 {
		if out, err := c.run("journalctl", "--no-pager", "-b", "-n", "300", "-o", "short-monotonic"); err == nil {
			t.Logf("the container's journal (last 300 lines):\n%s", out)
		}
	}
	if c.nspawn != nil {
		c.nspawn.Signal(syscall.SIGTERM)
		select {
		case <-c.exited:
		case <-time.After(30 * time.Second):
			t.Errorf("systemd-nspawn did not power the container off within 30s: killing it")
			c.nspawn.Kill()
		}
	}
	for i := len(c.cgroups) - 1; i >= 0; i-- {
		if err := killCgroup(c.cgroups[i]); err != nil {
			t.Errorf("removing the container's cgroup: %v", err)
		}
	}
	if c.nspawn != nil {
		select {
		case <-c.exited:
		case <-time.After(10 * time.Second):
			t.Errorf("systemd-nspawn still runs after its cgroup was killed")
		}
	}
	if err := os.RemoveAll(c.dir); err != nil {
		t.Errorf("removing the container's state directory: %v", err)
	}
}

// cgroupMounts finds the cgroup2 mount and the name=systemd v1 one (empty
// on a host with no v1 hierarchies) in /proc/self/mountinfo.
func cgroupMounts() (v2, v1 string, err error) {
	return cgroupMountsIn("/proc/self/mountinfo")
}

// cgroupMountsIn is cgroupMounts in the mount namespace whose mountinfo
// file is path.
func cgroupMountsIn(path string) (v2, v1 string, err error) {
	f, err := os.Open(path)
	if err != nil {
		return "", "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT POINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER
		// (the harness's mount points hold no space, which would be \040)
		mount, fs, ok := strings.Cut(sc.Text(), " - ")
		m, f := strings.Fields(mount), strings.Fields(fs)
		if !ok || len(m) < 5 || len(f) < 3 {
			continue
		}
		if f[0] == "cgroup2" && v2 == "" {
			v2 = m[4]
		}
		if f[0] == "cgroup" && v1 == "" && slices.Contains(strings.Split(f[2], ","), "name=systemd") {
			v1 = m[4]
		}
	}
	if err := sc.Err(); err != nil {
		return "", "", err
	}
	if v2 == "" {
		return "", "", errors.New("no cgroup2 file system is mounted")
	}
	return v2, v1, nil
}

// removeStaleContainers removes what a killed earlier test process left:
// the state directories and cgroups named relay-sd.PID.N whose PID is gone.
// It touches only directories of that name that are not symlinks.
func removeStaleContainers(t *testing.T, v2, v1 string) {
	t.Helper()
	for _, parent := range []string{v2, v1, os.TempDir()} {
		if parent == "" {
			continue
		}
		ents, err := os.ReadDir(parent)
		if err != nil {
			continue
		}
		for _, e := range ents {
			if !staleName(e.Name()) || e.Type()&os.ModeSymlink != 0 || !e.IsDir() || !ownedByUs(filepath.Join(parent, e.Name())) {
				continue
			}
			p := filepath.Join(parent, e.Name())
			if parent == os.TempDir() {
				err = os.RemoveAll(p)
			} else {
				err = killCgroup(p)
			}
			if err != nil {
				t.Logf("removing %s, left by a killed test run: %v", p, err)
				continue
			}
			t.Logf("removed %s, left by a killed test run", p)
		}
	}
}

// ownedByUs reports whether path (not followed) belongs to this process's
// user, as what the harness made does.
func ownedByUs(path string) bool {
	var st unix.Stat_t
	return unix.Lstat(path, &st) == nil && int(st.Uid) == os.Geteuid()
}

// staleName reports whether name is relay-sd.PID.N of a test process that
// is gone.
func staleName(name string) bool {
	rest, ok := strings.CutPrefix(name, sdPrefix)
	if !ok {
		return false
	}
	pidStr, n, ok := strings.Cut(rest, ".")
	pid, err1 := strconv.Atoi(pidStr)
	_, err2 := strconv.Atoi(n)
	if !ok || err1 != nil || err2 != nil || pid <= 0 || pid == os.Getpid() {
		return false
	}
	return errors.Is(unix.Kill(pid, 0), unix.ESRCH)
}

// killCgroup kills every process in the cgroup dir and below (cgroup.kill
// on cgroup2, SIGKILL to each process on v1), waits up to 10s until they
// are gone, and removes the cgroups, deepest first.
func killCgroup(dir string) error {
	if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0); err != nil {
		for _, pid := range cgroupProcs(dir) {
			unix.Kill(pid, unix.SIGKILL)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		procs := cgroupProcs(dir)
		if len(procs) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s still has processes %v after SIGKILL", dir, procs)
		}
		for _, pid := range procs {
			unix.Kill(pid, unix.SIGKILL)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return rmdirTree(dir)
}

// cgroupProcs lists the processes in dir and the cgroups below it.
func cgroupProcs(dir string) []int {
	var out []int
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
			return nil
		}
		b, _ := os.ReadFile(p)
		for _, f := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(f); err == nil {
				out = append(out, n)
			}
		}
		return nil
	})
	return out
}

// rmdirTree removes the cgroup dir and those below it with rmdir only,
// deepest first (WalkDir lists a directory before what it holds, and does
// not follow symlinks).
func rmdirTree(dir string) error {
	var dirs []string
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return err
	})
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, d := range slices.Backward(dirs) {
		if err := unix.Rmdir(d); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("removing cgroup %s: %w", d, err)
		}
	}
	return nil
}

// linkOrCopy hard-links src to dst, or copies it where a link cannot be
// made (another file system).
func linkOrCopy(src, dst string) error {
	if os.Link(src, dst) == nil {
		return nil
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
