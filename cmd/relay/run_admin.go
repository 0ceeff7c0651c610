package main

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/oklog/run"

	"github.com/relaysh/relay/internal/admin"
	"github.com/relaysh/relay/supervisor"
)

// The admin listener of relay run --metrics: /metrics, /healthz and
// /readyz on an address of relay's own (package admin).

// parseMetricsAddr checks --metrics: "" (off) or [HOST]:PORT with HOST an
// IP address or nothing (every address).
func parseMetricsAddr(v string) (string, error) {
	if v == "" {
		return "", nil
	}
	bad := func(why string) error {
		return usagef("--metrics %q: %s; give [IP]:PORT, e.g. --metrics 127.0.0.1:9090, or --metrics :9090 for every address", v, why)
	}
	// The forms of --listen that --metrics does not take.
	switch network, rest, _ := strings.Cut(v, ":"); {
	case strings.Contains(v, "://"):
		return "", bad("not a URL: --metrics takes a TCP address only, and serves its own paths")
	case strings.EqualFold(network, "unix") || strings.HasPrefix(v, "/"):
		return "", bad("not a unix socket: --metrics takes a TCP address only")
	case strings.EqualFold(network, "udp"):
		return "", bad("not UDP: --metrics takes a TCP address only")
	case strings.EqualFold(network, "tcp"):
		return "", bad(fmt.Sprintf("write the address without \"tcp:\" (%s)", rest))
	}
	host, port, err := net.SplitHostPort(v)
	if err != nil {
		return "", bad("not HOST:PORT")
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || (n == 0 && port != "0") {
		return "", bad("the port is not a number from 0 to 65535")
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil {
			return "", bad("the host is not an IP address")
		}
	}
	return v, nil
}

// newRecorder returns the metrics' Recorder, or nil without --metrics.
func newRecorder(opts runOptions) *admin.Recorder {
	if opts.metrics == "" {
		return nil
	}
	return admin.NewRecorder()
}

// supervisorRecorder is rec as the supervisor's Recorder: nil (nobody)
// for none, never an interface holding a nil pointer.
func supervisorRecorder(rec *admin.Recorder) supervisor.Recorder {
	if rec == nil {
		return nil
	}
	return rec
}

// listenAdmin binds --metrics, if given; nil without it.
func listenAdmin(opts runOptions, sup *supervisor.Supervisor, rec *admin.Recorder, log *slog.Logger) (*admin.Server, error) {
	if opts.metrics == "" {
		return nil, nil
	}
	adm, err := admin.Listen(opts.metrics, admin.Options{Status: sup, Recorder: rec, Build: buildInfo(), Log: log})
	if err != nil {
		return nil, err
	}
	log.Info("admin listener", "addr", adm.Addr().String(), "paths", "/metrics /healthz /readyz")
	return adm, nil
}

// buildInfo names this binary for relay_build_info.
func buildInfo() admin.BuildInfo {
	b := admin.BuildInfo{Version: "(devel)", GoVersion: runtime.Version()}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		b.Version = bi.Main.Version
	}
	return b
}

// addAdmin serves the admin listener until relay stops; nothing without
// --metrics.
func addAdmin(g *run.Group, adm *admin.Server) {
	if adm == nil {
		return
	}
	g.Add(adm.Serve, func(error) { adm.Close() })
}
