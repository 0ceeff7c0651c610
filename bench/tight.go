package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/relaysh/relay/bench/load"
	"github.com/relaysh/relay/bench/report"
)

// tightMode is the load of the tight-restarts run: a new connection per
// request, where a generation that does not accept shows at once.
const tightMode = "new-conn"

// tightTailMax bounds how long the load runs on after the last SIGHUP,
// waiting for the restarts to be over.
const tightTailMax = 60 * time.Second

// runTight runs the tight-restarts comparison: relay (steered, --health
// notify, its defaults otherwise) and start_server in turn, each with the
// same backend (hello with s.tightStartup) and the same load, sent
// s.tightRestarts SIGHUPs s.tightInterval apart. It returns the runs that
// completed, and the errors of the others.
func runTight(ctx context.Context, s *settings) (*report.Tight, error) {
	ts := *s
	ts.startup = s.tightStartup
	tg := &report.Tight{Restarts: s.tightRestarts, IntervalS: s.tightInterval.Seconds(), StartupS: s.tightStartup.Seconds(),
		Mode: tightMode, Workers: s.workers}
	var errs []error
	for _, sc := range scenarios() {
		if sc.name != "relay-notify" && (sc.name != "start_server" || s.starter == "") {
			continue
		}
		fmt.Fprintf(os.Stderr, "tight %-12s ", sc.name)
		r, err := tightRun(ctx, &ts, sc)
		if ctx.Err() != nil {
			return tg, ctx.Err()
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "error: %v\n", err)
			errs = append(errs, fmt.Errorf("tight restarts, %s: %w", sc.name, err))
			if r.Supervisor == "" {
				continue
			}
		}
		fmt.Fprintf(os.Stderr, "%7d ok  %5d failed  %s\n", r.OK, r.TotalFailed(), tightSummary(r))
		tg.Runs = append(tg.Runs, r)
	}
	return tg, errors.Join(errs...)
}

// tightRun runs one supervisor: the load starts, a SIGHUP goes out every
// s.tightInterval from then on, and once the last one is over (a process
// started after it is ready and the one it replaced has its stop signal,
// or tightTailMax has passed) the load stops a moment later.
func tightRun(ctx context.Context, s *settings, sc scenario) (report.TightRun, error) {
	run, err := launchServing(ctx, s, sc, "tight-"+sc.name)
	if err != nil {
		return report.TightRun{}, err
	}
	defer run.close()
	st := run.setup
	before, err := readUsage(st.pid())
	if err != nil {
		return report.TightRun{}, err
	}
	base := time.Now()
	loadCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	results := make(chan load.Result, 1)
	go func() {
		results <- load.Run(loadCtx, load.Config{Addr: run.addr, Workers: s.workers, Timeout: s.timeout}, base)
	}()

	var triggers []time.Duration
	var restartErr error
	for i := 1; i <= s.tightRestarts && ctx.Err() == nil; i++ {
		select {
		case <-ctx.Done():
		case <-time.After(time.Until(base.Add(time.Duration(i) * s.tightInterval))):
		}
		if ctx.Err() != nil {
			break
		}
		triggers = append(triggers, time.Since(base))
		if err := st.restart(); err != nil && restartErr == nil {
			restartErr = fmt.Errorf("restart %d: %w", i, err)
		}
	}
	var tailErr error
	if len(triggers) > 0 && ctx.Err() == nil {
		tailErr = waitTightOver(ctx, run.logPath, base, triggers[len(triggers)-1], st.exited())
	}
	// A moment more of load, for the new generation's first answers.
	select {
	case <-ctx.Done():
	case <-time.After(250 * time.Millisecond):
	}
	cancel()
	lr := <-results
	if ctx.Err() != nil {
		return report.TightRun{}, ctx.Err()
	}
	after, err := readUsage(st.pid())
	if err != nil {
		return report.TightRun{}, err
	}
	stopErr := run.finish()
	l, err := readRunLog(run.logPath, base)
	if err != nil {
		return report.TightRun{}, err
	}
	in := report.TightInput{Supervisor: st.supervisor, Samples: lr.Samples, Triggers: triggers,
		Started: l.started, Ready: l.ready, Stops: l.stops, Proc: supervisorUsage(st.supervisor, before, after, after.fds)}
	if st.supervisor == "relay" {
		in.Switched, in.Drained, in.Coalesced, in.Queued = l.switched, l.drained, l.coalesced, l.queued
	}
	return report.AnalyzeTight(in), errors.Join(restartErr, tailErr, stopErr)
}

// waitTightOver waits until the restart triggered at last is over, as the
// log at logPath tells: a backend process started after it has logged
// that it is ready, and the one ready before it has logged its stop
// signal. It gives up after tightTailMax, or when the supervisor exits.
func waitTightOver(ctx context.Context, logPath string, base time.Time, last time.Duration, exited <-chan struct{}) error {
	deadline := time.Now().Add(tightTailMax)
	for {
		l, err := readRunLog(logPath, base)
		if err != nil {
			return err
		}
		if tightOver(l, last) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the last restart was not over %v after it was sent (see %s)", tightTailMax, logPath)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-exited:
			return fmt.Errorf("the supervisor exited during the run (see %s)", logPath)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// tightOver reports whether a process started after last is ready and the
// process ready before it has its stop signal.
func tightOver(l runLog, last time.Duration) bool {
	pids := make([]int32, 0, len(l.ready))
	for pid := range l.ready {
		pids = append(pids, pid)
	}
	slices.SortFunc(pids, func(a, b int32) int { return int(l.ready[a] - l.ready[b]) })
	for i := 1; i < len(pids); i++ {
		if at, ok := l.started[pids[i]]; ok && at >= last-report.StartedSlack {
			_, stopped := l.stops[pids[i-1]]
			return stopped
		}
	}
	return false
}

func tightSummary(r report.TightRun) string {
	lat, hand, drain := r.Figures()
	return fmt.Sprintf("restart latency median %s ms  handover median %s ms  drain median %s ms  %d generations", lat[0], hand[0], drain[0], len(r.Handovers))
}
