// Package steertest holds what the tests of relay's socket set share: a
// test of a steered group and a test of the set both end by reading what a
// connection queued on a listening socket sent.
package steertest

import (
	"errors"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// AcceptLine accepts a connection on the listening socket fd within 5 s
// and returns its first line (at most 4 KiB). It leaves fd's file status
// flags alone.
func AcceptLine(t testing.TB, fd int) string {
	t.Helper()
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	deadline := time.Now().Add(5 * time.Second)
	for fds[0].Revents&unix.POLLIN == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no connection to accept in 5 s")
		}
		if _, err := unix.Poll(fds, 100); err != nil && !errors.Is(err, unix.EINTR) {
			t.Fatal(err)
		}
	}
	nfd, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC)
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	defer unix.Close(nfd)
	tv := unix.NsecToTimeval(int64(5 * time.Second))
	if err := unix.SetsockoptTimeval(nfd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
	var line []byte
	b := make([]byte, 1)
	for len(line) < 4096 {
		n, err := unix.Read(nfd, b)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			t.Fatalf("reading the request: %v", err)
		case n == 0:
			t.Fatalf("reading the request: closed after %q", line)
		case b[0] == '\n':
			return string(line)
		}
		line = append(line, b[0])
	}
	t.Fatalf("reading the request: no end of line in %q", line)
	return ""
}
