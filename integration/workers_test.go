package integration

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/relaysh/relay/internal/procfs"
)

// Worker pools (relay run --workers): real single-process servers that bind
// their own port, run as two copies per generation, restarted under a load
// that opens a new connection per request. Every request must be answered,
// both copies of every generation must answer, and each copy must listen on
// one socket of its own, relay's.

// workersRestarts is the number of restarts of each pool.
const workersRestarts = 10

// workersCopies is the copies of each generation.
const workersCopies = 2

// poolServer is a server for restartPool.
type poolServer struct {
	// command is the server's argv for the port; {generation} and
	// {worker} are relay's.
	command func(port int) []string
	// path is what the load asks for, and ident tells who answered.
	path  string
	ident ident
	// who is what ident says of copy worker of generation gen, whose pid
	// is pid.
	who func(gen, worker, pid int) int
	// slow: the server is the conformance app (testdata/conformance),
	// which holds GET /slow until the test lets it go; each restart then
	// has a slow request in flight in the old generation.
	slow bool
	// exitCode is relay's exit code after SIGTERM; -1 for any.
	exitCode int
}

// copyPids reads the pids of a generation's copies from its "generation
// ready" line, by worker.
func copyPids(t *testing.T, ready logLine) []int {
	t.Helper()
	pids := pidsOf(t, ready, workersCopies)
	if ready.num("pid") != pids[0] || ready.num("workers") != workersCopies {
		t.Fatalf("generation %d ready: %v", ready.num("gen"), ready)
	}
	return pids
}

// checkCopySockets checks that each copy of a generation (pids, by worker)
// bound the port once and got a socket of its own from relay: relay logged
// the takeover of its bind for it, with its own socket, and the fd it
// names is a listening socket of the port that relay holds, no other
// copy's. It returns the copies' sockets' inodes.
func checkCopySockets(t *testing.T, r *relayProc, gen int, pids []int, listener string, port int) []string {
	t.Helper()
	taken := r.lines(msgTakenOver, gen)
	if len(taken) != len(pids) {
		t.Fatalf("generation %d: %d %q lines, want one per copy: %v", gen, len(taken), msgTakenOver, taken)
	}
	socks := listening(t, port)
	relays := socketInodes(t, r.pid())
	inodes := make([]string, len(pids))
	for _, l := range taken {
		w := l.num("worker")
		if w < 0 || w >= len(pids) || l.num("bind_pid") != pids[w] || l.str("listener") != listener || l.str("socket") != "own" {
			t.Errorf("generation %d: %v, want the bind of one of its copies %v on its own socket", gen, l, pids)
			continue
		}
		inode := fdInode(t, pids[w], l.num("fd"))
		inodes[w] = inode
		if relays[inode] == nil {
			t.Errorf("generation %d, copy %d (pid %d): its socket %s is not relay's", gen, w, pids[w], inode)
		}
		if !slices.ContainsFunc(socks, func(s listenSock) bool { return s.inode == inode }) {
			t.Errorf("generation %d, copy %d (pid %d): its socket %s is not listening on port %d", gen, w, pids[w], inode, port)
		}
	}
	if inodes[0] == inodes[1] {
		t.Errorf("generation %d: its copies share socket %s", gen, inodes[0])
	}
	return inodes
}

// checkPoolListeners checks, once only generation gen is left, that every
// listening socket on the port is relay's, and that each of gen's copies
// (pids) holds exactly one of them: its own (inodes).
func checkPoolListeners(t *testing.T, r *relayProc, gen int, pids []int, inodes []string, port int) {
	t.Helper()
	socks := listening(t, port)
	relays := socketInodes(t, r.pid())
	for _, s := range socks {
		if relays[s.inode] == nil {
			t.Errorf("after generation %d alone serves: the listening socket %s (inode %s) is not relay's", gen, s.local, s.inode)
		}
	}
	for w, pid := range pids {
		var held []string
		for inode := range socketInodes(t, pid) {
			if slices.ContainsFunc(socks, func(s listenSock) bool { return s.inode == inode }) {
				held = append(held, inode)
			}
		}
		if len(held) != 1 || held[0] != inodes[w] {
			t.Errorf("generation %d, copy %d (pid %d) holds the listening sockets %v of port %d, want its own, %s", gen, w, pid, held, port, inodes[w])
		}
	}
}

