package main

import (
	"strings"
	"testing"
	"time"

	"github.com/relaysh/relay/bench/report"
)

// A restart as today's main logs it (a fixed drain, no drained line):
// relay's JSON lines and hello's text lines, interleaved in one log, with
// lines that must be ignored.
var fixedDrainLog = []string{
	`start_server (pid:700) starting now...`,
	`{"time":"2026-12-01T09:00:00.000000000Z","level":"INFO","msg":"relay starting","pid":700}`,
	`{"time":"2026-12-01T09:00:00.001000000Z","level":"INFO","msg":"generation starting","gen":1,"pid":101,"cmd":["/tmp/hello"],"check":"notify"}`,
	`time=2026-12-01T09:00:00.003Z level=INFO msg=listener pid=101 generation=1 name=tcp-39265 addr=127.0.0.1:39265`,
	`time=2026-12-01T09:00:00.303Z level=INFO msg="ready, sent READY=1" pid=101 generation=1`,
	`{"time":"2026-12-01T09:00:00.303500000Z","level":"INFO","msg":"generation ready","gen":1,"pid":101,"ready_after":302500000}`,
	`{"time":"2026-12-01T09:00:01.000000000Z","level":"INFO","msg":"restart begun","reason":"SIGHUP"}`,
	`{"time":"2026-12-01T09:00:01.000400000Z","level":"INFO","msg":"generation starting","gen":2,"pid":102,"cmd":["/tmp/hello"]}`,
	// hello's times are truncated to the millisecond: its first line
	// can read earlier than relay's.
	`time=2026-12-01T09:00:01.000Z level=INFO msg=listener pid=102 generation=2 name=tcp-39265 addr=127.0.0.1:39265`,
	`{"time":"2026-12-01T09:00:01.100000000Z","level":"INFO","msg":"restart requested during a restart; queued","reason":"SIGHUP","queued":1}`,
	`{"time":"2026-12-01T09:00:01.200000000Z","level":"INFO","msg":"restart requested during a restart; coalesced with a queued one","reason":"SIGHUP"}`,
	`{"time":"2026-12-01T09:00:01.250000000Z","level":"INFO","msg":"restart requested during a restart; coalesced with a queued one","reason":"control"}`,
	`time=2026-12-01T09:00:01.301Z level=INFO msg="ready, sent READY=1" pid=102 generation=2`,
	`{"time":"2026-12-01T09:00:01.301700000Z","level":"INFO","msg":"generation ready","gen":2,"pid":102,"ready_after":301300000}`,
	`{"time":"2026-12-01T09:00:01.301800000Z","level":"INFO","msg":"old generation draining","gen":1,"pid":101,"drain":1000000000}`,
	`{"time":"2026-12-01T09:00:02.302000000Z","level":"INFO","msg":"stopping generation","gen":1,"pid":101,"signal":"TERM"}`,
	`time=2026-12-01T09:00:02.302Z level=INFO msg=stopping pid=101 generation=1 signal=terminated`,
	`time=2026-12-01T09:00:02.302Z level=INFO msg="lame duck" pid=101 generation=1 duration=1s`,
	`time=2026-12-01T09:00:02.400Z level=INFO msg="signal during startup, exiting" pid=103 generation=3 signal=terminated`,
	`time=2026-12-01T09:00:02.500Z level=INFO msg=stopping pid=103 generation=3 signal=terminated`,
	`{"time":"2026-12-01T09:00:03.000000000Z","level":"INFO","msg":"stopping","signal":"TERM","stop_timeout":10000000000}`,
	`restart accepted`,
	`{not json`,
	`time=2026-12-01T09:00:03.000Z level=INFO msg="unterminated pid=104 generation=4`,
}

var base0 = time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)

