// Command debversion prints the Debian version of a relay binary, made
// from the version that the Go toolchain stamped in it (what relay
// version prints), or with -changelog the Debian changelog of its
// package, for make package:
//
//	go run ./packaging/debversion PATH-TO-RELAY
//	go run ./packaging/debversion -changelog MAINTAINER [-version VERSION] PATH-TO-RELAY
//
// A release tag stays as it is, less its v (v1.4.0: 1.4.0), a
// pre-release sorts before its release (v1.4.0-rc.1: 1.4.0~rc.1), and a
// commit after a tag, or with no tag, is its Go pseudo-version with
// "~git" before the commit's time and its 12-hex-digit hash after it
// (v0.0.0-20261205121300-c642ed7abcde: 0.0.0~git20261205121300.c642ed7abcde;
// v1.4.1-0.20261205121300-c642ed7abcde: 1.4.1~git20261205121300.c642ed7abcde,
// before 1.4.1 and after 1.4.0), so that later commits sort later for
// dpkg and apt. A build from a modified checkout ends in +dirty. It reads
// the binary without running it, so GOARCH may be another machine's.
package main

import (
	"debug/buildinfo"
	"flag"
	"fmt"
	"os"
	"regexp"
	"runtime/debug"
	"strings"
	"time"
)

func main() {
	changelog := flag.String("changelog", "", "print the package's Debian changelog, signed by `MAINTAINER`, instead of the version")
	version := flag.String("version", "", "the package's `VERSION`, instead of the one made from the binary's")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: debversion [-changelog MAINTAINER [-version VERSION]] PATH-TO-RELAY")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	bin := flag.Arg(0)
	bi, err := buildinfo.ReadFile(bin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "debversion: %v\n", err)
		os.Exit(1)
	}
	v := *version
	if v == "" {
		if v, err = debianVersion(bi.Main.Version); err != nil {
			fmt.Fprintf(os.Stderr, "debversion: %s: %v\n", bin, err)
			os.Exit(1)
		}
	}
	if *changelog != "" {
		fmt.Print(debianChangelog(v, *changelog, bi, time.Now()))
		return
	}
	fmt.Println(v)
}

var (
	// vX.Y.Z-yyyymmddhhmmss-hash (no tag before), vX.Y.Z-0.yyyymmddhhmmss-hash
	// (after the release vX.Y.(Z-1)), vX.Y.Z-pre.0.yyyymmddhhmmss-hash (after
	// the pre-release vX.Y.Z-pre).
	pseudo  = regexp.MustCompile(`^(\d+\.\d+\.\d+)(?:-(?:(.+)\.)?0\.|-)(\d{14})-([0-9a-f]{12})$`)
	release = regexp.MustCompile(`^(\d+\.\d+\.\d+)(?:-([0-9A-Za-z.-]+))?$`)
)

// debianVersion turns the main module's version as the Go toolchain
// stamps it into a Debian version.
func debianVersion(goVersion string) (string, error) {
	v, dirty := strings.CutSuffix(goVersion, "+dirty")
	v, ok := strings.CutPrefix(v, "v")
	if !ok {
		return "", fmt.Errorf("no version stamped in the binary (%q): build it from a git checkout with -buildvcs=auto, or give make package DEB_VERSION=", goVersion)
	}
	var out string
	if m := pseudo.FindStringSubmatch(v); m != nil {
		out = m[1] + "~"
		if m[2] != "" {
			out += m[2] + "."
		}
		out += "git" + m[3] + "." + m[4]
	} else if m := release.FindStringSubmatch(v); m != nil {
		out = m[1]
		if m[2] != "" {
			out += "~" + m[2]
		}
	} else {
		return "", fmt.Errorf("version %q is not a Go module version", goVersion)
	}
	// Without a Debian revision, an upstream version has no hyphen.
	out = strings.ReplaceAll(out, "-", "~")
	if dirty {
		out += "+dirty"
	}
	return out, nil
}

// debianChangelog is the changelog of the package (Debian policy 4.4,
// and 12.7 for its place), one entry: the commit it was built from, dated
// by that commit's time for a package built twice to be the same; now
// for a binary without one.
func debianChangelog(version, maintainer string, bi *debug.BuildInfo, now time.Time) string {
	revision, modified, when := "", false, now
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			revision = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		case "vcs.time":
			if t, err := time.Parse(time.RFC3339, s.Value); err == nil {
				when = t
			}
		}
	}
	change := "Built by make package from a tree without version control information."
	if revision != "" {
		change = "Built by make package from commit " + revision
		if modified {
			change += ",\n    with uncommitted changes"
		}
		change += "."
	}
	return fmt.Sprintf("relay (%s) unstable; urgency=medium\n\n  * %s\n\n -- %s  %s\n",
		version, change, maintainer, when.UTC().Format("Mon, 02 Jan 2006 15:04:05 -0700"))
}
