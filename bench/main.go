// Command bench measures restarts under load: examples/hello run directly,
// restarted naively, under relay binding its own port (bind takeover) and in
// each readiness mode, and under start_server when it is installed, each
// with the same load, in keep-alive and new-connection modes; and what
// relay's bind takeover costs the backend. It writes a markdown table, a
// JSON file and one chart per mode. Run it from the repository root:
//
//	go run ./bench            # or: make bench
//	go run ./bench --help
package main

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/bench/report"
)

const description = `Runs examples/hello under each scenario for --duration, with --concurrency
workers sending requests and --restarts restarts evenly spaced, once per mode:

   direct        hello -bind binds the port itself and is never restarted: the ceiling
   naive         hello -bind is stopped (SIGTERM, wait) and started again
   relay-bind    relay run with its defaults (no --health: auto; takeover auto) and
                 hello -bind, which binds the port itself and sends no sd_notify message
   relay-fd      relay run --takeover off, no --health: hello takes LISTEN_FDS and sends
                 READY=1 (not run by default)
   relay-notify  relay run --health notify (hello sends READY=1); steered drain, the default
   relay-shared  relay-notify with --steer off: one socket shared by both generations
   relay-http    relay run --health http://{health_addr}/healthz (hello's private address)
   relay-delay   relay run --health delay:--delay
   relay-upgrade relay-notify whose "restarts" replace relay itself in place (SIGUSR2, relay
                 upgrade to the same binary): the backend is never restarted (not run by default)
   relay-stop-start  relay-notify whose "restarts" stop relay and start another, as a service
                 manager's restart of relay does without an fd store (not run by default)
   start_server  Server::Starter (Debian: libserver-starter-perl), skipped if absent

Modes: new-conn (a new connection per request) and keep-alive.

Takeover cost (--cost-rounds, 0 skips it): hello restarted --cost-restarts times with no
load, then under keep-alive load with no restart for --cost-duration, in rounds that
reverse the order of hello on an inherited socket (relay --takeover off, LISTEN_FDS), hello
-bind on a taken-over bind (relay's default takeover), both sending READY=1 (--health
notify) with -startup 0, and hello -bind alone for reference. It compares their
throughput, relay's ready_after (from just before relay starts a generation's process to
its READY=1) and how long hello's own net.Listen took.

Tight restarts (--tight-restarts, 0 skips it): relay (steered, --health notify, its
defaults otherwise) and then start_server, each with hello -startup --tight-startup under
the same new-conn load, sent a SIGHUP every --tight-interval whether or not the last restart
has finished, as an operator or an autoscaler would; the default 1.4s is less than the
startup + relay's 1s drain. Per supervisor: restart latency (from a SIGHUP to the first
answer from a process started after it), handover (the new generation's readiness to the
old one's stop signal), the drain relay took (from its "old generation drained" lines; where
it logs none, from its "generation ready" line to the old one's stop signal), failed
requests, and the restarts relay queued or coalesced; median and max.

Memory (--memory-restarts, 0 skips it): relay --health notify (steered, --drain
--memory-drain if given, its defaults otherwise) with hello -startup 0 -lame-duck 0,
restarted N times in a row with "relay restart", no load. relay's VmRSS, RssAnon (its own
memory) and RssFile (mostly its binary, shared by every relay on the host) before the
first restart, after the 1st, 10th, 100th, 250th, 500th, 1000th and last, and after a wait
of at most --memory-settle that ends once RssAnon has stayed the same for 2s. Each restart
takes at least relay's drain: with a fixed 1s drain, 1000 restarts take about 17 minutes.

Worker pool (--pool-duration, 0 skips it): hello -bind -burn --pool-burn, a single-threaded
CPU-bound backend (each request costs that much CPU, one at a time), under relay run
--workers 1 and then --workers 2, each with the same new-conn load for --pool-duration and no
restart: requests per second, their ratio, and each copy's share of the answers.

Everywhere a supervisor's RSS is shown, it is split into RssAnon and RssFile too.

It prints and writes to --out: results.md (the tables), results.json (every figure,
with a timeline), chart-MODE.svg, and logs/ (each run's supervisor and backend output).
A relay (and start_server) with one child and no load is watched for --idle alongside.
--scenarios '' runs none of the scenarios, for the other runs alone.
Nothing here asserts anything: it measures and prints.`