func TestParseRunLogFixedDrain(t *testing.T) {
	l, err := parseRunLog(strings.NewReader(strings.Join(fixedDrainLog, "\n")), base0)
	if err != nil {
		t.Fatal(err)
	}
	ms := func(f float64) time.Duration { return time.Duration(f * float64(time.Millisecond)) }
	wantMap := func(name string, got, want map[int32]time.Duration) {
		t.Helper()
		if len(got) != len(want) {
			t.Errorf("%s: %v, want %v", name, got, want)
			return
		}
		for pid, at := range want {
			if got[pid] != at {
				t.Errorf("%s: %v, want %v", name, got, want)
				return
			}
		}
	}
	// relay's own pid (700) is no backend: no generation starting line.
	wantMap("started", l.started, map[int32]time.Duration{101: ms(1), 102: ms(1000), 103: ms(2400)})
	wantMap("ready", l.ready, map[int32]time.Duration{101: ms(303), 102: ms(1301)})
	wantMap("switched", l.switched, map[int32]time.Duration{101: ms(303.5), 102: ms(1301.7)})
	// The first stop line per pid; relay's own "stopping" is not a backend's.
	wantMap("stops", l.stops, map[int32]time.Duration{101: ms(2302), 103: ms(2400)})
	if len(l.drained) != 0 {
		t.Errorf("drained %+v from a log with no drained line", l.drained)
	}
	if l.queued != 1 || l.coalesced != 2 {
		t.Errorf("queued %d coalesced %d, want 1 and 2", l.queued, l.coalesced)
	}
}

func TestParseRunLogDrainedLines(t *testing.T) {
	// The adaptive drain's line, in relay's JSON (a Duration as
	// nanoseconds, or as a string where relay formats it) and in its
	// text format.
	log := strings.Join([]string{
		`{"time":"2026-12-01T09:00:01.304Z","level":"INFO","msg":"old generation drained","gen":4,"pid":1234,"drain":2100000,"ended":"empty","max":5000000000}`,
		`{"time":"2026-12-01T09:00:02.304Z","level":"INFO","msg":"old generation drained","gen":5,"pid":1235,"drain":"5s","ended":"max","max":"5s"}`,
		`time=2026-12-01T09:00:03.305Z level=INFO msg="old generation drained" gen=6 pid=1236 drain=2.1ms ended=empty max=5s`,
		`time=2026-12-01T09:00:04.305Z level=INFO msg="old generation drained" gen=7 pid=1237 drain=1s ended=fixed max=1s`,
		`time=2026-12-01T09:00:04.306Z level=INFO msg="old generation drained" gen=8 pid=1238 drain=soon ended=empty`,
	}, "\n")
	l, err := parseRunLog(strings.NewReader(log), base0)
	if err != nil {
		t.Fatal(err)
	}
	want := []report.Drained{
		{Gen: 4, Pid: 1234, DrainMs: 2.1, Ended: "empty"},
		{Gen: 5, Pid: 1235, DrainMs: 5000, Ended: "max"},
		{Gen: 6, Pid: 1236, DrainMs: 2.1, Ended: "empty"},
		{Gen: 7, Pid: 1237, DrainMs: 1000, Ended: "fixed"},
	}
	if len(l.drained) != len(want) {
		t.Fatalf("drained %+v, want %+v", l.drained, want)
	}
	for i := range want {
		if l.drained[i] != want[i] {
			t.Errorf("drained[%d] = %+v, want %+v", i, l.drained[i], want[i])
		}
	}
	// A drained line is about a generation, not its start.
	if len(l.started) != 0 || len(l.stops) != 0 {
		t.Errorf("started %v stops %v from drained lines", l.started, l.stops)
	}
}

func TestLogFields(t *testing.T) {
	f, ok := logFields(`time=2026-12-01T09:00:58.460Z level=INFO msg="health listener" pid=12414 generation=1 addr=127.0.0.1:46107 took=2.16407ms err="a \"quoted\" = text"`)
	if !ok || f["msg"] != "health listener" || f["pid"] != "12414" || f["took"] != "2.16407ms" || f["err"] != `a "quoted" = text` {
		t.Errorf("text fields %v, %v", f, ok)
	}
	f, ok = logFields(`{"time":"2026-12-01T09:00:58.460538268Z","level":"INFO","msg":"generation ready","gen":1,"pid":12414,"ready_after":10290000,"ok":true,"cmd":["/tmp/hello","-x"]}`)
	if !ok || f["gen"] != "1" || f["ready_after"] != "10290000" || f["ok"] != "true" || f["cmd"] != `["/tmp/hello","-x"]` {
		t.Errorf("JSON fields %v, %v", f, ok)
	}
	for _, line := range []string{
		"", "restart accepted", "ready after 301ms", `{"msg":"no time"}`, `time=2026-12-01T09:00:58.460Z level=INFO`,
		`time=2026-12-01T09:00:58.460Z msg="open`, `{"time":"x","msg":"y"`,
	} {
		if f, ok := logFields(line); ok {
			t.Errorf("logFields(%q) = %v, want not a log line", line, f)
		}
	}
}
