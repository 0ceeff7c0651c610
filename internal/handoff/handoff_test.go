package handoff

import (
	"encoding/json"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func cloexec(t *testing.T, fd int) bool {
	t.Helper()
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil {
		t.Fatal(err)
	}
	return flags&unix.FD_CLOEXEC != 0
}

func TestRoundTrip(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	fds := []int{int(r.Fd()), int(w.Fd())}
	f, err := Write(Doc{From: "relay test", FDs: fds, Image: -1, State: json.RawMessage(`{"n":7}`)})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if !cloexec(t, int(f.Fd())) {
		t.Error("the memfd crosses an exec before Cross")
	}
	// Take closes the fd it is given: give it a copy of f's.
	memfd, err := unix.Dup(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	if err := Cross(append([]int{memfd}, fds...)); err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		if cloexec(t, fd) {
			t.Errorf("fd %d is close-on-exec after Cross", fd)
		}
	}
	// The new image's side, in this process.
	t.Setenv(EnvFD, strconv.Itoa(memfd))
	d, err := Take()
	if err != nil {
		t.Fatal(err)
	}
	if _, set := os.LookupEnv(EnvFD); set {
		t.Errorf("%s still set after Take: a child would inherit it", EnvFD)
	}
	if d.Handoff != Version || d.From != "relay test" || string(d.State) != `{"n":7}` {
		t.Errorf("took %+v", d)
	}
	for _, fd := range fds {
		if !cloexec(t, fd) {
			t.Errorf("fd %d crosses the next exec after Take", fd)
		}
	}
	// Take closed the memfd.
	if _, err := unix.FcntlInt(uintptr(memfd), unix.F_GETFD, 0); !errors.Is(err, unix.EBADF) {
		t.Errorf("the memfd is still open after Take: %v", err)
	}
}

func TestWriteSeals(t *testing.T) {
	f, err := Write(Doc{Image: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("x"), 0); err == nil {
		t.Error("the written state can be changed")
	}
}

func TestTakeWithoutState(t *testing.T) {
	os.Unsetenv(EnvFD)
	if _, err := Take(); !errors.Is(err, ErrNone) {
		t.Fatalf("Take with no state: %v, want ErrNone", err)
	}
}

func TestTakeRefusesAnotherVersion(t *testing.T) {
	b, _ := json.Marshal(Doc{Handoff: Version + 1, Image: -1})
	fd, err := unix.MemfdCreate("test", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Write(fd, b); err != nil {
		t.Fatal(err)
	}
	t.Setenv(EnvFD, strconv.Itoa(fd))
	_, err = Take()
	if err == nil || !strings.Contains(err.Error(), "version "+strconv.Itoa(Version+1)) {
		t.Fatalf("Take of version %d: %v, want refused", Version+1, err)
	}
}

func TestParseCandidate(t *testing.T) {
	if _, err := ParseCandidate("/usr/bin/relay", Describe("relay v9 commit x", Accepts())); err != nil {
		t.Errorf("this relay's own answer: %v", err)
	}
	for _, tc := range []struct{ out, want string }{
		{"", "is not a relay"},
		{"Usage: sleep NUMBER\n", "is not a relay"},
		{`{"relay":"relay v0 commit y","accepts":[0]}`, "cannot take this relay's state"},
	} {
		_, err := ParseCandidate("/usr/bin/relay", []byte(tc.out))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("answer %q: %v, want %q", tc.out, err, tc.want)
		}
	}
}

func TestIsCheck(t *testing.T) {
	if !IsCheck([]string{"relay", CheckArg}) || IsCheck([]string{"relay", "run"}) || !IsCheck([]string{"relay", CheckArg, "run"}) {
		t.Error("IsCheck")
	}
	if got := CheckArgs([]string{"relay", CheckArg, "run", "--listen", ":1"}); len(got) != 3 || got[0] != "run" {
		t.Errorf("CheckArgs = %q", got)
	}
	if got := CheckArgs([]string{"relay", CheckArg}); got != nil {
		t.Errorf("CheckArgs with none = %q", got)
	}
}
