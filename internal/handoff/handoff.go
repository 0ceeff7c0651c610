// Package handoff carries a running relay's state across the exec of its
// next image (relay upgrade): the state as a versioned JSON document in a
// memfd, and the fds it names, which stay open across execve because their
// close-on-exec flag is cleared for it, and only for it.
//
// The old relay writes the document (Write), clears close-on-exec on every
// fd the document names and on the memfd (Cross), and execs the new image
// with EnvFD set to the memfd's number. The new relay finds it (Take) and
// gets the document back, with close-on-exec set again on every fd it
// names: what is not taken from the document is closed at the next exec
// and never reaches a child.
//
// The document's format has a version of its own, Version, apart from
// relay's release. Before it execs a new image, relay asks it which
// versions it takes (CheckArg, Candidate), and refuses to exec one that
// does not take Version.
package handoff

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// Version is the version of the document's format that this relay writes.
// It changes whenever a field changes meaning or a new one must be read;
// Accepts lists those this relay reads.
const Version = 1

// Accepts are the versions of the document this relay can take.
func Accepts() []int { return []int{Version} }

// EnvFD names the environment variable that holds the memfd's number in
// the new image. Take removes it, so that no child inherits it.
const EnvFD = "RELAY_HANDOFF_FD"

// EnvReturn is set, to the version of the relay that failed to take the
// state, when an image returns to the one it replaced (see Return).
const EnvReturn = "RELAY_HANDOFF_RETURN"

// Doc is the document that crosses the exec.
type Doc struct {
	// Handoff is the version of this format.
	Handoff int `json:"handoff"`
	// From is the version line of the relay that wrote it.
	From string `json:"from"`
	// Written is when the old relay wrote it, just before the exec.
	Written time.Time `json:"written"`
	// Image is an fd open on the image that wrote it, so that a new
	// image that cannot take the state returns to the old one, even if
	// a package upgrade replaced the file at its path.
	Image int `json:"image_fd"`
	// FDs are every fd that crosses, the memfd aside.
	FDs []int `json:"fds"`
	// State is relay's state, as cmd/relay assembles it.
	State json.RawMessage `json:"state"`
}

// Write puts d in a new memfd and returns it, close-on-exec until Cross.
// A d without a version gets this relay's (one going back to the image
// that wrote it keeps that image's).
func Write(d Doc) (*os.File, error) {
	if d.Handoff == 0 {
		d.Handoff = Version
	}
	b, err := json.Marshal(d)
	if err != nil {
		return nil, fmt.Errorf("writing the handoff state: %w", err)
	}
	fd, err := unix.MemfdCreate("relay-handoff", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("creating the handoff memfd: %w", err)
	}
	f := os.NewFile(uintptr(fd), "relay-handoff")
	if _, err := f.Write(b); err != nil {
		f.Close()
		return nil, fmt.Errorf("writing the handoff state: %w", err)
	}
	// Nobody changes it from here on.
	seals := unix.F_SEAL_SEAL | unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
		f.Close()
		return nil, fmt.Errorf("sealing the handoff memfd: %w", err)
	}
	return f, nil
}

// Cross clears close-on-exec on fds, so that they cross the next exec. If
// it fails, it sets the flag again on those it had cleared.
func Cross(fds []int) error {
	for i, fd := range fds {
		if err := setCloexec(fd, false); err != nil {
			Keep(fds[:i])
			return fmt.Errorf("keeping fd %d open across the exec: %w", fd, err)
		}
	}
	return nil
}

// Keep sets close-on-exec on fds again: after a failed exec, and in the new
// image once it has them.
func Keep(fds []int) {
	for _, fd := range fds {
		setCloexec(fd, true)
	}
}

func setCloexec(fd int, on bool) error {
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil {
		return err
	}
	if on {
		flags |= unix.FD_CLOEXEC
	} else {
		flags &^= unix.FD_CLOEXEC
	}
	_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFD, flags)
	return err
}

// ErrNone is returned by Take in a relay that was not started by an
// upgrade.
var ErrNone = errors.New("no handoff state")

// Take reads the document a previous image left (EnvFD), closes the memfd,
// unsets EnvFD and sets close-on-exec again on every fd the document
// names. It returns ErrNone where there is none.
func Take() (Doc, error) {
	s, ok := os.LookupEnv(EnvFD)
	if !ok {
		return Doc{}, ErrNone
	}
	os.Unsetenv(EnvFD)
	fd, err := strconv.Atoi(s)
	if err != nil || fd < 3 {
		return Doc{}, fmt.Errorf("reading the handoff state: %s=%q is not an fd", EnvFD, s)
	}
	f := os.NewFile(uintptr(fd), "relay-handoff")
	defer f.Close()
	setCloexec(fd, true)
	b, err := io.ReadAll(io.NewSectionReader(f, 0, 1<<30))
	if err != nil {
		return Doc{}, fmt.Errorf("reading the handoff state: %w", err)
	}
	var d Doc
	if err := json.Unmarshal(b, &d); err != nil {
		return Doc{}, fmt.Errorf("reading the handoff state: %w", err)
	}
	Keep(d.FDs)
	if d.Image > 2 {
		setCloexec(d.Image, true)
	}
	if !slices.Contains(Accepts(), d.Handoff) {
		return d, fmt.Errorf("the handoff state is version %d; this relay takes %v", d.Handoff, Accepts())
	}
	return d, nil
}

// CheckArg is the argument that makes a relay image print what it is and
// which versions of the document it takes (Describe), and exit: relay
// runs a candidate image so before it execs it, followed by its own
// arguments, which the candidate must take (CheckArgs).
const CheckArg = "__relay_handoff_check"

// IsCheck reports whether args (os.Args) ask for the check.
func IsCheck(args []string) bool { return len(args) >= 2 && args[1] == CheckArg }

// CheckArgs are the arguments of the running relay that the check passes
// on (args being the check's os.Args); nil for none.
func CheckArgs(args []string) []string {
	if !IsCheck(args) || len(args) == 2 {
		return nil
	}
	return args[2:]
}

// Candidate is what an image says of itself for the check.
type Candidate struct {
	// Relay is its version line.
	Relay string `json:"relay"`
	// Accepts are the versions of the document it takes.
	Accepts []int `json:"accepts"`
}

// Describe is an image's answer to the check: its version line, and the
// versions of the document it takes (Accepts, but for tests).
func Describe(version string, accepts []int) []byte {
	b, _ := json.Marshal(Candidate{Relay: version, Accepts: accepts})
	return append(b, '\n')
}

// ParseCandidate reads what the image at path printed for the check, and
// returns an error that says why relay must not exec it if it cannot take
// this relay's document.
func ParseCandidate(path string, out []byte) (Candidate, error) {
	var c Candidate
	if err := json.Unmarshal(out, &c); err != nil || c.Relay == "" {
		return Candidate{}, fmt.Errorf("%s is not a relay that can take over from this one (it answered %q to the check; relay builds before in-place upgrades cannot)", path, shorten(out))
	}
	if !slices.Contains(c.Accepts, Version) {
		return c, fmt.Errorf("%s (%s) cannot take this relay's state: it reads handoff versions %v, this relay writes %d; upgrade through a release that reads both, or restart relay", path, c.Relay, c.Accepts, Version)
	}
	return c, nil
}

// shorten keeps the start of an unexpected answer for a message.
func shorten(b []byte) string {
	const max = 120
	if len(b) > max {
		return string(b[:max]) + "…"
	}
	return string(b)
}
