package procfs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat. It
// is 100 on every Linux architecture Go supports.
const clockTicks = 100

// Stat is what is read from /proc/PID/stat.
type Stat struct {
	// State is the process state: 'R' running, 'S' sleeping, 'Z' zombie...
	State byte
	// UTime and STime are the user and system CPU time of every thread,
	// alive or gone, in clock ticks.
	UTime, STime int64
}

// CPU is the process's user plus system CPU time.
func (s Stat) CPU() time.Duration {
	return time.Duration(s.UTime+s.STime) * time.Second / clockTicks
}

// ReadStat reads /proc/PID/stat.
func ReadStat(pid int) (Stat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return Stat{}, fmt.Errorf("reading the stat of pid %d: %w", pid, err)
	}
	s, err := parseStat(b)
	if err != nil {
		return Stat{}, fmt.Errorf("reading the stat of pid %d: %w", pid, err)
	}
	return s, nil
}

// parseStat parses the contents of /proc/PID/stat.
func parseStat(b []byte) (Stat, error) {
	// The command name, in parentheses, may hold spaces and parentheses:
	// fields are counted after the last closing one. State is field 3,
	// utime and stime are fields 14 and 15.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return Stat{}, errors.New("malformed stat: no command name")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 || len(f[0]) != 1 {
		return Stat{}, errors.New("short stat")
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return Stat{}, fmt.Errorf("bad utime/stime %q %q", f[11], f[12])
	}
	return Stat{State: f[0][0], UTime: utime, STime: stime}, nil
}

// Status is /proc/PID/status: each field's value by name, surrounding
// space trimmed ("Seccomp_filters" → "1", "VmRSS" → "1234 kB").
type Status map[string]string

// ErrNoField is returned for a field the status does not have.
var ErrNoField = errors.New("no such field")

// ReadStatus reads /proc/PID/status.
func ReadStatus(pid int) (Status, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, fmt.Errorf("reading the status of pid %d: %w", pid, err)
	}
	return ParseStatus(b), nil
}

// ParseStatus parses the contents of /proc/PID/status.
func ParseStatus(b []byte) Status {
	s := Status{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			s[k] = strings.TrimSpace(v)
		}
	}
	return s
}

// Tgid returns the thread group id (the process id) of thread tid, from
// the Tgid line near the top of /proc/TID/status: it reads only the start
// of the file and parses only that line, for a caller that asks at every
// bind of a child.
func Tgid(tid int) (int, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", tid))
	if err != nil {
		return 0, fmt.Errorf("reading the status of thread %d: %w", tid, err)
	}
	defer f.Close()
	var buf [512]byte // Name, Umask, State, Tgid: the fourth line
	n, err := io.ReadFull(f, buf[:])
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return 0, fmt.Errorf("reading the status of thread %d: %w", tid, err)
	}
	return parseTgid(buf[:n])
}

// parseTgid finds the Tgid line in the start of a status file.
func parseTgid(b []byte) (int, error) {
	for line := range bytes.Lines(b) {
		if v, ok := bytes.CutPrefix(line, []byte("Tgid:")); ok {
			n, err := strconv.Atoi(string(bytes.TrimSpace(v)))
			if err != nil {
				return 0, fmt.Errorf("bad Tgid %q: %w", bytes.TrimSpace(v), err)
			}
			return n, nil
		}
	}
	return 0, fmt.Errorf("Tgid: %w", ErrNoField)
}

// Int returns a numeric field, a size in kB ("VmRSS") as its number of kB.
func (s Status) Int(field string) (int64, error) {
	v, ok := s[field]
	if !ok {
		return 0, fmt.Errorf("%s: %w", field, ErrNoField)
	}
	n, err := strconv.ParseInt(strings.TrimSuffix(v, " kB"), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("bad %s %q: %w", field, v, err)
	}
	return n, nil
}
