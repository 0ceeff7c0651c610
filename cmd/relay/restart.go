package main

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/relaysh/relay/control"
)

const restartDescription = `Asks the relay named --name for a restart and follows it: the new generation starts,
becomes ready, the old one drains and is told to stop, and the old one exits. Each phase is
printed as it happens. Concurrent requests are serialized and coalesced: every caller gets
the outcome of a restart that began after it asked.

With relay run --confirm, the old generation stays warm for that window after the switch, and
relay restart waits through it: it exits 0 once the new generation is confirmed, and 3 if it
failed in the window (exited, failed --liveness, sent STOPPING=1 or ERRNO=, or relay rollback
was run) and new connections went back to the old one. --at-switch returns at the switch
instead, exit 0, before the window or the drain.

With -- COMMAND [ARG...], the new generation runs that command instead (a new binary, new
flags). It becomes the command for later restarts and crash replacements only once that
generation is ready; if it fails, the old command stays.

Exit status:
   0  the new generation serves and the old one has been told to stop (and is gone:
      its main process and every other process of it have exited, unless --no-wait)
   3  the restart was rolled back or refused (pre-flight check failed, command not found,
      or with --confirm a failure in the window); the old generation serves
   4  relay cannot be reached (not running, wrong --name/--control) or refused this user
   1  any other error

Examples:
   relay restart --name api
   relay restart --name api -- ./api-v2 --flag
   relay restart --name web --check "nginx -t"
   relay restart --name api --no-wait
   relay restart --name api --at-switch   # with --confirm: do not wait for the window`

func restartCommand() *cli.Command {
	return &cli.Command{
		Name:        "restart",
		Usage:       "restart a running relay's server and wait for the outcome",
		UsageText:   "relay restart [--name NAME] [--no-wait | --at-switch] [--check CMD] [-- COMMAND [ARG...]]",
		Description: restartDescription,
		Flags: append(clientFlags(),
			&cli.BoolFlag{Name: "no-wait", Usage: "return once relay has accepted the restart"},
			&cli.BoolFlag{Name: "at-switch", Usage: "return once the new generation is ready and gets the new connections, without waiting for the confirmation window (relay run --confirm) or the drain"},
			&cli.StringFlag{Name: "check", Usage: "pre-flight `CMD` for this restart, instead of relay run's --check (split on spaces, no shell)"},
		),
		Action:       restartAction,
		OnUsageError: onUsageError,
	}
}

func restartAction(c *cli.Context) error {
	path, err := controlPath(c)
	if err != nil {
		return err
	}
	check, err := checkFlag(c)
	if err != nil {
		return err
	}
	if c.Args().Present() && !afterDashes(c) {
		// "relay restart web" most likely names a relay: taken as a
		// command it would replace the default relay's server.
		args := c.Args().Slice()
		if len(args) == 1 && control.ValidateName(args[0]) == nil {
			return usagef("relay restart takes a new command only after \"--\", but got %q; to restart the relay named %s, use relay restart --name %s; to run %s instead, relay restart -- %s",
				args[0], args[0], args[0], args[0], args[0])
		}
		return usagef("relay restart takes a new command only after \"--\", but got %s; put it after \"--\": relay restart -- %s", quoteArgs(args), strings.Join(args, " "))
	}
	cmd, err := absCommand(c.Args().Slice())
	if err != nil {
		return err
	}
	if c.Bool("no-wait") && c.Bool("at-switch") {
		return usagef("--no-wait and --at-switch: give one; --no-wait returns before the new generation starts, --at-switch once it serves")
	}
	req := control.Request{Op: control.OpRestart, Command: cmd, Check: check, NoWait: c.Bool("no-wait")}
	out := c.App.Writer
	var result *control.Result
	switched := false
	err = call(path, req, func(r control.Response) error {
		switch r.Type {
		case control.TypeAccepted:
			fmt.Fprintln(out, "restart accepted")
		case control.TypeEvent:
			printEvent(out, r.Event)
			if r.Event.Result != nil {
				result = r.Event.Result
			}
			// The switch: the new generation serves; the stream ends.
			if r.Event.Phase == control.PhaseReady && c.Bool("at-switch") {
				switched = true
				return errSwitched
			}
		}
		return nil
	})
	if switched && result != nil && !result.OK {
		return rolledBackError{msg: "restart " + outcomeWord(result) + ": " + result.Reason}
	}
	if switched && errors.Is(err, errSwitched) {
		fmt.Fprintln(out, "the new generation serves; not waiting for the rest (--at-switch)")
		return nil
	}
	if err != nil {
		return err
	}
	switch {
	case result != nil && !result.OK:
		return rolledBackError{msg: "restart " + outcomeWord(result) + ": " + result.Reason}
	case c.Bool("no-wait"):
		return nil
	case result == nil:
		return fmt.Errorf("relay closed the connection before the restart finished (is it stopping?)")
	}
	return nil
}

