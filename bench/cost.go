package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/relaysh/relay/bench/load"
	"github.com/relaysh/relay/bench/report"
	"github.com/relaysh/relay/internal/procfs"
)

// costBase is the variant of the takeover cost comparison that the others
// are compared with.
const costBase = "inherited"

// costVariant is one way of giving hello its socket in the takeover cost
// comparison.
type costVariant struct {
	report.CostVariant
	sc scenario
}

// costVariants are the ways compared. Both relay variants wait for READY=1
// (--health notify), which relay sees the moment it arrives, so that their
// start times differ only by what the takeover does; --drain 0 and hello's
// -lame-duck 0 (runCost sets it) keep the restarts, made with no load,
// short.
func costVariants() []costVariant {
	return []costVariant{
		{
			CostVariant: report.CostVariant{Name: costBase,
				What: "`relay run --takeover off --health notify --drain 0 -- hello`: hello takes relay's socket from LISTEN_FDS, no bind takeover; its one net.Listen binds its private health address ($RELAY_HEALTH_ADDR), which is not a --listen port"},
			sc: scenario{name: "cost-inherited", health: "notify", relayArgs: []string{"--takeover", "off", "--drain", "0"}, launch: launchRelay},
		},
		{
			CostVariant: report.CostVariant{Name: "taken-over",
				What: "`relay run --health notify --drain 0 -- hello -bind -notify`: hello binds the port itself and relay takes the bind over (default --takeover auto); hello still sends READY=1"},
			sc: scenario{name: "cost-taken-over", health: "notify", relayArgs: []string{"--drain", "0"}, backendArgs: []string{"-bind", "-notify"}, launch: launchRelay},
		},
		{
			CostVariant: report.CostVariant{Name: "standalone",
				What: "`hello -bind` alone, no relay: its own socket; restarted by stopping and starting it, so no start → ready figure"},
			sc: scenario{name: "cost-standalone", backendArgs: []string{"-bind"}, launch: launchAlone(true)},
		},
	}
}

// runCost runs the takeover cost comparison: s.costRounds rounds, each
// running every variant once, in an order that reverses from one round to
// the next. hello starts with -startup 0 and stops with -lame-duck 0.
// It returns the runs that completed, and the errors of the others.
func runCost(ctx context.Context, s *settings) (*report.Cost, error) {
	cs := *s
	cs.startup, cs.lameDuck, cs.plainShutdown = 0, 0, false
	variants := costVariants()
	cost := &report.Cost{Base: costBase, LoadS: s.costDuration.Seconds()}
	for _, v := range variants {
		cost.Variants = append(cost.Variants, v.CostVariant)
	}
	var errs []error
	for round := 1; round <= s.costRounds; round++ {
		order := slices.Clone(variants)
		if round%2 == 0 {
			slices.Reverse(order)
		}
		for _, v := range order {
			fmt.Fprintf(os.Stderr, "cost %-10s round %d  ", v.Name, round)
			r, err := costRun(ctx, &cs, v, round)
			if ctx.Err() != nil {
				return cost, ctx.Err()
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "error: %v\n", err)
				errs = append(errs, fmt.Errorf("%s round %d: %w", v.Name, round, err))
				if r.Variant == "" {
					continue
				}
			}
			fmt.Fprintf(os.Stderr, "%6.0f ok/s  %d failed  start → ready median %s ms  net.Listen median %s µs  seccomp filters %d\n", r.OKPerSec, r.Failed,
				medianText(r.ReadyMs, 2), medianText(r.ListenUs, 0), r.SeccompFilters)
			cost.Runs = append(cost.Runs, r)
		}
	}
	return cost, errors.Join(errs...)
}

