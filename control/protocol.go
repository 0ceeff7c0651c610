package control

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Version is the protocol version. A server answers only requests of its
// own version, with an unsupported_version error otherwise.
const Version = 1

// MaxRequest bounds one request line.
const MaxRequest = 64 << 10

// maxArgs bounds the words of a command or check.
const maxArgs = 4096

// The operations.
const (
	OpRestart  = "restart"
	OpStatus   = "status"
	OpStop     = "stop"
	OpUpgrade  = "upgrade"
	OpRollback = "rollback"
)

// The response types.
const (
	TypeEvent    = "event"
	TypeAccepted = "accepted"
	TypeStatus   = "status"
	TypeStopping = "stopping"
	TypeUpgrade  = "upgrade"
	TypeRollback = "rolled_back"
	TypeError    = "error"
)

// Code says in a word why the server answered with an error.
type Code string

// The error codes; the package doc says when each is sent.
const (
	CodeBadRequest       Code = "bad_request"
	CodeTooLarge         Code = "too_large"
	CodeBadVersion       Code = "unsupported_version"
	CodeUnknownOp        Code = "unknown_op"
	CodePermissionDenied Code = "permission_denied"
	CodeBusy             Code = "busy"
	CodeStopping         Code = "stopping"
	CodeNothingWarm      Code = "nothing_warm"
	CodeInternal         Code = "internal"
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
	// Path, for upgrade: the relay binary to run; empty for the path
	// relay was started from. Clients send absolute paths.
	Path string `json:"path,omitempty"`
}

// Response is one response line.
type Response struct {
	V      int        `json:"v"`
	Type   string     `json:"type"`
	Event  *Event     `json:"event,omitempty"`
	Status *StatusDoc `json:"status,omitempty"`
	// Upgrade, with type upgrade: a phase of relay upgrade.
	Upgrade *UpgradeEvent `json:"upgrade,omitempty"`
	// Rollback, with type rolled_back: what relay rollback did.
	Rollback *RollbackDoc `json:"rollback,omitempty"`
	Pid      int          `json:"pid,omitempty"` // with stopping
	// Error and Code, with type error: the reason for people and for
	// programs. Code is empty from a server that predates codes.
	Error string `json:"error,omitempty"`
	Code  Code   `json:"code,omitempty"`
}

// RollbackDoc is what relay rollback did: the generation that serves
// again, and the failed one, which drains and stops.
type RollbackDoc struct {
	ServingGeneration int `json:"serving_generation"`
	ServingPid        int `json:"serving_pid"`
	FailedGeneration  int `json:"failed_generation"`
	FailedPid         int `json:"failed_pid"`
}

// codedError is an error the server answers with: its code and its
// message go on the wire.
type codedError struct {
	code Code
	err  error
}

func (e *codedError) Error() string { return e.err.Error() }
func (e *codedError) Unwrap() error { return e.err }

func errorf(code Code, format string, args ...any) error {
	return &codedError{code: code, err: fmt.Errorf(format, args...)}
}

// codeOf is the code to answer err with: its own, or internal.
func codeOf(err error) Code {
	var ce *codedError
	if errors.As(err, &ce) {
		return ce.code
	}
	return CodeInternal
}

// tooLongError is a line over its limit.
type tooLongError struct{ max int }

func (e *tooLongError) Error() string { return fmt.Sprintf("longer than %d bytes", e.max) }

// errEOF: the peer closed the connection before sending a line.
var errEOF = fmt.Errorf("no line before the connection closed: %w", io.EOF)

// decodeRequest reads and checks one request line from r. Its errors
// carry their code (codeOf).
func decodeRequest(r io.Reader) (Request, error) {
	line, err := readLine(bufio.NewReaderSize(r, 4096), MaxRequest)
	var tooLong *tooLongError
	if errors.As(err, &tooLong) {
		return Request{}, &codedError{code: CodeTooLarge, err: fmt.Errorf("request %w", err)}
	}
	if err != nil {
		return Request{}, &codedError{code: CodeBadRequest, err: err}
	}
	var req Request
	dec := json.NewDecoder(bytes.NewReader(line))
	if err := dec.Decode(&req); err != nil {
		return Request{}, errorf(CodeBadRequest, "malformed request: %w", err)
	}
	if dec.More() {
		return Request{}, errorf(CodeBadRequest, "malformed request: more than one JSON value on the line")
	}
	if req.V != Version {
		return Request{}, errorf(CodeBadVersion, "protocol version %d not supported; this relay speaks version %d", req.V, Version)
	}
	switch req.Op {
	case OpRestart:
		if req.Path != "" {
			return Request{}, errorf(CodeBadRequest, "restart takes no path; give the command instead")
		}
		if err := checkArgv("command", req.Command); err != nil {
			return Request{}, err
		}
		if err := checkArgv("check", req.Check); err != nil {
			return Request{}, err
		}
	case OpStatus, OpStop, OpRollback:
		if len(req.Command) > 0 || len(req.Check) > 0 || req.NoWait || req.Path != "" {
			return Request{}, errorf(CodeBadRequest, "%s takes no arguments", req.Op)
		}
	case OpUpgrade:
		if len(req.Command) > 0 || len(req.Check) > 0 || req.NoWait {
			return Request{}, errorf(CodeBadRequest, "upgrade takes a path only")
		}
		if req.Path != "" {
			if err := checkArgv("path", []string{req.Path}); err != nil {
				return Request{}, err
			}
		}
	default:
		return Request{}, errorf(CodeUnknownOp, "unknown op %q; want restart, status, stop, upgrade or rollback", req.Op)
	}

	return req, nil
}

func checkArgv(name string, argv []string) error {
	if len(argv) > maxArgs {
		return errorf(CodeBadRequest, "%s has more than %d words", name, maxArgs)
	}
	if len(argv) > 0 && argv[0] == "" {
		return errorf(CodeBadRequest, "%s has an empty program name", name)
	}
	for _, a := range argv {
		if bytes.IndexByte([]byte(a), 0) >= 0 {
			return errorf(CodeBadRequest, "%s holds a NUL byte", name)
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
			return nil, &tooLongError{max: max}
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
