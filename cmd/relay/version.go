package main

import (
	"fmt"
	"runtime/debug"

	"github.com/urfave/cli/v2"
)

const versionDescription = `Prints relay's version and the commit it was built from, as the Go toolchain recorded them
in the binary, in one line: the main module's version ("(devel)" for a build from a
checkout), the VCS revision, and "(modified)" if the checkout had uncommitted changes.
The same line as relay --version.

Examples:
   relay version
   relay --version`

func versionCommand() *cli.Command {
	return &cli.Command{
		Name:         "version",
		Usage:        "print relay's version and commit",
		UsageText:    "relay version",
		Description:  versionDescription,
		Action:       printVersion,
		OnUsageError: onUsageError,
	}
}

// printVersion is relay version and relay --version.
func printVersion(c *cli.Context) error {
	if c.Args().Present() {
		return usagef("relay version takes no arguments")
	}
	bi, ok := debug.ReadBuildInfo()
	fmt.Fprintln(c.App.Writer, versionLine(bi, ok))
	return nil
}

// versionLine says which relay this is, from its build info:
// "relay v1.2.0 commit 4f1c… (modified)", "relay (devel) commit unknown".
func versionLine(bi *debug.BuildInfo, ok bool) string {
	version, revision, modified := "(devel)", "unknown", false
	if ok && bi != nil {
		if bi.Main.Version != "" {
			version = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				revision = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
	}
	line := "relay " + version + " commit " + revision
	if modified {
		line += " (modified)"
	}
	return line
}
