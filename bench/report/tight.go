package report

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/relaysh/relay/bench/load"
)

// Drain sources: where a tight run's drain figures come from.
const (
	// DrainLogged: relay's "old generation drained" lines, one per
	// restart, each with the drain it took.
	DrainLogged = "logged"
	// DrainReadyToStop: relay logs no such line (a fixed --drain), so the
	// drain is from relay's "generation ready" line of the new generation
	// to the old one's stop signal.
	DrainReadyToStop = "ready→stop"
)

// StartedSlack allows for the backend's log times, which are truncated to
// the millisecond: a process whose first line is logged at most this long
// before a trigger may still have started after it.
const StartedSlack = time.Millisecond

// Drained is one "old generation drained" line of relay's: the generation
// that drained, how long its drain took and why it ended.
type Drained struct {
	Gen     int     `json:"gen"`
	Pid     int32   `json:"pid"`
	DrainMs float64 `json:"drain_ms"`
	// Ended is "empty" (its sockets were empty), "max" (--drain ran out)
	// or "fixed" (no observation: the fixed --drain).
	Ended string `json:"ended"`
}

// TightInput is what one supervisor's tight-restarts run recorded; times
// are from the run's base time.
type TightInput struct {
	Supervisor string
	Samples    []load.Sample
	// Triggers are when each SIGHUP was sent.
	Triggers []time.Duration
	// Started is when each backend pid logged its first line (the
	// backend's own, or relay's "generation starting").
	Started map[int32]time.Duration
	// Ready is when each backend pid logged that it was ready.
	Ready map[int32]time.Duration
	// Switched is when relay logged each generation ready, by pid; empty
	// for another supervisor.
	Switched map[int32]time.Duration
	// Stops is when each backend pid logged its stop signal.
	Stops   map[int32]time.Duration
	Drained []Drained
	// Coalesced and Queued count relay's lines for restarts asked for
	// during another one.
	Coalesced, Queued int
	Proc              *Proc
}

// TightRestart is one SIGHUP of a tight run.
type TightRestart struct {
	TriggerS float64 `json:"trigger_s"`
	// NewPid is the first pid started after the trigger to answer, 0 if
	// none did.
	NewPid int32 `json:"new_pid"`
	// LatencyMs is from the trigger to NewPid's first response, -1 if none.
	LatencyMs float64 `json:"latency_ms"`
}

// Handover is one generation replacing another, in the order they became
// ready. A figure that could not be measured is -1.
type Handover struct {
	OldPid int32 `json:"old_pid"`
	NewPid int32 `json:"new_pid"`
	// ReadyS is when the new one logged that it was ready.
	ReadyS float64 `json:"ready_s"`
	// HandoverMs is from the new one's readiness to the old one's stop
	// signal, both from the backend's log.
	HandoverMs float64 `json:"handover_ms"`
	// DrainMs is the drain relay took (see TightRun.DrainSource).
	DrainMs float64 `json:"drain_ms"`
}

// TightRun is one supervisor's figures in the tight-restarts run.
type TightRun struct {
	Supervisor string         `json:"supervisor"`
	Requests   int            `json:"requests"`
	OK         int            `json:"ok"`
	Failed     map[string]int `json:"failed"`
	Restarts   []TightRestart `json:"restarts"`
	Handovers  []Handover     `json:"handovers"`
	Drained    []Drained      `json:"drained,omitempty"`
	// DrainSource is DrainLogged, DrainReadyToStop, or "" when the
	// supervisor is not relay.
	DrainSource string `json:"drain_source,omitempty"`
	Coalesced   int    `json:"coalesced"`
	Queued      int    `json:"queued"`
	Proc        *Proc  `json:"usage,omitempty"`
}

// TotalFailed is the number of failed requests.
func (r *TightRun) TotalFailed() int { return r.Requests - r.OK }

// Tight is the tight-restarts run: restarts sent at fixed times, closer
// together than the backend's startup plus relay's drain, to each
// supervisor in turn, under the same load.
type Tight struct {
	Restarts  int        `json:"restarts"`
	IntervalS float64    `json:"interval_s"`
	StartupS  float64    `json:"startup_s"`
	Mode      string     `json:"mode"`
	Workers   int        `json:"concurrency"`
	Runs      []TightRun `json:"runs"`
}

// AnalyzeTight computes a tight run's figures.
func AnalyzeTight(in TightInput) TightRun {
	r := TightRun{Supervisor: in.Supervisor, Requests: len(in.Samples), Failed: map[string]int{},
		Restarts: []TightRestart{}, Handovers: []Handover{}, Drained: in.Drained,
		Coalesced: in.Coalesced, Queued: in.Queued, Proc: in.Proc}
	samples := slices.Clone(in.Samples)
	slices.SortFunc(samples, func(a, b load.Sample) int { return int(a.End() - b.End()) })
	for _, s := range samples {
		if s.Class == load.OK {
			r.OK++
		} else {
			r.Failed[s.Class.String()]++
		}
	}
	for _, t := range in.Triggers {
		r.Restarts = append(r.Restarts, tightRestart(samples, t, in.Started))
	}

	switch {
	case len(in.Drained) > 0:
		r.DrainSource = DrainLogged
	case len(in.Switched) > 0:
		r.DrainSource = DrainReadyToStop
	}
	pids := slices.SortedFunc(maps.Keys(in.Ready), func(a, b int32) int { return int(in.Ready[a] - in.Ready[b]) })
	for i := 1; i < len(pids); i++ {
		old, nw := pids[i-1], pids[i]
		h := Handover{OldPid: old, NewPid: nw, ReadyS: in.Ready[nw].Seconds(), HandoverMs: -1, DrainMs: -1}
		stop, stopped := in.Stops[old]
		if stopped {
			h.HandoverMs = ms(stop - in.Ready[nw])
		}
		switch r.DrainSource {
		case DrainLogged:
			if i := slices.IndexFunc(in.Drained, func(d Drained) bool { return d.Pid == old }); i >= 0 {
				h.DrainMs = in.Drained[i].DrainMs
			}
		case DrainReadyToStop:
			if sw, ok := in.Switched[nw]; ok && stopped {
				h.DrainMs = ms(stop - sw)
			}
		}
		r.Handovers = append(r.Handovers, h)
	}
	return r
}

