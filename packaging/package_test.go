// Package packaging holds the test of make package, which builds relay's
// Debian package with nfpm from nfpm.yaml (see docs/install.md).
package packaging

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
)

// The files of the package, and their modes: nothing else is in it but
// the directories that hold them.
var packaged = map[string]os.FileMode{
	"usr/bin/relay":                                  0o755,
	"usr/lib/systemd/system/relay.service":           0o644,
	"usr/lib/systemd/system/relay.socket":            0o644,
	"usr/lib/systemd/system/relay@.service":          0o644,
	"usr/share/doc/relay/examples/relay@.conf":       0o644,
	"usr/share/man/man1/relay.1.gz":                  0o644,
	"usr/share/man/man1/relay-run.1.gz":              0o644,
	"usr/share/man/man1/relay-restart.1.gz":          0o644,
	"usr/share/man/man1/relay-rollback.1.gz":         0o644,
	"usr/share/man/man1/relay-upgrade.1.gz":          0o644,
	"usr/share/man/man1/relay-status.1.gz":           0o644,
	"usr/share/man/man1/relay-stop.1.gz":             0o644,
	"usr/share/man/man1/relay-version.1.gz":          0o644,
	"usr/share/man/man1/relay-completion.1.gz":       0o644,
	"usr/share/bash-completion/completions/relay":    0o644,
	"usr/share/zsh/vendor-completions/_relay":        0o644,
	"usr/share/fish/vendor_completions.d/relay.fish": 0o644,
	"usr/share/doc/relay/changelog.gz":               0o644,
	"usr/share/lintian/overrides/relay":              0o644,
}

// make package, into a temporary directory, builds one package, named
// relay_VERSION_ARCH.deb, with the files above and no other: a static
// relay whose version and commit are the package's, the units of
// examples/systemd with relay at /usr/bin/relay, the directory
// /etc/relay and the instance sample with the documentation (no conffile:
// dpkg -r leaves nothing behind), the man pages, the completion scripts the packaged relay
// prints, and maintainer scripts that only reload systemd.
func TestMakePackage(t *testing.T) {
	for _, tool := range []string{"dpkg-deb", "make", "gzip", "git"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed (Debian's dpkg, make, gzip and git; .ci/run installs make): make package is not tested", tool)
		}
	}
	if err := exec.Command("git", "-C", "..", "rev-parse", "HEAD").Run(); err != nil {
		t.Skip("not a git checkout: make package takes relay's version from git")
	}
	tmp := t.TempDir()
	dist := filepath.Join(tmp, "dist")
	cmd := exec.Command("make", "-C", "..", "package", "PKG_BUILD="+filepath.Join(tmp, "build"), "DIST="+dist)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make package: %v\n%s", err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(dist, "*"))
	if len(debs) != 1 {
		t.Fatalf("make package made %q, want one .deb", debs)
	}
	deb := debs[0]
	field := func(name string) string {
		out, err := exec.Command("dpkg-deb", "-f", deb, name).Output()
		if err != nil {
			t.Fatalf("dpkg-deb -f %s: %v", name, err)
		}
		return strings.TrimSpace(string(out))
	}
	version, arch := field("Version"), field("Architecture")
	if want := "relay_" + version + "_" + arch + ".deb"; filepath.Base(deb) != want {
		t.Errorf("package %s, want %s", filepath.Base(deb), want)
	}
	if (runtime.GOARCH == "amd64" || runtime.GOARCH == "arm64") && arch != runtime.GOARCH {
		t.Errorf("Architecture: %s, want %s (GOARCH)", arch, runtime.GOARCH)
	}
	if field("Package") != "relay" || field("Maintainer") == "" || field("Depends") != "" {
		t.Errorf("control: Package %q, Maintainer %q, Depends %q; want relay, someone, nothing (relay is static)",
			field("Package"), field("Maintainer"), field("Depends"))
	}

	root := filepath.Join(tmp, "root")
	files := unpack(t, deb, root)
	for name, mode := range packaged {
		if got, ok := files[name]; !ok {
			t.Errorf("/%s is not in the package", name)
		} else if got != mode {
			t.Errorf("/%s: mode %v, want %v", name, got, mode)
		}
	}
	for name := range files {
		if _, ok := packaged[name]; !ok {
			t.Errorf("/%s is in the package, unexpected", name)
		}
	}

	relay := filepath.Join(root, "usr/bin/relay")
	checkStatic(t, relay)
	checkVersion(t, relay, version)
	checkUnits(t, root)
	checkSample(t, root)
	checkControl(t, deb, tmp)
	for name := range packaged {
		if strings.HasPrefix(name, "usr/share/man/man1/") {
			roff := gunzip(t, filepath.Join(root, name))
			if !strings.Contains(roff, "\n.TH ") || !strings.Contains(roff, "\n.SH NAME\n") {
				t.Errorf("/%s is not a man page:\n%.200s", name, roff)
			}
		}
	}
	for shell, name := range map[string]string{
		"bash": "usr/share/bash-completion/completions/relay",
		"zsh":  "usr/share/zsh/vendor-completions/_relay",
		"fish": "usr/share/fish/vendor_completions.d/relay.fish",
	} {
		want, err := exec.Command(relay, "completion", shell).Output()
		got, _ := os.ReadFile(filepath.Join(root, name))
		if err != nil || !bytes.Equal(got, want) || len(got) == 0 {
			t.Errorf("/%s is not what the packaged relay completion %s prints (%v)", name, shell, err)
		}
	}
}

