package admin

import (
	"log/slog"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/relaysh/relay/supervisor"
)

// BuildInfo names the relay binary, for relay_build_info, and says how
// often relay was upgraded in place to one (relay upgrade).
type BuildInfo struct {
	Version   string // the main module's version, "(devel)" for a checkout
	GoVersion string // runtime.Version()
	// Upgrades counts relay's upgrades in place since it started;
	// LastUpgrade is when the last one was, zero before the first.
	Upgrades    int
	LastUpgrade time.Time
}

// statusCollector turns one supervisor Status per scrape into relay's
// counters and gauges. The counters are the supervisor's own, which only
// grow for relay's life, so they never go down.
type statusCollector struct {
	status func() (supervisor.Status, error)
	build  BuildInfo
	log    *slog.Logger

	restarts, crashes, liveness, serving, generations, lastTime, lastSuccess, buildInfo *prometheus.Desc
	upgrades, lastUpgrade, rollbacks, confirming, udpFlows                              *prometheus.Desc
	copies, copyReplaced, copyReplacements                                              *prometheus.Desc
}

// generationStates are the states relay_generations reports, each always
// present (0 for none). An exited generation is live while processes of it
// are left (workers finishing, a daemon it started); once none is, it is
// no longer listed.
func generationStates() []supervisor.State {
	return []supervisor.State{supervisor.Starting, supervisor.Serving, supervisor.Warm, supervisor.Draining, supervisor.Stopping, supervisor.Exited}
}

func newStatusCollector(status func() (supervisor.Status, error), build BuildInfo, log *slog.Logger) *statusCollector {
	return &statusCollector{
		status: status, build: build, log: log,
		restarts: prometheus.NewDesc("relay_restarts_total",
			"Requested restarts (signal or relay restart) that ended, by outcome: ok, rolled_back (the new generation failed; the old one serves on) or refused (nothing was started).",
			[]string{"outcome"}, nil),
		crashes: prometheus.NewDesc("relay_crash_replacements_total",
			"Restarts relay began by itself to replace a serving generation that exited.", nil, nil),
		liveness: prometheus.NewDesc("relay_liveness_replacements_total",
			"Restarts relay began by itself to replace a serving generation that failed its liveness check or its watchdog.", nil, nil),
		serving: prometheus.NewDesc("relay_serving_generation",
			"Number of the generation that serves new connections; 0 while none does.", nil, nil),
		generations: prometheus.NewDesc("relay_generations",
			"Generations of which a process is alive, by state; exited: its main process exited, other processes of it have not yet.", []string{"state"}, nil),
		lastTime: prometheus.NewDesc("relay_last_restart_timestamp_seconds",
			"When the last requested restart ended, in seconds since the Unix epoch; absent before the first.", nil, nil),
		lastSuccess: prometheus.NewDesc("relay_last_restart_success",
			"1 if the last requested restart succeeded, 0 if it was rolled back or refused; absent before the first.", nil, nil),
		buildInfo: prometheus.NewDesc("relay_build_info",
			"Always 1; its labels name the relay binary.", []string{"version", "goversion"}, nil),
		rollbacks: prometheus.NewDesc("relay_rollbacks_after_switch_total",
			"Requested restarts rolled back in their confirmation window (relay run --confirm), after the switch, by what failed: exited, liveness, notify (STOPPING=1 or ERRNO= unasked) or manual (relay rollback). They count in relay_restarts_total{outcome=\"rolled_back\"} too.",
			[]string{"reason"}, nil),
		confirming: prometheus.NewDesc("relay_confirm_window_end_timestamp_seconds",
			"When the open confirmation window ends and its new generation is confirmed, in seconds since the Unix epoch; absent while none is open.", nil, nil),
		udpFlows: prometheus.NewDesc("relay_udp_flows",
			"UDP flows (client address and port pairs heard from within the flow idle timeout) that the steered UDP listeners send to each live generation; absent where no UDP listener is steered.",
			[]string{"generation"}, nil),
		copies: prometheus.NewDesc("relay_copy",
			"Always 1, for each copy of each live generation (relay run --workers; one per generation without it); its labels say which, its pid, and its state: starting (not yet ready), ready, or exited (a replacement may be pending).",
			[]string{"generation", "worker", "pid", "state"}, nil),
		copyReplaced: prometheus.NewDesc("relay_copy_replaced",
			"Replacements of each copy of each live generation before the one running now (relay run --workers): a copy that exits, or fails its liveness check or watchdog, while its generation serves is replaced alone.",
			[]string{"generation", "worker"}, nil),
		copyReplacements: prometheus.NewDesc("relay_copy_replacements_total",
			"Copies (relay run --workers) started in place of one that exited or failed while its generation served.", nil, nil),
		upgrades: prometheus.NewDesc("relay_upgrades_total",
			"In-place upgrades of relay's own binary (relay upgrade) since relay started.", nil, nil),
		lastUpgrade: prometheus.NewDesc("relay_last_upgrade_timestamp_seconds",
			"When relay last upgraded its own binary in place, in seconds since the Unix epoch; absent before the first.", nil, nil),
	}
}

