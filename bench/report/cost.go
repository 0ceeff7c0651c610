package report

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Cost is the takeover cost comparison: the same backend given its
// listening socket in different ways, each run in several rounds.
type Cost struct {
	// Base is the variant the others are compared with.
	Base string `json:"base"`
	// Variants name and describe the ways, in table order.
	Variants []CostVariant `json:"variants"`
	Runs     []CostRun     `json:"runs"`
	// LoadS is the length of each run's keep-alive load, in seconds.
	LoadS float64 `json:"load_s"`
}

// CostVariant is one way of giving the backend its socket.
type CostVariant struct {
	Name string `json:"name"`
	What string `json:"what"`
}

// CostRun is one variant's run in one round.
type CostRun struct {
	Variant  string  `json:"variant"`
	Round    int     `json:"round"`
	OK       int     `json:"ok"`
	Failed   int     `json:"failed"`
	OKPerSec float64 `json:"ok_per_s"`
	// ReadyMs is relay's ready_after of each generation, in ms: from just
	// before relay started its process to its readiness. Empty without relay.
	ReadyMs []float64 `json:"ready_after_ms"`
	// ListenUs is how long each of the backend's net.Listen calls took, in
	// µs, as it logged them. Empty when it binds nothing.
	ListenUs []float64 `json:"net_listen_us"`
	// SeccompFilters is how many seccomp filters the backend ran under
	// (Seccomp_filters in /proc/PID/status), -1 when unknown.
	SeccompFilters int `json:"seccomp_filters"`
}

// Spread is the median, minimum and maximum of N values; all 0 when N is 0.
type Spread struct {
	N                int
	Median, Min, Max float64
}

// SpreadOf returns the spread of v; the median of an even count is the
// mean of the middle two.
func SpreadOf(v []float64) Spread {
	if len(v) == 0 {
		return Spread{}
	}
	v = slices.Sorted(slices.Values(v))
	n := len(v)
	med := v[n/2]
	if n%2 == 0 {
		med = (v[n/2-1] + v[n/2]) / 2
	}
	return Spread{N: n, Median: med, Min: v[0], Max: v[n-1]}
}

// CostRow is one variant's figures over all its runs.
type CostRow struct {
	Variant string
	// OKPerSec is each run's throughput, in round order.
	OKPerSec []float64
	// Throughput is the spread of OKPerSec.
	Throughput Spread
	// VsBase is the median throughput over the base variant's; 0 when
	// either has none.
	VsBase float64
	Failed int
	// Ready is the spread of the generations' ready_after, in ms.
	Ready Spread
	// AddedMs and AddedMinMs are Ready's median and minimum minus the
	// base's; valid when HasAdded. On a busy machine the noise only adds
	// time, so the minima say more about the takeover's own cost.
	AddedMs, AddedMinMs float64
	HasAdded            bool
	// Listen is the spread of the net.Listen times, in µs.
	Listen Spread
	// Filters are the runs' distinct SeccompFilters, sorted.
	Filters []int
}

