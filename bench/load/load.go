// Package load is the benchmark's HTTP load generator: C workers, each
// sending one GET at a time, either on a keep-alive connection or on a new
// connection per request, recording every request's outcome.
//
// It speaks HTTP/1.1 on raw connections rather than through net/http's
// Transport on purpose. The Transport silently retries an idempotent request
// that failed on a reused keep-alive connection, which would hide exactly the
// failures a restart benchmark has to count; here every request is sent once
// and its outcome is recorded as it happened.
package load

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// Class is the outcome of one request.
type Class uint8

// The outcome classes. Every class but OK is a failed request.
const (
	OK      Class = iota // a complete 2xx response
	Refused              // connect: connection refused
	Reset                // connection reset (or broken pipe) before a full response
	EOF                  // connection closed before a full response
	Timeout              // no full response within the timeout
	Non2xx               // a complete response with a status outside 2xx
	Other                // anything else, e.g. the client ran out of local ports
	NumClasses
)

func (c Class) String() string {
	switch c {
	case OK:
		return "ok"
	case Refused:
		return "refused"
	case Reset:
		return "reset"
	case EOF:
		return "eof"
	case Timeout:
		return "timeout"
	case Non2xx:
		return "non2xx"
	case Other:
		return "other"
	}
	return "class(" + strconv.Itoa(int(c)) + ")"
}

// Classify maps a request's error to its class. A nil error is OK.
func Classify(err error) Class {
	var ne net.Error
	switch {
	case err == nil:
		return OK
	case errors.Is(err, syscall.ECONNREFUSED):
		return Refused
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return Reset
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return Timeout
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return EOF
	}
	return Other
}

// Sample is one request.
type Sample struct {
	// Start is when the request began (its connect, for a new connection),
	// measured from the run's base time.
	Start time.Duration
	// Latency is from Start to the end of the response body, or to the error.
	Latency time.Duration
	// Pid is the X-Pid header of the response, or 0.
	Pid int32
	// Status is the HTTP status, or 0 when there was no response.
	Status int16
	Class  Class
	// Reused is true when the request went out on a connection that had
	// already carried a complete response: a client that retries idempotent
	// requests would repeat a failure there. A request on a fresh connection
	// has no such excuse.
	Reused bool
}

// End is when the request finished.
func (s Sample) End() time.Duration { return s.Start + s.Latency }

// Config is a load run.
type Config struct {
	Addr      string        // host:port of the server
	Path      string        // request path; "/" when empty
	Workers   int           // concurrent workers (C)
	KeepAlive bool          // keep connections open; otherwise a new connection per request
	Timeout   time.Duration // per request, connect included
}

// Client sends requests one at a time, as one worker does.
type Client struct {
	cfg    Config
	base   time.Time
	req    []byte
	dialer net.Dialer
	conn   net.Conn
	br     *bufio.Reader
	served int // complete responses on conn
	// FirstErrors keeps the first few distinct error texts of class Other,
	// so that an unexpected class can be diagnosed.
	FirstErrors []string
}

// NewClient returns a client whose samples are timed from base.
func NewClient(cfg Config, base time.Time) *Client {
	path := cfg.Path
	if path == "" {
		path = "/"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	// In new-connection mode the request says "Connection: close", as a
	// client that wants one request per connection should, and the server
	// closes first. TIME_WAIT then stays on the server's side of each
	// connection, and the client's ports are free again at once: closing
	// first on the client side would leave thousands of loopback ports in
	// TIME_WAIT each second, reusable only a second later, and the run
	// would stall on connect() every second or so for want of a port.
	conn := ""
	if !cfg.KeepAlive {
		conn = "Connection: close\r\n"
	}
	req := fmt.Sprintf("GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: relay-bench\r\n%s\r\n", path, cfg.Addr, conn)
	return &Client{cfg: cfg, base: base, req: []byte(req), dialer: net.Dialer{Timeout: cfg.Timeout}}
}

// Do sends one request and reports its outcome.
func (c *Client) Do() Sample {
	t0 := time.Now()
	s := Sample{Start: t0.Sub(c.base)}
	err := c.do(t0, &s)
	s.Latency = time.Since(t0)
	if err != nil {
		s.Class = Classify(err)
		if s.Class == Other && len(c.FirstErrors) < 5 {
			c.FirstErrors = append(c.FirstErrors, err.Error())
		}
		c.Close()
		return s
	}
	if s.Status < 200 || s.Status > 299 {
		s.Class = Non2xx
	}
	return s
}

func (c *Client) do(t0 time.Time, s *Sample) error {
	if c.conn == nil {
		conn, err := c.dialer.Dial("tcp", c.cfg.Addr)
		if err != nil {
			return err
		}
		c.conn, c.served = conn, 0
		if c.br == nil {
			c.br = bufio.NewReaderSize(conn, 4096)
		} else {
			c.br.Reset(conn)
		}
	}
	s.Reused = c.served > 0
	if err := c.conn.SetDeadline(t0.Add(c.cfg.Timeout)); err != nil {
		return err
	}
	if _, err := c.conn.Write(c.req); err != nil {
		return err
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil {
		return err
	}
	c.served++
	s.Status = int16(resp.StatusCode)
	if pid, err := strconv.Atoi(resp.Header.Get("X-Pid")); err == nil {
		s.Pid = int32(pid)
	}
	if !c.cfg.KeepAlive || resp.Close {
		c.Close()
	}
	return nil
}

// Close closes the client's connection, if any.
func (c *Client) Close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
}

// Result is what a run recorded.
type Result struct {
	Samples     []Sample // in no particular order
	FirstErrors []string // texts of the first errors of class Other
}

// Run runs cfg.Workers clients until ctx ends and returns every sample. A
// request in flight when ctx ends is finished (bounded by the timeout) and
// recorded.
func Run(ctx context.Context, cfg Config, base time.Time) Result {
	if cfg.Workers < 1 {
		cfg.Workers = 1
	}
	per := make([][]Sample, cfg.Workers)
	errs := make([][]string, cfg.Workers)
	var wg sync.WaitGroup
	for i := range per {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := NewClient(cfg, base)
			defer c.Close()
			out := make([]Sample, 0, 1<<14)
			for ctx.Err() == nil {
				out = append(out, c.Do())
			}
			per[i], errs[i] = out, c.FirstErrors
		}()
	}
	wg.Wait()
	var r Result
	n := 0
	for _, p := range per {
		n += len(p)
	}
	r.Samples = make([]Sample, 0, n)
	for i, p := range per {
		r.Samples = append(r.Samples, p...)
		for _, e := range errs[i] {
			if len(r.FirstErrors) < 10 {
				r.FirstErrors = append(r.FirstErrors, e)
			}
		}
	}
	return r
}
