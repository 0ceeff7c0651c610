package main

import (
	"errors"
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/relaysh/relay/control"
)

const rollbackDescription = `Sends new connections back to the generation relay keeps warm in the confirmation window
(relay run --confirm): the one the last restart replaced, never told to stop. It serves again at
once; the new generation drains and stops as an old one does after any restart. The restart
being confirmed ends rolled back, and relay restart, if it follows it, exits 3.

Outside a window (relay runs without --confirm, or the window ended and the old generation was
stopped) there is nothing warm to go back to: relay rollback says so and changes nothing. Then
run relay restart with the previous command instead.

Exit status:
   0  the warm generation serves again
   3  nothing warm to go back to; nothing changed
   4  relay cannot be reached (not running, wrong --name/--control) or refused this user
   1  any other error

Examples:
   relay rollback --name api
   relay status --name api      # the window, its end, and the warm generation`

func rollbackCommand() *cli.Command {
	return &cli.Command{
		Name:         "rollback",
		Usage:        "send traffic back to the generation kept warm by relay run --confirm",
		UsageText:    "relay rollback [--name NAME]",
		Description:  rollbackDescription,
		Flags:        clientFlags(),
		Action:       rollbackAction,
		OnUsageError: onUsageError,
	}
}

func rollbackAction(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	path, err := controlPath(c)
	if err != nil {
		return err
	}
	var doc *control.RollbackDoc
	err = call(path, control.Request{Op: control.OpRollback}, func(r control.Response) error {
		doc = r.Rollback
		return nil
	})
	var se *control.ServerError
	if errors.As(err, &se) && se.Code == control.CodeNothingWarm {
		return rolledBackError{msg: "rollback: " + se.Msg}
	}
	if err != nil {
		return err
	}
	if doc == nil {
		return errors.New("relay sent no answer to the rollback")
	}
	fmt.Fprintf(c.App.Writer, "rolled back: generation %d (pid %d) serves again; generation %d (pid %d) drains and stops\n",
		doc.ServingGeneration, doc.ServingPid, doc.FailedGeneration, doc.FailedPid)
	return nil
}
