package supervisor

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The table in doc.go, "What each event does to a generation, by its
// state", is walked row by row: each row has a case below that drives the
// supervisor through it with the harness and checks the states it leaves,
// and each case has a row. A row added, changed or dropped in doc.go
// without its case (or the other way round) fails TestDocEventTable.

// docTableTitle is the line of doc.go above the table.
const docTableTitle = "What each event does to a generation, by its state:"

// docEventTable returns the rows of doc.go's event table, each as its
// states and its event: "Starting: check passed", "Draining/Stopping:
// exits". A row begins on a line with both a state and an event; the
// lines below it, up to the next row, carry on its columns.
func docEventTable(t *testing.T) []string {
	t.Helper()
	src, err := os.ReadFile("doc.go")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(src), "\n")
	at := slices.IndexFunc(lines, func(l string) bool { return strings.HasSuffix(l, docTableTitle) })
	if at < 0 || at+3 >= len(lines) {
		t.Fatalf("doc.go has no line %q with a table below it", docTableTitle)
	}
	// The rule under the header gives the columns: runs of '─'.
	rule := []rune(strings.TrimPrefix(lines[at+3], "//\t"))
	var cols []int
	for i, r := range rule {
		if r == '─' && (i == 0 || rule[i-1] != '─') {
			cols = append(cols, i)
		}
	}
	if len(cols) != 3 {
		t.Fatalf("doc.go's table rule %q has %d columns, want 3 (state, event, what happens)", string(rule), len(cols))
	}
	cell := func(l []rune, from, to int) string {
		from, to = min(from, len(l)), min(to, len(l))
		return strings.TrimSpace(string(l[from:to]))
	}
	var rows []string
	var states, event, what []string
	flush := func() {
		if len(states) == 0 {
			return
		}
		if len(what) == 0 {
			t.Errorf("doc.go's row %q says nothing of what happens", strings.Join(event, " "))
		}
		rows = append(rows, strings.Join(states, "/")+": "+strings.Join(event, " "))
		states, event, what = nil, nil, nil
	}
	for _, l := range lines[at+4:] {
		text, ok := strings.CutPrefix(l, "//\t")
		if !ok {
			break // the blank comment line after the table
		}
		r := []rune(text)
		state, ev, does := cell(r, 0, cols[1]), cell(r, cols[1], cols[2]), cell(r, cols[2], len(r))
		if state != "" && ev != "" {
			flush()
		}
		for _, c := range []struct {
			list *[]string
			text string
		}{{&states, state}, {&event, ev}, {&what, does}} {
			if c.text != "" {
				*c.list = append(*c.list, c.text)
			}
		}
	}
	flush()
	return rows
}

func TestDocEventTable(t *testing.T) {
	t.Parallel()
	rows := docEventTable(t)
	if len(rows) < 10 {
		t.Fatalf("found %d rows in doc.go's event table, want its 14 or so: %q", len(rows), rows)
	}
	cases := eventTableCases()
	for _, row := range rows {
		if _, ok := cases[row]; !ok {
			t.Errorf("doc.go's event table has a row %q with no case in eventTableCases", row)
		}
	}
	for row := range cases {
		if !slices.Contains(rows, row) {
			t.Errorf("eventTableCases has a case %q with no row in doc.go's event table", row)
		}
	}
	for _, row := range rows {
		if c, ok := cases[row]; ok {
			t.Run(row, func(t *testing.T) {
				t.Parallel()
				c(t)
			})
		}
	}
}

