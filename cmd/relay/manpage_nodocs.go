//go:build urfave_cli_no_docs

package main

import (
	"errors"

	"github.com/urfave/cli/v2"
)

// The lean build (-tags urfave_cli_no_docs, as make relay builds) has no
// man page writer; a plain build has (manpage.go).

func manCommand() *cli.Command {
	return &cli.Command{
		Name:      "__man",
		Hidden:    true,
		Usage:     "write relay's man pages into DIR (not in this build)",
		UsageText: "relay __man DIR",
		Action: func(*cli.Context) error {
			return errors.New("man pages are not in this build of relay (built with -tags urfave_cli_no_docs); " +
				"write them with a plain build: go run ./cmd/relay __man DIR")
		},
		OnUsageError: onUsageError,
	}
}
