//go:build !urfave_cli_no_docs

package main

import (
	"bufio"
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

// flagsDoc is docs/flags.md, from this package's directory.
const flagsDoc = "../../docs/flags.md"

// Every flag of every command is in its man page and in docs/flags.md,
// under each of its names. The policy, flag by flag:
//   - a visible flag of a visible command, and each of its aliases: an
//     entry in the OPTIONS of relay-COMMAND(1), and a row in the table of
//     the section "## `relay COMMAND`" of docs/flags.md;
//   - relay's global flags (App.Flags: --version): an entry in the OPTIONS
//     of relay(1), and a mention anywhere in docs/flags.md (its section
//     "relay version" shows relay --version, in no table);
//   - --help, -h, which cli gives relay and every command: an entry in
//     every page; docs/flags.md says it once in its introduction instead
//     of a row in every table, and that is checked;
//   - hidden flags and hidden commands (relay __man) are in neither;
//   - cli's --generate-bash-completion (EnableBashCompletion, for
//     relay completion's scripts) is no flag of any command: in neither.
//
// And the other way: a row of docs/flags.md for a flag that its command
// does not have is an error too.
func TestEveryFlagInManPagesAndFlagsDoc(t *testing.T) {
	app := newApp(io.Discard, boot{})
	pages := map[string]string{}
	for _, p := range manPages(app) {
		pages[p.file] = p.roff
	}
	doc, err := os.ReadFile(flagsDoc)
	if err != nil {
		t.Fatal(err)
	}
	rows := flagsDocRows(string(doc))

	for _, c := range app.Commands {
		if c.Hidden {
			continue
		}
		page := manName(app, c) + ".1"
		listed := manOptions(pages[page])
		section := "## `relay " + c.Name + "`"
		documented, hasSection := rows[c.Name]
		var names []string
		for _, f := range c.Flags {
			if v, ok := f.(cli.VisibleFlag); ok && !v.IsVisible() {
				continue
			}
			for _, n := range flagNames(f) {
				names = append(names, n)
				if !listed[n] {
					t.Errorf("relay %s: flag %s is missing from its man page %s (OPTIONS)", c.Name, n, page)
				}
				if !documented[n] {
					t.Errorf("relay %s: flag %s is missing from %s: no row in the table of its section %q", c.Name, n, flagsDoc, section)
				}
			}
		}
		if len(names) > 0 && !hasSection {
			t.Errorf("relay %s: %s has no section %q for its flags %s", c.Name, flagsDoc, section, strings.Join(names, ", "))
		}
		for n := range documented {
			if !slices.Contains(names, n) {
				t.Errorf("relay %s: %s has a row for flag %s in %q, which relay %s does not have", c.Name, flagsDoc, n, section, c.Name)
			}
		}
		for _, n := range flagNames(cli.HelpFlag) {
			if !listed[n] {
				t.Errorf("relay %s: %s is missing from its man page %s (OPTIONS)", c.Name, n, page)
			}
		}
	}
	for cmd := range rows {
		if c := app.Command(cmd); c == nil || c.Hidden {
			t.Errorf("%s has a section \"## `relay %s`\" with flags, but relay has no command %s", flagsDoc, cmd, cmd)
		}
	}

	listed := manOptions(pages["relay.1"])
	for _, f := range append(slices.Clone(app.Flags), cli.HelpFlag) {
		for _, n := range flagNames(f) {
			if !listed[n] {
				t.Errorf("relay: global flag %s is missing from the man page relay.1 (OPTIONS)", n)
			}
		}
	}
	for _, f := range app.Flags {
		for _, n := range flagNames(f) {
			if !regexp.MustCompile(`(^|[^-\w])` + regexp.QuoteMeta(n) + `\b`).Match(doc) {
				t.Errorf("relay: global flag %s is missing from %s", n, flagsDoc)
			}
		}
	}
	// --help, -h: once, in the introduction.
	intro, _, _ := strings.Cut(string(doc), "\n## ")
	if !strings.Contains(intro, "`--help`") || !strings.Contains(intro, "`-h`") {
		t.Errorf("%s: its introduction no longer says that every command takes `--help`, `-h`, which its tables leave out", flagsDoc)
	}

	for _, p := range manPages(app) {
		if strings.Contains(p.roff, "generate-bash-completion") && p.file != "relay-completion.1" {
			t.Errorf("%s lists cli's --generate-bash-completion", p.file)
		}
	}
}

// flagNames are a flag's names as typed: --listen, -l.
func flagNames(f cli.Flag) []string {
	var out []string
	for _, n := range f.Names() {
		if len(n) == 1 {
			out = append(out, "-"+n)
		} else {
			out = append(out, "--"+n)
		}
	}
	return out
}

// flagsDocRows reads the tables of docs/flags.md: for each section
// "## `relay COMMAND`", the flags that the first column of its table
// names (`--listen ADDR`, `-l`).
func flagsDocRows(doc string) map[string]map[string]bool {
	heading := regexp.MustCompile("^## `relay ([a-z][a-z-]*)`")
	code := regexp.MustCompile("`(-[^`]*)`")
	rows := map[string]map[string]bool{}
	cmd := ""
	sc := bufio.NewScanner(strings.NewReader(doc))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			cmd = ""
			if m := heading.FindStringSubmatch(line); m != nil {
				cmd = m[1]
			}
			continue
		}
		if cmd == "" || !strings.HasPrefix(line, "|") {
			continue
		}
		cells := strings.Split(line, "|")
		if len(cells) < 3 {
			continue
		}
		for _, m := range code.FindAllStringSubmatch(cells[1], -1) {
			if rows[cmd] == nil {
				rows[cmd] = map[string]bool{}
			}
			rows[cmd][strings.Fields(m[1])[0]] = true
		}
	}
	return rows
}