// tightRestart times the restart triggered at t: the first response, after
// t, from a pid that started after t. A pid with no known start qualifies
// if it had not answered before t.
func tightRestart(sorted []load.Sample, t time.Duration, started map[int32]time.Duration) TightRestart {
	rs := TightRestart{TriggerS: t.Seconds(), LatencyMs: -1}
	before := map[int32]bool{}
	for _, s := range sorted {
		if s.Class != load.OK || s.Pid == 0 {
			continue
		}
		if s.End() < t {
			before[s.Pid] = true
			continue
		}
		at, known := started[s.Pid]
		if (known && at >= t-StartedSlack) || (!known && !before[s.Pid]) {
			rs.NewPid, rs.LatencyMs = s.Pid, ms(s.End()-t)
			return rs
		}
	}
	return rs
}

// Figures returns the median and maximum of the restart latencies, the
// handovers and the drains, in ms, as table cells; the latency's maximum
// says how many restarts no new process answered.
func (r *TightRun) Figures() (lat, hand, drain [2]string) {
	var l, h, d []float64
	missing := 0
	for _, rs := range r.Restarts {
		if rs.LatencyMs >= 0 {
			l = append(l, rs.LatencyMs)
		} else {
			missing++
		}
	}
	for _, ho := range r.Handovers {
		if ho.HandoverMs >= 0 {
			h = append(h, ho.HandoverMs)
		}
		if ho.DrainMs >= 0 {
			d = append(d, ho.DrainMs)
		}
	}
	lat = medianMax(l)
	if missing > 0 {
		lat[1] += fmt.Sprintf(" (%d never answered)", missing)
	}
	return lat, medianMax(h), medianMax(d)
}

func (tg *Tight) writeMarkdown(b *strings.Builder) {
	fmt.Fprintf(b, "\n**Tight restarts.** %d restarts sent %s apart, at fixed times whether or not the last one had finished (SIGHUP, as an operator or an autoscaler would), with a backend that starts in %s; %s mode, C=%d, each supervisor in turn with the same backend. "+
		"Latency: from the SIGHUP to the first response from a pid started after it. Handover: from the new generation's readiness to the old one's stop signal (both from the backend's log). Drain: the drain relay took. Coalesced and queued: restarts asked for during another one, as relay logged them.\n\n",
		tg.Restarts, durText(tg.IntervalS), durText(tg.StartupS), tg.Mode, tg.Workers)
	b.WriteString("| supervisor | restarts | generations | coalesced | queued | latency p50 | latency max | handover p50 | handover max | drain p50 | drain max | drain ended | ok | failed | RSS MiB | anon / file MiB |\n")
	b.WriteString("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|\n")
	var notes []string
	for _, r := range tg.Runs {
		l, hd, dr := r.Figures()
		coalesced, queued, ended := "—", "—", "—"
		if r.DrainSource != "" {
			coalesced, queued = fmt.Sprint(r.Coalesced), fmt.Sprint(r.Queued)
		}
		switch r.DrainSource {
		case DrainLogged:
			ended = endedText(r.Drained)
		case DrainReadyToStop:
			ended = "fixed (no drain line)"
			notes = append(notes, fmt.Sprintf("%s logged no \"old generation drained\" line: its drain is from its \"generation ready\" line to the old generation's stop signal.", r.Supervisor))
		}
		rss, split := "—", "—"
		if p := r.Proc; p != nil {
			rss, split = fmt.Sprintf("%.1f", mib(p.RSSAfterKB)), rssSplit(p.RSSAnonAfterKB, p.RSSFileAfterKB)
		}
		fmt.Fprintf(b, "| %s | %d | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %d | **%d** | %s | %s |\n",
			r.Supervisor, len(r.Restarts), len(r.Handovers), coalesced, queued, l[0], l[1], hd[0], hd[1], dr[0], dr[1], ended,
			r.OK, r.TotalFailed(), rss, split)
	}
	for _, n := range notes {
		fmt.Fprintf(b, "\n%s\n", n)
	}
}

// endedText counts the drains by how they ended: "empty 9, max 1".
func endedText(ds []Drained) string {
	n := map[string]int{}
	for _, d := range ds {
		n[d.Ended]++
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(n)) {
		parts = append(parts, fmt.Sprintf("%s %d", k, n[k]))
	}
	return strings.Join(parts, ", ")
}

func durText(seconds float64) string {
	return time.Duration(seconds * float64(time.Second)).Round(time.Millisecond).String()
}
