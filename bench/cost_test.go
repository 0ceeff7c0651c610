package main

import (
	"strings"
	"testing"
	"time"

	"github.com/relaysh/relay/bench/load"
)

func TestStartTimes(t *testing.T) {
	// Lines as relay (--log-format json) and examples/hello write them,
	// interleaved in one log, with lines that must be ignored.
	log := strings.Join([]string{
		`{"time":"2026-12-01T09:00:58.450540763Z","level":"INFO","msg":"generation starting","gen":1,"pid":12414,"cmd":["/tmp/hello"],"check":"notify"}`,
		`time=2026-12-01T09:00:58.459Z level=INFO msg=listener pid=12414 generation=1 name=tcp-39265 addr=127.0.0.1:39265`,
		`time=2026-12-01T09:00:58.460Z level=INFO msg="health listener" pid=12414 generation=1 addr=127.0.0.1:46107 took=2.16407ms`,
		`{"time":"2026-12-01T09:00:58.460538268Z","level":"INFO","msg":"generation ready","gen":1,"pid":12414,"ready_after":10290000,"since_request":10744000}`,
		`time=2026-12-01T09:00:58.508Z level=INFO msg="bound -addr" pid=12430 generation=2 addr=127.0.0.1:39265 took=85.5µs`,
		`time=2026-12-01T09:00:58.508Z level=INFO msg="bound -addr" pid=12431 generation=2 addr=127.0.0.1:39265 took="1.5ms"`,
		`{"time":"2026-12-01T09:00:58.508964487Z","level":"INFO","msg":"generation ready","gen":2,"pid":12430,"ready_after":5578000}`,
		`{"time":"2026-12-01T09:00:58.508964487Z","level":"INFO","msg":"generation ready","gen":3}`,
		`{"msg":"restart finished","ok":true,"took":1006598000}`,
		`time=2026-12-01T09:00:58.509Z level=INFO msg="lame duck" pid=12414 generation=1 duration=1s`,
		`time=2026-12-01T09:00:58.509Z level=ERROR msg="bound -addr" took=1s`,
		`{not json`,
		`restart accepted`,
	}, "\n")
	ready, listen, err := startTimes(strings.NewReader(log))
	if err != nil {
		t.Fatal(err)
	}
	if len(ready) != 2 || ready[0] != 10.29 || ready[1] != 5.578 {
		t.Errorf("ready_after %v ms, want [10.29 5.578]", ready)
	}
	if len(listen) != 3 || listen[0] != 2164.07 || listen[1] != 85.5 || listen[2] != 1500 {
		t.Errorf("net.Listen %v µs, want [2164.07 85.5 1500]", listen)
	}
}

func TestParseSeccompFilters(t *testing.T) {
	status := "Name:\thello\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\nSpeculation_Store_Bypass:\tthread vulnerable\n"
	if n, err := parseSeccompFilters(status); err != nil || n != 1 {
		t.Errorf("parseSeccompFilters = %d, %v; want 1", n, err)
	}
	if _, err := parseSeccompFilters("Name:\thello\nSeccomp:\t0\n"); err == nil {
		t.Error("no error without a Seccomp_filters line")
	}
	if _, err := parseSeccompFilters("Seccomp_filters:\tx\n"); err == nil {
		t.Error("no error for a malformed Seccomp_filters line")
	}
}

func TestLastPid(t *testing.T) {
	ms := time.Millisecond
	s := []load.Sample{
		{Start: 0, Latency: 5 * ms, Pid: 10},
		{Start: 4 * ms, Latency: 2 * ms, Pid: 20},
		{Start: 6 * ms, Latency: 1 * ms, Class: load.Reset},
		{Start: 2 * ms, Latency: 2 * ms, Pid: 30},
	}
	// The complete response that ended last (pid 20, at 6 ms): the failed
	// one after it carries no pid, and the order of the samples is not
	// the order of their ends.
	if got := lastPid(s); got != 20 {
		t.Errorf("lastPid = %d, want 20", got)
	}
	if got := lastPid(s[2:3]); got != 0 {
		t.Errorf("lastPid of failures only = %d", got)
	}
}
