package report

import (
	"fmt"
	"strings"
)

// Memory is the memory run: relay restarted many times in a row, with no
// load, its memory read after some of the restarts and once more after a
// bounded wait at the end.
type Memory struct {
	Restarts int `json:"restarts"`
	// Drain is the --drain relay ran with, "" for its default.
	Drain  string        `json:"drain,omitempty"`
	Points []MemoryPoint `json:"points"`
	// Settled is the memory after the final wait, nil when it was not
	// reached; SettleS is how long that wait took.
	Settled *MemoryPoint `json:"settled,omitempty"`
	SettleS float64      `json:"settle_s"`
	// RestartMs is how long each "relay restart" took, to its exit.
	RestartMs []float64 `json:"restart_ms"`
}

// MemoryPoint is relay's memory after a number of restarts.
type MemoryPoint struct {
	After     int   `json:"after_restarts"`
	RSSKB     int64 `json:"rss_kb"`
	RSSAnonKB int64 `json:"rss_anon_kb"`
	RSSFileKB int64 `json:"rss_file_kb"`
	FDs       int   `json:"fds"`
}

// AnonGrowthKB is RssAnon at the last point (the settled one if there is
// one) minus RssAnon after the first restart, and whether both exist.
func (m *Memory) AnonGrowthKB() (int64, bool) {
	var first, last *MemoryPoint
	for i := range m.Points {
		if p := &m.Points[i]; p.After >= 1 {
			if first == nil {
				first = p
			}
			last = p
		}
	}
	if m.Settled != nil {
		last = m.Settled
	}
	if first == nil || last == first {
		return 0, false
	}
	return last.RSSAnonKB - first.RSSAnonKB, true
}

func (m *Memory) writeMarkdown(b *strings.Builder) {
	drain := "relay's default --drain"
	if m.Drain != "" {
		drain = "--drain " + m.Drain
	}
	fmt.Fprintf(b, "\n**Relay's memory over %d restarts.** `relay run --health notify` (steered, %s) with hello -startup 0 -lame-duck 0, restarted %d times in a row with `relay restart`, which returns once the old generation has exited; no load. RssAnon is relay's own memory; RssFile is file-backed pages, mostly relay's binary, which every relay on a host shares.\n\n",
		m.Restarts, drain, m.Restarts)
	b.WriteString("| after restarts | VmRSS MiB | RssAnon MiB | RssFile MiB | fds |\n|---|--:|--:|--:|--:|\n")
	row := func(label string, p MemoryPoint) {
		fmt.Fprintf(b, "| %s | %.2f | %.2f | %.2f | %d |\n", label, mib(p.RSSKB), mib(p.RSSAnonKB), mib(p.RSSFileKB), p.FDs)
	}
	for _, p := range m.Points {
		label := fmt.Sprint(p.After)
		if p.After == 0 {
			label = "0 (serving, before the first)"
		}
		row(label, p)
	}
	if m.Settled != nil {
		row(fmt.Sprintf("%d, then %.1f s idle", m.Settled.After, m.SettleS), *m.Settled)
	}
	var parts []string
	if d, ok := m.AnonGrowthKB(); ok {
		parts = append(parts, fmt.Sprintf("RssAnon from the first restart to the last row: %+.2f MiB", mib(d)))
	}
	if len(m.RestartMs) > 0 {
		s := SpreadOf(m.RestartMs)
		parts = append(parts, fmt.Sprintf("`relay restart` took %.1f ms median, %.1f ms max", s.Median, s.Max))
	}
	if len(parts) > 0 {
		fmt.Fprintf(b, "\n%s.\n", strings.Join(parts, "; "))
	}
}