// restartPool runs srv as relay run --workers 2 on 127.0.0.1:PORT with no
// --health, restarts it workersRestarts times with SIGHUP under a load of
// new connections, and checks that no request failed, that both copies of
// every generation answered, and each copy's sockets.
func restartPool(t *testing.T, srv poolServer) {
	t.Helper()
	port := freeLoopbackPort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	dir := t.TempDir()
	args := append([]string{"--listen", addr, "--workers", strconv.Itoa(workersCopies), "--"}, srv.command(port)...)
	r := startRelay(t, []string{"CONFORMANCE_DIR=" + dir}, args...)
	listener := r.listenAddrs(1)[0]
	if listener.str("drain") != "steered" {
		t.Fatalf("listener not steered: %v", listener)
	}
	name := listener.str("name")

	// copyOf maps who answered to "generation G, copy W".
	copyOf := map[int]string{}
	ready, from := r.waitMsg(0, "generation ready", 1)
	pids := copyPids(t, ready)
	inodes := checkCopySockets(t, r, 1, pids, name, port)
	checkPoolListeners(t, r, 1, pids, inodes, port)
	members := func(gen int, pids []int) []int {
		ids := make([]int, len(pids))
		for w, pid := range pids {
			ids[w] = srv.who(gen, w, pid)
			copyOf[ids[w]] = fmt.Sprintf("generation %d, copy %d (pid %d)", gen, w, pid)
		}
		return ids
	}
	serving := members(1, pids)
	load := startLoadIdent(httpURL(addr)+strings.TrimPrefix(srv.path, "/"), 8, 5*time.Minute, srv.ident)
	loadStopped := false
	defer func() {
		if !loadStopped {
			load.stop()
		}
	}()
	slowOK := 0
	for gen := 2; gen <= workersRestarts+1; gen++ {
		old := gen - 1
		waitUntil(t, 60*time.Second, fmt.Sprintf("both copies of generation %d to answer", old), answeredBy(load, serving))
		var slow *conformanceSlow
		worker := 0
		if srv.slow {
			slow = startConformanceSlow(old, fmt.Sprintf("http://%s/slow?id=%d&ms=100", addr, old), 3*time.Minute)
			worker = conformanceMarker(t, dir, slow)
			if !slices.Contains(pids, worker) {
				t.Fatalf("slow request %d was received by pid %d, no copy of generation %d %v", old, worker, old, pids)
			}
		}
		r.signal(syscall.SIGHUP)
		ready, from = r.waitMsg(from, "generation ready", gen)
		oldPids := pids
		pids = copyPids(t, ready)
		inodes = checkCopySockets(t, r, gen, pids, name, port)
		serving = members(gen, pids)
		_, from = r.waitFor(from, 60*time.Second, fmt.Sprintf("relay to stop generation %d", old), func(l logLine) bool {
			return l.str("msg") == "stopping generation" && l.num("gen") == old
		})
		if slow != nil {
			select {
			case res := <-slow.done:
				t.Fatalf("slow request %d ended before relay stopped generation %d: %s", old, old, res.describe(nil))
			default:
			}
			writeMode(t, filepath.Join(dir, strconv.Itoa(old)+".go"), "go")
			var res conformanceSlowResult
			select {
			case res = <-slow.done:
			case <-time.After(3 * time.Minute):
				t.Fatalf("slow request %d: no end", old)
			}
			want := append(conformanceFill(), fmt.Sprintf("id=%d pid=%d gen=%d\n", old, worker, old)...)
			if why := res.describe(want); why != "" {
				t.Errorf("slow request %d, in flight in generation %d (copy pid %d of %v) at its stop: %s", old, old, worker, oldPids, why)
			} else {
				slowOK++
			}
		}
		_, from = r.waitMsg(from, "old generation exited", old)
		checkPoolListeners(t, r, gen, pids, inodes, port)
	}
	waitUntil(t, 60*time.Second, "both copies of the last generation to answer", answeredBy(load, serving))
	load.stop()
	loadStopped = true

	requests, failures := load.summary()
	var counts []string
	for _, id := range load.answered() {
		n, _ := load.served(id)
		counts = append(counts, fmt.Sprintf("%s: %d", copyOf[id], n))
		if copyOf[id] == "" {
			t.Errorf("%d answered, which is no copy of any generation", id)
		}
	}
	t.Logf("%d restarts of %d copies: %d requests, %d failed; slow requests answered in full: %d; answers by copy:\n%s",
		workersRestarts, workersCopies, requests, len(failures), slowOK, strings.Join(counts, "\n"))
	noFailures(t, failures, requests)
	checkStatusCopies(t, r, pids)
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); srv.exitCode >= 0 && code != srv.exitCode {
		t.Errorf("relay exit code %d, want %d", code, srv.exitCode)
	}
}

