package report

import (
	"fmt"
	"io"
	"slices"
	"strings"
)

// Idle is a supervisor's usage over an idle period, with one child serving
// and no load.
type Idle struct {
	Name       string  `json:"name"`
	Seconds    float64 `json:"seconds"`
	CPUSeconds float64 `json:"cpu_seconds"`
	RSSKB      int64   `json:"rss_kb"`
	// RSSAnonKB and RSSFileKB split RSSKB (RssAnon, RssFile).
	RSSAnonKB int64 `json:"rss_anon_kb"`
	RSSFileKB int64 `json:"rss_file_kb"`
	FDs       int   `json:"fds"`
}

// Report is a whole benchmark: its settings, the runs and the idle figures.
type Report struct {
	Settings map[string]string `json:"settings"`
	Machine  string            `json:"machine"`
	Results  []Result          `json:"results"`
	Idle     []Idle            `json:"idle"`
	Skipped  []string          `json:"skipped,omitempty"`
	// Notes are caveats about this run's figures.
	Notes []string `json:"notes,omitempty"`
	// Cost is the takeover cost comparison, nil when it was not run.
	Cost *Cost `json:"takeover_cost,omitempty"`
	// Tight is the tight-restarts run, nil when it was not run.
	Tight *Tight `json:"tight_restarts,omitempty"`
	// Memory is relay's memory over many restarts, nil when not run.
	Memory *Memory `json:"memory,omitempty"`
	// Pool is the worker-pool run, nil when not run.
	Pool *Pool `json:"pool,omitempty"`
}

// SetRatios fills VsDirect from the direct run of the same mode.
func (rep *Report) SetRatios() {
	for i := range rep.Results {
		r := &rep.Results[i]
		for _, d := range rep.Results {
			if d.Scenario == "direct" && d.Mode == r.Mode && d.ReqPerSec > 0 {
				r.VsDirect = r.ReqPerSec / d.ReqPerSec
			}
		}
	}
}

