package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// starterExec runs argv with the sockets start_server (Server::Starter)
// passed in SERVER_STARTER_PORT ("host:port=fd;..."), handed over the way
// relay hands them: as fds 3.., with LISTEN_FDS and LISTEN_PID. The same
// unmodified backend then runs under both supervisors. execve keeps the
// pid, so LISTEN_PID is the backend's own.
func starterExec(argv []string) error {
	if len(argv) == 0 {
		return errors.New("server-starter-exec: no command given")
	}
	spec := os.Getenv("SERVER_STARTER_PORT")
	if spec == "" {
		return errors.New("server-starter-exec: SERVER_STARTER_PORT is not set; run it under start_server")
	}
	var fds []int
	for _, e := range strings.Split(spec, ";") {
		_, fd, ok := strings.Cut(e, "=")
		n, err := strconv.Atoi(fd)
		if !ok || err != nil {
			return fmt.Errorf("server-starter-exec: bad SERVER_STARTER_PORT entry %q", e)
		}
		fds = append(fds, n)
	}
	// Move every socket above the target range first, so that no dup2 onto
	// 3.. overwrites a socket not moved yet.
	high := make([]int, len(fds))
	for i, fd := range fds {
		n, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 3+len(fds))
		if err != nil {
			return fmt.Errorf("server-starter-exec: duplicating fd %d: %w", fd, err)
		}
		high[i] = n
	}
	for i, fd := range high {
		if err := unix.Dup3(fd, 3+i, 0); err != nil {
			return fmt.Errorf("server-starter-exec: moving fd %d to %d: %w", fd, 3+i, err)
		}
	}
	for _, fd := range fds {
		if fd >= 3+len(fds) {
			unix.Close(fd)
		}
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return fmt.Errorf("server-starter-exec: %w", err)
	}
	names := make([]string, len(fds))
	for i := range names {
		names[i] = "server-starter"
	}
	env := []string{
		"LISTEN_FDS=" + strconv.Itoa(len(fds)),
		"LISTEN_PID=" + strconv.Itoa(os.Getpid()),
		"LISTEN_FDNAMES=" + strings.Join(names, ":"),
	}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "LISTEN_") {
			env = append(env, kv)
		}
	}
	return unix.Exec(path, argv, env)
}
