package main

import (
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/relaysh/relay/control"
)

// Exit codes of the client commands.
const (
	exitRolledBack  = 3 // the restart was rolled back or refused; the old generation serves
	exitUnreachable = 4 // no relay answered, or it refused this user
)

// unreachableError is a client that could not reach relay.
type unreachableError struct{ err error }

func (e unreachableError) Error() string { return e.err.Error() }
func (e unreachableError) Unwrap() error { return e.err }

// rolledBackError is a restart that did not take.
type rolledBackError struct{ msg string }

func (e rolledBackError) Error() string { return e.msg }

func clientFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "name", Value: control.DefaultName, Usage: "`NAME` given to relay run --name"},
		&cli.StringFlag{Name: "control", Usage: "`PATH` of the control socket, if relay run was given --control"},
	}
}

func controlPath(c *cli.Context) (string, error) {
	p, err := control.Path(c.String("name"), c.String("control"))
	if err != nil {
		return "", usageError{err}
	}
	return p, nil
}

// call sends req and classifies the errors for exitCode.
func call(path string, req control.Request, onResponse func(control.Response) error) error {
	err := control.Do(path, req, onResponse)
	var se *control.ServerError
	switch {
	case err == nil:
		return nil
	case errors.Is(err, control.ErrUnreachable):
		return unreachableError{err}
	case errors.As(err, &se) && se.Code == control.CodePermissionDenied:
		return unreachableError{err}
	}
	return err
}

// checkFlag is c's --check, parsed: nil if it was not given. Given, even
// empty, it must hold a command.
func checkFlag(c *cli.Context) ([]string, error) {
	if !c.IsSet("check") {
		return nil, nil
	}
	return parseCheck(c.String("check"))
}

// parseCheck splits a --check value into words. No shell is involved.
func parseCheck(value string) ([]string, error) {
	argv := strings.Fields(value)
	if len(argv) == 0 {
		return nil, usagef("--check %q holds no command: give one, such as --check \"nginx -t\", or leave --check out", value)
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return nil, usageError{fmt.Errorf("--check %q: %w", value, commandError(argv[0], err))}
	}
	// Resolved here, where the caller named it: relay may run elsewhere.
	if argv[0], err = filepath.Abs(path); err != nil {
		return nil, fmt.Errorf("resolving %s: %w", path, err)
	}
	return argv, nil
}

// noArgs refuses arguments to a command that takes none (relay status,
// stop, rollback): a relay's name given without --name, most likely.
func noArgs(c *cli.Context) error {
	if !c.Args().Present() {
		return nil
	}
	args := c.Args().Slice()
	name := "relay " + c.Command.Name
	if len(args) == 1 && control.ValidateName(args[0]) == nil {
		return usagef("%s takes no arguments, but got %q; to name the relay, use --name: %s --name %s", name, args[0], name, args[0])
	}
	return usagef("%s takes no arguments, but got %s; remove them (the relay is named with --name NAME or --control PATH)", name, quoteArgs(args))
}

// quoteArgs is args, each quoted, for an error message.
func quoteArgs(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = strconv.Quote(a)
	}
	return strings.Join(q, " ")
}

// absCommand makes a relative program path absolute, so that relay, whose
// working directory may differ, runs what the caller named.
func absCommand(args []string) ([]string, error) {
	if len(args) == 0 || !strings.Contains(args[0], "/") || filepath.IsAbs(args[0]) {
		return args, nil
	}
	abs, err := filepath.Abs(args[0])
	if err != nil {
		return nil, fmt.Errorf("resolving %s: %w", args[0], err)
	}
	return append([]string{abs}, args[1:]...), nil
}
