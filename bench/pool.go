package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"time"

	"github.com/relaysh/relay/bench/load"
	"github.com/relaysh/relay/bench/report"
)

// poolMode is the pool run's load: a new connection per request, so that
// the steering program's hash spreads requests, not a few long
// connections, over the copies.
const poolMode = "new-conn"

// poolCounts are the --workers the pool run compares.
var poolCounts = [...]int{1, 2}

// runPool runs the worker-pool comparison: hello -bind -burn under relay
// run --workers N for each of poolCounts, each with the same load for
// s.poolDuration and no restart. It returns the runs that completed, and
// the errors of the others.
func runPool(ctx context.Context, s *settings) (*report.Pool, error) {
	ps := *s
	ps.startup, ps.work, ps.lameDuck, ps.plainShutdown = 0, 0, 0, false
	pool := &report.Pool{BurnMs: float64(s.poolBurn) / float64(time.Millisecond), DurationS: s.poolDuration.Seconds(),
		Concurrency: s.workers, Mode: poolMode}
	var errs []error
	for _, n := range poolCounts {
		fmt.Fprintf(os.Stderr, "pool --workers %d  ", n)
		r, err := poolRun(ctx, &ps, n)
		if ctx.Err() != nil {
			return pool, ctx.Err()
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "error: %v\n", err)
			errs = append(errs, fmt.Errorf("pool --workers %d: %w", n, err))
			continue
		}
		fmt.Fprintf(os.Stderr, "%7d ok  %5d failed  %6.0f ok/s  shares %s\n", r.OK, r.Failed, r.OKPerSec, r.Shares())
		pool.Runs = append(pool.Runs, r)
	}
	if x, ok := pool.Ratio(2); ok {
		fmt.Fprintf(os.Stderr, "pool: --workers 2 serves %.2f× the requests per second of --workers 1\n", x)
	}
	return pool, errors.Join(errs...)
}

// poolRun runs relay run --workers n with the CPU-bound backend under the
// load for s.poolDuration.
func poolRun(ctx context.Context, s *settings, n int) (report.PoolRun, error) {
	runtime.GC() // the samples of the run before
	sc := scenario{name: "relay-workers-" + strconv.Itoa(n), relayArgs: []string{"--workers", strconv.Itoa(n)},
		backendArgs: []string{"-bind", "-burn", s.poolBurn.String()}, launch: launchRelay}
	run, err := launchServing(ctx, s, sc, sc.name)
	if err != nil {
		return report.PoolRun{}, err
	}
	defer run.close()
	loadCtx, cancel := context.WithTimeout(ctx, s.poolDuration)
	lr := load.Run(loadCtx, load.Config{Addr: run.addr, Workers: s.workers, Timeout: s.timeout}, time.Now())
	cancel()
	if ctx.Err() != nil {
		return report.PoolRun{}, ctx.Err()
	}
	r := report.PoolRun{Workers: n}
	byPid := map[int32]int{}
	for _, smp := range lr.Samples {
		if smp.Class == load.OK {
			r.OK++
			byPid[smp.Pid]++
		} else {
			r.Failed++
		}
	}
	r.OKPerSec = float64(r.OK) / s.poolDuration.Seconds()
	for pid, ok := range byPid {
		r.Copies = append(r.Copies, report.PoolCopy{Pid: int(pid), OK: ok})
	}
	slices.SortFunc(r.Copies, func(a, b report.PoolCopy) int { return cmp.Or(b.OK-a.OK, a.Pid-b.Pid) })
	return r, run.finish()
}
