package main

import (
	"fmt"
	"os"
	"time"

	"github.com/relaysh/relay/internal/procfs"
)

// usage is a process's resource use at one moment, read from /proc.
type usage struct {
	cpu    time.Duration // user + system, of every thread, alive or gone
	rssKB  int64
	peakKB int64 // VmHWM: the peak RSS so far
	fds    int
}

func readUsage(pid int) (usage, error) {
	var u usage
	stat, err := procfs.ReadStat(pid)
	if err != nil {
		return u, fmt.Errorf("reading the usage of pid %d: %w", pid, err)
	}
	u.cpu = stat.CPU()
	status, err := procfs.ReadStatus(pid)
	if err != nil {
		return u, fmt.Errorf("reading the memory of pid %d: %w", pid, err)
	}
	// A kernel thread has no memory lines; a user process has both.
	for _, f := range []struct {
		name string
		dst  *int64
	}{{"VmRSS", &u.rssKB}, {"VmHWM", &u.peakKB}} {
		if _, ok := status[f.name]; !ok {
			continue
		}
		if *f.dst, err = status.Int(f.name); err != nil {
			return u, fmt.Errorf("reading the memory of pid %d: %w", pid, err)
		}
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return u, fmt.Errorf("counting the fds of pid %d: %w", pid, err)
	}
	u.fds = len(fds)
	return u, nil
}
