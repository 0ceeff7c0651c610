package procfs

import (
	"errors"
	"os"
	"os/exec"
	"testing"
	"time"
)

func TestParseStat(t *testing.T) {
	// A command name with spaces and a parenthesis of its own.
	b := []byte("4242 (a (b) c) Z 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 0 0\n")
	s, err := parseStat(b)
	if err != nil {
		t.Fatal(err)
	}
	if s.State != 'Z' || s.UTime != 250 || s.STime != 50 || s.CPU() != 3*time.Second {
		t.Errorf("parseStat = %+v (CPU %s), want state Z, utime 250, stime 50, 3s", s, s.CPU())
	}
	for _, bad := range []string{"4242 no-parens S 1", "4242 (x) S 1 2 3", "4242 (x) S 1 2 3 4 5 6 7 8 9 10 u s"} {
		if _, err := parseStat([]byte(bad)); err == nil {
			t.Errorf("parseStat(%q) succeeded", bad)
		}
	}
}

func TestReadStat(t *testing.T) {
	s, err := ReadStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if s.State == 'Z' || s.State == 0 {
		t.Errorf("the test itself is in state %q", s.State)
	}
	cmd := exec.Command("true")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Not yet waited for, it becomes a zombie once it exits.
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, err := ReadStat(cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		if s.State == 'Z' {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("true never became a zombie: state %q", s.State)
		}
		time.Sleep(time.Millisecond)
	}
	cmd.Wait()
	if _, err := ReadStat(cmd.Process.Pid); err == nil {
		t.Errorf("a reaped process still has a stat")
	}
}

func TestStatus(t *testing.T) {
	s := ParseStatus([]byte("Name:\thello\nTgid:\t42\nVmRSS:\t    1234 kB\nSeccomp_filters:\tx\n"))
	if s["Name"] != "hello" {
		t.Errorf("Name %q", s["Name"])
	}
	if n, err := s.Int("Tgid"); err != nil || n != 42 {
		t.Errorf("Tgid = %d, %v; want 42", n, err)
	}
	if n, err := s.Int("VmRSS"); err != nil || n != 1234 {
		t.Errorf("VmRSS = %d, %v; want 1234 kB", n, err)
	}
	if _, err := s.Int("Seccomp_filters"); err == nil || errors.Is(err, ErrNoField) {
		t.Errorf("a malformed field: %v", err)
	}
	if _, err := s.Int("Seccomp"); !errors.Is(err, ErrNoField) {
		t.Errorf("a missing field: %v, want ErrNoField", err)
	}
	own, err := ReadStatus(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if pid, err := own.Int("Tgid"); err != nil || pid != int64(os.Getpid()) {
		t.Errorf("own Tgid = %d, %v; want %d", pid, err, os.Getpid())
	}
}

// Tgid reads a thread's process id: this process's own, for its main
// thread, from the same field ReadStatus sees.
func TestTgid(t *testing.T) {
	pid := os.Getpid()
	got, err := Tgid(pid)
	if err != nil || got != pid {
		t.Errorf("Tgid(%d) = %d, %v; want %d", pid, got, err, pid)
	}
	if _, err := parseTgid([]byte("Name:\tx\nUmask:\t0022\nState:\tS\n")); !errors.Is(err, ErrNoField) {
		t.Errorf("parseTgid without a Tgid line: %v, want ErrNoField", err)
	}
	if n, err := parseTgid([]byte("Name:\tx\nTgid:\t 42\nNgid:\t0\n")); err != nil || n != 42 {
		t.Errorf("parseTgid: %d, %v; want 42", n, err)
	}
	if _, err := Tgid(-1); err == nil {
		t.Error("Tgid(-1): no error")
	}
}