// A Node.js server that binds its own port (server.listen(PORT, HOST)), two
// copies per generation, with a slow request in flight at every restart.
func TestWorkersNode(t *testing.T) {
	t.Parallel()
	node := conformanceProgram(t, "node")
	app := conformanceApp(t, "app.js")
	restartPool(t, poolServer{
		command:  func(port int) []string { return []string{node, app, "127.0.0.1:" + strconv.Itoa(port)} },
		path:     "/",
		ident:    pidHeader,
		who:      func(_, _, pid int) int { return pid },
		slow:     true,
		exitCode: 0,
	})
}

// Python's http.server, two copies per generation. It says nothing of its
// pid, so each copy serves a directory of its own ({generation}.{worker})
// whose file "who" names it. It has no graceful stop (TERM ends it at
// once), so no slow request is sent: one in flight would be lost with or
// without relay.
func TestWorkersPythonHTTPServer(t *testing.T) {
	t.Parallel()
	python := requireProgram(t, "python3", "/usr/bin/python3")
	if out, err := exec.Command(python, "-c", "import http.server").CombinedOutput(); err != nil {
		t.Fatalf("%s has no http.server: %v %s", python, err, out)
	}
	root := t.TempDir()
	who := func(gen, worker, _ int) int { return gen*100 + worker }
	for gen := 1; gen <= workersRestarts+1; gen++ {
		for w := range workersCopies {
			dir := filepath.Join(root, fmt.Sprintf("%d.%d", gen, w))
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			writeMode(t, filepath.Join(dir, "who"), strconv.Itoa(who(gen, w, 0))+"\n")
		}
	}
	restartPool(t, poolServer{
		command: func(port int) []string {
			return []string{python, "-m", "http.server", "--bind", "127.0.0.1",
				"--directory", filepath.Join(root, "{generation}.{worker}"), strconv.Itoa(port)}
		},
		path:     "/who",
		ident:    bodyNumber,
		who:      who,
		exitCode: -1, // SIGTERM ends Python without a handler
	})
}

// answeredBy reports, for waitUntil, whether each of ids has answered the
// load at least once.
func answeredBy(ld *load, ids []int) func() bool {
	return func() bool {
		for _, id := range ids {
			if n, _ := ld.served(id); n == 0 {
				return false
			}
		}
		return true
	}
}

// checkStatusCopies checks that relay status --json lists one generation,
// whose copies are pids, by worker, all ready.
func checkStatusCopies(t *testing.T, r *relayProc, pids []int) {
	t.Helper()
	doc := r.statusJSON(t)
	gens, _ := doc["generations"].([]any)
	if len(gens) != 1 {
		t.Fatalf("relay status lists %d generations, want 1: %v", len(gens), doc["generations"])
	}
	copies, _ := gens[0].(map[string]any)["copies"].([]any)
	var got []string
	for _, c := range copies {
		m, _ := c.(map[string]any)
		got = append(got, fmt.Sprintf("%v:%v:%v", m["worker"], m["pid"], m["state"]))
	}
	var want []string
	for w, pid := range pids {
		want = append(want, fmt.Sprintf("%d:%d:ready", w, pid))
	}
	if !slices.Equal(got, want) {
		t.Errorf("relay status lists the copies %q, want %q", got, want)
	}
}

