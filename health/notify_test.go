package health

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMakeNotifyDir(t *testing.T) {
	base := t.TempDir()
	t.Setenv("XDG_RUNTIME_DIR", base)
	dir, err := MakeNotifyDir()
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if filepath.Dir(dir) != base {
		t.Errorf("made %s, want it under XDG_RUNTIME_DIR %s", dir, base)
	}
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("the directory: %v, %v; want mode 0700", st.Mode(), err)
	}

	// A base too long for a socket path below it is passed over.
	long := filepath.Join(base, strings.Repeat("d", 100))
	if err := os.Mkdir(long, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Setenv("XDG_RUNTIME_DIR", long)
	t.Setenv("TMPDIR", base)
	dir, err = MakeNotifyDir()
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if filepath.Dir(dir) != base {
		t.Errorf("made %s, want it under TMPDIR %s", dir, base)
	}
}
