// Command relay gives unmodified servers zero-downtime restarts: it binds
// the listening sockets once and hands them to each new generation of the
// server through systemd socket activation.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/relaysh/relay/internal/cgroup"
	"github.com/relaysh/relay/internal/handoff"
	"github.com/relaysh/relay/internal/reaper"
	"github.com/relaysh/relay/signals"
	"github.com/relaysh/relay/socketpass"
)

// Exit codes. A child's own status is passed through as relay's.
const (
	exitOK       = 0
	exitFailure  = 1   // relay could not do what it was asked
	exitUsage    = 2   // bad flags, arguments or configuration
	exitShimExec = 127 // the exec shim could not run the command
)

func main() {
	// The main goroutine keeps the main thread, and serves on it the
	// forks of every process relay starts and the exec of an upgrade:
	// see reaper.Thread. relay itself runs on another goroutine. Locked
	// first: anything that starts a goroutine before (signal.Notify
	// does) may move this one to another thread.
	runtime.LockOSThread()
	var b boot
	if _, upgraded := os.LookupEnv(handoff.EnvFD); upgraded {
		// An upgrade execed this image: from the exec until here, a
		// stop signal would have killed relay (reaper.Thread.Exec).
		b.sigC, b.stopSignals = signals.Notify()
	}
	oneProcessor()
	b.thread = reaper.NewThread()
	done := make(chan struct{})
	code := exitFailure
	go func() {
		defer close(done)
		code = realMain(os.Args, os.Stderr, b)
	}()
	b.thread.Serve(done)
	os.Exit(code)
}

// boot is what main makes ready before relay runs: the thread that forks
// and execs (nil: the reaper makes one of its own), and in an image an
// upgrade execed, the signals, taken over first thing.
type boot struct {
	thread      *reaper.Thread
	sigC        <-chan os.Signal
	stopSignals func()
	// checkOnly: relay run checks its command line and returns, for an
	// upgrading relay's check (handoff.CheckArg).
	checkOnly bool
}

// realMain runs relay with args and returns its exit code.
func realMain(args []string, stderr io.Writer, b boot) int {
	if cgroup.IsGuard(args) {
		if err := cgroup.RunGuard(args); err != nil {
			fmt.Fprintf(stderr, "relay: %v\n", err)
			return exitFailure
		}
		return exitOK
	}
	if handoff.IsCheck(args) {
		// An upgrading relay asks this image what it takes: its state
		// versions, and its command line, parsed as relay run would.
		if given := handoff.CheckArgs(args); given != nil {
			if err := newApp(stderr, boot{checkOnly: true}).Run(append([]string{args[0]}, given...)); err != nil {
				return exitCode(err, stderr)
			}
		}
		os.Stdout.Write(handoff.Describe(thisVersion(), checkAccepts()))
		return exitOK
	}
	if socketpass.IsShim(args) {
		err := socketpass.RunShim(args)
		fmt.Fprintf(stderr, "relay: %v\n", err)
		return exitShimExec
	}
	app := newApp(stderr, b)
	app.Metadata = map[string]any{argvKey: args}
	err := app.Run(args)
	return exitCode(err, stderr)
}

// argvKey names relay's command line in the app's Metadata, for what the
// parsed flags no longer show (the "--" before relay restart's command).
const argvKey = "argv"

func newApp(stderr io.Writer, b boot) *cli.App {
	return &cli.App{
		Name:      "relay",
		Writer:    os.Stdout,
		Usage:     "zero-downtime restarts for unmodified servers",
		ErrWriter: stderr,
		Description: "relay binds your server's listening sockets once and runs the server on them: a\n" +
			"server that binds its own port has that bind land on relay's socket, and one that takes\n" +
			"inherited sockets gets them by systemd socket activation (fds 3.., LISTEN_FDS,\n" +
			"LISTEN_PID, LISTEN_FDNAMES). On SIGHUP it starts a new generation on the same sockets,\n" +
			"waits until that generation is ready, and only then stops the old one. Run\n" +
			"'relay COMMAND --help' for the details.",
		Commands: withCompletion(runCommand(b), restartCommand(), rollbackCommand(), upgradeCommand(), statusCommand(), stopCommand(), versionCommand(),
			completionCommand(), manCommand()),
		HideHelpCommand: true,
		// --version is relay's own flag rather than cli's, whose printer
		// is a package variable.
		HideVersion: true,
		Flags:       []cli.Flag{&cli.BoolFlag{Name: "version", Usage: "print relay's version and commit, as relay version does"}},
		// "--listen unix:/run/a,b.sock" is one address, not two.
		DisableSliceFlagSeparator: true,
		// relay completion bash|zsh's scripts ask relay itself: a command
		// line ending in --generate-bash-completion, with no "--" in it,
		// prints the commands or flags that may come next instead of
		// running anything (completion.go).
		EnableBashCompletion: true,
		// Exit codes are decided in exitCode, never inside cli.
		ExitErrHandler: func(*cli.Context, error) {},
		OnUsageError:   onUsageError,
		Action: func(c *cli.Context) error {
			if c.Bool("version") {
				return printVersion(c)
			}
			if c.Args().Present() {
				return usagef("unknown command %q; run 'relay --help' for the commands", c.Args().First())
			}
			return cli.ShowAppHelp(c)
		},
	}
}

// usageError is bad input from the command line.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// onUsageError points a bad flag at the help of the command it was given
// to: relay's own for a global flag (cli passes the root command then, under
// the app's name), or the subcommand's.
func onUsageError(c *cli.Context, err error, isSubcommand bool) error {
	name := "relay"
	if isSubcommand && c.Command != nil && c.Command.Name != "" {
		name += " " + c.Command.Name
	}
	return usageError{fmt.Errorf("%w (see '%s --help')", err, name)}
}

// childExit carries the child's status out as relay's exit code.
type childExit struct {
	code int
}

func (e childExit) Error() string { return fmt.Sprintf("child exited with code %d", e.code) }

func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return exitOK
	}
	var ce childExit
	if errors.As(err, &ce) {
		return ce.code
	}
	var rb rolledBackError
	var ur unreachableError
	// One line, whatever the error holds.
	msg := strings.ReplaceAll(strings.TrimSpace(err.Error()), "\n", " | ")
	fmt.Fprintf(stderr, "relay: %s\n", msg)
	var ue usageError
	switch {
	case errors.As(err, &ue):
		return exitUsage
	case errors.As(err, &rb):
		return exitRolledBack
	case errors.As(err, &ur):
		return exitUnreachable
	}
	return exitFailure
}
