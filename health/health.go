// Package health decides when a new generation is ready to serve.
//
// The old generation serves the public address until the new one is ready,
// so a probe that the old generation could answer proves nothing about the
// new one. The checks here are made specific to one child: its own
// NOTIFY_SOCKET (notify), a private loopback address relay picks for each
// child and hands it through RELAY_HEALTH_ADDR or the {health_addr}
// placeholder (http, tcp), a command that is told the child's pid (exec), or
// an http or tcp probe of the public address that the caller steers to the
// child's own socket (Child.Control). delay is the weakest form: it only
// waits.
//
// A tcp check is ready when the server accepts the probe connection, not
// when the kernel completes the handshake: the kernel completes it for a
// listening socket whether or not any process ever calls accept(2). The
// check looks up the server's end of the connection with NETLINK_SOCK_DIAG:
// while it waits in the listener's accept queue it has no inode (no file),
// once accepted it has one, and once accepted and closed it is an orphan
// in FIN_WAIT1, FIN_WAIT2, CLOSING, TIME_WAIT or LAST_ACK.
//
// accept needs nothing from the server. For each of the child's listeners
// (Child.Listeners) it is ready when the new generation took the listener:
// a probe that Control steers to the new generation's own socket in relay's
// SO_REUSEPORT group, and that whoever holds that socket accepted (only the
// new generation does), or a bind of the listener's address that the new
// generation made itself, which relay observes (Listener.Claimed). Neither
// an older generation's accept nor its socket can satisfy either. A
// listener relay can neither steer a probe to nor watch (UDP, unix, a
// shared socket) fails the check.
//
// auto, the default, is ready at READY=1 on the child's NOTIFY_SOCKET or,
// for a server that does not speak sd_notify, when the accept condition
// holds. A server that does speak it may accept before it is warm, so once
// the child (or an earlier generation: Child.SpeaksNotify) sent any
// sd_notify message, only READY=1 counts; and when a listener cannot be
// checked alone, auto waits for READY=1 only.
package health

