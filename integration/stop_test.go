package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/relaysh/relay/internal/procfs"
)

// The stop tests (issue 22). What is left of a generation once its main
// process has exited (here a setsid helper that ignores the stop signal)
// is a generation like any other: it counts against --max-draining, relay
// status shows it, and relay restart reports the old generation gone only
// once nothing of it is alive. A generation replaced because it hung hands
// the connections queued on its socket to the new generation at once.

// stopMarkVar is put, with a value unique to one test, in the environment
// of everything a lingering generation runs: with RELAY_GENERATION, which
// every process of a generation inherits, it tells which generation of
// which test a process belongs to.
const stopMarkVar = "RELAY_STOP_TEST"

const (
	// lingerRestarts is how many restarts run one after another.
	lingerRestarts = 6
	// lingerMaxLive: with --max-draining 1, the serving generation and
	// one other (draining, lingering or starting) at most.
	lingerMaxLive = 2
)

// lingerFlags are relay's flags for the lingering tests: a helper left
// behind is killed one second after its generation's stop signal.
func lingerFlags() []string {
	return []string{"--listen", "127.0.0.1:0", "--max-draining", "1", "--stop-timeout", "1s", "--"}
}

// lingeringChild is a command line for relay whose every generation leaves
// a helper behind: a shell that leaves the process group (setsid), ignores
// TERM, HUP and INT and execs sleep 120, as the daemon of issue 22 does.
// The generation's shell writes the helper's pid to dir/helper-GEN and
// execs testchild in its own place (so LISTEN_PID, its pid, is the
// server's). env puts mark in the environment of all of them.
func lingeringChild(dir, mark string) []string {
	script := fmt.Sprintf(`setsid sh -c 'trap "" TERM HUP INT; exec sleep 120' </dev/null >/dev/null 2>&1 & `+
		`echo $! > %[1]s/helper-{generation}.tmp && mv %[1]s/helper-{generation}.tmp %[1]s/helper-{generation}; exec %[2]s`,
		dir, built.testchild)
	return []string{"/usr/bin/env", stopMarkVar + "=" + mark, "/bin/sh", "-c", script}
}