// kill -9 of one copy of a Node.js server under a load of new connections:
// the other copy serves on, no request sent after the kill fails, and relay
// replaces the copy alone, on the same socket, and the replacement takes
// its share again. What the killed copy had accepted (a slow request held
// in it, and whatever of the load it was serving) is lost with it, and
// counted apart.
func TestWorkersKillOneCopy(t *testing.T) {
	t.Parallel()
	node := conformanceProgram(t, "node")
	app := conformanceApp(t, "app.js")
	port := freeLoopbackPort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	dir := t.TempDir()
	r := startRelay(t, []string{"CONFORMANCE_DIR=" + dir}, "--listen", addr, "--workers", "2", "--", node, app, addr)
	name := r.listenAddrs(1)[0].str("name")
	ready, from := r.waitMsg(0, "generation ready", 1)
	pids := copyPids(t, ready)
	inodes := checkCopySockets(t, r, 1, pids, name, port)
	load := startLoadIdent(httpURL(addr), 8, 5*time.Minute, pidHeader)
	loadStopped := false
	defer func() {
		if !loadStopped {
			load.stop()
		}
	}()
	waitUntil(t, 60*time.Second, "both copies to answer", answeredBy(load, pids))

	// A slow request held by copy 1: the hash of its source port picks
	// the copy, so send them until one lands there; those that land on
	// copy 0 are let go.
	var held *conformanceSlow
	for id := 1; id <= 40 && held == nil; id++ {
		s := startConformanceSlow(id, fmt.Sprintf("http://%s/slow?id=%d&ms=0", addr, id), 3*time.Minute)
		if conformanceMarker(t, dir, s) == pids[1] {
			held = s
			break
		}
		writeMode(t, filepath.Join(dir, strconv.Itoa(id)+".go"), "go")
		if res := <-s.done; res.err != nil || res.status != http.StatusOK {
			t.Fatalf("slow request %d to copy 0: %s", id, res.describe(nil))
		}
	}
	if held == nil {
		t.Fatal("no slow request of 40 reached copy 1")
	}
	before0, _ := load.served(pids[0])
	killedAt := time.Now()
	if err := syscall.Kill(pids[1], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	exited, from := r.waitFor(from, 30*time.Second, "copy 1 to exit", func(l logLine) bool {
		return strings.HasPrefix(l.str("msg"), "copy exited on its own") && l.num("worker") == 1
	})
	if exited.num("pid") != pids[1] || exited.num("gen") != 1 {
		t.Errorf("exited: %v, want generation 1's copy 1, pid %d", exited, pids[1])
	}
	replaced, _ := r.waitFor(from, 60*time.Second, "copy 1's replacement to serve", func(l logLine) bool {
		return l.str("msg") == "copy replaced and serving" && l.num("worker") == 1
	})
	newPid := replaced.num("pid")
	if newPid == pids[1] || newPid == 0 || replaced.num("gen") != 1 {
		t.Fatalf("replacement: %v", replaced)
	}
	between, _ := load.served(pids[0])
	waitUntil(t, 60*time.Second, "the replacement to take its share", func() bool {
		n, _ := load.served(newPid)
		return n >= 20
	})
	res := <-held.done
	lost := res.describe(append(conformanceFill(), fmt.Sprintf("id=%d pid=%d gen=1\n", held.id, pids[1])...))
	if lost == "" {
		t.Errorf("the slow request held by the killed copy was answered in full")
	}
	load.stop()
	loadStopped = true

	// The replacement got copy 1's socket, and is the only other copy.
	now := []int{pids[0], newPid}
	taken := r.lines(msgTakenOver, 1)
	last := taken[len(taken)-1]
	if last.num("bind_pid") != newPid || last.num("worker") != 1 || fdInode(t, newPid, last.num("fd")) != inodes[1] {
		t.Errorf("the replacement's bind: %v, want pid %d on copy 1's socket %s", last, newPid, inodes[1])
	}
	checkPoolListeners(t, r, 1, now, inodes, port)
	checkStatusCopies(t, r, now)
	requests, _ := load.summary()
	lostBefore, failedAfter := load.failuresSent(killedAt)
	served0, _ := load.served(pids[0])
	served1, _ := load.served(pids[1])
	servedNew, _ := load.served(newPid)
	t.Logf("kill -9 of copy 1 (pid %d): the killed copy had accepted and lost the slow request (%s) and %d requests of the load; "+
		"requests sent after the kill: %d failed of %d in all; copy 0 (pid %d) answered %d (%d while copy 1 was being replaced), "+
		"copy 1 %d before the kill, its replacement (pid %d) %d",
		pids[1], lost, len(lostBefore), len(failedAfter), requests, pids[0], served0, between-before0, served1, newPid, servedNew)
	noFailures(t, failedAfter, requests)
	if between <= before0 {
		t.Errorf("copy 0 answered nothing while copy 1 was being replaced")
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// nodeCopiesAlive counts relay's children that run the conformance app and
// have not exited (zombies, exited but not yet reaped, do not count).
func nodeCopiesAlive(relay int, app string) int {
	n := 0
	for _, pid := range procfs.Children(relay) {
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !strings.Contains(string(cmdline), app) {
			continue
		}
		if st, err := procfs.ReadStatus(pid); err == nil && !strings.HasPrefix(st["State"], "Z") {
			n++
		}
	}
	return n
}

// A rolling restart (--workers 4 --rolling 1) of a Node.js server that
// binds its own port, 5 times under a load of new connections, with a slow
// request in flight in a copy of the old generation each time: a sampler
// reading relay's children every millisecond never sees more than 5 copies
// alive, and sees 5, no request fails, every slow request is answered in
// full by the copy that received it, and all 4 copies of every generation
// answer.
func TestWorkersRolling(t *testing.T) {
	t.Parallel()
	const copies, k, restarts = 4, 1, 5
	node := conformanceProgram(t, "node")
	app := conformanceApp(t, "app.js")
	port := freeLoopbackPort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	dir := t.TempDir()
	r := startRelay(t, []string{"CONFORMANCE_DIR=" + dir}, "--listen", addr, "--workers", strconv.Itoa(copies), "--rolling", strconv.Itoa(k), "--", node, app, addr)
	ready, from := r.waitMsg(0, "generation ready", 1)
	pids := pidsOf(t, ready, copies)

	stopSampling := make(chan struct{})
	sampled := make(chan [2]int, 1) // the most alive at once, and the samples
	go func() {
		most, samples := 0, 0
		for {
			select {
			case <-stopSampling:
				sampled <- [2]int{most, samples}
				return
			default:
			}
			most = max(most, nodeCopiesAlive(r.pid(), app))
			samples++
			time.Sleep(time.Millisecond)
		}
	}()
	load := startLoadIdent(httpURL(addr), 8, 5*time.Minute, pidHeader)
	loadStopped := false
	defer func() {
		if !loadStopped {
			load.stop()
			close(stopSampling)
		}
	}()
	for gen := 2; gen <= restarts+1; gen++ {
		old := gen - 1
		waitUntil(t, 60*time.Second, fmt.Sprintf("the copies of generation %d to answer", old), answeredBy(load, pids))
		slow := startConformanceSlow(old, fmt.Sprintf("http://%s/slow?id=%d&ms=100", addr, old), 3*time.Minute)
		worker := conformanceMarker(t, dir, slow)
		restart := startConformanceRestart(r)
		stopped, _ := r.waitFor(from, 120*time.Second, fmt.Sprintf("relay to stop the copy pid %d holding slow request %d", worker, old), func(l logLine) bool {
			return (l.str("msg") == "leaving copy drained; stopping it" && l.num("pid") == worker) ||
				(l.str("msg") == "stopping generation" && l.num("gen") == old)
		})
		t.Logf("restart %d: %s (gen %d, pid %d)", old, stopped.str("msg"), stopped.num("gen"), stopped.num("pid"))
		writeMode(t, filepath.Join(dir, strconv.Itoa(old)+".go"), "go")
		var res conformanceSlowResult
		select {
		case res = <-slow.done:
		case <-time.After(3 * time.Minute):
			t.Fatalf("slow request %d: no end", old)
		}
		want := append(conformanceFill(), fmt.Sprintf("id=%d pid=%d gen=%d\n", old, worker, old)...)
		if why := res.describe(want); why != "" {
			t.Errorf("slow request %d, held by pid %d of generation %d at its stop: %s", old, worker, old, why)
		}
		var outcome conformanceRestart
		select {
		case outcome = <-restart:
		case <-time.After(3 * time.Minute):
			t.Fatalf("relay restart %d did not return", old)
		}
		if outcome.err != nil || outcome.code != 0 {
			t.Fatalf("relay restart %d: exit %d, %v\n%s%s", old, outcome.code, outcome.err, outcome.stdout, outcome.stderr)
		}
		ready, _ = r.waitMsg(from, "generation ready", gen)
		pids = pidsOf(t, ready, copies)
		batches := r.linesWhere(func(l logLine) bool {
			return l.num("gen") == gen && strings.HasPrefix(l.str("msg"), "rolling restart: ") && strings.Contains(l.str("msg"), "batch is ready")
		})
		if len(batches) != copies/k {
			t.Errorf("restart %d: %d batch lines, want %d: %v", old, len(batches), copies/k, batches)
		}
		_, from = r.waitMsg(from, "old generation exited", old)
	}
	waitUntil(t, 60*time.Second, "the copies of the last generation to answer", answeredBy(load, pids))
	load.stop()
	close(stopSampling)
	loadStopped = true
	s := <-sampled
	requests, failures := load.summary()
	t.Logf("%d rolling restarts of %d copies, %d at a time: %d requests, %d failed; at most %d copies alive in %d samples",
		restarts, copies, k, requests, len(failures), s[0], s[1])
	noFailures(t, failures, requests)
	if s[0] > copies+k {
		t.Errorf("%d copies alive at once, want at most %d", s[0], copies+k)
	}
	if s[0] < copies+k {
		t.Errorf("never more than %d copies alive in %d samples: the sampler missed every batch's %d", s[0], s[1], copies+k)
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// pidsOf reads the pids of a generation's n copies from its "generation
// ready" line.
func pidsOf(t *testing.T, ready logLine, n int) []int {
	t.Helper()
	raw, _ := ready["pids"].([]any)
	if len(raw) != n {
		t.Fatalf("generation %d ready with pids %v, want %d", ready.num("gen"), ready["pids"], n)
	}
	pids := make([]int, n)
	for i, v := range raw {
		f, _ := v.(float64)
		pids[i] = int(f)
	}
	return pids
}

// A rolling restart whose third new copy fails at its start falls back,
// under a load of new connections: no request fails, relay restart reports
// the rollback with the copy's stderr, and the old generation serves on
// with its 4 copies (the two that had left started again), never more than
// 5 alive.
func TestWorkersRollingFallsBack(t *testing.T) {
	t.Parallel()
	const copies, k = 4, 1
	node := conformanceProgram(t, "node")
	app := conformanceApp(t, "app.js")
	port := freeLoopbackPort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	r := startRelay(t, []string{"CONFORMANCE_DIR=" + t.TempDir()}, "--listen", addr, "--workers", strconv.Itoa(copies), "--rolling", strconv.Itoa(k), "--", node, app, addr)
	ready, from := r.waitMsg(0, "generation ready", 1)
	pids := pidsOf(t, ready, copies)
	stopSampling := make(chan struct{})
	sampled := make(chan int, 1)
	go func() {
		most := 0
		for {
			select {
			case <-stopSampling:
				sampled <- most
				return
			default:
			}
			most = max(most, nodeCopiesAlive(r.pid(), app))
			time.Sleep(time.Millisecond)
		}
	}()
	load := startLoadIdent(httpURL(addr), 8, 5*time.Minute, pidHeader)
	waitUntil(t, 60*time.Second, "the copies of generation 1 to answer", answeredBy(load, pids))
	stdout, stderr, code := r.client("restart", "--", "env", "FAIL_WORKER=2", node, app, addr)
	if code != 3 || !strings.Contains(stdout+stderr, "FAIL_WORKER") {
		t.Errorf("relay restart into a failing copy 2: exit %d, want 3 with its stderr\n%s%s", code, stdout, stderr)
	}
	_, from = r.waitFor(from, 60*time.Second, "the fall back", func(l logLine) bool {
		return strings.HasPrefix(l.str("msg"), "rolling restart failed half-way")
	})
	fellBack := from
	// Copies 0 and 1 of generation 1 left; both start again.
	var again []int
	for range 2 {
		var l logLine
		l, from = r.waitFor(from, 60*time.Second, "an old copy to serve again", func(l logLine) bool {
			return l.str("msg") == "copy replaced and serving" && l.num("gen") == 1
		})
		again = append(again, l.num("pid"))
	}
	now := []int{0, 0, pids[2], pids[3]}
	for _, pid := range again {
		for w, old := range pids[:2] {
			if l := r.linesWhere(func(l logLine) bool {
				return l.str("msg") == "the old generation's copy started again after the rolling restart failed" && l.num("pid") == pid && l.num("replaces_pid") == old
			}); len(l) == 1 {
				now[w] = pid
			}
		}
	}
	if slices.Contains(now, 0) {
		t.Fatalf("the old copies started again %v do not replace copies 0 and 1 %v", again, pids[:2])
	}
	r.waitMsg(fellBack, "restart finished", 2)
	waitUntil(t, 60*time.Second, "the old generation's 4 copies to answer", answeredBy(load, now))
	load.stop()
	close(stopSampling)
	most := <-sampled
	requests, failures := load.summary()
	t.Logf("a rolling restart failing at copy 2: %d requests, %d failed; at most %d copies alive; generation 1 serves with %v", requests, len(failures), most, now)
	noFailures(t, failures, requests)
	if most > copies+k {
		t.Errorf("%d copies alive at once, want at most %d", most, copies+k)
	}
	checkStatusCopies(t, r, now)
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}

// --liveness per copy: one of two Node.js copies hangs (SIGSTOP) under a
// load of new connections. Its probes, steered to its own socket, fail; it
// alone leaves the spread, gets the stop signal (and SIGCONT), and is
// replaced on the same socket. Its sibling serves throughout, and no
// request fails: what waited on the hung copy's socket is served by the
// copy itself once it runs again, or by its replacement.
func TestWorkersLivenessReplacesOneCopy(t *testing.T) {
	t.Parallel()
	node := conformanceProgram(t, "node")
	app := conformanceApp(t, "app.js")
	port := freeLoopbackPort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	r := startRelay(t, []string{"CONFORMANCE_DIR=" + t.TempDir()}, "--listen", addr, "--workers", "2",
		"--liveness", "http://"+addr+"/healthz", "--liveness-interval", "500ms", "--liveness-failures", "2", "--", node, app, addr)
	ready, from := r.waitMsg(0, "generation ready", 1)
	pids := copyPids(t, ready)
	load := startLoadIdent(httpURL(addr), 8, 5*time.Minute, pidHeader)
	loadStopped := false
	defer func() {
		if !loadStopped {
			load.stop()
		}
	}()
	waitUntil(t, 60*time.Second, "both copies to answer", answeredBy(load, pids))
	if err := syscall.Kill(pids[1], syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	failed, from := r.waitFor(from, 30*time.Second, "copy 1 to fail its liveness check", func(l logLine) bool {
		return strings.HasPrefix(l.str("msg"), "copy failed its liveness check") && l.num("worker") == 1
	})
	if failed.num("pid") != pids[1] {
		t.Errorf("failed: %v, want copy 1, pid %d", failed, pids[1])
	}
	replaced, _ := r.waitFor(from, 60*time.Second, "copy 1's replacement to serve", func(l logLine) bool {
		return l.str("msg") == "copy replaced and serving" && l.num("worker") == 1
	})
	newPid := replaced.num("pid")
	waitUntil(t, 60*time.Second, "the replacement to take its share", func() bool {
		n, _ := load.served(newPid)
		return n >= 20
	})
	load.stop()
	loadStopped = true
	if l := r.lines("copy failed its liveness check; stopping it, to replace it alone", 1); len(l) != 1 {
		t.Errorf("%d copies failed their liveness check, want 1: %v", len(l), l)
	}
	requests, failures := load.summary()
	served0, _ := load.served(pids[0])
	servedNew, _ := load.served(newPid)
	t.Logf("copy 1 (pid %d) hung: replaced by pid %d; %d requests, %d failed; copy 0 (pid %d) answered %d, the replacement %d",
		pids[1], newPid, requests, len(failures), pids[0], served0, servedNew)
	noFailures(t, failures, requests)
	checkStatusCopies(t, r, []int{pids[0], newPid})
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}
