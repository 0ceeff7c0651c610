package integration

import (
	"bufio"
	"fmt"
	"io"
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

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// adminClient asks relay's admin listener.
type adminClient struct {
	t    *testing.T
	base string
	// seen is the last value of each counter, which must never go down.
	seen map[string]float64
}

func newAdminClient(t *testing.T, r *relayProc) *adminClient {
	t.Helper()
	l, _ := r.waitMsg(0, "admin listener", 0)
	return &adminClient{t: t, base: "http://" + l.str("addr"), seen: map[string]float64{}}
}

// get returns the status code and body of GET path.
func (a *adminClient) get(path string) (int, string) {
	a.t.Helper()
	resp, err := newConnClient().Get(a.base + path)
	if err != nil {
		a.t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		a.t.Fatalf("GET %s: reading: %v", path, err)
	}
	return resp.StatusCode, string(body)
}

// expect checks GET path's status code.
func (a *adminClient) expect(path string, want int) {
	a.t.Helper()
	if code, body := a.get(path); code != want {
		a.t.Errorf("GET %s: %d %q, want %d", path, code, strings.TrimSpace(body), want)
	}
}

// scrape gets /metrics, lints the whole body as promtool check metrics
// does, checks that no counter went down since the last scrape, and
// returns the families by name.
func (a *adminClient) scrape() map[string]*dto.MetricFamily {
	a.t.Helper()
	code, body := a.get("/metrics")
	if code != http.StatusOK {
		a.t.Fatalf("GET /metrics: %d\n%s", code, body)
	}
	problems, err := promlint.New(strings.NewReader(body)).Lint()
	if err != nil {
		a.t.Fatalf("linting /metrics: %v", err)
	}
	for _, p := range problems {
		a.t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		a.t.Fatalf("parsing /metrics: %v\n%s", err, body)
	}
	for name, f := range fams {
		if f.GetType() != dto.MetricType_COUNTER {
			continue
		}
		for _, m := range f.GetMetric() {
			key := name + labelsOf(m)
			v := m.GetCounter().GetValue()
			if v < a.seen[key] {
				a.t.Errorf("counter %s went down: %g, then %g", key, a.seen[key], v)
			}
			a.seen[key] = v
		}
	}
	return fams
}

func labelsOf(m *dto.Metric) string {
	var parts []string
	for _, l := range m.GetLabel() {
		parts = append(parts, l.GetName()+"="+strconv.Quote(l.GetValue()))
	}
	return "{" + strings.Join(parts, ",") + "}"
}

// value is the value of the series name{labels} (labels as "k=v,k=v";
// "" for none): a counter's or a gauge's, a histogram's count; -1 if the
// series is absent.
func value(fams map[string]*dto.MetricFamily, name, labels string) float64 {
	want := "{"
	if labels != "" {
		var parts []string
		for _, kv := range strings.Split(labels, ",") {
			k, v, _ := strings.Cut(kv, "=")
			parts = append(parts, k+"="+strconv.Quote(v))
		}
		slices.Sort(parts) // as labelsOf: the text format sorts labels by name
		want += strings.Join(parts, ",")
	}
	want += "}"
	for _, m := range fams[name].GetMetric() {
		if labelsOf(m) != want {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue()
		case m.Gauge != nil:
			return m.GetGauge().GetValue()
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount())
		}
	}
	return -1
}

// expectValues checks series of one scrape: "name{k=v}" -> value.
func (a *adminClient) expectValues(when string, want map[string]float64) {
	a.t.Helper()
	fams := a.scrape()
	for series, w := range want {
		name, labels, _ := strings.Cut(strings.TrimSuffix(series, "}"), "{")
		if got := value(fams, name, labels); got != w {
			a.t.Errorf("%s: %s = %g, want %g", when, series, got, w)
		}
	}
}

// listeningInode is the inode of the TCP socket listening on 127.0.0.1:port.
func listeningInode(t *testing.T, port int) string {
	t.Helper()
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	local := fmt.Sprintf("0100007F:%04X", port)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 9 && fields[1] == local && fields[3] == "0A" {
			return fields[9]
		}
	}
	t.Fatalf("no socket listens on 127.0.0.1:%d", port)
	return ""
}

// holdsSocket reports whether pid has the socket of inode open.
func holdsSocket(t *testing.T, pid int, inode string) bool {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		if link, err := os.Readlink(filepath.Join(dir, fd.Name())); err == nil && link == "socket:["+inode+"]" {
			return true
		}
	}
	return false
}

