package main

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// The logs held while the sockets are opened: a usage error after the
// bind drops what went well (INFO) and keeps why steering failed (WARN);
// once released, records pass straight through.
func TestHeldLogs(t *testing.T) {
	var out bytes.Buffer
	base := slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug,
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}}))
	held := holdLogs()
	log := slog.New(held.handler(base.Handler())).With("listener", "tcp-8080")
	log.Info("turned on net.ipv4.tcp_migrate_req")
	log.WithGroup("g").Warn("steering unavailable", "err", "EPERM")
	log.Debug("detail")
	if out.Len() != 0 {
		t.Fatalf("held records were written before release:\n%s", out.String())
	}
	held.release(slog.LevelWarn)
	if got, want := out.String(), "level=WARN msg=\"steering unavailable\" listener=tcp-8080 g.err=EPERM\n"; got != want {
		t.Errorf("released at WARN:\n%s\nwant\n%s", got, want)
	}
	out.Reset()
	log.Info("later")
	if got := out.String(); !strings.Contains(got, "msg=later listener=tcp-8080") {
		t.Errorf("a record after release: %q, want it written at once", got)
	}

	out.Reset()
	held = holdLogs()
	log = slog.New(held.handler(base.Handler()))
	log.Info("one")
	log.Debug("two")
	held.release(slog.LevelDebug)
	if got, want := out.String(), "level=INFO msg=one\nlevel=DEBUG msg=two\n"; got != want {
		t.Errorf("released at DEBUG: %q, want %q", got, want)
	}
}
