package main

import (
	"io"
	"strings"
	"testing"
)

// relay rollback: 0 when the warm generation serves again, 3 when nothing
// is warm, with relay's reason.
func TestRollback(t *testing.T) {
	path, _ := fakeRelay(t, `{"v":1,"type":"rolled_back","rollback":{"serving_generation":4,"serving_pid":1200,"failed_generation":5,"failed_pid":1240}}`)
	out, err := runClient(rollbackCommand(), "--control", path)
	if err != nil || !strings.Contains(out, "rolled back: generation 4 (pid 1200) serves again; generation 5 (pid 1240) drains and stops\n") {
		t.Errorf("relay rollback: %v\n%s", err, out)
	}
	path, _ = fakeRelay(t, `{"v":1,"type":"error","error":"nothing warm to go back to: relay runs without --confirm, so every old generation stops once drained","code":"nothing_warm"}`)
	out, err = runClient(rollbackCommand(), "--control", path)
	if got := exitCode(err, io.Discard); got != exitRolledBack || !strings.Contains(err.Error(), "rollback: nothing warm to go back to: relay runs without --confirm") {
		t.Errorf("relay rollback with nothing warm: %v, exit %d; want %d and the reason\n%s", err, got, exitRolledBack, out)
	}
}