// unpack extracts the package's files into root and returns the mode of
// each regular file by path; a link or a directory that holds no file of
// the package is an error.
func unpack(t *testing.T, deb, root string) map[string]os.FileMode {
	t.Helper()
	out, err := exec.Command("dpkg-deb", "--fsys-tarfile", deb).Output()
	if err != nil {
		t.Fatalf("dpkg-deb --fsys-tarfile: %v", err)
	}
	files := map[string]os.FileMode{}
	var dirs []string
	tr := tar.NewReader(bytes.NewReader(out))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		name := strings.TrimPrefix(path.Clean(h.Name), "./")
		if h.Uid != 0 || h.Gid != 0 {
			t.Errorf("/%s: owner %d:%d, want root", name, h.Uid, h.Gid)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if name != "." {
				dirs = append(dirs, name)
			}
		case tar.TypeReg:
			files[name] = os.FileMode(h.Mode).Perm()
			dst := filepath.Join(root, name)
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(dst, b, os.FileMode(h.Mode).Perm()); err != nil {
				t.Fatal(err)
			}
		default:
			t.Errorf("/%s: a tar entry of type %q, unexpected", name, h.Typeflag)
		}
	}
	for _, d := range dirs {
		holds := d == "etc" || d == "etc/relay" // the instance files' directory, empty

		for name := range packaged {
			if strings.HasPrefix(name, d+"/") {
				holds = true
			}
		}
		if !holds {
			t.Errorf("directory /%s holds no file of the package, unexpected", d)
		}
	}
	return files
}

// checkStatic: relay has no program interpreter, so it needs no C library.
func checkStatic(t *testing.T, relay string) {
	t.Helper()
	f, err := elf.Open(relay)
	if err != nil {
		t.Fatalf("/usr/bin/relay: %v", err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("/usr/bin/relay has a program interpreter (PT_INTERP): not static")
		}
	}
}

// checkVersion: relay version, run from the package, names the commit the
// package version names (and the version itself for a release), and is
// "(modified)" when the version is +dirty.
func checkVersion(t *testing.T, relay, version string) {
	t.Helper()
	out, err := exec.Command(relay, "version").Output()
	if err != nil {
		t.Fatalf("relay version: %v", err)
	}
	line := strings.TrimSpace(string(out))
	m := regexp.MustCompile(`^relay (\S+) commit ([0-9a-f]{40})( \(modified\))?$`).FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("relay version: %q, want relay VERSION commit SHA1: built without VCS information?", line)
	}
	dirty := strings.HasSuffix(version, "+dirty")
	if dirty != (m[3] != "") {
		t.Errorf("package %s, relay version %q: +dirty and (modified) disagree", version, line)
	}
	if c := regexp.MustCompile(`[~.]git\d{14}\.([0-9a-f]{12})(\+dirty)?$`).FindStringSubmatch(version); c != nil {
		if !strings.HasPrefix(m[2], c[1]) {
			t.Errorf("package %s names commit %s, relay version %q another", version, c[1], line)
		}
	} else if want := strings.ReplaceAll(strings.TrimPrefix(m[1], "v"), "-", "~"); version != want {
		t.Errorf("package %s, relay version %q: want the package version %s", version, line, want)
	}
}

