package main

import (
	"fmt"
	"io"
	"path/filepath"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/relaysh/relay/control"
)

const upgradeDescription = `Replaces the relay named --name with the relay binary at PATH, in place: relay executes
the new binary (execve), which keeps relay's pid, its children, their sockets and their
connections, and takes over relay's state. The server sees nothing: no restart, no signal,
no new socket. By default PATH is the file relay was started from, where a package upgrade
puts the new binary; SIGUSR2 to relay does the same.

Before it executes anything, relay asks the new binary which state versions it can take,
and whether it takes relay's command line, and refuses one that cannot. relay upgrades only
when no restart, stop or replacement is under way; otherwise it answers busy, and nothing
changes: try again a moment later. Old generations finishing their requests cross too,
with the time left before their SIGKILL. A new relay that cannot take the state returns to
the one it replaced, which serves on. See docs/upgrade.md.

Exit status:
   0  the new relay serves
   3  the upgrade was refused (busy, not a relay, a state version or a command line it
      cannot take) or the new relay could not take over and the old one serves again
   4  relay cannot be reached (not running, wrong --name/--control) or refused this user
   1  any other error

Examples:
   relay upgrade --name api
   relay upgrade --name api /usr/local/bin/relay-1.4.0
   systemctl kill --kill-whom=main -s USR2 relay.service   # the same, through systemd`

func upgradeCommand() *cli.Command {
	return &cli.Command{
		Name:         "upgrade",
		Usage:        "replace a running relay's own binary in place, its server untouched",
		UsageText:    "relay upgrade [--name NAME] [PATH]",
		Description:  upgradeDescription,
		Flags:        clientFlags(),
		Action:       upgradeAction,
		OnUsageError: onUsageError,
	}
}

func upgradeAction(c *cli.Context) error {
	if c.NArg() > 1 {
		return usagef("relay upgrade takes at most one PATH, the new relay binary, but got %d: %s; give one, or none for the file relay was started from", c.NArg(), quoteArgs(c.Args().Slice()))
	}
	path, err := controlPath(c)
	if err != nil {
		return err
	}
	bin := c.Args().First()
	if bin != "" {
		// Resolved here, where the caller named it: relay may run
		// elsewhere.
		if bin, err = filepath.Abs(bin); err != nil {
			return fmt.Errorf("resolving %s: %w", c.Args().First(), err)
		}
	}
	out := c.App.Writer
	var last *control.UpgradeEvent
	err = call(path, control.Request{Op: control.OpUpgrade, Path: bin}, func(r control.Response) error {
		if r.Type == control.TypeUpgrade && r.Upgrade != nil {
			printUpgrade(out, r.Upgrade)
			last = r.Upgrade
		}
		return nil
	})
	if err != nil {
		return err
	}
	switch {
	case last == nil:
		return fmt.Errorf("relay closed the connection before the upgrade finished")
	case last.Phase == control.UpgradeDone:
		return nil
	case last.Phase == control.UpgradeRefused || last.Phase == control.UpgradeReturned:
		return rolledBackError{msg: "upgrade " + last.Phase + ": " + last.Reason}
	}
	return fmt.Errorf("relay closed the connection after %q, before the upgrade finished", last.Phase)
}

func printUpgrade(w io.Writer, ev *control.UpgradeEvent) {
	switch ev.Phase {
	case control.UpgradeChecked:
		fmt.Fprintf(w, "%s takes this relay's state (%s, now %s)\n", ev.Path, ev.To, ev.From)
	case control.UpgradeHandingOver:
		fmt.Fprintf(w, "handing over to %s\n", ev.Path)
	case control.UpgradeDone:
		fmt.Fprintf(w, "upgrade done: %s serves (was %s); relay answered nothing for %s\n", ev.To, ev.From, msDuration(ev.GapMs).Round(100*time.Microsecond))
	case control.UpgradeReturned:
		fmt.Fprintf(w, "upgrade failed: the new relay could not take over (%s); %s serves again\n", ev.Reason, ev.From)
	case control.UpgradeRefused:
		fmt.Fprintf(w, "upgrade refused: %s\n", ev.Reason)
	default:
		fmt.Fprintln(w, ev.Phase)
	}
}
