package control

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/relaysh/relay/supervisor"
)

// The golden files hold the JSON relay 0.x wrote before the wire types
// moved to control: clients parse it, so it changes only by added fields.

func TestStatusJSONGolden(t *testing.T) {
	want, err := os.ReadFile("testdata/status.json")
	if err != nil {
		t.Fatal(err)
	}
	info := sampleInfo()
	var got []byte
	for _, doc := range []*StatusDoc{
		{Version: Version, Name: info.Name, Pid: 777, Started: info.Started, Control: "/run/relay/api.sock", Listeners: info.Listeners, Status: sampleStatus()},
		{Version: Version, Name: "relay", Pid: 1, Started: sampleStart, Control: "/c.sock", Status: supervisor.Status{Generations: []supervisor.GenerationStatus{}}},
	} {
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
		rs = append(rs, Response{V: Version, Type: TypeEvent, Event: &ev})
	}
	minimal := StatusDoc{Version: Version, Name: "relay", Pid: 1, Started: sampleStart, Control: "/c.sock", Status: supervisor.Status{Generations: []supervisor.GenerationStatus{}}}
	rs = append(rs,
		Response{V: Version, Type: TypeAccepted},
		Response{V: Version, Type: TypeStopping, Pid: 99},
		Response{V: Version, Type: TypeError, Error: "permission denied: uid 5 may not control this relay (uid 0)"},
		Response{V: Version, Type: TypeStatus, Status: &minimal},
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