// manOptions are the flags that the OPTIONS section of a page lists:
// the flags in the tags of its .TP entries.
func manOptions(roff string) map[string]bool {
	out := map[string]bool{}
	lines := strings.Split(roff, "\n")
	in := false
	for i, l := range lines {
		if strings.HasPrefix(l, ".SH ") {
			in = l == ".SH OPTIONS"
		}
		if !in || l != ".TP" || i+1 == len(lines) {
			continue
		}
		for _, w := range strings.Fields(roffPlain(lines[i+1])) {
			if w = strings.TrimSuffix(w, ","); strings.HasPrefix(w, "-") {
				out[w] = true
			}
		}
	}
	return out
}

// roffPlain undoes the escapes manpage.go writes, for the tests to read.
func roffPlain(s string) string {
	return strings.NewReplacer(`\-`, "-", `\fB`, "", `\fI`, "", `\fR`, "", `\fP`, "", `\&`, "", `\e`, `\`).Replace(s)
}

// relay __man writes relay.1 and a page per visible command, none for
// the hidden ones; each renders with man and groff without a warning,
// and lexgrog (whatis) reads its NAME.
func TestManPagesRenderCleanly(t *testing.T) {
	app := newApp(io.Discard, boot{})
	dir := t.TempDir()
	if err := writeManPages(app, dir); err != nil {
		t.Fatal(err)
	}
	want := []string{"relay.1"}
	for _, c := range []string{"run", "restart", "rollback", "upgrade", "status", "stop", "version", "completion"} {
		want = append(want, "relay-"+c+".1")
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		got = append(got, e.Name())
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("relay __man wrote %q, want %q", got, want)
	}

	for _, tool := range []string{"man", "groff"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed (Debian's man-db and groff-base; .ci/run installs them): the pages are not rendered", tool)
		}
	}
	for _, name := range got {
		path := filepath.Join(dir, name)
		for _, args := range [][]string{
			{"man", "--warnings", "-l", path},
			{"groff", "-ww", "-man", "-z", path},
		} {
			cmd := exec.Command(args[0], args[1:]...)
			cmd.Env = append(os.Environ(), "MANWIDTH=80", "MANPAGER=cat", "PAGER=cat", "LC_ALL=C.UTF-8")
			var stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = io.Discard, &stderr
			if err := cmd.Run(); err != nil || stderr.Len() > 0 {
				t.Errorf("%s: %v: %s", strings.Join(args, " "), err, stderr.String())
			}
		}
		if _, err := exec.LookPath("lexgrog"); err == nil {
			out, err := exec.Command("lexgrog", path).CombinedOutput()
			base := strings.TrimSuffix(name, ".1")
			if err != nil || !strings.Contains(string(out), `"`+base+" - ") {
				t.Errorf("lexgrog %s: %v: %s; want its NAME read as %q", name, err, out, base+" - ...")
			}
		}
	}
}
