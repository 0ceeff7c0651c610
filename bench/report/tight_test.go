package report

import (
	"strings"
	"testing"
	"time"

	"github.com/relaysh/relay/bench/load"
)

// tightSamples: pid 10 serves until 2400 ms, pid 20 (started at 1001 ms)
// from 1400 ms to 3900 ms, pid 30 (started at 2899 ms, a log time cut to
// the millisecond) from 3300 ms; one request fails.
func tightSamples() []load.Sample {
	var s []load.Sample
	for at := 0; at < 2400; at += 50 {
		s = append(s, ok(at, 2, 10))
	}
	for at := 1400; at < 3900; at += 50 {
		s = append(s, ok(at, 2, 20))
	}
	for at := 3300; at < 5000; at += 50 {
		s = append(s, ok(at, 2, 30))
	}
	return append(s, failed(1500, load.EOF, false))
}

func TestAnalyzeTightTimesRestartsByProcessStart(t *testing.T) {
	ms := func(v int) time.Duration { return time.Duration(v) * ms1 }
	in := TightInput{
		Supervisor: "relay",
		Samples:    tightSamples(),
		// Restarts at 1000, 2000 and 2900 ms: the second was queued
		// behind the first and is answered by pid 30, which started after
		// it (and after the third); pid 20, which started before it, does
		// not count for it.
		Triggers: []time.Duration{ms(1000), ms(2000), ms(2900)},
		Started:  map[int32]time.Duration{10: -ms(400), 20: ms(1001), 30: ms(2899)},
		Ready:    map[int32]time.Duration{10: -ms(100), 20: ms(1300), 30: ms(3200)},
		Switched: map[int32]time.Duration{10: -ms(99), 20: ms(1301), 30: ms(3201)},
		// pid 10 got its stop signal 1100 ms after pid 20's readiness;
		// pid 20's is not logged.
		Stops:     map[int32]time.Duration{10: ms(2400)},
		Coalesced: 1, Queued: 2,
	}
	r := AnalyzeTight(in)
	if r.Requests != len(in.Samples) || r.TotalFailed() != 1 || r.Failed["eof"] != 1 {
		t.Fatalf("requests %d failed %d %v", r.Requests, r.TotalFailed(), r.Failed)
	}
	want := []TightRestart{
		{TriggerS: 1, NewPid: 20, LatencyMs: 402},
		{TriggerS: 2, NewPid: 30, LatencyMs: 1302},
		{TriggerS: 2.9, NewPid: 30, LatencyMs: 402},
	}
	if len(r.Restarts) != len(want) {
		t.Fatalf("restarts %+v", r.Restarts)
	}
	for i, w := range want {
		if g := r.Restarts[i]; g.NewPid != w.NewPid || g.TriggerS != w.TriggerS || !near(g.LatencyMs, w.LatencyMs) {
			t.Errorf("restart %d: %+v, want %+v", i, g, w)
		}
	}
	// Today's relay logs no drained line: the drain is from relay's ready
	// line to the old one's stop signal.
	if r.DrainSource != DrainReadyToStop {
		t.Fatalf("drain source %q", r.DrainSource)
	}
	wantH := []Handover{
		{OldPid: 10, NewPid: 20, ReadyS: 1.3, HandoverMs: 1100, DrainMs: 1099},
		{OldPid: 20, NewPid: 30, ReadyS: 3.2, HandoverMs: -1, DrainMs: -1},
	}
	if len(r.Handovers) != len(wantH) {
		t.Fatalf("handovers %+v", r.Handovers)
	}
	for i, w := range wantH {
		g := r.Handovers[i]
		if g.OldPid != w.OldPid || g.NewPid != w.NewPid || !near(g.ReadyS*1000, w.ReadyS*1000) || !near(g.HandoverMs, w.HandoverMs) || !near(g.DrainMs, w.DrainMs) {
			t.Errorf("handover %d: %+v, want %+v", i, g, w)
		}
	}
	lat, hand, drain := r.Figures()
	if lat != [2]string{"402.0", "1302.0"} || hand != [2]string{"1100.0", "1100.0"} || drain != [2]string{"1099.0", "1099.0"} {
		t.Errorf("figures %q %q %q", lat, hand, drain)
	}

	// With the adaptive drain's lines, the drain is what relay logged for
	// the old generation.
	in.Drained = []Drained{{Gen: 2, Pid: 20, DrainMs: 2.5, Ended: "empty"}, {Gen: 1, Pid: 10, DrainMs: 4, Ended: "max"}}
	r = AnalyzeTight(in)
	if r.DrainSource != DrainLogged || r.Handovers[0].DrainMs != 4 || r.Handovers[1].DrainMs != 2.5 {
		t.Errorf("drain source %q, handovers %+v", r.DrainSource, r.Handovers)
	}

	// Another supervisor: no relay lines, so no drain; a pid whose start
	// is unknown counts if it had not answered before the trigger.
	r = AnalyzeTight(TightInput{Supervisor: "start_server", Samples: tightSamples(), Triggers: in.Triggers[:2],
		Ready: in.Ready, Stops: in.Stops})
	if r.DrainSource != "" || r.Handovers[0].DrainMs != -1 || r.Handovers[0].HandoverMs != 1100 {
		t.Errorf("start_server: source %q handovers %+v", r.DrainSource, r.Handovers)
	}
	if r.Restarts[0].NewPid != 20 || r.Restarts[1].NewPid != 30 || !near(r.Restarts[1].LatencyMs, 1302) {
		t.Errorf("start_server restarts %+v", r.Restarts)
	}
}

