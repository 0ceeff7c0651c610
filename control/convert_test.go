package control

import (
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/relaysh/relay/supervisor"
)

// TestConvertEveryField: every field of the supervisor's types reaches the
// wire type's field of the same name with its value, and the samples give
// every one of them a value that is not zero at least once, so that a
// field the conversion forgets, or one added to the supervisor and not to
// the protocol, fails here.
func TestConvertEveryField(t *testing.T) {
	var c fieldCheck
	c.nonZero = map[string]bool{}
	st := sampleStatus()
	c.compare(t, "Status", reflect.ValueOf(st), reflect.ValueOf(*statusDoc(sampleInfo(), "/c.sock", 1, st)))
	ok := sampleResult()
	ok.Outcome = supervisor.RestartOK
	events := append(sampleEvents(), supervisor.Event{Phase: supervisor.PhaseDone, Result: &ok})
	for _, ev := range events {
		c.compare(t, "Event", reflect.ValueOf(ev), reflect.ValueOf(eventFrom(ev)))
	}
	for _, typ := range []reflect.Type{reflect.TypeOf(supervisor.Status{}), reflect.TypeOf(supervisor.Event{})} {
		for _, leaf := range leaves(typ) {
			if !c.nonZero[leaf] {
				t.Errorf("the samples never set %s: give it a value in samples_test.go", leaf)
			}
		}
	}
}

type fieldCheck struct {
	nonZero map[string]bool // leaf fields, by type and name, seen set
}

// compare checks that wire holds what sup does, field by field, by name.
func (c *fieldCheck) compare(t *testing.T, path string, sup, wire reflect.Value) {
	t.Helper()
	switch {
	case isTime(sup.Type()):
		if !sup.Interface().(time.Time).Equal(wire.Interface().(time.Time)) {
			t.Errorf("%s: %v on the wire, want %v", path, wire, sup)
		}
	case sup.Kind() == reflect.Struct:
		for i := 0; i < sup.NumField(); i++ {
			f := sup.Type().Field(i)
			key := sup.Type().String() + "." + f.Name
			wf := wire.FieldByName(f.Name)
			display, converted := displayed()[key]
			if !wf.IsValid() && !converted {
				t.Errorf("%s.%s has no field of that name on the wire", path, f.Name)
				continue
			}
			if isLeaf(f.Type) && !sup.Field(i).IsZero() {
				c.nonZero[key] = true
			}
			if converted {
				if got, want := display(sup, wire); !reflect.DeepEqual(got, want) {
					t.Errorf("%s.%s: %v on the wire, want %v", path, f.Name, got, want)
				}
				continue
			}
			c.compare(t, path+"."+f.Name, sup.Field(i), wf)
		}
	case sup.Kind() == reflect.Pointer:
		if sup.IsNil() != wire.IsNil() {
			t.Errorf("%s: nil is %v on the wire, want %v", path, wire.IsNil(), sup.IsNil())
		} else if !sup.IsNil() {
			c.compare(t, path, sup.Elem(), wire.Elem())
		}
	case sup.Kind() == reflect.Slice:
		if sup.Len() != wire.Len() {
			t.Errorf("%s: %d elements on the wire, want %d", path, wire.Len(), sup.Len())
			return
		}
		for i := 0; i < sup.Len(); i++ {
			c.compare(t, fmt.Sprintf("%s[%d]", path, i), sup.Index(i), wire.Index(i))
		}
	case sup.Kind() == reflect.Map:
		if sup.Len() != wire.Len() {
			t.Errorf("%s: %d entries on the wire, want %d", path, wire.Len(), sup.Len())
			return
		}
		for _, k := range sup.MapKeys() {
			if w := wire.MapIndex(k); !w.IsValid() {
				t.Errorf("%s[%v] missing on the wire", path, k)
			} else {
				c.compare(t, fmt.Sprintf("%s[%v]", path, k), sup.MapIndex(k), w)
			}
		}
	default: // numbers, strings, bools and names such as Phase and State
		if s, w := fmt.Sprint(sup.Interface()), fmt.Sprint(wire.Interface()); s != w {
			t.Errorf("%s: %s on the wire, want %s", path, w, s)
		}
	}
}

