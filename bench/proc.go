package main

import (
	"fmt"
	"os"
	"time"

	"github.com/relaysh/relay/bench/report"
	"github.com/relaysh/relay/internal/procfs"
)

// usage is a process's resource use at one moment, read from /proc.
type usage struct {
	cpu    time.Duration // user + system, of every thread, alive or gone
	rssKB  int64
	peakKB int64 // VmHWM: the peak RSS so far
	// anonKB and fileKB split the RSS (RssAnon, RssFile): anonymous
	// memory is the process's own; file-backed pages, mostly its binary,
	// are shared with every process that maps the same file. The third
	// part, RssShmem, is left out.
	anonKB, fileKB int64
	fds            int
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
	if err := u.setMemory(status); err != nil {
		return u, fmt.Errorf("reading the memory of pid %d: %w", pid, err)
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return u, fmt.Errorf("counting the fds of pid %d: %w", pid, err)
	}
	u.fds = len(fds)
	return u, nil
}

// setMemory fills the memory figures from a /proc/PID/status. A kernel
// thread has no memory lines, and a line missing is left at 0; a line that
// is there but malformed is an error.
func (u *usage) setMemory(status procfs.Status) error {
	for _, f := range []struct {
		name string
		dst  *int64
	}{{"VmRSS", &u.rssKB}, {"VmHWM", &u.peakKB}, {"RssAnon", &u.anonKB}, {"RssFile", &u.fileKB}} {
		if _, ok := status[f.name]; !ok {
			continue
		}
		n, err := status.Int(f.name)
		if err != nil {
			return err
		}
		*f.dst = n
	}
	return nil
}

// supervisorUsage is a supervisor's usage over a run, from readings before
// and after it, and the fds it had once the run's restarts were over.
func supervisorUsage(name string, before, after usage, fdsAfter int) *report.Proc {
	return &report.Proc{Name: name, RSSBeforeKB: before.rssKB, RSSAfterKB: after.rssKB, RSSPeakKB: after.peakKB,
		RSSAnonAfterKB: after.anonKB, RSSFileAfterKB: after.fileKB,
		CPUSeconds: (after.cpu - before.cpu).Seconds(), FDsBefore: before.fds, FDsAfter: fdsAfter}
}
