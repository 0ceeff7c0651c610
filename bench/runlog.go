package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/relaysh/relay/bench/report"
)

// runLog is what a run's log says about the backend's processes, with times
// from the run's base time. The log interleaves relay's lines (JSON, with
// --log-format json, or slog's text; a generation's carry gen and pid) and
// the backend's (examples/hello: slog's text, each with pid and
// generation). Lines of neither kind, like start_server's, are skipped.
type runLog struct {
	// started is each backend pid's first line: relay's "generation
	// starting" or the backend's own first line, whichever came first.
	started map[int32]time.Duration
	// ready is when the backend logged that it was ready.
	ready map[int32]time.Duration
	// switched is when relay logged the generation ready (its switch).
	switched map[int32]time.Duration
	// stops is when the backend logged its stop signal, while serving or
	// still starting up.
	stops map[int32]time.Duration
	// drained are relay's "old generation drained" lines, in order.
	drained []report.Drained
	// coalesced and queued count relay's lines for a restart asked for
	// during another one.
	coalesced, queued int
}

// readRunLog parses the log at path; see parseRunLog.
func readRunLog(path string, base time.Time) (runLog, error) {
	f, err := os.Open(path)
	if err != nil {
		return runLog{}, fmt.Errorf("reading the run's log: %w", err)
	}
	defer f.Close()
	l, err := parseRunLog(f, base)
	if err != nil {
		return runLog{}, fmt.Errorf("reading %s: %w", path, err)
	}
	return l, nil
}

// parseRunLog reads a run's log. The backend's times have millisecond
// precision, relay's JSON times nanosecond precision.
func parseRunLog(r io.Reader, base time.Time) (runLog, error) {
	l := runLog{started: map[int32]time.Duration{}, ready: map[int32]time.Duration{},
		switched: map[int32]time.Duration{}, stops: map[int32]time.Duration{}}
	first := func(m map[int32]time.Duration, pid int32, at time.Duration) {
		if _, seen := m[pid]; !seen {
			m[pid] = at
		}
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f, ok := logFields(sc.Text())
		if !ok {
			continue
		}
		t, err := time.Parse(time.RFC3339Nano, f["time"])
		if err != nil {
			continue
		}
		at := t.Sub(base)
		msg := f["msg"]
		pid64, err := strconv.ParseInt(f["pid"], 10, 32)
		pid := int32(pid64)
		hasPid := err == nil && pid > 0
		if _, backend := f["generation"]; backend {
			if !hasPid {
				continue
			}
			if s, seen := l.started[pid]; !seen || at < s {
				l.started[pid] = at
			}
			switch {
			case strings.HasPrefix(msg, "ready"):
				first(l.ready, pid, at)
			case msg == "stopping" || msg == "signal during startup, exiting":
				first(l.stops, pid, at)
			}
			continue
		}
		switch {
		case msg == "generation starting" && hasPid:
			if s, seen := l.started[pid]; !seen || at < s {
				l.started[pid] = at
			}
		case msg == "generation ready" && hasPid:
			first(l.switched, pid, at)
		case msg == "old generation drained":
			d, err := logDuration(f["drain"])
			if err != nil {
				continue
			}
			gen, _ := strconv.Atoi(f["gen"])
			l.drained = append(l.drained, report.Drained{Gen: gen, Pid: pid, DrainMs: float64(d) / float64(time.Millisecond), Ended: f["ended"]})
		case strings.HasPrefix(msg, "restart requested during a restart"):
			if strings.Contains(msg, "coalesced") {
				l.coalesced++
			} else if strings.Contains(msg, "queued") {
				l.queued++
			}
		}
	}
	if err := sc.Err(); err != nil {
		return runLog{}, err
	}
	return l, nil
}

// logDuration parses a duration as slog writes it: a Go duration string
// ("2.1ms") in text and wherever the caller formatted it, a number of
// nanoseconds for a time.Duration in JSON.
func logDuration(v string) (time.Duration, error) {
	if n, err := strconv.ParseInt(v, 10, 64); err == nil {
		return time.Duration(n), nil
	}
	return time.ParseDuration(v)
}

// logFields splits a log line into its fields, as text: a JSON object (JSON
// numbers keep their literal form), or slog's text format (key=value, the
// value quoted when it needs to be). ok is false for any other line, and
// for a line without time and msg.
func logFields(line string) (fields map[string]string, ok bool) {
	line = strings.TrimSpace(line)
	if strings.HasPrefix(line, "{") {
		fields, ok = jsonFields(line)
	} else {
		fields, ok = textFields(line)
	}
	if !ok || fields["time"] == "" || fields["msg"] == "" {
		return nil, false
	}
	return fields, true
}

func jsonFields(line string) (map[string]string, bool) {
	dec := json.NewDecoder(strings.NewReader(line))
	dec.UseNumber()
	var raw map[string]any
	if dec.Decode(&raw) != nil {
		return nil, false
	}
	out := make(map[string]string, len(raw))
	for k, v := range raw {
		switch v := v.(type) {
		case string:
			out[k] = v
		case json.Number:
			out[k] = v.String()
		case bool:
			out[k] = strconv.FormatBool(v)
		case nil:
			out[k] = ""
		default:
			b, err := json.Marshal(v)
			if err != nil {
				return nil, false
			}
			out[k] = string(b)
		}
	}
	return out, true
}

func textFields(line string) (map[string]string, bool) {
	out := map[string]string{}
	for line != "" {
		key, rest, found := strings.Cut(line, "=")
		if !found || key == "" || strings.ContainsAny(key, " \t\"") {
			return nil, false
		}
		var val string
		if strings.HasPrefix(rest, `"`) {
			q, err := strconv.QuotedPrefix(rest)
			if err != nil {
				return nil, false
			}
			if val, err = strconv.Unquote(q); err != nil {
				return nil, false
			}
			rest = rest[len(q):]
		} else {
			i := strings.IndexAny(rest, " \t")
			if i < 0 {
				i = len(rest)
			}
			val, rest = rest[:i], rest[i:]
		}
		out[key] = val
		line = strings.TrimLeft(rest, " \t")
	}
	return out, true
}
