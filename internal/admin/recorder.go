package admin

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/relaysh/relay/supervisor"
)

// The histograms' buckets, in seconds. Readiness runs from a server's
// first accept (milliseconds) to --health-timeout (60s by default); a
// restart adds its pre-flight check and its drain (5s at most by default).
func readinessBuckets() []float64 {
	return []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}
}

func restartBuckets() []float64 {
	return []float64{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}
}

// Outcome label values of relay_restarts_total and
// relay_restart_duration_seconds: the supervisor's words for them.
const (
	outcomeOK         = string(supervisor.RestartOK)
	outcomeRolledBack = string(supervisor.RestartRolledBack)
	outcomeRefused    = string(supervisor.RestartRefused)
)

// outcomes are the outcome label values, each always present.
func outcomes() []string { return []string{outcomeOK, outcomeRolledBack, outcomeRefused} }

// Recorder keeps the histograms of readiness and restart durations. It is
// the supervisor's Recorder (it is told of each event as it happens) and a
// prometheus.Collector. Its methods never block: an observation is a few
// atomic adds.
type Recorder struct {
	readiness prometheus.Histogram
	restarts  *prometheus.HistogramVec // by outcome
}

var _ supervisor.Recorder = (*Recorder)(nil)

// NewRecorder returns a Recorder with every series present from the start,
// at zero.
func NewRecorder() *Recorder {
	r := &Recorder{
		readiness: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "relay_readiness_seconds",
			Help:    "Time from a generation's start to its readiness, for every generation that became ready.",
			Buckets: readinessBuckets(),
		}),
		restarts: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "relay_restart_duration_seconds",
			Help:    "Time from the begin of a requested restart to its outcome, by outcome.",
			Buckets: restartBuckets(),
		}, []string{"outcome"}),
	}
	for _, o := range outcomes() {
		r.restarts.WithLabelValues(o)
	}
	return r
}

// GenerationReady observes a readiness time.
func (r *Recorder) GenerationReady(_ int, readyAfter time.Duration) {
	r.readiness.Observe(readyAfter.Seconds())
}

// RestartFinished observes a restart's duration under its outcome.
func (r *Recorder) RestartFinished(res supervisor.Result) {
	r.restarts.WithLabelValues(outcomeOf(res)).Observe(res.Duration.Seconds())
}

// outcomeOf is res's outcome label; a Result that says none failed, as
// one that was rolled back.
func outcomeOf(res supervisor.Result) string {
	if res.Outcome == "" {
		return outcomeRolledBack
	}
	return string(res.Outcome)
}

// Describe is part of prometheus.Collector.
func (r *Recorder) Describe(c chan<- *prometheus.Desc) {
	r.readiness.Describe(c)
	r.restarts.Describe(c)
}

// Collect is part of prometheus.Collector.
func (r *Recorder) Collect(c chan<- prometheus.Metric) {
	r.readiness.Collect(c)
	r.restarts.Collect(c)
}
