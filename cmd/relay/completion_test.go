package main

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
)

// completionScript runs relay completion SHELL as realMain would and
// returns what it printed.
func completionScript(t *testing.T, shell string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	app := newApp(&stderr, boot{})
	app.Writer = &stdout
	if code := exitCode(app.Run([]string{"relay", "completion", shell}), &stderr); code != exitOK || stderr.Len() > 0 {
		t.Fatalf("relay completion %s: exit %d, stderr %q", shell, code, stderr.String())
	}
	return stdout.String()
}

// relay completion prints a script for bash, zsh and fish, each naming
// relay's visible commands (fish's) or registering its function for relay.
func TestCompletionScripts(t *testing.T) {
	for shell, want := range map[string]string{
		"bash": "complete -o default -F _relay relay\n",
		"zsh":  "compdef _relay relay\n",
		"fish": "complete -c relay",
	} {
		if got := completionScript(t, shell); !strings.Contains(got, want) {
			t.Errorf("relay completion %s: no %q in\n%s", shell, want, got)
		}
	}
	fish := completionScript(t, "fish")
	for _, c := range newApp(io.Discard, boot{}).Commands {
		if got := strings.Contains(fish, "-a '"+c.Name+"'"); got == c.Hidden {
			t.Errorf("relay completion fish: command %s (hidden: %v) offered: %v", c.Name, c.Hidden, got)
		}
	}
}

// A shell relay has no script for, or none, is a usage error (exit 2)
// that names the three.
func TestCompletionUnknownShell(t *testing.T) {
	for _, args := range [][]string{{"completion", "tcsh"}, {"completion"}, {"completion", "bash", "zsh"}} {
		code, line := runRelay(t, args...)
		if code != exitUsage || !strings.Contains(line, "bash, zsh or fish") {
			t.Errorf("relay %s: exit %d, %q; want exit %d naming bash, zsh or fish", strings.Join(args, " "), code, line, exitUsage)
		}
	}
}

// buildRelay builds relay as make relay does, with the tags of the lean
// build, into a temporary directory, and returns that directory.
func buildRelay(t *testing.T) string {
	t.Helper()
	gotool := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(gotool); err != nil {
		gotool = "go"
	}
	dir := t.TempDir()
	cmd := exec.Command(gotool, "build", "-tags", "nethttpomithttp2,urfave_cli_no_docs", "-o", filepath.Join(dir, "relay"), ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return dir
}

// relay completion bash, sourced in a real bash from a built relay,
// registers its function for relay, and that function completes as
// compgen would: commands, then a command's flags, nothing after "--",
// and "--" alone never makes relay run the command instead.
func TestBashCompletionInBash(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("bash is not installed")
	}
	dir := buildRelay(t)
	script := `
set -u
source <(relay completion bash) || exit 1
spec=$(complete -p relay) || exit 1
echo "spec: $spec"
fn=${spec##*-F }
fn=${fn%% *}
try() {
    COMP_WORDS=("$@")
    COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
    COMP_LINE="$*"
    COMP_POINT=${#COMP_LINE}
    COMPREPLY=()
    "$fn" relay "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    echo "$*|${COMPREPLY[*]}"
}
try relay re
try relay ""
try relay run --li
try relay run --
try relay status -- ""
try relay completion f
`
	cmd := exec.Command(bash, "--norc", "--noprofile", "-c", script)
	cmd.Env = append(os.Environ(), "PATH="+dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("bash: %v\n%s", err, out)
	}
	got := map[string][]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if spec, ok := strings.CutPrefix(line, "spec: "); ok {
			if !strings.Contains(spec, "-F _relay") || !strings.HasSuffix(spec, " relay") {
				t.Errorf("complete -p relay: %q; want relay's function, -F _relay", spec)
			}
			continue
		}
		words, reply, _ := strings.Cut(line, "|")
		got[words] = strings.Fields(reply)
	}
	for _, c := range []struct {
		words        string
		want, unwant []string
	}{
		{"relay re", []string{"restart"}, []string{"stop", "run"}},
		{"relay ", []string{"run", "restart", "rollback", "upgrade", "status", "stop", "version", "completion"}, []string{"__man", "help"}},
		{"relay run --li", []string{"--listen", "--liveness", "--liveness-interval", "--liveness-failures"}, []string{"--log-level", "-l"}},
		{"relay run --", []string{"--listen", "--stop-signal", "--help"}, []string{"-l", "-h"}},
		{"relay status -- ", nil, []string{"--json"}},
		{"relay completion f", []string{"fish"}, []string{"bash"}},
	} {
		reply, ok := got[c.words]
		if !ok {
			t.Errorf("%q: not completed; bash printed\n%s", c.words, out)
			continue
		}
		for _, w := range c.want {
			if !slices.Contains(reply, w) {
				t.Errorf("completing %q: COMPREPLY %q lacks %s", c.words, reply, w)
			}
		}
		for _, w := range c.unwant {
			if slices.Contains(reply, w) {
				t.Errorf("completing %q: COMPREPLY %q has %s", c.words, reply, w)
			}
		}
		if c.want == nil && len(reply) > 0 {
			t.Errorf("completing %q: COMPREPLY %q, want none (bash then completes file names)", c.words, reply)
		}
	}
}

// zsh and fish read their scripts without a syntax error, where they are
// installed (.ci/run does not install them).
func TestZshAndFishCompletionSyntax(t *testing.T) {
	for _, c := range []struct{ shell, check string }{{"zsh", "-n"}, {"fish", "--no-execute"}} {
		path, err := exec.LookPath(c.shell)
		if err != nil {
			t.Logf("%s is not installed: its script's syntax is not checked", c.shell)
			continue
		}
		file := filepath.Join(t.TempDir(), c.shell)
		if err := os.WriteFile(file, []byte(completionScript(t, c.shell)), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(path, c.check, file).CombinedOutput(); err != nil || len(out) > 0 {
			t.Errorf("%s %s on relay completion %s: %v\n%s", c.shell, c.check, c.shell, err, out)
		}
	}
}

// The lean build has no man page writer, and says so.
func TestLeanBuildHasNoManPages(t *testing.T) {
	dir := buildRelay(t)
	out, err := exec.Command(filepath.Join(dir, "relay"), "__man", t.TempDir()).CombinedOutput()
	if code := exitCodeOf(err); code != exitFailure || !strings.Contains(string(out), "man pages are not in this build") {
		t.Errorf("relay __man in the lean build: exit %d, %q; want exit %d saying man pages are not in this build", code, out, exitFailure)
	}
}

func exitCodeOf(err error) int {
	if err == nil {
		return 0
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	return -1
}