// The admin listener's counters move as restarts succeed, roll back and are
// refused, and as a crashed child is replaced; the serving generation's
// number follows; /readyz is 200 while a generation serves and 503 once
// relay stops, while /healthz stays 200; every /metrics body lints, and no
// counter ever goes down. No child holds the admin socket.
func TestMetricsFollowRestarts(t *testing.T) {
	r := startRelay(t, nil, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--health-timeout", "10s",
		"--stop-timeout", "60s", "--", built.testchild)
	r.listenAddrs(1)
	a := newAdminClient(t, r)
	first, from := r.waitMsg(0, "generation ready", 1)
	a.expect("/healthz", 200)
	a.expect("/readyz", 200)
	a.expect("/", 404)
	a.expect("/metricsx", 404)
	a.expectValues("after the first start", map[string]float64{
		"relay_serving_generation": 1, "relay_readiness_seconds": 1,
		"relay_restarts_total{outcome=ok}": 0, "relay_restarts_total{outcome=rolled_back}": 0, "relay_restarts_total{outcome=refused}": 0,
		"relay_generations{state=serving}": 1, "relay_generations{state=starting}": 0,
		"relay_last_restart_success": -1, "relay_build_info{version=(devel),goversion=" + goVersion(t) + "}": 1,
	})
	port, _ := strconv.Atoi(a.base[strings.LastIndexByte(a.base, ':')+1:])
	inode := listeningInode(t, port)
	if holdsSocket(t, first.num("pid"), inode) {
		t.Errorf("the child (pid %d) holds the admin listener's socket", first.num("pid"))
	}
	if !holdsSocket(t, r.pid(), inode) {
		t.Fatalf("relay does not hold the socket found for its admin port (inode %s)", inode)
	}

	restart := func(wantCode int, args ...string) {
		t.Helper()
		if out, errOut, code := r.client("restart", args...); code != wantCode {
			t.Fatalf("relay restart %q: exit %d, want %d\n%s%s", args, code, wantCode, out, errOut)
		}
	}
	restart(0)
	a.expectValues("after a restart", map[string]float64{
		"relay_serving_generation": 2, "relay_readiness_seconds": 2, "relay_restarts_total{outcome=ok}": 1,
		"relay_restart_duration_seconds{outcome=ok}": 1, "relay_last_restart_success": 1,
	})
	restart(3, "--", built.testchild, "-mode", "exit")
	a.expectValues("after a rollback", map[string]float64{
		"relay_serving_generation": 2, "relay_readiness_seconds": 2, "relay_restarts_total{outcome=ok}": 1,
		"relay_restarts_total{outcome=rolled_back}": 1, "relay_restart_duration_seconds{outcome=rolled_back}": 1,
		"relay_last_restart_success": 0,
	})
	restart(3, "--check", "false")
	a.expectValues("after a refused restart", map[string]float64{
		"relay_serving_generation": 2, "relay_restarts_total{outcome=refused}": 1,
		"relay_restart_duration_seconds{outcome=refused}": 1, "relay_last_restart_success": 0,
		"relay_crash_replacements_total": 0,
	})

	// A crash: generation 2 is killed, generation 4 replaces it.
	second, from := r.waitMsg(from, "generation ready", 2)
	if err := syscall.Kill(second.num("pid"), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_, from = r.waitMsg(from, "generation ready", 4)
	a.expectValues("after a crash replacement", map[string]float64{
		"relay_serving_generation": 4, "relay_crash_replacements_total": 1, "relay_readiness_seconds": 3,
		"relay_restarts_total{outcome=ok}": 1, "relay_liveness_replacements_total": 0,
	})

	// The last generation ignores SIGTERM, so relay's stop lasts until
	// the second one.
	restart(0, "--", built.testchild, "-ignore-term")
	r.waitMsg(from, "generation ready", 5)
	a.expect("/readyz", 200)
	r.signal(syscall.SIGTERM)
	r.waitMsg(from, "stopping", 0)
	a.expect("/readyz", 503)
	a.expect("/healthz", 200)
	a.expectValues("while relay stops", map[string]float64{
		"relay_restarts_total{outcome=ok}": 2, "relay_generations{state=stopping}": 1, "relay_generations{state=serving}": 0,
		"relay_serving_generation": 0,
	})
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
	if _, err := newConnClient().Get(a.base + "/healthz"); err == nil {
		t.Errorf("the admin listener still answers after relay exited")
	}
}

func goVersion(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOVERSION").Output()
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

// A bad --metrics is a usage error, one in use the start failure a
// --listen in use is; either way one line naming the flag and the fix, and
// no child starts.
func TestMetricsBadInput(t *testing.T) {
	held, busy := mustFreeTCPAddr(t)
	defer held.Close()
	marker := filepath.Join(t.TempDir(), "started")
	for _, c := range []struct {
		value string
		code  int
		want  []string
	}{
		{"localhost:9090", 2, []string{`--metrics "localhost:9090"`, "not an IP address", "e.g. --metrics 127.0.0.1:9090"}},
		{"9090", 2, []string{`--metrics "9090"`, "not HOST:PORT"}},
		{"127.0.0.1:http", 2, []string{"not a number from 0 to 65535"}},
		{busy, 1, []string{"--metrics " + busy + ": address already in use; pick another port or stop what holds it"}},
	} {
		cmd := exec.Command(built.relay, "run", "--listen", "127.0.0.1:0", "--control", filepath.Join(t.TempDir(), "ctl.sock"),
			"--metrics", c.value, "--", built.testchild, "-report", marker)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		err := cmd.Run()
		out := strings.TrimRight(stderr.String(), "\n")
		if code := cmd.ProcessState.ExitCode(); err == nil || code != c.code {
			t.Errorf("--metrics %s: exit %d (%v), want %d", c.value, code, err, c.code)
		}
		if last := out[strings.LastIndexByte(out, '\n')+1:]; !strings.HasPrefix(last, "relay: ") {
			t.Errorf("--metrics %s: last line %q, want relay's one-line error", c.value, last)
		}
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("--metrics %s: error %q does not say %q", c.value, out, w)
			}
		}
		if _, err := os.Stat(marker); err == nil {
			t.Errorf("--metrics %s: the child was started", c.value)
		}
	}
}
