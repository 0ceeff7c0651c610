//go:build !urfave_cli_no_docs

package main

// relay __man DIR writes relay's man pages, relay.1 and relay-COMMAND.1,
// from the same definitions --help prints: each command's Usage,
// UsageText, Description and flags (each flag's line is cli's own, the one
// in the command's --help). It is left out of the lean build (-tags
// urfave_cli_no_docs, as make relay builds), where manpage_nodocs.go says
// so; make package runs it from a plain build: go run ./cmd/relay __man DIR.
//
// The roff is written here rather than by cli's ToManWithSection, which
// reads the descriptions as markdown: it refills their indented tables
// and examples (breaking their lines mid-row), heads a command's flags
// "GLOBAL OPTIONS" and prints each as --flag="", and leaves every "-" a
// hyphen, so that an option copied from the page is not the option.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"unicode"

	"github.com/urfave/cli/v2"
)

func manCommand() *cli.Command {
	return &cli.Command{
		Name:      "__man",
		Hidden:    true,
		Usage:     "write relay's man pages into DIR",
		UsageText: "relay __man DIR",
		Action: func(c *cli.Context) error {
			if c.Args().Len() != 1 {
				return usagef("relay __man takes one argument, the directory to write the man pages into")
			}
			return writeManPages(c.App, c.Args().First())
		},
		OnUsageError: onUsageError,
	}
}

// manPage is one man page: its file name and its roff source.
type manPage struct {
	file, roff string
}

