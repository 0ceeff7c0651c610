// Package report turns the samples of a benchmark run into figures: failures
// by class, throughput, latency percentiles (steady and during restarts), the
// timing of each restart, and a timeline for the chart.
package report

import (
	"slices"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"

	"github.com/relaysh/relay/bench/load"
)

// Input is what one scenario run recorded.
type Input struct {
	Scenario string
	Mode     string        // "new-conn" or "keep-alive"
	Duration time.Duration // of the load
	Bucket   time.Duration // timeline resolution
	Samples  []load.Sample
	// Triggers are the restarts' trigger times, from the run's base time.
	Triggers []time.Duration
	// StopSignals holds, per pid, when that process logged that it had
	// received its stop signal, from the run's base time.
	StopSignals map[int32]time.Duration
	// Supervisor is the supervising process's usage, nil when there is none.
	Supervisor  *Proc
	FirstErrors []string
}

// Proc is a supervisor's resource usage over a run.
type Proc struct {
	Name        string `json:"name"`
	RSSBeforeKB int64  `json:"rss_before_kb"`
	RSSAfterKB  int64  `json:"rss_after_kb"`
	RSSPeakKB   int64  `json:"rss_peak_kb"`
	// The RSS after the run split into anonymous memory (RssAnon), the
	// process's own, and file-backed pages (RssFile), mostly its binary,
	// which every process mapping the same file shares.
	RSSAnonAfterKB int64   `json:"rss_anon_after_kb"`
	RSSFileAfterKB int64   `json:"rss_file_after_kb"`
	CPUSeconds     float64 `json:"cpu_seconds"`
	FDsBefore      int     `json:"fds_before"`
	FDsAfter       int     `json:"fds_after"`
}

// Latency is a latency distribution, in milliseconds.
type Latency struct {
	Count int64   `json:"count"`
	P50   float64 `json:"p50_ms"`
	P99   float64 `json:"p99_ms"`
	P999  float64 `json:"p99_9_ms"`
	Max   float64 `json:"max_ms"`
}

// Restart is the timing of one restart, in milliseconds from its trigger.
// A figure that could not be measured is -1.
type Restart struct {
	TriggerS float64 `json:"trigger_s"`
	OldPid   int32   `json:"old_pid"`
	NewPid   int32   `json:"new_pid"`
	// LatencyMs: the trigger to the first response from the new pid.
	LatencyMs float64 `json:"latency_ms"`
	// HandoverMs: the trigger to the old child receiving its stop signal.
	HandoverMs float64 `json:"handover_ms"`
	// LastOldMs: the trigger to the old pid's last response.
	LastOldMs float64 `json:"last_old_response_ms"`
}

// Point is one timeline bucket.
type Point struct {
	T          float64 `json:"t_s"` // bucket start
	OKPerSec   float64 `json:"ok_per_s"`
	FailPerSec float64 `json:"failed_per_s"`
	// ByPid counts the complete responses of the bucket by the pid that
	// answered: which process served when.
	ByPid map[int32]int `json:"ok_by_pid"`
}

// Result is the figures of one run.
type Result struct {
	Scenario  string  `json:"scenario"`
	Mode      string  `json:"mode"`
	DurationS float64 `json:"duration_s"`
	Requests  int     `json:"requests"`
	OK        int     `json:"ok"`
	ReqPerSec float64 `json:"ok_per_s"`
	// VsDirect is ReqPerSec as a ratio to the direct run of the same mode,
	// 0 when there is none.
	VsDirect float64 `json:"vs_direct"`
	// Failed counts failed requests by class.
	Failed map[string]int `json:"failed"`
	// FailedFresh and FailedReused split the failures by connection: a
	// reused connection had already carried a response.
	FailedFresh  int        `json:"failed_fresh_conn"`
	FailedReused int        `json:"failed_reused_conn"`
	Steady       Latency    `json:"latency_steady"`
	DuringRe     Latency    `json:"latency_during_restart"`
	Restarts     []Restart  `json:"restarts"`
	Supervisor   *Proc      `json:"supervisor,omitempty"`
	Timeline     []Point    `json:"timeline"`
	TriggersS    []float64  `json:"triggers_s"`
	FirstErrors  []string   `json:"first_other_errors,omitempty"`
	window       [][2]int64 // restart windows, ns from base
}

// TotalFailed is the number of failed requests.
func (r *Result) TotalFailed() int { return r.Requests - r.OK }