const examples = `
Examples:
   go run ./bench                                   # everything: about 11 minutes, plus 1000 x relay's drain
   go run ./bench --duration 8s --restarts 3 --idle 0 --cost-rounds 0 --tight-restarts 0 --memory-restarts 0 --scenarios direct,relay-bind
   go run ./bench --scenarios direct --modes keep-alive --idle 0 --cost-rounds 5 --tight-restarts 0 --memory-restarts 0   # mostly the takeover cost
   go run ./bench --duration 2m --restarts 40 -c 64 --startup 1s --work 2ms
   go run ./bench --scenarios '' --idle 0 --cost-rounds 0 --memory-restarts 0       # the tight restarts alone
   go run ./bench --scenarios '' --idle 0 --cost-rounds 0 --tight-restarts 0 --memory-restarts 100 --memory-drain 0s
   go run ./bench --scenarios '' --idle 0 --cost-rounds 0 --tight-restarts 0 --memory-restarts 0 --pool-duration 10s   # the worker pool alone
   go run ./bench --tight-restarts 20 --tight-interval 1s --tight-startup 500ms --scenarios '' --idle 0 --cost-rounds 0 --memory-restarts 0`

func main() {
	if err := newApp().Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func newApp() *cli.App {
	return &cli.App{
		Name:        "bench",
		Usage:       "measure restarts under load: direct, naive, relay and start_server",
		UsageText:   "go run ./bench [options]",
		Description: description + "\n" + examples,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "out", Value: "bench-results", Usage: "`DIR` for the results"},
			&cli.DurationFlag{Name: "duration", Value: 30 * time.Second, Usage: "`DURATION` of the load in each run"},
			&cli.IntFlag{Name: "restarts", Value: 10, Usage: "`K` restarts per run, evenly spaced"},
			&cli.IntFlag{Name: "concurrency", Aliases: []string{"c"}, Value: 32, Usage: "`C` concurrent workers"},
			&cli.StringFlag{Name: "modes", Value: "new-conn,keep-alive", Usage: "`MODES` to run, comma-separated"},
			&cli.StringFlag{Name: "scenarios", Value: "direct,naive,relay-bind,relay-notify,relay-shared,relay-http,relay-delay,start_server", Usage: "`NAMES` to run, comma-separated"},
			&cli.DurationFlag{Name: "startup", Value: 300 * time.Millisecond, Usage: "the backend's startup `DURATION` (hello -startup)"},
			&cli.DurationFlag{Name: "work", Value: 0, Usage: "the backend's work `DURATION` per request (hello -work)"},
			&cli.DurationFlag{Name: "lame-duck", Value: time.Second, Usage: "the backend's lame duck `DURATION` (hello -lame-duck)"},
			&cli.BoolFlag{Name: "plain-shutdown", Usage: "the backend just calls http.Server.Shutdown on SIGTERM, no lame duck (hello -plain-shutdown)"},
			&cli.DurationFlag{Name: "delay", Usage: "`DURATION` of relay-delay's --health delay (default: --startup + 200ms)"},
			&cli.DurationFlag{Name: "timeout", Value: 5 * time.Second, Usage: "per-request `TIMEOUT`, connect included"},
			&cli.DurationFlag{Name: "idle", Value: 60 * time.Second, Usage: "`DURATION` to watch an idle supervisor; 0 skips it"},
			&cli.DurationFlag{Name: "bucket", Value: 100 * time.Millisecond, Usage: "timeline and chart resolution `DURATION`"},
			&cli.IntFlag{Name: "cost-rounds", Value: 3, Usage: "`N` rounds of the takeover cost comparison; 0 skips it"},
			&cli.DurationFlag{Name: "cost-duration", Value: 5 * time.Second, Usage: "`DURATION` of the keep-alive load in each takeover cost run"},
			&cli.IntFlag{Name: "cost-restarts", Value: 5, Usage: "`K` restarts after the load in each takeover cost run, for start-time samples"},
			&cli.IntFlag{Name: "tight-restarts", Value: 10, Usage: "`N` restarts in the tight-restarts run (relay and start_server side by side); 0 skips it"},
			&cli.DurationFlag{Name: "tight-interval", Value: 1400 * time.Millisecond, Usage: "`DURATION` between the tight run's restarts, sent whether or not the last one finished"},
			&cli.DurationFlag{Name: "tight-startup", Value: 300 * time.Millisecond, Usage: "the backend's startup `DURATION` in the tight run (hello -startup)"},
			&cli.IntFlag{Name: "memory-restarts", Value: 1000, Usage: "`N` restarts in a row in the memory run (relay restart, no load); 0 skips it"},
			&cli.DurationFlag{Name: "memory-drain", Usage: "relay's --drain `DURATION` in the memory run (default: relay's own)"},
			&cli.DurationFlag{Name: "pool-duration", Value: 10 * time.Second, Usage: "`DURATION` of each run of the worker-pool comparison; 0 skips it"},
			&cli.DurationFlag{Name: "pool-burn", Value: 2 * time.Millisecond, Usage: "CPU `DURATION` the pool run's backend spends on each request (hello -burn)"},
			&cli.DurationFlag{Name: "memory-settle", Value: 10 * time.Second, Usage: "the longest `DURATION` to wait for relay's memory to settle after the memory run's last restart"},
		},
		Action:          benchAction,
		HideHelpCommand: true,
		Commands: []*cli.Command{{
			Name:            "server-starter-exec",
			Hidden:          true,
			Usage:           "(internal) run COMMAND with start_server's sockets as socket activation",
			SkipFlagParsing: true,
			Action: func(c *cli.Context) error {
				args := c.Args().Slice()
				if len(args) > 0 && args[0] == "--" {
					args = args[1:]
				}
				return starterExec(args)
			},
		}},
	}
}