// Describe is part of prometheus.Collector.
func (c *statusCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.restarts, c.crashes, c.liveness, c.serving, c.generations, c.lastTime, c.lastSuccess, c.buildInfo, c.upgrades, c.lastUpgrade, c.rollbacks, c.confirming, c.udpFlows, c.copies, c.copyReplaced, c.copyReplacements} {
		ch <- d
	}
}

// Collect is part of prometheus.Collector. Without a status, the scrape
// gets the build info and the histograms only, and the error is logged.
func (c *statusCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(c.buildInfo, prometheus.GaugeValue, 1, c.build.Version, c.build.GoVersion)
	ch <- prometheus.MustNewConstMetric(c.upgrades, prometheus.CounterValue, float64(c.build.Upgrades))
	if !c.build.LastUpgrade.IsZero() {
		ch <- prometheus.MustNewConstMetric(c.lastUpgrade, prometheus.GaugeValue, float64(c.build.LastUpgrade.UnixNano())/1e9)
	}
	st, err := c.status()
	if err != nil {
		c.log.Warn("metrics: relay's counters left out of a scrape", "err", err)
		return
	}
	r := st.Restarts
	for _, o := range []struct {
		outcome string
		n       int
	}{{outcomeOK, r.OK}, {outcomeRolledBack, r.RolledBack}, {outcomeRefused, r.Refused}} {
		ch <- prometheus.MustNewConstMetric(c.restarts, prometheus.CounterValue, float64(o.n), o.outcome)
	}
	for _, cause := range supervisor.RollbackCauses() {
		ch <- prometheus.MustNewConstMetric(c.rollbacks, prometheus.CounterValue, float64(r.AfterSwitch[cause]), string(cause))
	}
	if cf := st.Confirm; cf != nil {
		ch <- prometheus.MustNewConstMetric(c.confirming, prometheus.GaugeValue, float64(cf.Until.UnixNano())/1e9)
	}
	ch <- prometheus.MustNewConstMetric(c.crashes, prometheus.CounterValue, float64(r.Replacements))
	ch <- prometheus.MustNewConstMetric(c.liveness, prometheus.CounterValue, float64(r.LivenessReplacements))
	ch <- prometheus.MustNewConstMetric(c.copyReplacements, prometheus.CounterValue, float64(r.CopyReplacements))
	ch <- prometheus.MustNewConstMetric(c.serving, prometheus.GaugeValue, float64(servingGeneration(st)))
	byState := map[supervisor.State]int{}
	for _, g := range st.Generations {
		byState[g.State]++
		if st.UDPSteered {
			ch <- prometheus.MustNewConstMetric(c.udpFlows, prometheus.GaugeValue, float64(g.UDPFlows), strconv.Itoa(g.Generation))
		}
		gen := strconv.Itoa(g.Generation)
		for _, cp := range g.Copies {
			worker := strconv.Itoa(cp.Worker)
			ch <- prometheus.MustNewConstMetric(c.copies, prometheus.GaugeValue, 1, gen, worker, strconv.Itoa(cp.Pid), cp.State)
			ch <- prometheus.MustNewConstMetric(c.copyReplaced, prometheus.GaugeValue, float64(cp.Replaced), gen, worker)
		}
	}
	for _, s := range generationStates() {
		ch <- prometheus.MustNewConstMetric(c.generations, prometheus.GaugeValue, float64(byState[s]), string(s))
	}
	if l := st.LastRestart; l != nil {
		ch <- prometheus.MustNewConstMetric(c.lastTime, prometheus.GaugeValue, float64(l.Finished.UnixNano())/1e9)
		success := 0.0
		if l.Outcome == supervisor.RestartOK {
			success = 1
		}
		ch <- prometheus.MustNewConstMetric(c.lastSuccess, prometheus.GaugeValue, success)
	}
}
