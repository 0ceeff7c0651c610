package main

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/relaysh/relay/control"
)

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:      "status",
		Usage:     "show a running relay's generations, listeners and restarts",
		UsageText: "relay status [--name NAME] [--json]",
		Description: "Prints each live generation (number, pid, state, age, how it took each listener's\n" +
			"socket: fd for an inherited fd, bind for its own bind taken over by relay, command), the listeners, the\n" +
			"restart counters and the last restart's outcome. --json prints the same as one JSON\n" +
			"document, described in docs/control.md. Exit status 4 when relay cannot be reached.",
		Flags:        append(clientFlags(), &cli.BoolFlag{Name: "json", Usage: "print the status as JSON"}),
		Action:       statusAction,
		OnUsageError: onUsageError,
	}
}

func statusAction(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	path, err := controlPath(c)
	if err != nil {
		return err
	}
	var doc *control.StatusDoc
	err = call(path, control.Request{Op: control.OpStatus}, func(r control.Response) error {
		doc = r.Status
		return nil
	})
	if err != nil {
		return err
	}
	if doc == nil {
		return fmt.Errorf("relay sent no status")
	}
	if c.Bool("json") {
		enc := json.NewEncoder(c.App.Writer)
		enc.SetIndent("", "  ")
		return enc.Encode(doc)
	}
	printStatus(c.App.Writer, doc)
	return nil
}

// socketsTaken says how a generation took each listener, in fd order:
// "tcp-8080=bind udp-53=fd".
func socketsTaken(ls []control.ListenerInfo, took map[string]string) string {
	if len(took) == 0 {
		return "-"
	}
	parts := make([]string, 0, len(ls))
	for _, l := range ls {
		if how, ok := took[l.Name]; ok {
			parts = append(parts, l.Name+"="+how)
		}
	}
	return strings.Join(parts, " ")
}

func printStatus(w io.Writer, d *control.StatusDoc) {
	up := time.Since(d.Started).Round(time.Second)
	fmt.Fprintf(w, "relay %q (pid %d), up %s, control %s\n", d.Name, d.Pid, up, d.Control)
	if d.RelayVersion != "" {
		line := d.RelayVersion
		if d.Upgrades > 0 {
			line += fmt.Sprintf(", upgraded in place %d time(s), last %s ago", d.Upgrades, time.Since(d.LastUpgrade).Round(time.Second))
		}
		fmt.Fprintln(w, line)
	}
	switch {
	case !d.ShutdownAt.IsZero():
		fmt.Fprintln(w, shutdownLine(time.Until(d.ShutdownAt)))
	case d.Stopping:
		fmt.Fprintln(w, "STOPPING")
	}
	if cf := d.Confirm; cf != nil {
		fmt.Fprintf(w, "CONFIRMING generation %d (pid %d) until %s (%s left); generation %d (pid %d) kept warm: relay rollback sends traffic back to it\n",
			cf.Generation, cf.Pid, cf.Until.Local().Format(time.TimeOnly), time.Duration(cf.LeftSeconds*float64(time.Second)).Round(100*time.Millisecond),
			cf.Warm, cf.WarmPid)
	}
	fmt.Fprintf(w, "command: %s\n\n", strings.Join(d.Command, " "))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LISTENER\tFD\tNETWORK\tADDRESS\tORIGIN\tDRAIN")
	for _, l := range d.Listeners {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\n", l.Name, l.FD, l.Network, l.Address, l.Origin, l.Drain)
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	udp := len(d.Generations) > 0 && d.Generations[0].UDPFlows != nil
	if udp {
		fmt.Fprintln(tw, "GEN\tPID\tPROCS\tSTATE\tAGE\tREADY AFTER\tSOCKETS\tUDP FLOWS\tCOMMAND")
	} else {
		fmt.Fprintln(tw, "GEN\tPID\tPROCS\tSTATE\tAGE\tREADY AFTER\tSOCKETS\tCOMMAND")
	}
	for _, g := range d.Generations {
		ready := "-"
		if g.ReadyAfterMs > 0 {
			ready = msDuration(g.ReadyAfterMs).String()
		}
		age := time.Duration(g.AgeSeconds * float64(time.Second)).Round(time.Second)
		flows := ""
		if udp && g.UDPFlows != nil {
			flows = fmt.Sprintf("%d\t", *g.UDPFlows)
		}
		fmt.Fprintf(tw, "%d\t%d\t%d\t%s\t%s\t%s\t%s\t%s%s\n", g.Generation, g.Pid, g.Processes, g.State, age, ready, socketsTaken(d.Listeners, g.Sockets), flows, strings.Join(g.Command, " "))
	}
	tw.Flush()
	writeCopies(w, d.Generations)
	r := d.Restarts
	fmt.Fprintf(w, "\nrestarts: %d ok, %d rolled back, %d refused, %d crash replacements", r.OK, r.RolledBack, r.Refused, r.Replacements)
	if r.CopyReplacements > 0 {
		fmt.Fprintf(w, ", %d copy replacements", r.CopyReplacements)
	}
	if r.LivenessReplacements > 0 {
		fmt.Fprintf(w, ", %d liveness replacements", r.LivenessReplacements)
	}
	if after := afterSwitch(r.AfterSwitch); after != "" {
		fmt.Fprintf(w, " (rolled back after the switch: %s)", after)
	}
	if r.InProgress {
		fmt.Fprint(w, "; one in progress")
	}
	if r.Queued {
		fmt.Fprint(w, "; one queued")
	}
	fmt.Fprintln(w)
	if l := d.LastRestart; l != nil {
		ago := time.Since(l.Finished).Round(time.Second)
		if l.OK {
			fmt.Fprintf(w, "last restart: ok, generation %d (pid %d), took %s, %s ago\n", l.Generation, l.Pid, msDuration(l.DurationMs), ago)
		} else {
			fmt.Fprintf(w, "last restart: %s after %s, %s ago: %s\n", outcomeWord(&l.Result), msDuration(l.DurationMs), ago, l.Reason)
		}
	}
}

// afterSwitch says what rolled restarts back in their confirmation window:
// "1 exited, 2 manual"; "" for none.
func afterSwitch(counts map[string]int) string {
	var parts []string
	for _, cause := range []string{"exited", "liveness", "notify", "manual"} {
		if n := counts[cause]; n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, cause))
		}
	}
	return strings.Join(parts, ", ")
}

// shutdownLine says when a shutdown delay that ends in left ends:
// "STOPPING in 1.5s (--shutdown-delay; serving until then)".
func shutdownLine(left time.Duration) string {
	if left <= 0 {
		return "STOPPING now (--shutdown-delay over)"
	}
	return fmt.Sprintf("STOPPING in %s (--shutdown-delay; serving until then)", left.Round(100*time.Millisecond))
}

// writeCopies lists the copies of the generations that have several
// (relay run --workers); nothing where none has.
func writeCopies(w io.Writer, gens []control.GenerationStatus) {
	if !slices.ContainsFunc(gens, func(g control.GenerationStatus) bool { return len(g.Copies) > 1 }) {
		return
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GEN\tWORKER\tPID\tSTATE\tAGE\tREPLACED")
	for _, g := range gens {
		for _, c := range g.Copies {
			age := time.Duration(c.AgeSeconds * float64(time.Second)).Round(time.Second)
			fmt.Fprintf(tw, "%d\t%d\t%d\t%s\t%s\t%d\n", g.Generation, c.Worker, c.Pid, c.State, age, c.Replaced)
		}
	}
	tw.Flush()
}