func TestAnalyzeTightRestartNeverAnswered(t *testing.T) {
	r := AnalyzeTight(TightInput{Samples: []load.Sample{ok(0, 1, 10), ok(500, 1, 10)},
		Triggers: []time.Duration{200 * ms1}, Started: map[int32]time.Duration{10: -ms1}})
	if r.Restarts[0].NewPid != 0 || r.Restarts[0].LatencyMs != -1 {
		t.Fatalf("restart %+v", r.Restarts[0])
	}
	if lat, _, _ := r.Figures(); lat[1] != "— (1 never answered)" {
		t.Errorf("latency cells %q", lat)
	}
}

func TestTightMarkdown(t *testing.T) {
	tg := &Tight{Restarts: 2, IntervalS: 1.4, StartupS: 0.3, Mode: "new-conn", Workers: 32, Runs: []TightRun{
		{Supervisor: "relay", Requests: 10, OK: 10, DrainSource: DrainLogged, Coalesced: 1, Queued: 0,
			Restarts:  []TightRestart{{LatencyMs: 310}, {LatencyMs: 330}},
			Handovers: []Handover{{HandoverMs: 3, DrainMs: 2.1}, {HandoverMs: 5, DrainMs: 4}},
			Drained:   []Drained{{Ended: "empty"}, {Ended: "max"}, {Ended: "empty"}},
			Proc:      &Proc{RSSAfterKB: 10240, RSSAnonAfterKB: 1536, RSSFileAfterKB: 8704}},
		{Supervisor: "start_server", Requests: 10, OK: 8,
			Restarts: []TightRestart{{LatencyMs: 320}, {LatencyMs: -1}}, Handovers: []Handover{{HandoverMs: 690, DrainMs: -1}}},
	}}
	var b strings.Builder
	tg.writeMarkdown(&b)
	for _, row := range []string{
		"| relay | 2 | 2 | 1 | 0 | 310.0 | 330.0 | 3.0 | 5.0 | 2.1 | 4.0 | empty 2, max 1 | 10 | **0** | 10.0 | 1.50 / 8.50 |",
		"| start_server | 2 | 1 | — | — | 320.0 | 320.0 (1 never answered) | 690.0 | 690.0 | — | — | — | 8 | **2** | — | — |",
		"2 restarts sent 1.4s apart", "starts in 300ms; new-conn mode, C=32",
	} {
		if !strings.Contains(b.String(), row) {
			t.Errorf("no %q in:\n%s", row, b.String())
		}
	}
}

func TestMemoryMarkdown(t *testing.T) {
	m := &Memory{Restarts: 1000, Drain: "0s", Points: []MemoryPoint{
		{After: 0, RSSKB: 10000, RSSAnonKB: 1500, RSSFileKB: 8500, FDs: 17},
		{After: 1, RSSKB: 10300, RSSAnonKB: 1800, RSSFileKB: 8500, FDs: 17},
		{After: 1000, RSSKB: 16000, RSSAnonKB: 7300, RSSFileKB: 8700, FDs: 17},
	}, Settled: &MemoryPoint{After: 1000, RSSKB: 11000, RSSAnonKB: 2324, RSSFileKB: 8676, FDs: 17}, SettleS: 4.25,
		RestartMs: []float64{3, 5, 4}}
	if d, ok := m.AnonGrowthKB(); !ok || d != 524 {
		t.Errorf("growth %d kB, %v; want 524 from the first restart to the settled figure", d, ok)
	}
	var b strings.Builder
	m.writeMarkdown(&b)
	for _, row := range []string{
		"| 0 (serving, before the first) | 9.77 | 1.46 | 8.30 | 17 |",
		"| 1000 | 15.62 | 7.13 | 8.50 | 17 |",
		"| 1000, then 4.2 s idle | 10.74 | 2.27 | 8.47 | 17 |",
		"+0.51 MiB", "4.0 ms median, 5.0 ms max", "--drain 0s",
	} {
		if !strings.Contains(b.String(), row) {
			t.Errorf("no %q in:\n%s", row, b.String())
		}
	}
	// Without the settled figure, the last point; with one point, none.
	m.Settled = nil
	if d, ok := m.AnonGrowthKB(); !ok || d != 5500 {
		t.Errorf("growth %d kB, %v; want 5500", d, ok)
	}
	m.Points = m.Points[:2]
	if _, ok := m.AnonGrowthKB(); ok {
		t.Error("a growth from one restart's figure")
	}
}

func near(a, b float64) bool { return a-b < 0.01 && b-a < 0.01 }
