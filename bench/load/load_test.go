package load

import (
	"bufio"
	"context"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// rawServer accepts connections on loopback and hands each to handle.
func rawServer(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
	return ln.Addr().String()
}

// readRequest reads one request's head from c.
func readRequest(br *bufio.Reader) bool {
	req, err := http.ReadRequest(br)
	if err != nil {
		return false
	}
	req.Body.Close()
	return true
}

const okResponse = "HTTP/1.1 200 OK\r\nX-Pid: 4242\r\nContent-Length: 3\r\n\r\nok\n"

func TestClassifiesEachOutcome(t *testing.T) {
	// A free port: bound, then closed.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := ln.Addr().String()
	ln.Close()

	answer := func(resp string) func(net.Conn) {
		return func(c net.Conn) {
			defer c.Close()
			br := bufio.NewReader(c)
			for readRequest(br) {
				if _, err := c.Write([]byte(resp)); err != nil {
					return
				}
			}
		}
	}
	cases := []struct {
		name   string
		addr   string
		want   Class
		pid    int32
		status int16
	}{
		{"ok", rawServer(t, answer(okResponse)), OK, 4242, 200},
		{"non2xx", rawServer(t, answer("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")), Non2xx, 0, 503},
		{"refused", closedAddr, Refused, 0, 0},
		{"eof", rawServer(t, func(c net.Conn) {
			readRequest(bufio.NewReader(c))
			c.Close()
		}), EOF, 0, 0},
		{"eof mid-body", rawServer(t, func(c net.Conn) {
			readRequest(bufio.NewReader(c))
			c.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"))
			c.Close()
		}), EOF, 0, 0},
		{"reset", rawServer(t, func(c net.Conn) {
			readRequest(bufio.NewReader(c))
			c.(*net.TCPConn).SetLinger(0) // close with RST
			c.Close()
		}), Reset, 0, 0},
		{"timeout", rawServer(t, func(c net.Conn) {
			readRequest(bufio.NewReader(c))
			// Never answer; the client gives up at its timeout. Reading
			// until the client closes keeps the connection open until then.
			var b [1]byte
			c.Read(b[:])
			c.Close()
		}), Timeout, 0, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := NewClient(Config{Addr: tc.addr, Timeout: 300 * time.Millisecond}, time.Now())
			defer c.Close()
			s := c.Do()
			if s.Class != tc.want || s.Pid != tc.pid || s.Status != tc.status {
				t.Fatalf("got class %v pid %d status %d, want %v %d %d (errors: %q)",
					s.Class, s.Pid, s.Status, tc.want, tc.pid, tc.status, c.FirstErrors)
			}
			if s.Reused {
				t.Fatal("the first request on a connection was marked reused")
			}
		})
	}
}

// A failure on a connection that already carried a response is told apart
// from one on a fresh connection, and the client reconnects after it.
func TestKeepAliveSeparatesReusedFailures(t *testing.T) {
	addr := rawServer(t, func(c net.Conn) {
		// Answer two requests, then close on the third without answering.
		defer c.Close()
		br := bufio.NewReader(c)
		for i := 0; i < 3 && readRequest(br); i++ {
			if i == 2 {
				return
			}
			c.Write([]byte(okResponse))
		}
	})
	c := NewClient(Config{Addr: addr, KeepAlive: true, Timeout: 2 * time.Second}, time.Now())
	defer c.Close()
	var got []Sample
	for range 4 {
		got = append(got, c.Do())
	}
	want := []struct {
		class  Class
		reused bool
	}{{OK, false}, {OK, true}, {EOF, true}, {OK, false}}
	for i, w := range want {
		if got[i].Class != w.class || got[i].Reused != w.reused {
			t.Fatalf("request %d: class %v reused %v, want %v %v", i, got[i].Class, got[i].Reused, w.class, w.reused)
		}
	}
}

// In new-connection mode every request dials; a "Connection: close"
// response ends a keep-alive connection too.
func TestNewConnectionPerRequest(t *testing.T) {
	conns := make(chan struct{}, 16)
	handler := func(resp string) func(net.Conn) {
		return func(c net.Conn) {
			conns <- struct{}{}
			defer c.Close()
			br := bufio.NewReader(c)
			for readRequest(br) {
				c.Write([]byte(resp))
			}
		}
	}
	for _, tc := range []struct {
		name      string
		keepAlive bool
		resp      string
	}{
		{"new-conn", false, okResponse},
		{"keep-alive, server says close", true, strings.Replace(okResponse, "\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := rawServer(t, handler(tc.resp))
			c := NewClient(Config{Addr: addr, KeepAlive: tc.keepAlive}, time.Now())
			defer c.Close()
			for i := range 3 {
				if s := c.Do(); s.Class != OK || s.Reused {
					t.Fatalf("request %d: class %v reused %v", i, s.Class, s.Reused)
				}
			}
			if n := len(conns); n != 3 {
				t.Fatalf("%d connections for 3 requests, want 3", n)
			}
			for len(conns) > 0 {
				<-conns
			}
		})
	}
}

func TestRunRecordsEveryRequest(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// The server ends the run itself once it has answered 40 requests.
	// It counts each request before it answers it: a response the client
	// has read is then always counted when Run returns, which counting
	// after the write did not promise.
	var answered atomic.Int32
	addr := rawServer(t, func(c net.Conn) {
		defer c.Close()
		br := bufio.NewReader(c)
		for readRequest(br) {
			if answered.Add(1) == 40 {
				cancel()
			}
			c.Write([]byte(okResponse))
		}
	})
	r := Run(ctx, Config{Addr: addr, Workers: 4, KeepAlive: true}, time.Now())
	ok := 0
	for _, s := range r.Samples {
		if s.Class == OK && s.Pid == 4242 {
			ok++
		}
	}
	if ok < 40 || ok != int(answered.Load()) {
		t.Fatalf("%d OK samples for %d answered requests (of %d samples)", ok, answered.Load(), len(r.Samples))
	}

	// A run whose context has already ended sends nothing.
	before := answered.Load()
	if r := Run(ctx, Config{Addr: addr, Workers: 4}, time.Now()); len(r.Samples) != 0 || answered.Load() != before {
		t.Fatalf("%d samples from a cancelled run", len(r.Samples))
	}
}