// costRun runs one variant once: s.costRestarts restarts with no load, one
// after the other, then keep-alive load with no restart for
// s.costDuration. The restarts come first, while nothing else runs: right
// after a load, this program's own garbage collection of the samples
// competes with the new generation for the CPU. The start times come from
// the run's log.
func costRun(ctx context.Context, s *settings, v costVariant, round int) (report.CostRun, error) {
	// The same holds for the samples of the run before.
	runtime.GC()
	run, err := launchServing(ctx, s, v.sc, v.sc.name+"-"+strconv.Itoa(round))
	if err != nil {
		return report.CostRun{}, err
	}
	defer run.close()
	var restartErr error
	for i := 1; i <= s.costRestarts && restartErr == nil; i++ {
		if err := restartAndWait(ctx, s, run); err != nil {
			restartErr = fmt.Errorf("restart %d: %w", i, err)
		}
	}

	loadCtx, cancel := context.WithTimeout(ctx, s.costDuration)
	lr := load.Run(loadCtx, load.Config{Addr: run.addr, Workers: s.workers, KeepAlive: true, Timeout: s.timeout}, time.Now())
	cancel()
	if ctx.Err() != nil {
		return report.CostRun{}, ctx.Err()
	}
	r := report.CostRun{Variant: v.Name, Round: round, ReadyMs: []float64{}, ListenUs: []float64{}, SeccompFilters: -1}
	for _, smp := range lr.Samples {
		if smp.Class == load.OK {
			r.OK++
		} else {
			r.Failed++
		}
	}
	r.OKPerSec = float64(r.OK) / s.costDuration.Seconds()
	if pid := lastPid(lr.Samples); pid > 0 {
		if n, err := seccompFilters(int(pid)); err == nil {
			r.SeccompFilters = n
		}
	}

	stopErr := run.finish()
	f, err := os.Open(run.logPath)
	if err != nil {
		return report.CostRun{}, fmt.Errorf("reading the run's log: %w", err)
	}
	defer f.Close()
	ready, listen, err := startTimes(f)
	if err != nil {
		return report.CostRun{}, fmt.Errorf("reading %s: %w", run.logPath, err)
	}
	r.ReadyMs, r.ListenUs = append(r.ReadyMs, ready...), append(r.ListenUs, listen...)
	return r, errors.Join(restartErr, stopErr)
}

// restartAndWait restarts the backend and returns once the restart is
// over: under relay, once "relay restart" has followed it to the old
// generation's exit; alone, once the new process answers.
func restartAndWait(ctx context.Context, s *settings, run *serving) error {
	if run.control == "" {
		if err := run.restart(); err != nil {
			return err
		}
		_, err := waitServing(ctx, run.addr, 30*time.Second, run.exited())
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(rctx, s.relay, "restart", "--control", run.control)
	cmd.Env = cleanEnv()
	cmd.Stdout, cmd.Stderr = run.logf, run.logf
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("relay restart: %w (see %s)", err, run.logPath)
	}
	return nil
}

// startTimes reads a run's log: relay's ready_after of each generation
// (its JSON "generation ready" lines), in ms, and how long each of hello's
// net.Listen calls took (-addr or the health address), in µs.
func startTimes(r io.Reader) (readyMs, listenUs []float64, err error) {
	// The lines examples/hello logs once net.Listen has bound -addr or
	// its private health address, with how long the call took.
	helloListen := regexp.MustCompile(`^time=\S+ level=INFO msg=(?:"bound -addr"|"health listener") .*\btook=("[^"]*"|\S+)`)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "{") {
			var e struct {
				Msg        string `json:"msg"`
				ReadyAfter *int64 `json:"ready_after"` // slog writes a Duration as nanoseconds
			}
			if json.Unmarshal([]byte(line), &e) == nil && e.Msg == "generation ready" && e.ReadyAfter != nil {
				readyMs = append(readyMs, float64(*e.ReadyAfter)/1e6)
			}
			continue
		}
		m := helloListen.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		v := m[1]
		if u, err := strconv.Unquote(v); err == nil {
			v = u
		}
		if d, err := time.ParseDuration(v); err == nil {
			listenUs = append(listenUs, float64(d)/1e3)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, nil, err
	}
	return readyMs, listenUs, nil
}

// lastPid is the pid that sent the last complete response, or 0.
func lastPid(samples []load.Sample) int32 {
	var last load.Sample
	for _, s := range samples {
		if s.Class == load.OK && s.Pid > 0 && s.End() >= last.End() {
			last = s
		}
	}
	return last.Pid
}

// seccompFilters reads how many seccomp filters process pid runs under
// (Seccomp_filters in /proc/PID/status).
func seccompFilters(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("reading the seccomp filters of pid %d: %w", pid, err)
	}
	return parseSeccompFilters(string(b))
}

func parseSeccompFilters(status string) (int, error) {
	n, err := procfs.ParseStatus([]byte(status)).Int("Seccomp_filters")
	if errors.Is(err, procfs.ErrNoField) {
		return 0, errors.New("no Seccomp_filters line (kernel older than 5.9?)")
	}
	return int(n), err
}

// medianText is the median of v with prec decimals, or "—".
func medianText(v []float64, prec int) string {
	if len(v) == 0 {
		return "—"
	}
	return strconv.FormatFloat(report.SpreadOf(v).Median, 'f', prec, 64)
}