// writeManPages writes app's man pages into dir, creating it if missing.
func writeManPages(app *cli.App, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, p := range manPages(app) {
		if err := os.WriteFile(filepath.Join(dir, p.file), []byte(p.roff), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// manPages are relay(1) and a page per visible command, relay-NAME(1).
func manPages(app *cli.App) []manPage {
	cmds := manCommands(app)
	pages := []manPage{{app.Name + ".1", appManPage(app, cmds)}}
	for _, c := range cmds {
		pages = append(pages, manPage{manName(app, c) + ".1", commandManPage(app, c, cmds)})
	}
	return pages
}

// manCommands are the commands that have a page: the visible ones.
func manCommands(app *cli.App) []*cli.Command {
	var cmds []*cli.Command
	for _, c := range app.Commands {
		if !c.Hidden {
			cmds = append(cmds, c)
		}
	}
	return cmds
}

// manName is a command's page name: relay-run.
func manName(app *cli.App, c *cli.Command) string { return app.Name + "-" + c.Name }

// manFlags are the flags a page lists, in the order --help lists them:
// the visible ones, then --help unless hidden. cli adds --help to a
// command's flags only once it runs, so it is added here whether or not
// it already was.
func manFlags(flags []cli.Flag, hideHelp bool) []cli.Flag {
	var out []cli.Flag
	for _, f := range flags {
		if f == cli.HelpFlag {
			continue
		}
		if v, ok := f.(cli.VisibleFlag); ok && !v.IsVisible() {
			continue
		}
		out = append(out, f)
	}
	if !hideHelp && cli.HelpFlag != nil {
		out = append(out, cli.HelpFlag)
	}
	return out
}

func appManPage(app *cli.App, cmds []*cli.Command) string {
	var m roffWriter
	m.header(app.Name, app.Name, app.Usage)
	m.section("SYNOPSIS")
	m.request(".nf")
	for _, c := range cmds {
		for _, line := range strings.Split(strings.TrimSpace(c.UsageText), "\n") {
			m.synopsisLine(line, app.Name+" "+c.Name)
		}
	}
	for _, f := range manFlags(app.Flags, true) {
		m.synopsisLine(app.Name+" --"+f.Names()[0], app.Name)
	}
	m.request(".fi")
	if app.Description != "" {
		m.section("DESCRIPTION")
		m.text(app.Description)
	}
	m.section("COMMANDS")
	for _, c := range cmds {
		m.request(".TP")
		m.line(`\fB` + roffEscape(app.Name+" "+c.Name) + `\fR`)
		m.line(roffEscape(c.Usage) + ": " + manRef(manName(app, c)) + ".")
	}
	m.options(manFlags(app.Flags, app.HideHelp))
	m.section("SEE ALSO")
	var refs []string
	for _, c := range cmds {
		refs = append(refs, manRef(manName(app, c)))
	}
	m.line(strings.Join(refs, ", "))
	return m.String()
}

func commandManPage(app *cli.App, c *cli.Command, cmds []*cli.Command) string {
	var m roffWriter
	name := manName(app, c)
	m.header(name, name, c.Usage)
	m.section("SYNOPSIS")
	m.request(".nf")
	for _, line := range strings.Split(strings.TrimSpace(c.UsageText), "\n") {
		m.synopsisLine(line, app.Name+" "+c.Name)
	}
	m.request(".fi")
	if c.Description != "" {
		m.section("DESCRIPTION")
		m.text(c.Description)
	}
	m.options(manFlags(c.Flags, c.HideHelp || app.HideHelp))
	m.section("SEE ALSO")
	refs := []string{manRef(app.Name)}
	for _, o := range cmds {
		if o != c {
			refs = append(refs, manRef(manName(app, o)))
		}
	}
	m.line(strings.Join(refs, ", "))
	return m.String()
}

// manRef is a reference to a page of section 1: \fBrelay\-run\fR(1).
func manRef(page string) string { return `\fB` + roffEscape(page) + `\fR(1)` }

// roffWriter builds a page of the man macros, one input line at a time.
type roffWriter struct{ strings.Builder }

// header starts the page: the comment that says where it comes from, .TH,
// and NAME in the form whatis and lexgrog(1) read.
func (m *roffWriter) header(page, name, usage string) {
	m.request(`.\" ` + page + ".1: written by relay __man from relay's command definitions (cmd/relay); do not edit.")
	m.request(`.TH "` + roffEscape(strings.ToUpper(page)) + `" "1" "" "relay" "User Commands"`)
	// No hyphenation: options and paths must read as written.
	m.request(".nh")
	m.section("NAME")
	m.line(roffEscape(name) + ` \- ` + roffEscape(usage))
}

func (m *roffWriter) section(title string) { m.request(".SH " + title) }

// request adds a line of roff as it is.
func (m *roffWriter) request(s string) {
	m.WriteString(s)
	m.WriteByte('\n')
}

// line adds a line of text, already escaped: one that would start with a
// control character is protected with \&.
func (m *roffWriter) line(s string) {
	if s == "" {
		return
	}
	if s[0] == '.' || s[0] == '\'' {
		m.WriteString(`\&`)
	}
	m.request(s)
}

// synopsisLine adds a usage line in no-fill mode, with the command itself
// (prefix) in bold.
func (m *roffWriter) synopsisLine(line, prefix string) {
	line = strings.TrimSpace(line)
	if rest, ok := strings.CutPrefix(line, prefix); ok {
		m.line(`\fB` + roffEscape(prefix) + `\fR` + roffEscape(rest))
		return
	}
	m.line(roffEscape(line))
}

// text adds a description as --help prints it: paragraphs (split at blank
// lines) whose lines start at the margin are filled, and runs of indented
// lines (tables of values, examples) are kept line for line.
func (m *roffWriter) text(desc string) {
	var paragraph []string
	flush := func() {
		if len(paragraph) == 0 {
			return
		}
		m.request(".PP")
		indented := false
		for _, l := range paragraph {
			if in := l[0] == ' ' || l[0] == '\t'; in != indented {
				if in {
					m.request(".nf")
				} else {
					m.request(".fi")
				}
				indented = in
			}
			m.line(roffEscape(strings.TrimRightFunc(l, unicode.IsSpace)))
		}
		if indented {
			m.request(".fi")
		}
		paragraph = paragraph[:0]
	}
	for _, l := range strings.Split(strings.Trim(desc, "\n"), "\n") {
		if strings.TrimSpace(l) == "" {
			flush()
			continue
		}
		paragraph = append(paragraph, l)
	}
	flush()
}

// options adds the OPTIONS section: each flag's names and value as --help
// prints them (cli.FlagStringer), in bold and italics, and its usage with
// its default.
func (m *roffWriter) options(flags []cli.Flag) {
	if len(flags) == 0 {
		return
	}
	m.section("OPTIONS")
	for _, f := range flags {
		names, usage, _ := strings.Cut(cli.FlagStringer(f), "\t")
		m.request(".TP")
		m.line(roffFlagNames(names))
		m.line(roffEscape(strings.TrimSpace(usage)))
	}
}

// roffFlagNames sets cli's "--listen ADDR, -l ADDR [ --listen ADDR, -l
// ADDR ]" with the flags in bold and the values in italics.
func roffFlagNames(names string) string {
	var out []string
	for _, tok := range strings.Fields(names) {
		word, comma := strings.CutSuffix(tok, ",")
		switch {
		case word == "[" || word == "]":
			word = roffEscape(word)
		case strings.HasPrefix(word, "-"):
			word = `\fB` + roffEscape(word) + `\fR`
		default:
			word = `\fI` + roffEscape(word) + `\fR`
		}
		if comma {
			word += ","
		}
		out = append(out, word)
	}
	return strings.Join(out, " ")
}

// roffEscape makes text safe in a roff text line: a backslash is \e, a
// hyphen the minus \- (options then copy as typed, and nothing breaks at
// them), and any other character outside ASCII its \[uXXXX] name, which
// groff reads in any input encoding.
func roffEscape(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == '\\':
			b.WriteString(`\e`)
		case r == '-':
			b.WriteString(`\-`)
		case r == '\t':
			b.WriteString("        ")
		case r > unicode.MaxASCII:
			fmt.Fprintf(&b, `\[u%04X]`, r)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}