func benchAction(c *cli.Context) error {
	if c.Args().Len() > 0 {
		return fmt.Errorf("unexpected argument %q; see --help", c.Args().First())
	}
	s := &settings{
		duration: c.Duration("duration"), restarts: c.Int("restarts"), workers: c.Int("concurrency"),
		startup: c.Duration("startup"), work: c.Duration("work"), lameDuck: c.Duration("lame-duck"),
		delay: c.Duration("delay"), timeout: c.Duration("timeout"), idle: c.Duration("idle"), bucket: c.Duration("bucket"),
		plainShutdown: c.Bool("plain-shutdown"),
		costRounds:    c.Int("cost-rounds"), costDuration: c.Duration("cost-duration"), costRestarts: c.Int("cost-restarts"),
		tightRestarts: c.Int("tight-restarts"), tightInterval: c.Duration("tight-interval"), tightStartup: c.Duration("tight-startup"),
		memoryRestarts: c.Int("memory-restarts"), memorySettle: c.Duration("memory-settle"),
		poolDuration: c.Duration("pool-duration"), poolBurn: c.Duration("pool-burn"),
	}
	if s.poolDuration < 0 || (s.poolDuration > 0 && s.poolBurn <= 0) {
		return errors.New("--pool-duration must not be negative, --pool-burn positive")
	}
	if c.IsSet("memory-drain") {
		if c.Duration("memory-drain") < 0 {
			return errors.New("--memory-drain must not be negative")
		}
		s.memoryDrain = c.Duration("memory-drain").String()
	}
	if s.tightRestarts < 0 || (s.tightRestarts > 0 && s.tightInterval <= 0) || s.tightStartup < 0 {
		return errors.New("--tight-restarts and --tight-startup must not be negative, --tight-interval positive")
	}
	if s.memoryRestarts < 0 || s.memorySettle < 0 {
		return errors.New("--memory-restarts and --memory-settle must not be negative")
	}
	if s.plainShutdown {
		s.lameDuck = 0
	}
	if s.delay == 0 {
		s.delay = s.startup + 200*time.Millisecond
	}
	if s.duration <= 0 || s.restarts < 0 || s.workers < 1 || s.timeout <= 0 || s.bucket <= 0 || s.idle < 0 {
		return errors.New("--duration, --concurrency, --timeout and --bucket must be positive, --restarts and --idle not negative")
	}
	if s.costRounds < 0 || s.costRestarts < 0 || (s.costRounds > 0 && s.costDuration <= 0) {
		return errors.New("--cost-rounds and --cost-restarts must not be negative, --cost-duration positive")
	}
	modes := strings.Split(c.String("modes"), ",")
	for _, m := range modes {
		if m != "new-conn" && m != "keep-alive" {
			return fmt.Errorf("unknown mode %q: use new-conn and/or keep-alive", m)
		}
	}
	var run []scenario
	var skipped []string
	all := scenarios()
	var names []string
	if c.String("scenarios") != "" {
		names = strings.Split(c.String("scenarios"), ",")
	}
	for _, name := range names {
		i := slices.IndexFunc(all, func(sc scenario) bool { return sc.name == name })
		if i < 0 {
			var known []string
			for _, sc := range all {
				known = append(known, sc.name)
			}
			return fmt.Errorf("unknown scenario %q: choose from %s, or '' for none", name, strings.Join(known, ", "))
		}
		run = append(run, all[i])
	}
	if _, err := os.Stat(filepath.Join("cmd", "relay")); err != nil {
		return errors.New("run it from the repository root (cmd/relay not found here); make bench does")
	}

	began := time.Now()
	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()
	// After the first interrupt, which stops the runs gracefully, a second
	// one kills the benchmark at once.
	go func() { <-ctx.Done(); stop() }()

	out := c.String("out")
	if err := os.MkdirAll(filepath.Join(out, "logs"), 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", out, err)
	}
	work, err := os.MkdirTemp("", "relay-bench-")
	if err != nil {
		return fmt.Errorf("creating a work directory: %w", err)
	}
	defer os.RemoveAll(work)
	s.out, s.tmp = out, work
	if s.self, err = os.Executable(); err != nil {
		return fmt.Errorf("finding this program: %w", err)
	}
	fmt.Fprintln(os.Stderr, "building relay and examples/hello")
	for _, b := range []struct{ pkg, out string }{{"./cmd/relay", "relay"}, {"./examples/hello", "hello"}} {
		// relay is built as the README builds it: CGO_ENABLED=0 and the
		// tags that leave out what it never runs, since its cost is
		// measured here.
		cmd := exec.CommandContext(ctx, "go", "build", "-tags", "nethttpomithttp2,urfave_cli_no_docs", "-o", filepath.Join(work, b.out), b.pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("building %s: %w", b.pkg, err)
		}
	}
	s.relay, s.hello = filepath.Join(work, "relay"), filepath.Join(work, "hello")
	if s.starter, err = exec.LookPath("start_server"); err != nil {
		s.starter = ""
		if i := slices.IndexFunc(run, func(sc scenario) bool { return sc.name == "start_server" }); i >= 0 {
			run = slices.Delete(run, i, i+1)
			skipped = append(skipped, "start_server: not installed (Debian: apt-get install libserver-starter-perl)")
			fmt.Fprintln(os.Stderr, "skipping start_server: not installed (Debian: apt-get install libserver-starter-perl)")
		}
	}

	var notes []string
	// A restart under relay takes the startup, relay's steered drain (1s
	// by default) and the old backend's stop (its lame duck).
	if cycle := s.startup + time.Second + s.lameDuck + 200*time.Millisecond; s.restarts > 0 && s.duration/time.Duration(s.restarts+1) < cycle {
		n := fmt.Sprintf("restarts are %v apart, less than the backend's startup + relay's 1s drain + lame duck + 200ms (%v): a restart may wait for the previous one to finish (relay's --max-draining 1), which adds to its latency",
			s.duration/time.Duration(s.restarts+1), cycle)
		notes = append(notes, n)
		fmt.Fprintln(os.Stderr, "note:", n)
	}
	rep := report.Report{Machine: machine(), Skipped: skipped, Notes: notes, Settings: map[string]string{
		"duration": s.duration.String(), "restarts": strconv.Itoa(s.restarts), "concurrency": strconv.Itoa(s.workers),
		"startup": s.startup.String(), "work": s.work.String(), "lame_duck": s.lameDuck.String(),
		"delay": s.delay.String(), "timeout": s.timeout.String(), "plain_shutdown": strconv.FormatBool(s.plainShutdown),
		"cost_rounds": strconv.Itoa(s.costRounds), "cost_duration": s.costDuration.String(), "cost_restarts": strconv.Itoa(s.costRestarts),
		"tight_restarts": strconv.Itoa(s.tightRestarts), "tight_interval": s.tightInterval.String(), "tight_startup": s.tightStartup.String(),
		"pool_duration": s.poolDuration.String(), "pool_burn": s.poolBurn.String(),
		"memory_restarts": strconv.Itoa(s.memoryRestarts), "memory_drain": cmp.Or(s.memoryDrain, "relay's default"), "memory_settle": s.memorySettle.String(),
	}}

	// The idle supervisors run alongside the matrix: idle, they use next to
	// no CPU, and what they use is their own whatever else runs.
	var idleWG sync.WaitGroup
	// On an interrupt too, the idle runs stop their processes before exit.
	defer idleWG.Wait()
	var idleMu sync.Mutex
	var idleErrs []error
	if s.idle > 0 {
		for _, sc := range all {
			if sc.name == "relay-notify" || (sc.name == "start_server" && s.starter != "") {
				idleWG.Add(1)
				go func() {
					defer idleWG.Done()
					r, err := measureIdle(ctx, s, sc)
					idleMu.Lock()
					defer idleMu.Unlock()
					if err != nil {
						idleErrs = append(idleErrs, err)
						return
					}
					rep.Idle = append(rep.Idle, r)
				}()
			}
		}
	}

	var runErrs []error
	for _, mode := range modes {
		for _, sc := range run {
			fmt.Fprintf(os.Stderr, "%-13s %-10s ", sc.name, mode)
			r, err := runOne(ctx, s, sc, mode)
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "error: %v\n", err)
				runErrs = append(runErrs, fmt.Errorf("%s %s: %w", sc.name, mode, err))
				if r.Scenario == "" {
					continue
				}
			}
			fmt.Fprintf(os.Stderr, "%7d ok  %5d failed  %6.0f ok/s%s\n", r.OK, r.TotalFailed(), r.ReqPerSec, restartSummary(r))
			if len(r.Restarts) > 0 && !slices.ContainsFunc(r.Restarts, func(rs report.Restart) bool { return rs.HandoverMs >= 0 }) {
				n := fmt.Sprintf("%s %s: no stop signal found in the backend's log, so no handover time (is the backend examples/hello?)", sc.name, mode)
				rep.Notes = append(rep.Notes, n)
				fmt.Fprintln(os.Stderr, "note:", n)
			}
			rep.Results = append(rep.Results, r)
		}
	}
	if s.costRounds > 0 {
		cost, err := runCost(ctx, s)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			runErrs = append(runErrs, fmt.Errorf("takeover cost: %w", err))
		}
		rep.Cost = cost
	}
	if s.tightRestarts > 0 {
		if s.starter == "" {
			rep.Skipped = append(rep.Skipped, "start_server in the tight-restarts run: not installed (Debian: apt-get install libserver-starter-perl)")
		}
		tight, err := runTight(ctx, s)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			runErrs = append(runErrs, err)
		}
		rep.Tight = tight
	}
	if s.poolDuration > 0 {
		pool, err := runPool(ctx, s)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			runErrs = append(runErrs, err)
		}
		rep.Pool = pool
	}
	if s.memoryRestarts > 0 {
		mem, err := runMemory(ctx, s)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			runErrs = append(runErrs, err)
		}
		rep.Memory = mem
	}
	if s.idle > 0 {
		fmt.Fprintln(os.Stderr, "waiting for the idle measurement")
	}
	idleWG.Wait()
	slices.SortFunc(rep.Idle, func(a, b report.Idle) int { return strings.Compare(a.Name, b.Name) })
	rep.SetRatios()

	if err := writeOutputs(out, &rep, modes); err != nil {
		return err
	}
	if err := rep.WriteMarkdown(os.Stdout); err != nil {
		return fmt.Errorf("printing the table: %w", err)
	}
	fmt.Fprintf(os.Stderr, "\nwrote %s in %s\n", strings.Join([]string{filepath.Join(out, "results.md"), filepath.Join(out, "results.json"), filepath.Join(out, "chart-*.svg")}, ", "),
		time.Since(began).Round(time.Second))
	return errors.Join(append(runErrs, idleErrs...)...)
}