// Analyze computes a run's figures.
func Analyze(in Input) Result {
	r := Result{
		Scenario:    in.Scenario,
		Mode:        in.Mode,
		DurationS:   in.Duration.Seconds(),
		Requests:    len(in.Samples),
		Failed:      map[string]int{},
		Restarts:    []Restart{},
		TriggersS:   []float64{},
		Supervisor:  in.Supervisor,
		FirstErrors: in.FirstErrors,
	}
	for c := load.Refused; c < load.NumClasses; c++ {
		r.Failed[c.String()] = 0
	}
	samples := slices.Clone(in.Samples)
	slices.SortFunc(samples, func(a, b load.Sample) int { return int(a.End() - b.End()) })

	for _, s := range samples {
		if s.Class == load.OK {
			r.OK++
			continue
		}
		r.Failed[s.Class.String()]++
		if s.Reused {
			r.FailedReused++
		} else {
			r.FailedFresh++
		}
	}
	if in.Duration > 0 {
		r.ReqPerSec = float64(r.OK) / in.Duration.Seconds()
	}
	for _, t := range in.Triggers {
		r.TriggersS = append(r.TriggersS, t.Seconds())
		rs, end := restartTiming(samples, t, in.StopSignals)
		r.Restarts = append(r.Restarts, rs)
		r.window = append(r.window, [2]int64{int64(t), int64(end)})
	}
	r.Steady, r.DuringRe = latencies(samples, r.window)
	r.Timeline = timeline(samples, in.Duration, in.Bucket)
	return r
}

// restartTiming times the restart triggered at t, from the responses: the
// old pid is the one that answered last before t, the new pid the first one
// to answer after t that never answered before it. It also returns the end
// of the restart's window: when the new pid has answered and the old pid
// has answered for the last time.
func restartTiming(sorted []load.Sample, t time.Duration, stops map[int32]time.Duration) (Restart, time.Duration) {
	rs := Restart{TriggerS: t.Seconds(), LatencyMs: -1, HandoverMs: -1, LastOldMs: -1}
	before := map[int32]bool{}
	i := 0
	for ; i < len(sorted) && sorted[i].End() < t; i++ {
		if s := sorted[i]; s.Class == load.OK && s.Pid != 0 {
			before[s.Pid] = true
			rs.OldPid = s.Pid
		}
	}
	end := t
	for _, s := range sorted[i:] {
		if s.Class != load.OK || s.Pid == 0 {
			continue
		}
		if rs.NewPid == 0 && !before[s.Pid] {
			rs.NewPid = s.Pid
			rs.LatencyMs = ms(s.End() - t)
			end = max(end, s.End())
		}
		if s.Pid == rs.OldPid {
			rs.LastOldMs = ms(s.End() - t)
			end = max(end, s.End())
		}
	}
	if at, ok := stops[rs.OldPid]; ok && rs.OldPid != 0 && at >= t {
		rs.HandoverMs = ms(at - t)
	}
	return rs, end
}

// latencies builds the latency distributions of the complete responses,
// split by whether the request started inside a restart window.
func latencies(samples []load.Sample, windows [][2]int64) (steady, during Latency) {
	hs := hdrhistogram.New(1, int64(time.Minute/time.Microsecond), 3)
	hr := hdrhistogram.New(1, int64(time.Minute/time.Microsecond), 3)
	for _, s := range samples {
		if s.Class != load.OK {
			continue
		}
		us := max(1, s.Latency.Microseconds())
		h := hs
		for _, w := range windows {
			if int64(s.Start) >= w[0] && int64(s.Start) <= w[1] {
				h = hr
				break
			}
		}
		// RecordValue fails only above the highest trackable value, a
		// minute, which the request timeout rules out.
		_ = h.RecordValue(us)
	}
	return summarize(hs), summarize(hr)
}

func summarize(h *hdrhistogram.Histogram) Latency {
	if h.TotalCount() == 0 {
		return Latency{}
	}
	us := func(v int64) float64 { return float64(v) / 1000 }
	return Latency{
		Count: h.TotalCount(),
		P50:   us(h.ValueAtQuantile(50)),
		P99:   us(h.ValueAtQuantile(99)),
		P999:  us(h.ValueAtQuantile(99.9)),
		Max:   us(h.Max()),
	}
}

// timeline counts complete and failed requests per bucket, by end time. A
// last bucket cut short by the end of the run is divided by its own length.
func timeline(samples []load.Sample, d, bucket time.Duration) []Point {
	if bucket <= 0 || d <= 0 {
		return nil
	}
	n := int((d + bucket - 1) / bucket)
	out := make([]Point, n)
	failed := make([]int, n)
	for i := range out {
		out[i] = Point{T: (time.Duration(i) * bucket).Seconds(), ByPid: map[int32]int{}}
	}
	for _, s := range samples {
		i := int(s.End() / bucket)
		if i < 0 || i >= n {
			continue
		}
		if s.Class == load.OK {
			out[i].ByPid[s.Pid]++
		} else {
			failed[i]++
		}
	}
	for i := range out {
		length := min(bucket, d-time.Duration(i)*bucket).Seconds()
		ok := 0
		for _, c := range out[i].ByPid {
			ok += c
		}
		out[i].OKPerSec, out[i].FailPerSec = float64(ok)/length, float64(failed[i])/length
	}
	return out
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
