package socketpass

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/takeover"
)

// shimCommand is the hidden first argument that makes the relay binary act
// as the exec shim. It is not a user command.
const shimCommand = "__relay_exec_shim"

// selfExe names the running relay binary even if its file was replaced or
// removed since it started, so the shim is always the same build as relay.
const selfExe = "/proc/self/exe"

// Takeover says whether the shim installs the bind takeover filter
// (package takeover) before it execs the command.
type Takeover struct {
	// FD is the shim's end of the takeover handshake; 0 for no takeover.
	FD int
	// Required makes the shim fail, rather than exec without the filter,
	// when the filter cannot be installed.
	Required bool
	// Unlink also hands relay the child's unlinks (takeover.Options), for
	// relay's unix socket paths.
	Unlink bool
	// IOURing lets the child set up io_uring rings (takeover.Options).
	IOURing bool
}

// arg encodes t as one shim argument: "-", or "auto:FD" or "on:FD", with
// ":unlink" after it for Unlink and ":io_uring" for IOURing.
func (t Takeover) arg() string {
	if t.FD == 0 {
		return "-"
	}
	a := "auto:" + strconv.Itoa(t.FD)
	if t.Required {
		a = "on:" + strconv.Itoa(t.FD)
	}
	if t.Unlink {
		a += ":unlink"
	}
	if t.IOURing {
		a += ":io_uring"
	}
	return a
}

func parseTakeover(arg string) (Takeover, error) {
	if arg == "-" {
		return Takeover{}, nil
	}
	parts := strings.Split(arg, ":")
	bad := fmt.Errorf("exec shim: bad takeover argument %q", arg)
	if len(parts) < 2 || (parts[0] != "auto" && parts[0] != "on") {
		return Takeover{}, bad
	}
	n, err := strconv.Atoi(parts[1])
	if err != nil || n < FirstFD {
		return Takeover{}, bad
	}
	t := Takeover{FD: n, Required: parts[0] == "on"}
	for _, flag := range parts[2:] {
		switch flag {
		case "unlink":
			t.Unlink = true
		case "io_uring":
			t.IOURing = true
		default:
			return Takeover{}, bad
		}
	}
	return t, nil
}

// ShimArgv returns the program and argv that start path with argv through the
// exec shim, as u (nil: as relay). argv[0] is what the child will see as its
// own argv[0]. The shim checks that its parent is still the calling relay
// (see RunShim).
func ShimArgv(path string, argv []string, t Takeover, u *User) (string, []string) {
	ua := "-"
	if u != nil {
		ua = u.arg()
	}
	return selfExe, append([]string{"relay-exec-shim", shimCommand, t.arg(), ua, strconv.Itoa(os.Getpid()), path}, argv...)
}

// noParent is the shim's parent argument when it has no relay to outlive.
const noParent = "-"

// ShimLauncher returns the argv that makes the relay binary at relay run
// path through the exec shim without a takeover; the caller appends path's
// argv (argv[0] first). Tests use it to start relay itself the way systemd
// would, with LISTEN_PID set to its own pid.
func ShimLauncher(relay, path string) []string {
	return []string{relay, shimCommand, Takeover{}.arg(), "-", noParent, path}
}

// IsShim reports whether args (os.Args) ask for the exec shim.
func IsShim(args []string) bool {
	return len(args) > 1 && args[1] == shimCommand
}

// RunShim is the exec shim. args is os.Args: [argv0, shimCommand, takeover,
// user, parent, path, argv...]. Go cannot learn a child's pid before it runs, so relay
// starts this shim, which sets LISTEN_PID to its own pid and replaces itself
// with path. execve keeps the pid, so LISTEN_PID is the server's own pid. The
// passed sockets at fds 3.. are left alone: they are not close-on-exec, and
// every other fd relay had is. With a takeover fd, the shim first installs
// the bind takeover filter, which execve keeps.
//
// parent is relay's pid, or "-". The shim makes sure it has a parent-death
// signal (SIGKILL) and that its parent is still that relay, closing the
// race with a relay that died before the signal was set; execve keeps the
// signal (only a set-user-ID or set-group-ID exec clears it), so the server
// dies with relay.
//
// With a user, the shim takes its credentials last, once the filter is in
// place (installing it may need relay's CAP_SYS_ADMIN), and sets
// no_new_privs: the server runs with no capabilities and cannot gain any
// back through a set-user-ID program. The kernel clears the parent-death
// signal as the credentials change; the shim sets it again and checks its
// parent once more.
//
// RunShim returns only on failure.
func RunShim(args []string) error {
	if !IsShim(args) || len(args) < 7 {
		return errors.New("exec shim: usage: relay " + shimCommand + " TAKEOVER USER PARENT PATH ARGV0 [ARG...]")
	}
	t, err := parseTakeover(args[2])
	if err != nil {
		return err
	}
	u, err := parseUser(args[3])
	if err != nil {
		return err
	}
	// The parent-death signal, the takeover filter and no_new_privs
	// belong to the thread that sets them, and execve keeps only those of
	// the thread that calls it; other threads the runtime started have
	// no parent-death signal. So one thread does all of it: this one,
	// never unlocked.
	runtime.LockOSThread()
	if err := checkParent(args[4]); err != nil {
		return err
	}
	path, argv := args[5], args[6:]
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
	if _, ok := os.LookupEnv(EnvWatchdogUsec); ok {
		// Like LISTEN_PID: the watchdog is the server's own, pid and
		// all (relay drops any WATCHDOG_PID it inherited).
		out = append(out, EnvWatchdogPID+"="+strconv.Itoa(os.Getpid()))
	}
	if t.FD != 0 {
		err := takeover.Install(t.FD, takeover.Options{Unlink: t.Unlink, IOURing: t.IOURing})
		switch {
		case err == nil:
		case !errors.Is(err, takeover.ErrUnavailable):
			return fmt.Errorf("exec shim: %w", err) // a filter nobody answers
		case t.Required:
			return fmt.Errorf("exec shim: --takeover on: %w", err)
		}
		// Otherwise relay heard why, and the child takes its sockets
		// as inherited fds only.
	}
	if u != nil {
		if err := u.become(); err != nil {
			return err
		}
		if err := checkParent(args[4]); err != nil {
			return err
		}
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

// checkParent gives the calling thread a parent-death signal if it has
// none (only the thread relay forked has one), and fails if the shim's
// parent is no longer the relay whose pid is parent.
func checkParent(parent string) error {
	if parent == noParent {
		return nil
	}
	want, err := strconv.Atoi(parent)
	if err != nil || want <= 0 {
		return fmt.Errorf("exec shim: bad parent argument %q", parent)
	}
	var sig int32
	if err := unix.Prctl(unix.PR_GET_PDEATHSIG, uintptr(unsafe.Pointer(&sig)), 0, 0, 0); err != nil || sig == 0 {
		if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0, 0, 0); err != nil {
			return fmt.Errorf("exec shim: setting the parent-death signal: %w", err)
		}
	}
	if got := os.Getppid(); got != want {
		return fmt.Errorf("exec shim: relay (pid %d) is gone (parent is now pid %d); not starting the server", want, got)
	}
	return nil
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
