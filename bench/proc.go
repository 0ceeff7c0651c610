package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat. It
// is 100 on every Linux architecture Go supports.
const clockTicks = 100

// usage is a process's resource use at one moment, read from /proc.
type usage struct {
	cpu    time.Duration // user + system, of every thread, alive or gone
	rssKB  int64
	peakKB int64 // VmHWM: the peak RSS so far
	fds    int
}

func readUsage(pid int) (usage, error) {
	var u usage
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return u, fmt.Errorf("reading the usage of pid %d: %w", pid, err)
	}
	// The command name, in parentheses, may hold spaces: fields are counted
	// after its closing parenthesis. utime and stime are fields 14 and 15.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return u, fmt.Errorf("reading the usage of pid %d: malformed stat", pid)
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 13 {
		return u, fmt.Errorf("reading the usage of pid %d: short stat", pid)
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return u, fmt.Errorf("reading the usage of pid %d: bad utime/stime %q %q", pid, f[11], f[12])
	}
	u.cpu = time.Duration(utime+stime) * time.Second / clockTicks

	status, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, fmt.Errorf("reading the memory of pid %d: %w", pid, err)
	}
	defer status.Close()
	sc := bufio.NewScanner(status)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		var dst *int64
		switch k {
		case "VmRSS":
			dst = &u.rssKB
		case "VmHWM":
			dst = &u.peakKB
		default:
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			return u, fmt.Errorf("reading the memory of pid %d: bad %s %q: %w", pid, k, v, err)
		}
		*dst = n
	}
	if err := sc.Err(); err != nil {
		return u, fmt.Errorf("reading the memory of pid %d: %w", pid, err)
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return u, fmt.Errorf("counting the fds of pid %d: %w", pid, err)
	}
	u.fds = len(fds)
	return u, nil
}