func restartSummary(r report.Result) string {
	if len(r.Restarts) == 0 {
		return ""
	}
	var lat []float64
	for _, rs := range r.Restarts {
		if rs.LatencyMs >= 0 {
			lat = append(lat, rs.LatencyMs)
		}
	}
	if len(lat) == 0 {
		return "  no restart reached a new pid"
	}
	slices.Sort(lat)
	return fmt.Sprintf("  restart latency p50 %.1f ms max %.1f ms", lat[(len(lat)-1)/2], lat[len(lat)-1])
}

func writeOutputs(out string, rep *report.Report, modes []string) error {
	var md strings.Builder
	if err := rep.WriteMarkdown(&md); err != nil {
		return fmt.Errorf("formatting the table: %w", err)
	}
	if err := os.WriteFile(filepath.Join(out, "results.md"), []byte(md.String()), 0o644); err != nil {
		return fmt.Errorf("writing the table: %w", err)
	}
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding the results: %w", err)
	}
	if err := os.WriteFile(filepath.Join(out, "results.json"), append(js, '\n'), 0o644); err != nil {
		return fmt.Errorf("writing the results: %w", err)
	}
	for _, mode := range modes {
		var runs []report.Result
		for _, r := range rep.Results {
			if r.Mode == mode {
				runs = append(runs, r)
			}
		}
		if len(runs) == 0 {
			continue
		}
		f, err := os.Create(filepath.Join(out, "chart-"+mode+".svg"))
		if err != nil {
			return fmt.Errorf("writing the chart: %w", err)
		}
		title := fmt.Sprintf("Requests per second, %s mode: C=%s, %s restarts in %s, backend startup %s",
			mode, rep.Settings["concurrency"], rep.Settings["restarts"], rep.Settings["duration"], rep.Settings["startup"])
		err = report.WriteChart(f, title, runs)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("writing the chart: %w", err)
		}
	}
	return nil
}

// machine describes where the benchmark ran.
func machine() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	kernel := "Linux"
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		kernel = unix.ByteSliceToString(u.Sysname[:]) + " " + unix.ByteSliceToString(u.Release[:])
	}
	return fmt.Sprintf("%s, %d CPUs, %s, %s", model, runtime.NumCPU(), kernel, runtime.Version())
}