// displayed names the supervisor's fields, by type and name, that reach the
// wire in its display units or under other names: each gives what the wire
// struct holds for the field and what it should hold, from the
// supervisor's struct.
func displayed() map[string]func(sup, wire reflect.Value) (got, want any) {
	duration := func(v reflect.Value, name string) time.Duration {
		return v.FieldByName(name).Interface().(time.Duration)
	}
	// An event's drain is how its window is to end (Until) or how it
	// ended (Ended).
	drain := func(sup, wire reflect.Value) (any, any) {
		want := sup.FieldByName("Until").String()
		if want == "" {
			want = sup.FieldByName("Ended").String()
		}
		return wire.FieldByName("Drain").String(), want
	}
	return map[string]func(sup, wire reflect.Value) (got, want any){
		"supervisor.Event.Duration": func(sup, wire reflect.Value) (any, any) {
			return wire.FieldByName("DurationMs").Float(), ms(duration(sup, "Duration"))
		},
		"supervisor.GenerationStatus.ReadyAfter": func(sup, wire reflect.Value) (any, any) {
			return wire.FieldByName("ReadyAfterMs").Float(), ms(duration(sup, "ReadyAfter"))
		},
		// The causes are words on the wire.
		"supervisor.RestartCounts.AfterSwitch": func(sup, wire reflect.Value) (any, any) {
			want := map[string]int{}
			for cause, n := range sup.FieldByName("AfterSwitch").Interface().(map[supervisor.RollbackCause]int) {
				want[string(cause)] = n
			}
			return wire.FieldByName("AfterSwitch").Interface(), want
		},
		// A generation's UDP flows are on the wire where a UDP listener
		// is steered (Status.UDPSteered), absent elsewhere.
		"supervisor.GenerationStatus.UDPFlows": func(sup, wire reflect.Value) (any, any) {
			p := wire.FieldByName("UDPFlows").Interface().(*int)
			if p == nil {
				return nil, int(sup.FieldByName("UDPFlows").Int())
			}
			return *p, int(sup.FieldByName("UDPFlows").Int())
		},
		"supervisor.Status.UDPSteered": func(sup, wire reflect.Value) (any, any) {
			gens := wire.FieldByName("Generations")
			on := gens.Len() > 0
			for i := range gens.Len() {
				on = on && !gens.Index(i).FieldByName("UDPFlows").IsNil()
			}
			return on, sup.FieldByName("UDPSteered").Bool()
		},
		"supervisor.Event.Until": drain,
		"supervisor.Event.Ended": drain,
		"supervisor.Result.Outcome": func(sup, wire reflect.Value) (any, any) {
			return outcomeOf(wire.Interface().(Result)), sup.Interface().(supervisor.Result).Outcome
		},
		// Status.At is the generations' age_seconds.
		"supervisor.Status.At": func(sup, wire reflect.Value) (any, any) {
			st, doc := sup.Interface().(supervisor.Status), wire.Interface().(StatusDoc)
			var got, want []float64
			for i, g := range st.Generations {
				got = append(got, doc.Generations[i].AgeSeconds)
				want = append(want, st.At.Sub(g.Started).Seconds())
			}
			return got, want
		},
	}
}

// isLeaf: a field's type holds no struct of the supervisor's to descend
// into.
func isLeaf(typ reflect.Type) bool {
	for typ.Kind() == reflect.Pointer || typ.Kind() == reflect.Slice {
		typ = typ.Elem()
	}
	return typ.Kind() != reflect.Struct || isTime(typ)
}

func isTime(typ reflect.Type) bool { return typ == reflect.TypeOf(time.Time{}) }

// leaves names the leaf fields of typ and of the structs it holds.
func leaves(typ reflect.Type) []string {
	var out []string
	for i := 0; i < typ.NumField(); i++ {
		f := typ.Field(i)
		if isLeaf(f.Type) {
			out = append(out, typ.String()+"."+f.Name)
			continue
		}
		elem := f.Type
		for elem.Kind() == reflect.Pointer || elem.Kind() == reflect.Slice {
			elem = elem.Elem()
		}
		out = append(out, leaves(elem)...)
	}
	return out
}

