package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"
	"time"
)

func TestDebianVersion(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"v1.4.0", "1.4.0"},
		{"v1.4.0-rc.1", "1.4.0~rc.1"},
		{"v1.4.0-rc1", "1.4.0~rc1"},
		{"v0.0.0-20261205121300-c642ed7abcde", "0.0.0~git20261205121300.c642ed7abcde"},
		{"v0.0.0-20261205121300-c642ed7abcde+dirty", "0.0.0~git20261205121300.c642ed7abcde+dirty"},
		{"v1.4.1-0.20261205121300-c642ed7abcde", "1.4.1~git20261205121300.c642ed7abcde"},
		{"v1.4.0-rc.1.0.20261205121300-c642ed7abcde", "1.4.0~rc.1.git20261205121300.c642ed7abcde"},
		{"v1.4.0-beta-2", "1.4.0~beta~2"},
	} {
		got, err := debianVersion(c.in)
		if err != nil || got != c.want {
			t.Errorf("debianVersion(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	for _, in := range []string{"(devel)", "", "1.4.0", "vfoo"} {
		if got, err := debianVersion(in); err == nil {
			t.Errorf("debianVersion(%q) = %q, want an error", in, got)
		}
	}
}

// dpkg sorts the versions as the commits and tags come: an untagged
// commit, the next, a pre-release, a commit after it, the release, a
// commit after that, the next release.
func TestDebianVersionsSortAsCommits(t *testing.T) {
	if _, err := exec.LookPath("dpkg"); err != nil {
		t.Skip("dpkg is not installed")
	}
	var vs []string
	for _, in := range []string{
		"v0.0.0-20261205121300-c642ed7abcde",
		"v0.0.0-20261206090000-0123456789ab",
		"v1.4.0-rc.1",
		"v1.4.0-rc.1.0.20261207000000-0123456789ab",
		"v1.4.0",
		"v1.4.1-0.20261208000000-0123456789ab",
		"v1.4.1",
	} {
		v, err := debianVersion(in)
		if err != nil {
			t.Fatal(err)
		}
		vs = append(vs, v)
	}
	for i := 1; i < len(vs); i++ {
		if err := exec.Command("dpkg", "--compare-versions", vs[i-1], "lt", vs[i]).Run(); err != nil {
			t.Errorf("dpkg: %s is not before %s", vs[i-1], vs[i])
		}
	}
}

// The changelog names the commit and is dated by its time.
func TestDebianChangelog(t *testing.T) {
	bi := &debug.BuildInfo{Settings: []debug.BuildSetting{
		{Key: "vcs.revision", Value: "c642ed7abcde0123456789abcdef0123456789ab"},
		{Key: "vcs.time", Value: "2026-12-05T12:13:00Z"},
		{Key: "vcs.modified", Value: "false"},
	}}
	got := debianChangelog("0.0.0~git20261205121300.c642ed7abcde", "A B <a@b.invalid>", bi, time.Now())
	want := "relay (0.0.0~git20261205121300.c642ed7abcde) unstable; urgency=medium\n\n" +
		"  * Built by make package from commit c642ed7abcde0123456789abcdef0123456789ab.\n\n" +
		" -- A B <a@b.invalid>  Sat, 05 Dec 2026 12:13:00 +0000\n"
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
	if _, err := exec.LookPath("dpkg-parsechangelog"); err == nil {
		f := filepath.Join(t.TempDir(), "changelog")
		if err := os.WriteFile(f, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("dpkg-parsechangelog", "-l", f, "-S", "Version").CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "0.0.0~git20261205121300.c642ed7abcde" {
			t.Errorf("dpkg-parsechangelog: %v: %s", err, out)
		}
	}
}