// Rows summarizes the runs by variant: the variants in Variants' order,
// then any other variant in the order its first run came.
func (c *Cost) Rows() []CostRow {
	var order []string
	for _, v := range c.Variants {
		order = append(order, v.Name)
	}
	by := map[string][]CostRun{}
	for _, r := range c.Runs {
		if !slices.Contains(order, r.Variant) {
			order = append(order, r.Variant)
		}
		by[r.Variant] = append(by[r.Variant], r)
	}
	var rows []CostRow
	for _, name := range order {
		runs := by[name]
		if len(runs) == 0 {
			continue
		}
		slices.SortStableFunc(runs, func(a, b CostRun) int { return a.Round - b.Round })
		row := CostRow{Variant: name}
		var ready, listen []float64
		for _, r := range runs {
			row.OKPerSec = append(row.OKPerSec, r.OKPerSec)
			row.Failed += r.Failed
			ready = append(ready, r.ReadyMs...)
			listen = append(listen, r.ListenUs...)
			if !slices.Contains(row.Filters, r.SeccompFilters) {
				row.Filters = append(row.Filters, r.SeccompFilters)
			}
		}
		slices.Sort(row.Filters)
		row.Throughput, row.Ready, row.Listen = SpreadOf(row.OKPerSec), SpreadOf(ready), SpreadOf(listen)
		rows = append(rows, row)
	}
	i := slices.IndexFunc(rows, func(r CostRow) bool { return r.Variant == c.Base })
	if i < 0 {
		return rows
	}
	base := rows[i]
	for j := range rows {
		r := &rows[j]
		if base.Throughput.Median > 0 && r.Throughput.Median > 0 {
			r.VsBase = r.Throughput.Median / base.Throughput.Median
		}
		if base.Ready.N > 0 && r.Ready.N > 0 {
			r.AddedMs, r.AddedMinMs, r.HasAdded = r.Ready.Median-base.Ready.Median, r.Ready.Min-base.Ready.Min, true
		}
	}
	return rows
}

// writeMarkdown writes the takeover cost table and the variants' list.
func (c *Cost) writeMarkdown(b *strings.Builder) {
	fmt.Fprintf(b, "\n**Takeover cost.** The same backend given its socket in different ways (below), restarted with no load, then under keep-alive load with no restart for %gs per run, "+
		"in rounds that reverse their order; throughput can differ by more between two processes of the same backend than between variants, so read each round's figure, not only the median. "+
		"Start → ready: relay's ready_after of every generation (the first and each restart, all with no load), from just before relay starts its process until it is ready; "+
		"\"added\" is its median and its minimum minus %s's (noise on a busy machine only adds time, so the minima say more about the cost itself). net.Listen: how long the backend's own net.Listen calls took (socket, bind and listen), from its log. "+
		"Filters: the seccomp filters the backend ran under (/proc/PID/status; ? when unknown).\n\n", c.LoadS, c.Base)
	fmt.Fprintf(b, "| variant | filters | ok/s per round | ok/s median | vs %s | failed | start → ready ms median | min | max | n | added ms median / min | net.Listen µs median | min | max | n |\n", c.Base)
	b.WriteString("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, r := range c.Rows() {
		var per []string
		for _, v := range r.OKPerSec {
			per = append(per, fmt.Sprintf("%.0f", v))
		}
		vs, added := "—", "—"
		if r.VsBase > 0 {
			vs = fmt.Sprintf("%.3f", r.VsBase)
		}
		if r.HasAdded {
			added = fmt.Sprintf("%+.2f / %+.2f", r.AddedMs, r.AddedMinMs)
		}
		var filters []string
		for _, n := range r.Filters {
			if n < 0 {
				filters = append(filters, "?")
			} else {
				filters = append(filters, strconv.Itoa(n))
			}
		}
		fmt.Fprintf(b, "| %s | %s | %s | %.0f | %s | %d | %s | %s | %s | %d | %s | %s | %s | %s | %d |\n",
			r.Variant, strings.Join(filters, "/"), strings.Join(per, ", "), r.Throughput.Median, vs, r.Failed,
			fig(r.Ready.Median, r.Ready.N, 2), fig(r.Ready.Min, r.Ready.N, 2), fig(r.Ready.Max, r.Ready.N, 2), r.Ready.N, added,
			fig(r.Listen.Median, r.Listen.N, 0), fig(r.Listen.Min, r.Listen.N, 0), fig(r.Listen.Max, r.Listen.N, 0), r.Listen.N)
	}
	b.WriteString("\n")
	for _, v := range c.Variants {
		fmt.Fprintf(b, "- `%s`: %s\n", v.Name, v.What)
	}
}

// fig formats v with prec decimals, or "—" when there were no values.
func fig(v float64, n, prec int) string {
	if n == 0 {
		return "—"
	}
	return fmt.Sprintf("%.*f", prec, v)
}
