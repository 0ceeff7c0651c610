package main

import (
	"io"
	"reflect"
	"testing"

	"github.com/relaysh/relay/control"
)

func TestStop(t *testing.T) {
	path, reqs := fakeRelay(t, `{"v":1,"type":"stopping","pid":1195}`)
	out, err := runClient(stopCommand(), "--control", path)
	if err != nil || out != "stopping relay (pid 1195)\nrelay stopped\n" {
		t.Errorf("relay stop: %v, printed %q; want it to say relay's pid, then that it stopped", err, out)
	}
	if got, want := <-reqs, (control.Request{V: control.Version, Op: control.OpStop}); !reflect.DeepEqual(got, want) {
		t.Errorf("relay stop sent %+v, want %+v", got, want)
	}

	path, _ = fakeRelay(t, `{"v":1,"type":"error","error":"permission denied: uid 5 may not control this relay (uid 0)","code":"permission_denied"}`)
	if _, err := runClient(stopCommand(), "--control", path); exitCode(err, io.Discard) != exitUnreachable {
		t.Errorf("relay stop refused by relay: %v; want exit %d", err, exitUnreachable)
	}
}
