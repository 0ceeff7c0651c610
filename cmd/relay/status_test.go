package main

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"
)

// statusGolden is the first status document of control's golden file,
// as relay status --json prints it.
func statusGolden(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile("../../control/testdata/status.json")
	if err != nil {
		t.Fatal(err)
	}
	var doc json.RawMessage
	if err := json.NewDecoder(bytes.NewReader(b)).Decode(&doc); err != nil {
		t.Fatal(err)
	}
	return doc
}

// TestStatusJSON: relay status --json prints every field relay sent, as
// relay sent it.
func TestStatusJSON(t *testing.T) {
	want := statusGolden(t)
	var line bytes.Buffer
	if err := json.Compact(&line, want); err != nil {
		t.Fatal(err)
	}
	path, _ := fakeRelay(t, `{"v":1,"type":"status","status":`+line.String()+`}`)
	out, err := runClient(statusCommand(), "--control", path, "--json")
	if err != nil || out != string(want)+"\n" {
		t.Errorf("relay status --json: %v, printed\n%s\nwant\n%s", err, out, want)
	}
}

func TestStatusText(t *testing.T) {
	var line bytes.Buffer
	if err := json.Compact(&line, statusGolden(t)); err != nil {
		t.Fatal(err)
	}
	path, _ := fakeRelay(t, `{"v":1,"type":"status","status":`+line.String()+`}`)
	out, err := runClient(statusCommand(), "--control", path)
	if err != nil {
		t.Fatalf("relay status: %v\n%s", err, out)
	}
	for _, want := range []string{
		`relay "api" (pid 777), up `,
		"STOPPING now (--shutdown-delay over)\n",
		"command: /srv/api --port {health_port}\n",
		"tcp-8080  3   tcp      127.0.0.1:8080  bound      steered\n",
		"SOCKETS                  UDP FLOWS  COMMAND\n",
		"tcp-8080=fd udp-53=bind  12         /srv/api\n",
		"-                        0          /srv/api -v2\n",
		"restarts: 3 ok, 2 rolled back, 1 refused, 4 crash replacements, 6 copy replacements, 5 liveness replacements (rolled back after the switch: 1 exited, 2 manual); one in progress; one queued\n",
		"GEN  WORKER  PID   STATE   AGE   REPLACED\n",
		"4    0       1100  ready   ",
		"4    1       1180  exited  ",
		"CONFIRMING generation 5 (pid 1240) until ",
		"generation 4 (pid 1100) kept warm: relay rollback sends traffic back to it\n",
		"last restart: refused after 2.0035s, ",
		": readiness check failed\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("relay status printed\n%s\nwant %q in it", out, want)
		}
	}

	ahead, err := json.Marshal(time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	path, _ = fakeRelay(t, `{"v":1,"type":"status","status":{"version":1,"name":"api","generations":[],"stopping":false,"shutdown_at":`+string(ahead)+`}}`)
	if out, err := runClient(statusCommand(), "--control", path); err != nil || !(strings.Contains(out, "STOPPING in 1h0m0s (") || strings.Contains(out, "STOPPING in 59m59.9s (")) || !strings.Contains(out, "(--shutdown-delay; serving until then)\n") {
		t.Errorf("relay status in a shutdown delay: %v, printed\n%s\nwant the time left", err, out)
	}

	path, _ = fakeRelay(t) // closes without an answer
	if _, err := runClient(statusCommand(), "--control", path); err == nil || !strings.Contains(err.Error(), "no status") {
		t.Errorf("relay status from a relay that sent nothing: %v; want an error saying so", err)
	}
}
