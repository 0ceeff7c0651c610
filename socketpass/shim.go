package socketpass

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ShimCommand is the hidden first argument that makes the relay binary act
// as the exec shim. It is not a user command.
const ShimCommand = "__relay_exec_shim"

// selfExe names the running relay binary even if its file was replaced or
// removed since it started, so the shim is always the same build as relay.
const selfExe = "/proc/self/exe"

// ShimArgv returns the program and argv that start path with argv through the
// exec shim. argv[0] is what the child will see as its own argv[0].
func ShimArgv(path string, argv []string) (string, []string) {
	return selfExe, append([]string{"relay-exec-shim", ShimCommand, path}, argv...)
}

// IsShim reports whether args (os.Args) ask for the exec shim.
func IsShim(args []string) bool {
	return len(args) > 1 && args[1] == ShimCommand
}

// RunShim is the exec shim. args is os.Args: [argv0, ShimCommand, path,
// argv...]. Go cannot learn a child's pid before it runs, so relay starts
// this shim, which sets LISTEN_PID to its own pid and replaces itself with
// path. execve keeps the pid, so LISTEN_PID is the server's own pid. The
// passed sockets at fds 3.. are left alone: they are not close-on-exec, and
// every other fd relay had is.
//
// RunShim returns only on failure.
func RunShim(args []string) error {
	if !IsShim(args) || len(args) < 4 {
		return errors.New("exec shim: usage: relay " + ShimCommand + " PATH ARGV0 [ARG...]")
	}
	path, argv := args[2], args[3:]
	env := os.Environ()
	out := env[:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, EnvListenPID+"=") {
			out = append(out, kv)
		}
	}
	passed := 0
	if v, ok := os.LookupEnv(EnvListenFDs); ok {
		out = append(out, EnvListenPID+"="+strconv.Itoa(os.Getpid()))
		passed, _ = strconv.Atoi(v)
	}
	// Only stdin, stdout, stderr and the passed sockets cross the exec.
	if err := CloseOnExecFrom(FirstFD + passed); err != nil {
		return err
	}
	for {
		err := unix.Exec(path, argv, out)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return fmt.Errorf("exec %s: %w", path, err)
	}
}

// CloseOnExecFrom marks every fd from lowest up close-on-exec, so that no fd
// relay inherited or opened reaches a child unless it is passed on purpose.
func CloseOnExecFrom(lowest int) error {
	err := unix.CloseRange(uint(lowest), ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	if err == nil {
		return nil
	}
	// Kernels before 5.11: walk the fd table.
	ents, rerr := os.ReadDir("/proc/self/fd")
	if rerr != nil {
		return fmt.Errorf("marking fds close-on-exec: %w", errors.Join(err, rerr))
	}
	for _, e := range ents {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd >= lowest {
			unix.CloseOnExec(fd)
		}
	}
	return nil
}