// WriteMarkdown writes the report's tables.
func (rep *Report) WriteMarkdown(w io.Writer) error {
	var b strings.Builder
	keys := make([]string, 0, len(rep.Settings))
	for k := range rep.Settings {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var set []string
	for _, k := range keys {
		set = append(set, k+"="+rep.Settings[k])
	}
	fmt.Fprintf(&b, "Settings: %s  \nMachine: %s\n\n", strings.Join(set, ", "), rep.Machine)

	if len(rep.Results) > 0 {
		rep.writeMatrix(&b)
	}
	if rep.Cost != nil && len(rep.Cost.Runs) > 0 {
		rep.Cost.writeMarkdown(&b)
	}
	if rep.Tight != nil && len(rep.Tight.Runs) > 0 {
		rep.Tight.writeMarkdown(&b)
	}
	if rep.Memory != nil && len(rep.Memory.Points) > 0 {
		rep.Memory.writeMarkdown(&b)
	}
	if rep.Pool != nil && len(rep.Pool.Runs) > 0 {
		rep.Pool.writeMarkdown(&b)
	}
	if len(rep.Idle) > 0 {
		b.WriteString("\n**Idle.** One child serving, no load.\n\n")
		b.WriteString("| supervisor | idle s | CPU s | RSS MiB | anon / file MiB | fds |\n|---|--:|--:|--:|--:|--:|\n")
		for _, i := range rep.Idle {
			fmt.Fprintf(&b, "| %s | %.0f | %.2f | %.1f | %s | %d |\n", i.Name, i.Seconds, i.CPUSeconds, mib(i.RSSKB), rssSplit(i.RSSAnonKB, i.RSSFileKB), i.FDs)
		}
	}
	for _, s := range rep.Skipped {
		fmt.Fprintf(&b, "\nSkipped: %s\n", s)
	}
	for _, s := range rep.Notes {
		fmt.Fprintf(&b, "\nNote: %s\n", s)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// writeMatrix writes the tables of the scenario runs.
func (rep *Report) writeMatrix(b *strings.Builder) {
	b.WriteString("**Requests.** Failed requests by class; \"reused\" counts the failures on keep-alive connections that had already carried a response.\n\n")
	b.WriteString("| scenario | mode | ok | ok/s | vs direct | failed | refused | reset | EOF | timeout | non-2xx | other | on reused conns |\n")
	b.WriteString("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, r := range rep.Results {
		vs := "—"
		if r.VsDirect > 0 {
			vs = fmt.Sprintf("%.3f", r.VsDirect)
		}
		fmt.Fprintf(b, "| %s | %s | %d | %.0f | %s | **%d** | %d | %d | %d | %d | %d | %d | %d |\n",
			r.Scenario, r.Mode, r.OK, r.ReqPerSec, vs, r.TotalFailed(),
			r.Failed["refused"], r.Failed["reset"], r.Failed["eof"], r.Failed["timeout"], r.Failed["non2xx"], r.Failed["other"],
			r.FailedReused)
	}

	b.WriteString("\n**Latency** of complete responses, in ms: steady, and for requests started during a restart (from its trigger until the new pid has answered and the old pid has answered for the last time).\n\n")
	b.WriteString("| scenario | mode | steady p50 | p99 | p99.9 | max | restart p50 | p99 | p99.9 | max |\n")
	b.WriteString("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, r := range rep.Results {
		fmt.Fprintf(b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", r.Scenario, r.Mode,
			num(r.Steady.P50, r.Steady.Count), num(r.Steady.P99, r.Steady.Count), num(r.Steady.P999, r.Steady.Count), num(r.Steady.Max, r.Steady.Count),
			num(r.DuringRe.P50, r.DuringRe.Count), num(r.DuringRe.P99, r.DuringRe.Count), num(r.DuringRe.P999, r.DuringRe.Count), num(r.DuringRe.Max, r.DuringRe.Count))
	}

	b.WriteString("\n**Restarts and the supervisor.** Restart latency: from the trigger to the first response from the new pid; in keep-alive mode clients move only when the old child closes their connections, so there it is at least the handover. Handover: from the trigger to the old child receiving its stop signal (from the backend's log, to the millisecond). RSS and CPU are the supervisor's own, over the run; RSS is split into anonymous memory (RssAnon: the process's own) and file-backed pages (RssFile: mostly its binary, shared by every process that runs it); fds before the first restart and after the last.\n\n")
	b.WriteString("| scenario | mode | restarts | latency p50 | latency max | handover p50 | handover max | supervisor | RSS MiB (peak) | anon / file MiB | CPU s | fds before → after |\n")
	b.WriteString("|---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|\n")
	for _, r := range rep.Results {
		lat, hand := restartFigures(r.Restarts)
		sup, rss, split, cpu, fds := "—", "—", "—", "—", "—"
		if p := r.Supervisor; p != nil {
			sup = p.Name
			rss = fmt.Sprintf("%.1f (%.1f)", mib(p.RSSAfterKB), mib(p.RSSPeakKB))
			split = rssSplit(p.RSSAnonAfterKB, p.RSSFileAfterKB)
			cpu = fmt.Sprintf("%.2f", p.CPUSeconds)
			fds = fmt.Sprintf("%d → %d", p.FDsBefore, p.FDsAfter)
		}
		fmt.Fprintf(b, "| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", r.Scenario, r.Mode, len(r.Restarts),
			lat[0], lat[1], hand[0], hand[1], sup, rss, split, cpu, fds)
	}

}

// restartFigures returns the p50 and max of the restart latencies and of
// the handover times, as table cells.
func restartFigures(rs []Restart) (lat, hand [2]string) {
	var l, h []float64
	missing := 0
	for _, r := range rs {
		if r.LatencyMs >= 0 {
			l = append(l, r.LatencyMs)
		} else {
			missing++
		}
		if r.HandoverMs >= 0 {
			h = append(h, r.HandoverMs)
		}
	}
	lat = medianMax(l)
	if missing > 0 {
		lat[1] += fmt.Sprintf(" (%d never answered)", missing)
	}
	return lat, medianMax(h)
}

func medianMax(v []float64) [2]string {
	if len(v) == 0 {
		return [2]string{"—", "—"}
	}
	slices.Sort(v)
	return [2]string{fmt.Sprintf("%.1f", v[(len(v)-1)/2]), fmt.Sprintf("%.1f", v[len(v)-1])}
}

func num(v float64, count int64) string {
	if count == 0 {
		return "—"
	}
	return fmt.Sprintf("%.2f", v)
}

func mib(kb int64) float64 { return float64(kb) / 1024 }

// rssSplit is a table cell with RssAnon and RssFile in MiB, or "—" when
// neither was read.
func rssSplit(anonKB, fileKB int64) string {
	if anonKB == 0 && fileKB == 0 {
		return "—"
	}
	return fmt.Sprintf("%.2f / %.2f", mib(anonKB), mib(fileKB))
}