import (
	"fmt"
	"net"
	"net/url"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// Kind is the form of a readiness check.
type Kind string

// The kinds of check.
const (
	Notify Kind = "notify"
	HTTP   Kind = "http"
	TCP    Kind = "tcp"
	Exec   Kind = "exec"
	Delay  Kind = "delay"
	Accept Kind = "accept"
	Auto   Kind = "auto"
)

// Placeholders substituted in --health specs and in the child's arguments.
const (
	PlaceholderHealthAddr = "{health_addr}"
	PlaceholderHealthPort = "{health_port}"
	PlaceholderGeneration = "{generation}"
	PlaceholderWorker     = "{worker}" // which copy of its generation, from 0 (--workers)
	PlaceholderPid        = "{pid}"    // in checks only: unknown before exec
)

// Environment variables relay sets for each child and each exec check.
const (
	EnvGeneration = "RELAY_GENERATION"
	EnvHealthAddr = "RELAY_HEALTH_ADDR"
	EnvHealthPort = "RELAY_HEALTH_PORT"
	EnvWorker     = "RELAY_WORKER"
	EnvChildPid   = "RELAY_CHILD_PID"
)

// Spec is a parsed --health value.
type Spec struct {
	Kind Kind
	// Raw is the value as given.
	Raw string
	// Target is the URL (http), host:port (tcp) or command (exec), with
	// placeholders still in it.
	Target string
	// Argv is the exec check's command, split on white space.
	Argv []string
	// Delay is the wait of a delay check.
	Delay time.Duration
}

// Parse parses a --health value.
func Parse(value string) (Spec, error) { return parse("--health", value) }

// parse parses the value of flag, --health or --liveness.
func parse(flag, value string) (Spec, error) {
	s := Spec{Raw: value}
	switch {
	case value == "notify":
		s.Kind = Notify
	case value == "accept":
		s.Kind = Accept
	case value == "auto":
		s.Kind = Auto
	case strings.HasPrefix(value, "http://"), strings.HasPrefix(value, "https://"):
		s.Kind, s.Target = HTTP, value
		u, err := url.Parse(Expand(value, Vars{HealthAddr: "127.0.0.1:1", Generation: 1, Pid: 1}))
		if err != nil || u.Host == "" {
			return Spec{}, fmt.Errorf("%s %q: not a valid URL; want e.g. http://{health_addr}/healthz", flag, value)
		}
	case strings.HasPrefix(value, "tcp://"):
		s.Kind, s.Target = TCP, strings.TrimPrefix(value, "tcp://")
		if _, _, err := net.SplitHostPort(Expand(s.Target, Vars{HealthAddr: "127.0.0.1:1"})); err != nil {
			return Spec{}, fmt.Errorf("%s %q: want tcp://host:port, e.g. tcp://{health_addr}", flag, value)
		}
	case strings.HasPrefix(value, "exec:"):
		s.Kind, s.Target = Exec, strings.TrimPrefix(value, "exec:")
		s.Argv = strings.Fields(s.Target)
		if len(s.Argv) == 0 {
			return Spec{}, fmt.Errorf("%s %q: exec: needs a command, e.g. exec:./check-ready", flag, value)
		}
		if _, err := exec.LookPath(s.Argv[0]); err != nil {
			return Spec{}, fmt.Errorf("%s %q: check command %q not found: %w", flag, value, s.Argv[0], err)
		}
	case strings.HasPrefix(value, "delay:"):
		d, err := time.ParseDuration(strings.TrimPrefix(value, "delay:"))
		if err != nil || d < 0 {
			return Spec{}, fmt.Errorf("%s %q: want a duration such as delay:2s", flag, value)
		}
		s.Kind, s.Delay = Delay, d
	default:
		return Spec{}, fmt.Errorf("%s %q: unknown check; use auto, notify, accept, http://…, tcp://…, exec:CMD or delay:DURATION", flag, value)
	}
	return s, nil
}

// Vars are the per-child values substituted into placeholders.
type Vars struct {
	Pid        int
	Generation int
	// Worker is which copy of its generation the child is, from 0: with
	// --workers N, 0 to N-1.
	Worker     int
	HealthAddr string
}

// Env returns v as the RELAY_* variables ("KEY=value"): RELAY_GENERATION,
// RELAY_WORKER, RELAY_HEALTH_ADDR and RELAY_HEALTH_PORT, which every child
// gets, and before them RELAY_CHILD_PID when Pid is set, as it is for an
// exec check.
func (v Vars) Env() []string {
	_, port, _ := net.SplitHostPort(v.HealthAddr)
	env := make([]string, 0, 5)
	if v.Pid != 0 {
		env = append(env, EnvChildPid+"="+strconv.Itoa(v.Pid))
	}
	return append(env,
		EnvGeneration+"="+strconv.Itoa(v.Generation),
		EnvWorker+"="+strconv.Itoa(v.Worker),
		EnvHealthAddr+"="+v.HealthAddr,
		EnvHealthPort+"="+port,
	)
}

// Expand substitutes the placeholders in s.
func Expand(s string, v Vars) string {
	if !strings.Contains(s, "{") {
		return s
	}
	_, port, _ := net.SplitHostPort(v.HealthAddr)
	pairs := []string{
		PlaceholderHealthAddr, v.HealthAddr,
		PlaceholderHealthPort, port,
		PlaceholderGeneration, strconv.Itoa(v.Generation),
		PlaceholderWorker, strconv.Itoa(v.Worker),
	}
	if v.Pid != 0 {
		// Known to checks only; a child's own arguments keep {pid}.
		pairs = append(pairs, PlaceholderPid, strconv.Itoa(v.Pid))
	}
	return strings.NewReplacer(pairs...).Replace(s)
}

// usesPrivateAddr reports whether the check goes to the child's private
// health address rather than to a fixed one.
func (s Spec) usesPrivateAddr() bool {
	return strings.Contains(s.Target, PlaceholderHealthAddr) || strings.Contains(s.Target, PlaceholderHealthPort)
}

// hostPort returns the host and port an http or tcp check connects to
// (placeholders unexpanded), and false for other kinds or a target without
// one.
func (s Spec) hostPort() (host, port string, ok bool) {
	hostport := s.Target
	switch s.Kind {
	case HTTP:
		u, err := url.Parse(s.Target)
		if err != nil {
			return "", "", false
		}
		hostport = u.Host
		if u.Port() == "" {
			hostport = net.JoinHostPort(u.Hostname(), map[string]string{"http": "80", "https": "443"}[u.Scheme])
		}
	case TCP:
	default:
		return "", "", false
	}
	host, port, err := net.SplitHostPort(hostport)
	return host, port, err == nil
}

// needsListeners reports whether the check looks at the child's
// listeners (Child.Listeners): accept and auto do.
func (s Spec) needsListeners() bool { return s.Kind == Accept || s.Kind == Auto }

// weak reports whether the check proves nothing about the child's state.
func (s Spec) weak() bool { return s.Kind == Delay }

// String names the check for logs, e.g. "http http://{health_addr}/healthz".
func (s Spec) String() string { return s.Raw }