// checkUnits: the units are examples/systemd's with relay at /usr/bin/relay,
// and nothing else changed.
func checkUnits(t *testing.T, root string) {
	t.Helper()
	for _, unit := range []string{"relay.service", "relay.socket", "relay@.service"} {
		example, err := os.ReadFile(filepath.Join("..", "examples", "systemd", unit))
		if err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(filepath.Join(root, "usr/lib/systemd/system", unit))
		if want := strings.ReplaceAll(string(example), "/usr/local/bin/relay ", "/usr/bin/relay "); string(got) != want {
			t.Errorf("/usr/lib/systemd/system/%s is not examples/systemd/%s with /usr/bin/relay", unit, unit)
		}
		if strings.Contains(string(got), "/usr/local/bin/relay") {
			t.Errorf("/usr/lib/systemd/system/%s still runs /usr/local/bin/relay", unit)
		}
		if strings.HasSuffix(unit, ".service") && !strings.Contains(string(got), "\nExecStart=/usr/bin/relay run ") {
			t.Errorf("/usr/lib/systemd/system/%s: no ExecStart=/usr/bin/relay run", unit)
		}
	}
}

// checkSample: the sample sets each variable relay@.service's ExecStart
// reads from /etc/relay/%i.conf.
func checkSample(t *testing.T, root string) {
	t.Helper()
	unit, _ := os.ReadFile(filepath.Join(root, "usr/lib/systemd/system/relay@.service"))
	if !strings.Contains(string(unit), "\nEnvironmentFile=/etc/relay/%i.conf\n") {
		t.Fatalf("relay@.service no longer reads EnvironmentFile=/etc/relay/%%i.conf")
	}
	sample, _ := os.ReadFile(filepath.Join(root, "usr/share/doc/relay/examples/relay@.conf"))
	set := map[string]bool{}
	for _, l := range strings.Split(string(sample), "\n") {
		if name, _, ok := strings.Cut(l, "="); ok && !strings.HasPrefix(l, "#") {
			set[name] = true
		}
	}
	var execStart string
	for _, l := range strings.Split(string(unit), "\n") {
		if strings.HasPrefix(l, "ExecStart=") {
			execStart = l
		}
	}
	used := regexp.MustCompile(`\$\{?([A-Z_]+)\}?`).FindAllStringSubmatch(execStart, -1)
	if len(used) == 0 {
		t.Fatalf("relay@.service's ExecStart reads no variable: %q", execStart)
	}
	for _, u := range used {
		if !set[u[1]] {
			t.Errorf("the sample relay@.conf does not set %s, which relay@.service's ExecStart reads", u[1])
		}
	}
}

// checkControl: no conffile; the maintainer scripts run
// systemctl daemon-reload alone, only where systemd runs.
func checkControl(t *testing.T, deb, tmp string) {
	t.Helper()
	dir := filepath.Join(tmp, "control")
	if out, err := exec.Command("dpkg-deb", "-e", deb, dir).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb -e: %v\n%s", err, out)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "conffiles")); err == nil {
		t.Errorf("conffiles: %q, want none: dpkg -r leaves conffiles behind", b)
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		switch e.Name() {
		case "control", "conffiles", "md5sums":
			continue
		case "postinst", "postrm":
		default:
			t.Errorf("control member %s, unexpected", e.Name())
			continue
		}
		b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		s := string(b)
		if !strings.Contains(s, "[ -d /run/systemd/system ]") {
			t.Errorf("%s does not check that systemd runs", e.Name())
		}
		for _, l := range strings.Split(s, "\n") {
			if l = strings.TrimSpace(l); l == "" || strings.HasPrefix(l, "#") {
				continue
			}
			if strings.Contains(l, "systemctl") && !strings.Contains(l, "systemctl --system daemon-reload") ||
				regexp.MustCompile(`\b(deb-systemd-invoke|invoke-rc\.d|service|relay)\b`).MatchString(l) {
				t.Errorf("%s: %q: the maintainer scripts only reload systemd", e.Name(), l)
			}
		}
	}
}

func gunzip(t *testing.T, file string) string {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	z, err := gzip.NewReader(f)
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	b, err := io.ReadAll(z)
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return string(b)
}