// newStopMark returns a mark unique to this test, and kills, at the end of
// the test (after relay's own cleanup), whatever process still carries it.
func newStopMark(t *testing.T) string {
	t.Helper()
	mark := fmt.Sprintf("%d.%d", os.Getpid(), time.Now().UnixNano())
	t.Cleanup(func() {
		for _, pids := range markedProcs(mark) {
			for _, pid := range pids {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	return mark
}

// generationOf reads pid's environment: it is a live process of the test
// marked mark, of generation gen. A zombie has no environment, so it is no
// longer one; a reused pid is not either.
func generationOf(pid int, mark string) (gen int, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		return 0, false
	}
	marked := false
	for _, kv := range bytes.Split(b, []byte{0}) {
		k, v, _ := strings.Cut(string(kv), "=")
		switch k {
		case stopMarkVar:
			marked = v == mark
		case "RELAY_GENERATION":
			gen, _ = strconv.Atoi(v)
		}
	}
	return gen, marked && gen > 0
}

// aliveIn reports whether pid is a live process of generation gen.
func aliveIn(pid, gen int, mark string) bool {
	g, ok := generationOf(pid, mark)
	return ok && g == gen
}

// markedProcs lists the live processes of the test marked mark, by
// generation.
func markedProcs(mark string) map[int][]int {
	out := map[int][]int{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if gen, ok := generationOf(pid, mark); ok {
			out[gen] = append(out[gen], pid)
		}
	}
	return out
}

// pidLiveGens samples, where relay has no cgroups, which generations
// have a live process. A generation here is two processes: its main one
// (relay's "generation starting" line names it) and its helper (its pid
// file), each checked by its environment. They are looked at newest
// generation first: a generation never gets a live process back once it
// has none, and an older one was alive before a newer one started, so an
// older one alive when looked at after a newer one was alive with it. The
// sample never counts more than were alive at one instant. It is used by
// one goroutine.
type pidLiveGens struct {
	r         *relayProc
	dir, mark string
	helpers   map[int]int // generation -> its helper's pid, once written
}

func (p *pidLiveGens) live() []int {
	mains := map[int]int{}
	for _, l := range p.r.lines("generation starting", 0) {
		mains[l.num("gen")] = l.num("pid")
	}
	gens := slices.Sorted(maps.Keys(mains))
	slices.Reverse(gens)
	var live []int
	for _, g := range gens {
		if _, ok := p.helpers[g]; !ok {
			if b, err := os.ReadFile(filepath.Join(p.dir, "helper-"+strconv.Itoa(g))); err == nil {
				if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
					p.helpers[g] = pid
				}
			}
		}
		if aliveIn(mains[g], g, p.mark) || (p.helpers[g] > 0 && aliveIn(p.helpers[g], g, p.mark)) {
			live = append(live, g)
		}
	}
	return live
}

// cgroupLiveGens is the sample of the cgroup case: the generations whose
// cgroup (tree/gen-N) has a process, newest first, by cgroup.events. The
// cgroups are read newest first, for the reason procLiveGens gives: the
// count is never more than were populated at one instant.
func cgroupLiveGens(tree string) []int {
	ents, err := os.ReadDir(tree)
	if err != nil {
		return nil
	}
	var gens []int
	for _, e := range ents {
		if n, ok := strings.CutPrefix(e.Name(), "gen-"); ok && e.IsDir() {
			if g, err := strconv.Atoi(n); err == nil {
				gens = append(gens, g)
			}
		}
	}
	slices.Sort(gens)
	slices.Reverse(gens)
	var live []int
	for _, g := range gens {
		if cgroupPopulated(genCgroup(tree, g)) {
			live = append(live, g)
		}
	}
	return live
}

func genCgroup(tree string, gen int) string { return filepath.Join(tree, "gen-"+strconv.Itoa(gen)) }

// cgroupPopulated reports whether the cgroup dir has a process (in it or
// below). One that was removed has none.
func cgroupPopulated(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		return false
	}
	for line := range strings.Lines(string(b)) {
		if strings.TrimSpace(line) == "populated 1" {
			return true
		}
	}
	return false
}

// genSampler samples, from a goroutine of its own, which generations have
// live processes, until stopped, and keeps the sample with the most.
type genSampler struct {
	stopC chan struct{}
	done  chan struct{}
	// Written by the sampling goroutine, read once done is closed.
	samples int
	most    []int
	mostAt  time.Time
}

// startGenSampler samples live every 2 ms, for at most limit.
func startGenSampler(limit time.Duration, live func() []int) *genSampler {
	s := &genSampler{stopC: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		deadline := time.NewTimer(limit)
		defer deadline.Stop()
		for s.samples < 10_000_000 {
			gens := live()
			s.samples++
			if len(gens) > len(s.most) {
				s.most, s.mostAt = gens, time.Now()
			}
			select {
			case <-s.stopC:
				return
			case <-deadline.C:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

// stop ends the sampling and returns the sample with the most live
// generations, when it was taken, and how many samples were taken.
func (s *genSampler) stop() ([]int, time.Time, int) {
	close(s.stopC)
	<-s.done
	return s.most, s.mostAt, s.samples
}

// statusGen is a generation in relay status --json.
type statusGen struct {
	Generation, Pid int
	State           string
	Processes       int
}

// statusGens asks relay status --json for the generations.
func statusGens(ctl string) ([]statusGen, error) {
	out, errOut, code, err := relayCommand(ctl, "status", "--json")
	if err != nil || code != 0 {
		return nil, fmt.Errorf("relay status --json: exit %d (%v): %s", code, err, errOut)
	}
	var doc struct {
		Generations []statusGen `json:"generations"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		return nil, fmt.Errorf("relay status --json: %v: %s", err, out)
	}
	return doc.Generations, nil
}

// restartOutcome is what a relay restart printed and returned, and what
// was alive of the generation it replaced the moment it returned.
type restartOutcome struct {
	stdout, stderr string
	code           int
	err            error
	left           []string
}

// restartAndLook runs relay restart in a goroutine and, as soon as it
// returns, looks for what is alive of generation old: any process of it
// (by the environment of every process), and, with cgroups (tree != ""),
// whether its cgroup has a process.
func restartAndLook(ctl string, old int, mark, tree string) <-chan restartOutcome {
	c := make(chan restartOutcome, 1)
	go func() {
		var o restartOutcome
		o.stdout, o.stderr, o.code, o.err = relayCommand(ctl, "restart")
		o.left = leftOf(old, mark, tree)
		c <- o
	}()
	return c
}

// leftOf describes what is alive of generation gen; nil if nothing.
func leftOf(gen int, mark, tree string) []string {
	var left []string
	if tree != "" && cgroupPopulated(genCgroup(tree, gen)) {
		left = append(left, "its cgroup "+genCgroup(tree, gen)+" has processes")
	}
	for _, pid := range markedProcs(mark)[gen] {
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		left = append(left, fmt.Sprintf("pid %d (%s)", pid, strings.TrimSpace(strings.ReplaceAll(string(cmdline), "\x00", " "))))
	}
	return left
}

// helperPid waits for generation gen's helper to write its pid.
func helperPid(t *testing.T, dir string, gen int) int {
	t.Helper()
	path := filepath.Join(dir, "helper-"+strconv.Itoa(gen))
	waitUntil(t, 30*time.Second, "the helper's pid file "+path, func() bool { return exists(path) })
	return readPid(t, path)
}

// awaitRestart waits for relay restart to return (started by
// restartAndLook) and, meanwhile, asks relay status about the old
// generation gen once it lingers (see lookLingering). It reports whether
// relay status was asked while gen lingered.
func awaitRestart(t *testing.T, ctl string, gen, pid, helper int, mark string, res <-chan restartOutcome) (restartOutcome, bool) {
	t.Helper()
	deadline := time.NewTimer(time.Minute)
	defer deadline.Stop()
	for range 100_000 {
		if lookLingering(t, ctl, gen, pid, helper, mark) {
			select {
			case o := <-res:
				return o, true
			case <-deadline.C:
				t.Fatalf("relay restart did not return within a minute")
			}
		}
		// Nothing announces the main process's exit to the test:
		// poll, every 2 ms.
		select {
		case o := <-res:
			// If gen lingers now, relay status must show it too.
			return o, lookLingering(t, ctl, gen, pid, helper, mark)
		case <-deadline.C:
			t.Fatalf("relay restart did not return within a minute")
		case <-time.After(2 * time.Millisecond):
		}
	}
	t.Fatalf("relay restart did not return after 100000 looks")
	return restartOutcome{}, false
}

// lookLingering asks relay status (--json, then the table) about
// generation gen if it lingers: its main process (pid) has exited and its
// helper lives. The answers are conclusive when the main process had
// exited before relay status was asked and the helper still lived after
// both answered: gen lingered throughout, and relay status must show it,
// in state "exited" with processes. lookLingering reports whether it got a conclusive answer,
// and fails the test if that answer does not show gen so.
func lookLingering(t *testing.T, ctl string, gen, pid, helper int, mark string) bool {
	t.Helper()
	if aliveIn(pid, gen, mark) || !aliveIn(helper, gen, mark) {
		return false
	}
	gens, err := statusGens(ctl)
	if err != nil {
		t.Fatal(err)
	}
	table, errOut, code, err := relayCommand(ctl, "status")
	if err != nil || code != 0 {
		t.Fatalf("relay status: exit %d (%v): %s", code, err, errOut)
	}
	if !aliveIn(helper, gen, mark) {
		return false // it died while relay status ran
	}
	i := slices.IndexFunc(gens, func(g statusGen) bool { return g.Generation == gen })
	if i < 0 || gens[i].State != "exited" || gens[i].Processes < 1 {
		t.Errorf("generation %d lingers (its main process, pid %d, has exited; its helper, pid %d, lives), but relay status --json shows generations %+v; want generation %d in state \"exited\" with processes > 0",
			gen, pid, helper, gens, gen)
	}
	g := strconv.Itoa(gen)
	if procs, _ := strconv.Atoi(column(table, "GEN", g, "PROCS")); column(table, "GEN", g, "STATE") != "exited" || procs < 1 {
		t.Errorf("generation %d lingers, but relay status shows no row for it in STATE exited with PROCS > 0:\n%s", gen, table)
	}
	return true
}

// checkRestart checks what relay restart, which replaced generation old
// (pid), printed and returned, and that nothing of old was alive when it
// returned.
func checkRestart(t *testing.T, o restartOutcome, old, pid int) {
	t.Helper()
	if o.err != nil || o.code != 0 {
		t.Fatalf("relay restart (replacing generation %d): exit %d (%v)\n%s%s", old, o.code, o.err, o.stdout, o.stderr)
	}
	if want := fmt.Sprintf("old generation %d (pid %d) exited", old, pid); !strings.Contains(o.stdout, want) {
		t.Errorf("relay restart printed no %q:\n%s", want, o.stdout)
	}
	if len(o.left) > 0 {
		t.Errorf("relay restart returned 0, reporting generation %d gone, while of it %s was alive; it printed:\n%s",
			old, strings.Join(o.left, ", "), o.stdout)
	}
}

// A generation whose helper (setsid, ignoring TERM, HUP and INT) outlives
// its main process, under --max-draining 1: six restarts one after
// another, then two asked for one right after the other. Throughout, a
// sampler counts the generations with live processes: never more than 2.
// While a generation lingers, relay status --json shows it (state
// "exited", processes > 0), and relay restart returns only once nothing of
// the old generation is alive, looked at the moment it returns.
func TestStopLingeringGenerations(t *testing.T) {
	t.Run("cgroup", func(t *testing.T) {
		dir := t.TempDir()
		mark := newStopMark(t)
		r := startRelay(t, nil, append(lingerFlags(), lingeringChild(dir, mark)...)...)
		tree := requireCgroup(t, r)
		lingeringRestarts(t, r, dir, mark, tree)
	})
	// Where relay has no cgroups: a generation is its process group and
	// the orphans of it that relay adopts (docs/containment.md). The
	// helper, out of the group, is found once the main process has
	// exited and it is reparented to relay.
	t.Run("process group", func(t *testing.T) {
		const nobody = 65534
		dir := tempDirOf(t, nobody, nobody)
		mark := newStopMark(t)
		r := startRelayAs(t, nobody, nobody, append(lingerFlags(), lingeringChild(dir, mark)...)...)
		l, _ := r.waitFor(0, 30*time.Second, "the containment line", func(l logLine) bool {
			return strings.HasPrefix(l.str("msg"), "containment ")
		})
		if l.str("msg") != "containment process-group" {
			t.Fatalf("relay as uid %d logged %q, want containment process-group", nobody, l.str("msg"))
		}
		lingeringRestarts(t, r, dir, mark, "")
	})
}

// lingeringRestarts runs the restarts of TestStopLingeringGenerations on r,
// sampling the generations' cgroups under tree, or, with no tree, their
// processes.
func lingeringRestarts(t *testing.T, r *relayProc, dir, mark, tree string) {
	live := (&pidLiveGens{r: r, dir: dir, mark: mark, helpers: map[int]int{}}).live
	what := "main processes and helpers"
	if tree != "" {
		live = func() []int { return cgroupLiveGens(tree) }
		what = "cgroups under " + tree
	}
	ready, _ := r.waitMsg(0, "generation ready", 1)
	sampler := startGenSampler(5*time.Minute, live)
	stopSampler := sync.OnceValues(func() ([]int, int) {
		most, _, n := sampler.stop()
		return most, n
	})
	defer stopSampler()

	serving, pid := 1, ready.num("pid")
	seen := 0
	for range lingerRestarts {
		helper := helperPid(t, dir, serving)
		res := restartAndLook(r.control, serving, mark, tree)
		o, ok := awaitRestart(t, r.control, serving, pid, helper, mark, res)
		if ok {
			seen++
		} else {
			t.Errorf("generation %d (pid %d): no conclusive relay status while it lingered (its helper, pid %d, died while status ran, or before its main process exited)", serving, pid, helper)
		}
		checkRestart(t, o, serving, pid)
		next, _ := r.waitMsg(0, "generation ready", serving+1)
		serving, pid = serving+1, next.num("pid")
	}

	// Two restarts, the second asked for while the first runs: it is
	// queued, and begins as soon as the first is done (its new generation
	// serves), while the generation the first replaced may still linger.
	// With --max-draining 1 it must wait for that one to be gone before it
	// starts a third.
	first := restartAndLook(r.control, serving, mark, tree)
	r.waitMsg(0, "generation starting", serving+1)
	second := restartAndLook(r.control, serving+1, mark, tree)
	var o1, o2 restartOutcome
	for range 2 {
		select {
		case o1 = <-first:
			first = nil
		case o2 = <-second:
			second = nil
		case <-time.After(2 * time.Minute):
			t.Fatalf("the two restarts did not return within 2 minutes")
		}
	}
	checkRestart(t, o1, serving, pid)
	mid, _ := r.waitMsg(0, "generation ready", serving+1)
	checkRestart(t, o2, serving+1, mid.num("pid"))
	r.waitMsg(0, "generation ready", serving+2)

	most, samples := stopSampler()
	t.Logf("%d restarts; lingering generations seen in relay status: %d of %d; sampled %s %d times: at most %d generations with live processes at once %v",
		lingerRestarts+2, seen, lingerRestarts, what, samples, len(most), most)
	if len(most) > lingerMaxLive {
		t.Errorf("%d generations had live processes at once (generations %v); with --max-draining 1, want at most %d",
			len(most), most, lingerMaxLive)
	}

	if _, errOut, code := r.client("stop"); code != 0 {
		t.Fatalf("relay stop: exit %d: %s", code, errOut)
	}
	r.wait(30 * time.Second)
	if left := markedProcs(mark); len(left) > 0 {
		t.Errorf("after relay stop, processes of generations are alive: %v", left)
	}
}

// reqRecord is one request of a recordedLoad: when it was sent, when it
// was answered or failed, and who answered.
type reqRecord struct {
	sent, done time.Time
	pid        int
	err        error
}

// recordedLoad runs workers that each send requests, a new connection
// each, until stopped or its time limit passes, and records every one.
type recordedLoad struct {
	mu       sync.Mutex
	records  []reqRecord
	inflight map[int]time.Time // worker -> when its request under way was sent
	stopC    chan struct{}
	wg       sync.WaitGroup
}

// startRecordedLoad starts workers that each send at most 100000 requests.
func startRecordedLoad(client *http.Client, url string, workers int, limit time.Duration) *recordedLoad {
	ld := &recordedLoad{inflight: map[int]time.Time{}, stopC: make(chan struct{})}
	deadline := time.Now().Add(limit)
	for w := range workers {
		ld.wg.Add(1)
		go func() {
			defer ld.wg.Done()
			for n := 0; n < 100_000 && time.Now().Before(deadline); n++ {
				select {
				case <-ld.stopC:
					return
				default:
				}
				sent := time.Now()
				ld.mu.Lock()
				ld.inflight[w] = sent
				ld.mu.Unlock()
				pid, err := get(client, url)
				done := time.Now()
				ld.mu.Lock()
				delete(ld.inflight, w)
				ld.records = append(ld.records, reqRecord{sent: sent, done: done, pid: pid, err: err})
				ld.mu.Unlock()
			}
		}()
	}
	return ld
}

func (ld *recordedLoad) stop() {
	close(ld.stopC)
	ld.wg.Wait()
}

// answeredBy counts the answers pid gave so far.
func (ld *recordedLoad) answeredBy(pid int) int {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	n := 0
	for _, r := range ld.records {
		if r.err == nil && r.pid == pid {
			n++
		}
	}
	return n
}

// settledBefore reports whether every request sent before at has its
// answer or its error.
func (ld *recordedLoad) settledBefore(at time.Time) bool {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	for _, sent := range ld.inflight {
		if sent.Before(at) {
			return false
		}
	}
	return true
}

func (ld *recordedLoad) snapshot() []reqRecord {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	return slices.Clone(ld.records)
}

const (
	// hungClientTimeout is the client timeout of issue 22's hung case.
	hungClientTimeout = 2 * time.Second
	// hungWorkers: each worker's request stuck in the hung generation's
	// queue is one queued connection.
	hungWorkers = 8
)

// A serving generation that hangs (testchild's /hang: it stops accepting,
// answers what it had accepted, then stops itself with SIGSTOP) under a
// load of new connections with a 2 s client timeout. relay's liveness
// check replaces it, and the connections queued on its socket are handed
// to the new generation at once, not after --drain (5 s by default, left
// as it is here). No request fails; every request sent after the hang and
// before the switch is answered by the new generation. The time from the
// switch (generation 2's "generation ready") to the last of the queued
// connections answered is logged, with relay's log lines about generation
// 1 after the switch (its handover, its stop).
func TestStopHungGenerationHandsOverItsQueue(t *testing.T) {
	// Liveness: each probe may take the interval, 150 ms, and the next
	// one starts 150 ms after it ended; 2 failures in a row replace the
	// generation. A hang is found at most 4 × 150 ms = 600 ms after it
	// began (a probe passed just before it: 150 ms to the next, which
	// fails 150 ms later, then the same again), and the replacement
	// starts after its 100 ms backoff; the new generation (testchild) is
	// ready a few hundred ms later under -race. The switch comes about
	// 1 s after the hang at worst, which leaves a connection queued at
	// the hang's first instant, answered at once after the switch, most
	// of a second of its 2 s client timeout to spare. A healthy testchild
	// accepts a probe within a few ms, far inside 150 ms.
	r := startRelay(t, nil, "--listen", "127.0.0.1:0",
		"--liveness", "accept", "--liveness-interval", "150ms", "--liveness-failures", "2",
		"--stop-timeout", "1s", "--", built.testchild, "-hang-endpoint")
	addr := r.listenAddrs(1)[0].str("addr")
	ready1, _ := r.waitMsg(0, "generation ready", 1)
	pid1 := ready1.num("pid")
	client := newConnClient()
	client.Timeout = hungClientTimeout
	ld := startRecordedLoad(client, httpURL(addr), hungWorkers, 90*time.Second)
	stopLoad := sync.OnceFunc(ld.stop)
	defer stopLoad()
	waitUntil(t, 30*time.Second, "generation 1 to answer under load", func() bool { return ld.answeredBy(pid1) >= 50 })

	// Once /hang is answered, generation 1 accepts nothing more: what the
	// load sends from here waits in its socket's queue (until the switch).
	who, err := get(client, "http://"+addr+"/hang")
	if err != nil || who != pid1 {
		t.Fatalf("/hang: answered by pid %d (%v), want generation 1's %d", who, err, pid1)
	}
	hungAt := time.Now()
	r.waitRaw("testchild: stopping itself (SIGSTOP) gen=1")
	if line := stderrLineWith(r.output(), "testchild: stopping itself"); !strings.Contains(line, " open=0") {
		t.Fatalf("generation 1 stopped with connections it had accepted still open (%q): their requests fail whatever relay does", line)
	}
	waitUntil(t, 10*time.Second, "generation 1 to be stopped", func() bool {
		st, err := procfs.ReadStat(pid1)
		return err == nil && st.State == 'T'
	})

	ready2, _ := r.waitMsg(0, "generation ready", 2)
	pid2 := ready2.num("pid")
	switchAt := logTime(t, ready2)
	waitUntil(t, 30*time.Second, "every request sent before the switch to have its answer or its error",
		func() bool { return ld.settledBefore(switchAt) })
	n2 := ld.answeredBy(pid2)
	waitUntil(t, 30*time.Second, "more answers from generation 2", func() bool { return ld.answeredBy(pid2) >= n2+50 })
	stopLoad()

	recs := ld.snapshot()
	var failures, waited []reqRecord
	var lastAnswer time.Time
	for _, rec := range recs {
		if rec.err != nil {
			failures = append(failures, rec)
		}
		if !rec.sent.Before(switchAt) || (rec.err == nil && rec.pid == pid1) {
			continue
		}
		// Sent before the switch and not answered by generation 1: it
		// waited in generation 1's queue (or, sent in the switch's last
		// instant, in generation 2's).
		waited = append(waited, rec)
		if rec.err == nil && rec.done.After(lastAnswer) {
			lastAnswer = rec.done
		}
		if rec.err == nil && rec.pid != pid2 {
			t.Errorf("a request sent at hang%s, before the switch, was answered by pid %d; want generation 2 (pid %d)",
				signed(rec.sent.Sub(hungAt)), rec.pid, pid2)
		}
	}
	for i, f := range failures {
		if i == 5 {
			break
		}
		t.Errorf("a request sent at hang%s (switch%s) failed after %s: %v",
			signed(f.sent.Sub(hungAt)), signed(f.sent.Sub(switchAt)), f.done.Sub(f.sent).Round(time.Millisecond), f.err)
	}
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed at a %s client timeout", len(failures), len(recs), hungClientTimeout)
	}
	if len(waited) == 0 {
		t.Errorf("no request was sent between the hang and the switch: no connection waited in generation 1's queue, so this proves nothing")
	}

	t.Logf("load: %d requests, %d failed; generation 1 (pid %d) hung %s before the switch",
		len(recs), len(failures), pid1, switchAt.Sub(hungAt).Round(time.Millisecond))
	for _, l := range r.lines(msgLivenessFailed, 1) {
		t.Logf("generation 1 found failed %s after the hang: %s", logTime(t, l).Sub(hungAt).Round(time.Millisecond), l.str("err"))
	}
	if !lastAnswer.IsZero() {
		t.Logf("%d requests waited for generation 2 (pid %d), %d of them answered; the last answered %s after the switch",
			len(waited), pid2, len(waited)-countFailed(waited), lastAnswer.Sub(switchAt).Round(100*time.Microsecond))
	} else {
		t.Logf("%d requests waited for generation 2 (pid %d); none was answered", len(waited), pid2)
	}
	// What relay said about generation 1 from the switch on: the handover
	// of its queue (a line whose msg speaks of its queue), its stop.
	handover := false
	for _, l := range r.linesWhere(func(l logLine) bool { return l.num("gen") == 1 }) {
		at := logTime(t, l)
		if at.Before(switchAt) {
			continue
		}
		what := "gen 1"
		if strings.Contains(strings.ToLower(l.str("msg")), "queue") {
			what, handover = "gen 1, the handover", true
		}
		t.Logf("switch +%s: %s: %q %s", at.Sub(switchAt).Round(100*time.Microsecond), what, l.str("msg"), logFields(l))
	}
	if !handover {
		t.Logf("relay logged no line about generation 1's queue")
	}

	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exited %d, want 0", code)
	}
}

// signed shows d to the millisecond with its sign: "+5ms", "-2ms". The
// hang is when /hang was answered, so a request sent a moment before it
// may have been queued too.
func signed(d time.Duration) string {
	d = d.Round(time.Millisecond)
	if d < 0 {
		return d.String()
	}
	return "+" + d.String()
}

// countFailed counts the records that failed.
func countFailed(recs []reqRecord) int {
	n := 0
	for _, r := range recs {
		if r.err != nil {
			n++
		}
	}
	return n
}

// stderrLineWith returns the first line of out that contains sub.
func stderrLineWith(out, sub string) string {
	for line := range strings.Lines(out) {
		if strings.Contains(line, sub) {
			return strings.TrimSpace(line)
		}
	}
	return ""
}

// logFields shows a log line's fields other than time, level and msg.
func logFields(l logLine) string {
	var keys []string
	for k := range l {
		switch k {
		case "time", "level", "msg":
		default:
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%s ", k, l.str(k))
	}
	return strings.TrimSpace(b.String())
}
