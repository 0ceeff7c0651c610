// Package control is relay's control plane: a unix socket in a private
// directory, a small versioned protocol of JSON lines over it, the server
// relay run answers with, and the client relay restart, status and stop use.
//
// A client sends one request line and reads response lines until the
// server closes the connection:
//
//	→ {"v":1,"op":"restart","command":["/srv/api-v2","--flag"]}
//	← {"v":1,"type":"event","event":{"phase":"starting","generation":5,"pid":1240}}
//	← {"v":1,"type":"event","event":{"phase":"done","result":{"ok":true,...}}}
//
// Requests: restart (command, check and no_wait optional), status, stop.
// Response types: event (restart progress), accepted (restart --no-wait),
// status, stopping (the connection then stays open until relay exits),
// error.
package control

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/relaysh/relay/supervisor"
)

// Version is the protocol version. A server answers only requests of its
// own version, with an error naming it otherwise.
const Version = 1

// MaxRequest bounds one request line.
const MaxRequest = 64 << 10

// maxArgs bounds the words of a command or check.
const maxArgs = 4096

// The operations.
const (
	OpRestart = "restart"
	OpStatus  = "status"
	OpStop    = "stop"
)

// The response types.
const (
	TypeEvent    = "event"
	TypeAccepted = "accepted"
	TypeStatus   = "status"
	TypeStopping = "stopping"
	TypeError    = "error"
)

// Request is one request line.
type Request struct {
	V  int    `json:"v"`
	Op string `json:"op"`
	// Command, for restart: the new generation's argv; empty for the
	// current command. A relative path with a slash is taken relative to
	// relay's working directory: clients send absolute paths.
	Command []string `json:"command,omitempty"`
	// Check, for restart: a pre-flight command; empty for relay's own.
	Check []string `json:"check,omitempty"`
	// NoWait, for restart: answer once the restart is accepted.
	NoWait bool `json:"no_wait,omitempty"`
}

// Response is one response line.
type Response struct {
	V      int               `json:"v"`
	Type   string            `json:"type"`
	Event  *supervisor.Event `json:"event,omitempty"`
	Status *StatusDoc        `json:"status,omitempty"`
	Pid    int               `json:"pid,omitempty"` // with stopping
	Error  string            `json:"error,omitempty"`
}

// StatusDoc is what relay status --json prints: relay's own facts and the
// supervisor's snapshot. Fields are added, never changed, within a Version.
type StatusDoc struct {
	Version   int            `json:"version"`
	Name      string         `json:"name"`
	Pid       int            `json:"pid"`
	Started   time.Time      `json:"started"`
	Control   string         `json:"control"`
	Listeners []ListenerInfo `json:"listeners"`
	supervisor.Status
}

// ListenerInfo describes one socket relay holds.
type ListenerInfo struct {
	FD      int    `json:"fd"`
	Name    string `json:"name"`
	Network string `json:"network"`
	Address string `json:"address"`
	// Origin is bound (relay bound it), inherited (passed to relay for a
	// --listen address) or activated (passed to relay, passed on as is).
	Origin string `json:"origin,omitempty"`
	// Drain is steered (a socket per generation, new connections to the
	// serving one only) or shared (one socket every generation accepts
	// on).
	Drain string `json:"drain,omitempty"`
}

// ErrTooLarge is returned for a request line over MaxRequest.
var ErrTooLarge = fmt.Errorf("request longer than %d bytes", MaxRequest)

// errEOF: the peer closed the connection before sending a line.
var errEOF = fmt.Errorf("no line before the connection closed: %w", io.EOF)

// DecodeRequest reads and checks one request line from r.
func DecodeRequest(r io.Reader) (Request, error) {
	line, err := readLine(bufio.NewReaderSize(r, 4096), MaxRequest)
	if err != nil {
		return Request{}, err
	}
	var req Request
	dec := json.NewDecoder(bytes.NewReader(line))
	if err := dec.Decode(&req); err != nil {
		return Request{}, fmt.Errorf("malformed request: %w", err)
	}
	if dec.More() {
		return Request{}, errors.New("malformed request: more than one JSON value on the line")
	}
	if req.V != Version {
		return Request{}, fmt.Errorf("protocol version %d not supported; this relay speaks version %d", req.V, Version)
	}
	switch req.Op {
	case OpRestart:
		if err := checkArgv("command", req.Command); err != nil {
			return Request{}, err
		}
		if err := checkArgv("check", req.Check); err != nil {
			return Request{}, err
		}
	case OpStatus, OpStop:
		if len(req.Command) > 0 || len(req.Check) > 0 || req.NoWait {
			return Request{}, fmt.Errorf("%s takes no arguments", req.Op)
		}
	default:
		return Request{}, fmt.Errorf("unknown op %q; want restart, status or stop", req.Op)
	}
	return req, nil
}

func checkArgv(name string, argv []string) error {
	if len(argv) > maxArgs {
		return fmt.Errorf("%s has more than %d words", name, maxArgs)
	}
	if len(argv) > 0 && argv[0] == "" {
		return fmt.Errorf("%s has an empty program name", name)
	}
	for _, a := range argv {
		if bytes.IndexByte([]byte(a), 0) >= 0 {
			return fmt.Errorf("%s holds a NUL byte", name)
		}
	}
	return nil
}

// readLine reads up to and without the first newline, at most max bytes.
func readLine(r *bufio.Reader, max int) ([]byte, error) {
	var line []byte
	for {
		chunk, err := r.ReadSlice('\n')
		line = append(line, chunk...)
		if len(line) > max+1 {
			return nil, ErrTooLarge
		}
		switch {
		case err == nil:
			return bytes.TrimSuffix(line[:len(line)-1], []byte("\r")), nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(line) > 0:
			return line, nil // a last line without newline
		case errors.Is(err, io.EOF):
			return nil, errEOF
		default:
			return nil, fmt.Errorf("reading a line: %w", err)
		}
	}
}
