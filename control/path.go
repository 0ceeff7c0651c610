package control

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/unixpath"
)

// DefaultName is the name of a relay started without --name.
const DefaultName = "relay"

// ValidateName checks a --name: 1 to 64 of A-Z a-z 0-9 . _ -, not
// starting with a dot.
func ValidateName(name string) error {
	if name == "" || len(name) > 64 || name[0] == '.' {
		return fmt.Errorf("--name %q: want 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'", name)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("--name %q: want 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'", name)
		}
	}
	return nil
}

// defaultDir is where control sockets live unless --control says
// otherwise: $XDG_RUNTIME_DIR/relay when XDG_RUNTIME_DIR is set, else
// /run/relay for root, else $TMPDIR/relay-UID.
func defaultDir() string {
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "relay")
	}
	if os.Getuid() == 0 {
		return "/run/relay"
	}
	return filepath.Join(os.TempDir(), "relay-"+strconv.Itoa(os.Getuid()))
}

// Path returns the control socket path for a relay: control if not empty,
// else NAME.sock in defaultDir.
func Path(name, control string) (string, error) {
	if control != "" {
		if i := strings.IndexFunc(control, unicode.IsControl); i >= 0 {
			r, _ := utf8.DecodeRuneInString(control[i:])
			return "", fmt.Errorf("--control %q: holds the control character %q, which relay does not put in a socket path; remove it", control, r)
		}
		p, err := filepath.Abs(control)
		if err != nil {
			return "", fmt.Errorf("--control %q: %w", control, err)
		}
		if err := unixpath.CheckLen(p); err != nil {
			return "", fmt.Errorf("--control %q: %w", control, err)
		}
		return p, nil
	}
	if err := ValidateName(name); err != nil {
		return "", err
	}
	p := filepath.Join(defaultDir(), name+".sock")
	if err := unixpath.CheckLen(p); err != nil {
		return "", fmt.Errorf("control socket %s (from --name %q): %w with --control", p, name, err)
	}
	return p, nil
}

// ensurePrivateDir makes sure dir is a directory that only this user can
// enter: it creates it 0700 if missing, and otherwise refuses a symlink, a
// directory owned by another user or one open to group or others.
func ensurePrivateDir(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("creating control directory %s: %w", dir, err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return fmt.Errorf("checking control directory %s: %w", dir, err)
	}
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFDIR:
		return fmt.Errorf("control directory %s is not a directory (a symlink?); remove it or choose another directory with --control", dir)
	case int(st.Uid) != os.Getuid():
		return fmt.Errorf("control directory %s belongs to uid %d, not to you (uid %d); choose another directory with --control", dir, st.Uid, os.Getuid())
	case st.Mode&0o077 != 0:
		return fmt.Errorf("control directory %s has mode %#o; it must be private: chmod 700 %s", dir, st.Mode&0o777, dir)
	}
	return nil
}