// TestPhasesAndStates: the names on the wire are the supervisor's, and
// the samples cover every phase the protocol names.
func TestPhasesAndStates(t *testing.T) {
	wire := map[Phase]bool{}
	for _, p := range []Phase{PhaseQueued, PhaseChecking, PhaseChecked, PhaseWaitOld, PhaseStarting, PhaseWaiting,
		PhaseReady, PhaseConfirming, PhaseConfirmed, PhaseRollingBack, PhaseDraining, PhaseStopping, PhaseDone, PhaseOldExit} {
		wire[p] = true
	}
	for _, ev := range sampleEvents() {
		p := phaseFrom(ev.Phase)
		if string(p) != string(ev.Phase) || !wire[p] {
			t.Errorf("supervisor phase %q is %q on the wire, want a protocol phase of the same name", ev.Phase, p)
		}
		delete(wire, p)
	}
	if len(wire) != 0 {
		t.Errorf("the samples leave out phases %v", wire)
	}
	for _, c := range []struct {
		sup  supervisor.State
		wire State
	}{
		{supervisor.Starting, StateStarting}, {supervisor.Serving, StateServing}, {supervisor.Warm, StateWarm}, {supervisor.Draining, StateDraining},
		{supervisor.Stopping, StateStopping}, {supervisor.Exited, StateExited},
	} {
		if got := stateFrom(c.sup); got != c.wire || string(got) != string(c.sup) {
			t.Errorf("stateFrom(%q) = %q, want %q", c.sup, got, c.wire)
		}
	}
	if got := phaseFrom("from_the_future"); got != "from_the_future" {
		t.Errorf("a phase the protocol does not know yet is %q on the wire, want its own name", got)
	}
}

// TestDrainValues: Event.Drain carries the supervisor's words unchanged.
func TestDrainValues(t *testing.T) {
	for _, c := range []struct {
		sup  supervisor.Event
		wire string
	}{
		{supervisor.Event{Until: supervisor.DrainAdaptive}, DrainAdaptive}, {supervisor.Event{Until: supervisor.DrainFixed}, DrainFixed},
		{supervisor.Event{Ended: supervisor.EndedEmpty}, DrainEmpty}, {supervisor.Event{Ended: supervisor.EndedMax}, DrainMax},
		{supervisor.Event{Ended: supervisor.EndedFixed}, DrainFixed}, {supervisor.Event{Ended: supervisor.EndedHandedOver}, DrainHandover},
	} {
		if got := eventFrom(c.sup).Drain; got != c.wire {
			t.Errorf("supervisor drain %q%q is %q on the wire, want %q", c.sup.Until, c.sup.Ended, got, c.wire)
		}
	}
}

// TestOutcomes: each outcome of a restart is a pair of ok and refused on
// the wire.
func TestOutcomes(t *testing.T) {
	for _, c := range []struct {
		sup         supervisor.RestartOutcome
		ok, refused bool
	}{
		{supervisor.RestartOK, true, false}, {supervisor.RestartRolledBack, false, false}, {supervisor.RestartRefused, false, true},
	} {
		if r := resultFrom(supervisor.Result{Outcome: c.sup}); r.OK != c.ok || r.Refused != c.refused {
			t.Errorf("%s is ok %v refused %v on the wire, want ok %v refused %v", c.sup, r.OK, r.Refused, c.ok, c.refused)
		}
	}
}

// outcomeOf reads a wire result's ok and refused back as an outcome.
func outcomeOf(r Result) supervisor.RestartOutcome {
	switch {
	case r.OK:
		return supervisor.RestartOK
	case r.Refused:
		return supervisor.RestartRefused
	}
	return supervisor.RestartRolledBack
}

// TestLastRestartDurationMs: last_restart's duration_ms is its
// duration_ns in milliseconds, to the microsecond.
func TestLastRestartDurationMs(t *testing.T) {
	st := sampleStatus()
	st.LastRestart.Duration = 2*time.Second + 3500*time.Microsecond + 999*time.Nanosecond
	if got := statusDoc(sampleInfo(), "/c.sock", 1, st).LastRestart.DurationMs; got != 2003.5 {
		t.Errorf("duration_ms %v for a restart of %s, want 2003.5", got, st.LastRestart.Duration)
	}
}