// errSwitched ends the stream of a restart at its switch (--at-switch).
var errSwitched = errors.New("switched")

func outcomeWord(r *control.Result) string {
	if r.Refused {
		return "refused"
	}
	return "rolled back"
}

func printEvent(w io.Writer, ev *control.Event) {
	g := fmt.Sprintf("generation %d (pid %d)", ev.Generation, ev.Pid)
	switch ev.Phase {
	case control.PhaseQueued:
		fmt.Fprintln(w, "queued behind the restart under way")
	case control.PhaseChecking:
		fmt.Fprintf(w, "running pre-flight check: %s\n", ev.Check)
	case control.PhaseChecked:
		fmt.Fprintln(w, "pre-flight check passed")
	case control.PhaseWaitOld:
		fmt.Fprintf(w, "waiting for old %s to be gone (--max-draining)\n", g)
	case control.PhaseStarting:
		fmt.Fprintf(w, "%s starting\n", g)
	case control.PhaseWaiting:
		fmt.Fprintf(w, "waiting for readiness (%s)\n", ev.Check)
	case control.PhaseReady:
		fmt.Fprintf(w, "ready after %s\n", msDuration(ev.DurationMs))
	case control.PhaseConfirming:
		fmt.Fprintf(w, "old %s kept warm for %s (--confirm): no new connections, no stop signal; relay rollback or a failure of the new one sends traffic back to it\n", g, msDuration(ev.DurationMs))
	case control.PhaseConfirmed:
		switch ev.Cause {
		case "restart":
			fmt.Fprintf(w, "new %s confirmed after %s: another restart was asked for\n", g, msDuration(ev.DurationMs))
		case "warm_exited":
			fmt.Fprintf(w, "new %s confirmed after %s: the warm generation exited, nothing is left to go back to\n", g, msDuration(ev.DurationMs))
		case "no_way_back":
			fmt.Fprintf(w, "new %s kept after %s: it failed, but new connections could not go back to the warm generation (see relay's log)\n", g, msDuration(ev.DurationMs))
		default:
			fmt.Fprintf(w, "new %s confirmed: nothing failed in %s\n", g, msDuration(ev.DurationMs))
		}
	case control.PhaseRollingBack:
		fmt.Fprintf(w, "ROLLING BACK after %s (%s: %s): %s serves again\n", msDuration(ev.DurationMs), ev.Cause, ev.Reason, g)
	case control.PhaseDraining:
		if ev.Drain == control.DrainAdaptive {
			fmt.Fprintf(w, "old %s draining until nothing more can reach it, at most %s\n", g, msDuration(ev.DurationMs))
			return
		}
		fmt.Fprintf(w, "old %s draining for %s\n", g, msDuration(ev.DurationMs))
	case control.PhaseStopping:
		switch ev.Drain {
		case control.DrainEmpty:
			fmt.Fprintf(w, "old %s drained in %s; sent %s\n", g, msDuration(ev.DurationMs), ev.Signal)
		case control.DrainMax:
			fmt.Fprintf(w, "old %s still had connections on their way to it after %s (--drain); sent %s\n", g, msDuration(ev.DurationMs), ev.Signal)
		case control.DrainHandover:
			fmt.Fprintf(w, "old %s accepted nothing: its queued connections moved to the new generation %s after the switch; sent %s\n", g, msDuration(ev.DurationMs), ev.Signal)
		default:
			fmt.Fprintf(w, "old %s sent %s\n", g, ev.Signal)
		}
	case control.PhaseOldExit:
		fmt.Fprintf(w, "old %s exited (%s); nothing of it is left\n", g, ev.Status)
	case control.PhaseDone:
		r := ev.Result
		if r.OK {
			fmt.Fprintf(w, "restart done: generation %d (pid %d) serving, took %s\n", r.Generation, r.Pid, r.Duration.Round(time.Microsecond*100))
			return
		}
		fmt.Fprintf(w, "restart %s: %s\n", outcomeWord(r), r.Reason)
		if r.StderrTail != "" {
			fmt.Fprintf(w, "stderr of generation %d (pid %d), last lines:\n", r.Generation, r.Pid)
			for _, line := range strings.Split(r.StderrTail, "\n") {
				fmt.Fprintf(w, "  | %s\n", line)
			}
		}
	default:
		fmt.Fprintf(w, "%s\n", ev.Phase)
	}
}

func msDuration(ms float64) time.Duration {
	return time.Duration(ms * float64(time.Millisecond)).Round(10 * time.Microsecond)
}

// afterDashes reports whether relay's command line has a "--" after the
// subcommand's name: the arguments are a command given as relay restart's
// help says. Without the command line in the app's Metadata (a test that
// builds its own app), it reports true.
func afterDashes(c *cli.Context) bool {
	argv, ok := c.App.Metadata[argvKey].([]string)
	if !ok {
		return true
	}
	i := slices.Index(argv, c.Command.Name)
	return i >= 0 && slices.Contains(argv[i+1:], "--")
}
