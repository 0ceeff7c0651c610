package report

import (
	"bytes"
	"encoding/xml"
	"strings"
	"testing"
	"time"

	"github.com/relaysh/relay/bench/load"
)

const ms1 = time.Millisecond

// ok is a complete response from pid, started at start (ms) and taking lat (ms).
func ok(start, lat int, pid int32) load.Sample {
	return load.Sample{Start: time.Duration(start) * ms1, Latency: time.Duration(lat) * ms1, Pid: pid, Status: 200}
}

func failed(start int, c load.Class, reused bool) load.Sample {
	return load.Sample{Start: time.Duration(start) * ms1, Latency: ms1, Class: c, Reused: reused}
}

func TestAnalyzeTimesARestartFromTheResponses(t *testing.T) {
	// pid 10 serves until 1400 ms; a restart is triggered at 1000 ms; pid 20
	// first answers at 1310 ms (request started at 1300); pid 10 gets its
	// stop signal at 1320 ms.
	var s []load.Sample
	for at := 0; at < 1400; at += 20 {
		s = append(s, ok(at, 1, 10))
	}
	s = append(s, ok(1300, 10, 20))
	for at := 1400; at < 2000; at += 20 {
		s = append(s, ok(at, 2, 20))
	}
	s = append(s, failed(1350, load.EOF, true), failed(1360, load.Refused, false), failed(1370, load.Reset, false))
	s = append(s, load.Sample{Start: 500 * ms1, Latency: ms1, Status: 503, Pid: 10, Class: load.Non2xx})

	r := Analyze(Input{
		Scenario: "x", Mode: "keep-alive", Duration: 2 * time.Second, Bucket: 100 * ms1,
		Samples:     s,
		Triggers:    []time.Duration{1000 * ms1},
		StopSignals: map[int32]time.Duration{10: 1320 * ms1, 20: 5000 * ms1},
	})
	if r.Requests != len(s) || r.OK != len(s)-4 || r.TotalFailed() != 4 {
		t.Fatalf("requests %d ok %d failed %d", r.Requests, r.OK, r.TotalFailed())
	}
	if r.Failed["eof"] != 1 || r.Failed["refused"] != 1 || r.Failed["reset"] != 1 || r.Failed["non2xx"] != 1 || r.Failed["timeout"] != 0 {
		t.Fatalf("failed by class: %v", r.Failed)
	}
	if r.FailedReused != 1 || r.FailedFresh != 3 {
		t.Fatalf("reused %d fresh %d", r.FailedReused, r.FailedFresh)
	}
	if len(r.Restarts) != 1 {
		t.Fatalf("restarts: %+v", r.Restarts)
	}
	rs := r.Restarts[0]
	want := Restart{TriggerS: 1, OldPid: 10, NewPid: 20, LatencyMs: 310, HandoverMs: 320, LastOldMs: 381}
	if rs != want {
		t.Fatalf("restart %+v, want %+v", rs, want)
	}
	// The window is [1000, 1381] ms: the requests of pid 10 started from
	// 1000 to 1380 (20 of them) and pid 20's first one are "during restart".
	if r.DuringRe.Count != 21 || r.Steady.Count != int64(r.OK)-21 {
		t.Fatalf("during %d steady %d", r.DuringRe.Count, r.Steady.Count)
	}
	// The histogram keeps three significant digits.
	if r.DuringRe.Max < 9.99 || r.DuringRe.Max > 10.02 || r.Steady.Max < 1.99 || r.Steady.Max > 2.01 {
		t.Fatalf("max latency during %v steady %v", r.DuringRe.Max, r.Steady.Max)
	}
	if len(r.Timeline) != 20 {
		t.Fatalf("%d timeline points", len(r.Timeline))
	}
	var okSum, failSum float64
	for _, p := range r.Timeline {
		okSum += p.OKPerSec / 10
		failSum += p.FailPerSec / 10
	}
	if int(okSum+0.5) != r.OK || int(failSum+0.5) != 4 {
		t.Fatalf("timeline holds %v complete and %v failed", okSum, failSum)
	}
	// Which pid answered when: the 1300-1400 ms bucket has both.
	if got := r.Timeline[13].ByPid; got[10] != 5 || got[20] != 1 || len(got) != 2 {
		t.Fatalf("pids answering from 1.3 s: %v", got)
	}
}

