package report

import (
	"fmt"
	"slices"
	"strings"
)

// Pool is the worker-pool run: a CPU-bound single-threaded backend under
// relay run --workers N, for each N, with the same load and no restart.
type Pool struct {
	BurnMs      float64   `json:"burn_ms"`
	DurationS   float64   `json:"duration_s"`
	Concurrency int       `json:"concurrency"`
	Mode        string    `json:"mode"`
	Runs        []PoolRun `json:"runs"`
}

// PoolRun is one --workers N.
type PoolRun struct {
	Workers  int     `json:"workers"`
	OK       int     `json:"ok"`
	Failed   int     `json:"failed"`
	OKPerSec float64 `json:"ok_per_sec"`
	// Copies are the answers of each copy, by pid, most first.
	Copies []PoolCopy `json:"copies"`
}

// PoolCopy is what one copy answered.
type PoolCopy struct {
	Pid int `json:"pid"`
	OK  int `json:"ok"`
}

// Ratio is the throughput of the run of n workers over that of 1, and
// whether both ran.
func (p *Pool) Ratio(n int) (float64, bool) {
	var one, many float64
	for _, r := range p.Runs {
		switch r.Workers {
		case 1:
			one = r.OKPerSec
		case n:
			many = r.OKPerSec
		}
	}
	if one <= 0 || many <= 0 {
		return 0, false
	}
	return many / one, true
}

// Shares formats each copy's share of a run's answers: "51.2% / 48.8%".
func (r PoolRun) Shares() string {
	var parts []string
	for _, c := range r.Copies {
		share := 0.0
		if r.OK > 0 {
			share = 100 * float64(c.OK) / float64(r.OK)
		}
		parts = append(parts, fmt.Sprintf("%.1f%%", share))
	}
	return strings.Join(parts, " / ")
}

func (p *Pool) writeMarkdown(b *strings.Builder) {
	fmt.Fprintf(b, "\n**Worker pool.** `relay run --workers N -- hello -bind -burn %gms`: each request to / costs %g ms of CPU, one request at a time per copy (GOMAXPROCS=1), a single-threaded CPU-bound server. %d workers, %s, %.0f s per run, no restart. The copies' shares are of the answers, most first.\n\n",
		p.BurnMs, p.BurnMs, p.Concurrency, p.Mode, p.DurationS)
	b.WriteString("| --workers | ok | failed | ok/s | vs --workers 1 | copies' shares |\n|--:|--:|--:|--:|--:|---|\n")
	runs := slices.Clone(p.Runs)
	slices.SortFunc(runs, func(a, b PoolRun) int { return a.Workers - b.Workers })
	for _, r := range runs {
		ratio := "-"
		if x, ok := p.Ratio(r.Workers); ok {
			ratio = fmt.Sprintf("%.2f×", x)
		}
		fmt.Fprintf(b, "| %d | %d | %d | %.0f | %s | %s |\n", r.Workers, r.OK, r.Failed, r.OKPerSec, ratio, r.Shares())
	}
}