// eventTableCases are the cases of doc.go's event table, by row. Each
// drives a supervisor on fakes through its row and checks the states
// (and signals) it leaves; the harness checks after every step that each
// generation is in the slot its state puts it in.
func eventTableCases() map[string]func(t *testing.T) {
	return map[string]func(t *testing.T){
		"Starting: check passed": func(t *testing.T) {
			h := newHarness(t, nil)
			old := h.serving()
			_, _, c := h.starting(RestartRequest{}, 2)
			h.wantGens("1:serving 2:starting")
			c.pass()
			h.waitLine("gen 1 pid 1001 draining; gen 2 pid 1002 serving")
			h.wantGens("1:draining 2:serving")
			old.untouched(t, "a generation in its drain")
		},
		"Starting: check passed, but it has exited meanwhile": func(t *testing.T) {
			h := newHarness(t, nil)
			h.holdStderr = true // the exit is reported after stderrGrace
			h.begin()
			p := h.started()
			c := h.check(1)
			g := h.sup.gens.starting
			if g == nil {
				t.Fatal("no generation is starting after the first start")
			}
			p.exit(exited(0), false)
			c.pass()
			h.step(checkEvent{})
			if g.state != Starting || h.sup.gens.starting != g || h.sup.gens.serving != nil {
				t.Fatalf("generation 1 is %s after its check passed with its child gone, want Starting and nothing serving", g.state)
			}
			h.clock.waitTimer(t, stderrGrace)
			h.clock.advance(stderrGrace)
			h.step(exitEvent{})
			if g.state != Exited || h.sup.gens.starting != nil || h.sup.stop.fatal == nil {
				t.Errorf("generation 1 is %s after its exit, want Exited and rolled back", g.state)
			}
		},
		"Starting: check failed, or --health-timeout": func(t *testing.T) {
			h := newHarness(t, nil)
			old := h.serving()
			events, p, c := h.starting(RestartRequest{}, 2)
			c.fail(errors.New("GET /healthz: 503 Service Unavailable"))
			p.waitSignals(t, "group KILL")
			h.wantGens("1:serving 2:starting")
			p.exit(killed(syscall.SIGKILL), false)
			if res := result(t, all(t, events)); res.Outcome != RestartRolledBack {
				t.Errorf("result %+v, want the restart rolled back", res)
			}
			h.wantGens("1:serving")
			events, p, _ = h.starting(RestartRequest{}, 3) // its check never answers
			h.clock.waitTimer(t, testHealthTimeout)
			h.clock.advance(testHealthTimeout)
			p.waitSignals(t, "group KILL")
			h.wantGens("1:serving 3:starting")
			p.exit(killed(syscall.SIGKILL), false)
			all(t, events)
			h.wantGens("1:serving")
			old.untouched(t, "the serving generation")
		},
		"Starting: exits": func(t *testing.T) {
			h := newHarness(t, nil)
			old := h.serving()
			events, p, _ := h.starting(RestartRequest{}, 2)
			p.exit(exited(3), false)
			if res := result(t, all(t, events)); res.Outcome != RestartRolledBack {
				t.Errorf("result %+v, want the restart rolled back", res)
			}
			h.wantGens("1:serving")
			old.untouched(t, "the serving generation")

			first := newHarness(t, nil)
			first.run()
			first.started().exit(exited(1), false)
			if _, err := first.wait(); err == nil || !strings.Contains(err.Error(), "never became ready") {
				t.Errorf("Run = %v after the first generation exited, want a never-ready error", err)
			}
		},
		"Serving: exits in its drain window": func(t *testing.T) {
			h := newHarness(t, nil)
			old, p, _, events := h.draining(RestartRequest{})
			p.exit(exited(1), false)
			all(t, events)
			h.wantGens("1:serving")
			old.untouched(t, "the generation serving again")

			gone := newHarness(t, nil)
			old, p, _, events = gone.draining(RestartRequest{})
			old.exit(exited(0), false)
			gone.waitLine("gen 2 pid 1002 serving")
			p.exit(exited(1), false)
			all(t, events)
			gone.waitLine("no generation serving; replacement pending; last restart rolled back: exited during the drain window: exit status 1")
			gone.replacedAfterBackoff(3)
		},
		"Serving: exits in its confirmation window": func(t *testing.T) {
			h := newHarness(t, withConfirm)
			old, p, _, events := h.confirming(RestartRequest{})
			h.wantGens("1:warm 2:serving")
			p.exit(exited(1), false)
			if res := result(t, all(t, events)); res.Outcome != RestartRolledBack || res.Generation != 2 {
				t.Errorf("result %+v, want generation 2 rolled back", res)
			}
			h.wantGens("1:serving")
			old.untouched(t, "the warm generation serving again")
		},
		"Serving: fails its liveness check, sends STOPPING=1 or ERRNO=, or relay rollback, in its confirmation window": func(t *testing.T) {
			for _, c := range []struct {
				name  string
				tweak func(*Config)
				fail  func(h *harness)
			}{
				{"liveness", withConfirmAndLiveness, func(h *harness) {
					for range testLivenessFailures {
						h.trialProbe(2).fail(errors.New("connected, but the server has not accepted it"))
					}
				}},
				{"STOPPING=1", withConfirm, func(h *harness) { h.notify(2, "STOPPING=1") }},
				{"ERRNO=", withConfirm, func(h *harness) { h.notify(2, "ERRNO=5") }},
				{"relay rollback", withConfirm, func(h *harness) {
					if _, err := h.sup.Rollback(); err != nil {
						h.t.Fatal(err)
					}
				}},
			} {
				t.Run(c.name, func(t *testing.T) {
					t.Parallel()
					h := newHarness(t, c.tweak)
					old, p, _, events := h.confirming(RestartRequest{})
					h.wantGens("1:warm 2:serving")
					c.fail(h)
					until(t, events, PhaseDraining)
					h.wantGens("1:serving 2:draining")
					p.untouched(t, "the failed generation in its drain")
					h.drainEnds(p, events)
					h.wantGens("1:serving 2:stopping")
					old.untouched(t, "the warm generation serving again")
				})
			}
		},
		"Serving: exits, otherwise": func(t *testing.T) {
			h := newHarness(t, nil)
			h.serving().exit(exited(1), false)
			h.waitLine("no generation serving; replacement pending")
			h.replacedAfterBackoff(2)
		},
		"Warm: confirmation window ends, or a restart is requested": func(t *testing.T) {
			h := newHarness(t, withConfirm)
			old, _, _, events := h.confirming(RestartRequest{})
			h.clock.advance(testConfirm)
			until(t, events, PhaseDraining)
			h.wantGens("1:draining 2:serving")
			old.untouched(t, "the old generation in its drain")
			h.drainEnds(old, events)
			h.wantGens("1:stopping 2:serving")

			requested := newHarness(t, withConfirm)
			old, _, _, events = requested.confirming(RestartRequest{})
			until(t, requested.restart(RestartRequest{}), PhaseQueued)
			until(t, events, PhaseDraining)
			requested.wantGens("1:draining 2:serving")
			old.untouched(t, "the old generation in its drain")
			requested.drainEnds(old, events)
			requested.wantGens("1:stopping 2:serving")
		},
		"Warm: exits": func(t *testing.T) {
			h := newHarness(t, withConfirm)
			old, _, _, events := h.confirming(RestartRequest{})
			old.exit(exited(0), false)
			if res := result(t, all(t, events)); res.Outcome != RestartOK || res.Generation != 2 {
				t.Errorf("result %+v, want generation 2 confirmed", res)
			}
			h.wantGens("2:serving")
			if _, err := h.sup.Rollback(); !errors.Is(err, ErrNothingWarm) {
				t.Errorf("Rollback = %v after the warm generation exited, want ErrNothingWarm", err)
			}
		},
		"Draining: drain timer, or its sockets emptied": func(t *testing.T) {
			h := newHarness(t, nil)
			old, _, _, events := h.draining(RestartRequest{})
			h.drainEnds(old, events)
			h.wantGens("1:stopping 2:serving")

			adaptive := newAdaptive(t)
			old, _, _, events = adaptive.draining(RestartRequest{})
			adaptive.watch(1).pass()
			old.waitSignals(t, "TERM")
			until(t, events, PhaseDone)
			adaptive.wantGens("1:stopping 2:serving")
		},
		"Draining: it failed its liveness check, and accepted nothing queued for stallQuiet": func(t *testing.T) {
			h := newHarnessWith(t, withLiveness, harnessOpts{handOver: true})
			old, stall := liveReplaced(h)
			h.wantGens("1:draining 2:serving")
			stall.pass()
			old.waitSignals(t, "TERM")
			h.wantGens("1:stopping 2:serving")
			if got := h.handedOverGens(); !slices.Equal(got, []int{1}) {
				t.Errorf("handed over the sockets of generations %v, want [1]", got)
			}
		},
		"Draining/Stopping: exits": func(t *testing.T) {
			h := newHarness(t, nil)
			old, _, _, _ := h.draining(RestartRequest{})
			old.exit(exited(0), false)
			h.waitLine("gen 2 pid 1002 serving")
			h.wantGens("2:serving")

			stopping := newHarness(t, noDrain)
			p1, _, first, second, _ := waitingForOld(stopping)
			stopping.wantGens("1:stopping 2:serving")
			stopping.noStart()
			p1.exit(exited(0), false)
			all(t, first)
			stopping.started() // the restart waiting on --max-draining
			stopping.wantGens("2:serving 3:starting")
			stopping.check(3).pass()
			until(t, second, PhaseDone)
			stopping.wantGens("2:stopping 3:serving")
		},
		"Stopping: stop timeout": func(t *testing.T) {
			h := newHarness(t, noDrain)
			old, _ := retiring(h)
			old.waitSignals(t, "TERM")
			h.clock.waitTimer(t, testStopTimeout)
			h.clock.advance(testStopTimeout)
			old.waitSignals(t, "TERM", "group KILL")
			h.wantGens("1:stopping 2:serving")
		},
		"any: Stop": func(t *testing.T) {
			h := newHarness(t, nil)
			old, p, _, _ := h.draining(RestartRequest{})
			h.sup.Stop(false)
			old.waitSignals(t, "TERM")
			p.waitSignals(t, "TERM")
			h.wantGens("1:stopping 2:stopping")
			h.sup.Stop(false) // changes nothing
			h.wantGens("1:stopping 2:stopping")
			old.waitSignals(t, "TERM")
			p.waitSignals(t, "TERM")

			starting := newHarness(t, nil)
			serving := starting.serving()
			_, p, c := starting.starting(RestartRequest{}, 2)
			starting.sup.Stop(false)
			recv(t, c.ctx.Done(), "the readiness check to be cancelled")
			serving.waitSignals(t, "TERM")
			p.waitSignals(t, "TERM")
			starting.wantGens("1:stopping 2:stopping")
		},
		"any: Stop(now)": func(t *testing.T) {
			h := newHarness(t, nil)
			old, p, _, events := h.draining(RestartRequest{})
			h.drainEnds(old, events)
			old.exit(exited(0), true) // its group lingers
			h.waitLine("gen 1 pid 1001 exited, processes left; gen 2 pid 1002 serving")
			h.wantGens("1:exited 2:serving")
			h.sup.Stop(true)
			p.waitSignals(t, "group KILL")
			old.waitSignals(t, "TERM", "group KILL")
			h.wantGens("1:exited 2:serving")
			p.exit(killed(syscall.SIGKILL), false)
			old.groupGone()
			h.orphaned()
			h.wait()
		},
		"any: StopAfter(d)": func(t *testing.T) {
			const delay = 5 * time.Second
			h := newHarness(t, nil)
			p := h.serving()
			h.sup.StopAfter(delay)
			h.clock.waitTimer(t, delay)
			h.wantGens("1:serving")
			p.untouched(t, "the generation serving through the shutdown delay")
			h.clock.advance(delay)
			p.waitSignals(t, "TERM")
			h.wantGens("1:stopping")
		},
		"Exited: orphans reaped, or its cgroup emptied": func(t *testing.T) {
			h := newHarness(t, noDrain)
			old, _ := retiring(h)
			old.waitSignals(t, "TERM")
			old.exit(exited(0), true) // its group lingers
			h.waitLine("gen 1 pid 1001 exited, processes left; gen 2 pid 1002 serving")
			h.wantGens("1:exited 2:serving")
			old.groupGone()
			h.orphaned()
			h.waitLine("gen 2 pid 1002 serving")
			h.wantGens("2:serving")

			contained := newHarnessContained(t, noDrain, true)
			retiring(contained)
			cg := contained.cgroup(1)
			cg.setOthers(1)
			cg.main.exit(exited(0), false)
			contained.waitLine("gen 1 pid 1001 exited, processes left; gen 2 pid 1002 serving")
			contained.wantGens("1:exited 2:serving")
			cg.setOthers(0)
			contained.waitLine("gen 2 pid 1002 serving")
			contained.wantGens("2:serving")
			if !cg.wasRemoved() {
				t.Errorf("the empty cgroup was not removed")
			}
		},
	}
}

// replacedAfterBackoff checks that nothing serves, and that generation gen
// replaces it after the backoff and serves.
func (h *harness) replacedAfterBackoff(gen int) {
	h.t.Helper()
	h.wantGens("")
	h.clock.waitTimer(h.t, testRestartBackoff)
	h.clock.advance(testRestartBackoff)
	h.started()
	h.check(gen).pass()
	h.waitLog(fmt.Sprintf(`msg="generation ready" gen=%d `, gen))
	h.wantGens(fmt.Sprintf("%d:serving", gen))
}

// drainEnds ends the drain window of the restart that events follow at
// --drain: old gets its stop signal and the restart is done.
func (h *harness) drainEnds(old *fakeProc, events <-chan Event) {
	h.t.Helper()
	h.clock.waitTimer(h.t, testDrain)
	h.clock.advance(testDrain)
	old.waitSignals(h.t, "TERM")
	until(h.t, events, PhaseDone)
}