// A last bucket cut short by the end of the run is a rate over its own
// length.
func TestTimelinePartialBucket(t *testing.T) {
	r := Analyze(Input{Duration: 250 * ms1, Bucket: 100 * ms1, Samples: []load.Sample{ok(200, 10, 1), ok(10, 10, 1)}})
	if len(r.Timeline) != 3 || r.Timeline[2].OKPerSec != 20 || r.Timeline[0].OKPerSec != 10 {
		t.Fatalf("timeline %+v", r.Timeline)
	}
}

// A restart whose new child never answers has no latency, and a stop
// signal logged before the trigger is not its handover.
func TestAnalyzeRestartWithoutNewPid(t *testing.T) {
	s := []load.Sample{ok(0, 1, 10), ok(100, 1, 10), ok(300, 1, 10)}
	r := Analyze(Input{Duration: time.Second, Bucket: 100 * ms1, Samples: s,
		Triggers: []time.Duration{200 * ms1}, StopSignals: map[int32]time.Duration{10: 50 * ms1}})
	rs := r.Restarts[0]
	if rs.NewPid != 0 || rs.LatencyMs != -1 || rs.HandoverMs != -1 || rs.OldPid != 10 {
		t.Fatalf("restart %+v", rs)
	}
	lat, hand := restartFigures(r.Restarts)
	if lat[1] != "— (1 never answered)" && !strings.Contains(lat[1], "never answered") {
		t.Fatalf("latency cells %q", lat)
	}
	if hand[0] != "—" {
		t.Fatalf("handover cells %q", hand)
	}
}

func TestReportOutputs(t *testing.T) {
	mk := func(scenario string, perSec int, failures int) Result {
		var s []load.Sample
		for i := range perSec {
			s = append(s, ok(i*1000/perSec, 1, 7))
		}
		for i := range failures {
			s = append(s, failed(500+i, load.Refused, false))
		}
		return Analyze(Input{Scenario: scenario, Mode: "new-conn", Duration: time.Second, Bucket: 100 * ms1,
			Samples: s, Triggers: []time.Duration{500 * ms1}})
	}
	rep := Report{Settings: map[string]string{"c": "32"}, Machine: "test",
		Results: []Result{mk("direct", 1000, 0), mk("naive", 500, 3)}}
	rep.SetRatios()
	if rep.Results[1].VsDirect != 0.5 {
		t.Fatalf("vs direct %v", rep.Results[1].VsDirect)
	}
	var md bytes.Buffer
	if err := rep.WriteMarkdown(&md); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(md.String(), "| naive | new-conn | 500 | 500 | 0.500 | **3** | 3 |") {
		t.Fatalf("markdown:\n%s", md.String())
	}
	var svg bytes.Buffer
	if err := WriteChart(&svg, "new-conn <test>", rep.Results); err != nil {
		t.Fatal(err)
	}
	// The chart is well-formed XML, escapes its text, and has a panel, a
	// line and a restart marker per run, and a bar for the failures.
	d := xml.NewDecoder(bytes.NewReader(svg.Bytes()))
	counts := map[string]int{}
	for {
		tok, err := d.Token()
		if err != nil {
			break
		}
		if se, ok := tok.(xml.StartElement); ok {
			counts[se.Name.Local]++
			for _, a := range se.Attr {
				if a.Name.Local == "stroke-dasharray" {
					counts["dashed"]++
				}
			}
		}
	}
	if counts["svg"] != 1 || counts["polyline"] != 2 || counts["dashed"] != 3 {
		t.Fatalf("chart elements %v", counts)
	}
	if !strings.Contains(svg.String(), "new-conn &lt;test&gt;") || !strings.Contains(svg.String(), `fill="#d62728"/>`) {
		t.Fatal("chart title not escaped or failures not drawn")
	}
}
