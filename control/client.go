package control

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"
)

// ErrUnreachable is wrapped by Do when no relay answers on the socket.
var ErrUnreachable = errors.New("relay cannot be reached")

// maxResponse bounds one response line (a status document with many
// generations stays far below it).
const maxResponse = 4 << 20

// Do sends req to the relay at path and calls onResponse for each response
// line until the server closes the connection or onResponse returns an
// error. An error response is returned as a *ServerError; an error that
// wraps ErrUnreachable means no relay answered.
func Do(path string, req Request, onResponse func(Response) error) error {
	conn, err := net.DialTimeout("unix", path, 10*time.Second)
	if err != nil {
		return fmt.Errorf("%w: connecting to %s: %w (is relay running with this --name or --control?)", ErrUnreachable, path, err)
	}
	defer conn.Close()
	req.V = Version
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encoding request: %w", err)
	}
	// relay may refuse a client before reading its request: a failed
	// write then still leaves relay's reason to read.
	_, writeErr := conn.Write(append(b, '\n'))
	r := bufio.NewReaderSize(conn, 64<<10)
	for {
		line, err := readLine(r, maxResponse)
		if err != nil && writeErr != nil {
			return fmt.Errorf("%w: sending request to %s: %w", ErrUnreachable, path, writeErr)
		}
		if err != nil {
			if errors.Is(err, errEOF) {
				return nil
			}
			return fmt.Errorf("reading from relay: %w", err)
		}
		var resp Response
		if err := json.Unmarshal(line, &resp); err != nil {
			return fmt.Errorf("malformed response from relay: %w", err)
		}
		if resp.Type == TypeError {
			return &ServerError{Code: resp.Code, Msg: resp.Error}
		}
		if err := onResponse(resp); err != nil {
			return err
		}
	}
}

// ServerError is an error response from relay. Code says why, for
// programs; it is empty from a relay that predates codes.
type ServerError struct {
	Code Code
	Msg  string
}

func (e *ServerError) Error() string { return "relay: " + e.Msg }
