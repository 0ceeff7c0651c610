package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/relaysh/relay/control"
)

func stopCommand() *cli.Command {
	return &cli.Command{
		Name:      "stop",
		Usage:     "stop a running relay gracefully and wait until it has exited",
		UsageText: "relay stop [--name NAME]",
		Description: "The same as SIGTERM to relay: every generation gets its stop signal, and SIGKILL after\n" +
			"--stop-timeout. Returns once relay has exited. Exit status 4 when relay cannot be reached.",
		Flags:        clientFlags(),
		Action:       stopAction,
		OnUsageError: onUsageError,
	}
}

func stopAction(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	path, err := controlPath(c)
	if err != nil {
		return err
	}
	// relay keeps the connection open until it exits: the end of the
	// stream is the answer.
	err = call(path, control.Request{Op: control.OpStop}, func(r control.Response) error {
		if r.Type == control.TypeStopping {
			fmt.Fprintf(c.App.Writer, "stopping relay (pid %d)\n", r.Pid)
		}
		return nil
	})
	if err != nil {
		return err
	}
	fmt.Fprintln(c.App.Writer, "relay stopped")
	return nil
}
