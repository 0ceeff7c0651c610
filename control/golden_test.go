package control

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/relaysh/relay/supervisor"
)

// The golden files hold the JSON relay wrote when the wire types were the
// supervisor's own: clients parse it, so it changes only by added fields
// (the code of an error response is one).

func TestStatusJSONGolden(t *testing.T) {
	want, err := os.ReadFile("testdata/status.json")
	if err != nil {
		t.Fatal(err)
	}
	info := sampleInfo()
	var got []byte
	sample := statusDoc(info, "/run/relay/api.sock", 777, sampleStatus())
	for _, doc := range []*StatusDoc{sample, minimalStatus()} {
		b, err := json.MarshalIndent(doc, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		got = append(append(got, b...), '\n')
	}
	diffLines(t, got, want)
}

func TestResponseJSONGolden(t *testing.T) {
	want, err := os.ReadFile("testdata/responses.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	var rs []Response
	for _, ev := range sampleEvents() {
		wire := eventFrom(ev)
		rs = append(rs, Response{V: Version, Type: TypeEvent, Event: &wire})
	}
	rs = append(rs,
		Response{V: Version, Type: TypeAccepted},
		Response{V: Version, Type: TypeStopping, Pid: 99},
		Response{V: Version, Type: TypeError, Error: admit(5, 0).Error(), Code: codeOf(admit(5, 0))},
		Response{V: Version, Type: TypeStatus, Status: minimalStatus()},
	)
	var got []byte
	for _, r := range rs {
		b, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		got = append(append(got, b...), '\n')
	}
	diffLines(t, got, want)
}

// minimalStatus is the status of a relay with nothing to say.
func minimalStatus() *StatusDoc {
	return statusDoc(Info{Name: "relay", Started: sampleStart()}, "/c.sock", 1, supervisor.Status{Generations: []supervisor.GenerationStatus{}})
}

// diffLines reports each line of got that differs from want.
func diffLines(t *testing.T, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	g, w := strings.Split(string(got), "\n"), strings.Split(string(want), "\n")
	for i := 0; i < len(g) || i < len(w); i++ {
		var gl, wl string
		if i < len(g) {
			gl = g[i]
		}
		if i < len(w) {
			wl = w[i]
		}
		if gl != wl {
			t.Errorf("line %d:\n got %s\nwant %s", i+1, gl, wl)
		}
	}
}
