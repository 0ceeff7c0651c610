package main

import (
	"os"
	"testing"

	"github.com/relaysh/relay/internal/procfs"
)

func TestSetMemory(t *testing.T) {
	// The memory lines of a /proc/PID/status as Linux 6.x writes them.
	status := procfs.ParseStatus([]byte("Name:\trelay\nVmHWM:\t   11520 kB\nVmRSS:\t   10752 kB\n" +
		"RssAnon:\t    1740 kB\nRssFile:\t    9012 kB\nRssShmem:\t       0 kB\nThreads:\t7\n"))
	var u usage
	if err := u.setMemory(status); err != nil {
		t.Fatal(err)
	}
	want := usage{rssKB: 10752, peakKB: 11520, anonKB: 1740, fileKB: 9012}
	if u != want {
		t.Errorf("memory %+v, want %+v", u, want)
	}

	// A kernel thread has no memory lines: all stay 0.
	u = usage{}
	if err := u.setMemory(procfs.ParseStatus([]byte("Name:\tkthreadd\nThreads:\t1\n"))); err != nil || u != (usage{}) {
		t.Errorf("no memory lines: %+v, %v", u, err)
	}
	if err := u.setMemory(procfs.ParseStatus([]byte("VmRSS:\t10 kB\nRssAnon:\tmany kB\n"))); err == nil {
		t.Error("no error for a malformed RssAnon line")
	}
}

func TestReadUsageSplitsTheRSS(t *testing.T) {
	u, err := readUsage(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// This test binary has anonymous memory (its heap) and file-backed
	// pages (its text); the two are parts of its RSS.
	if u.anonKB <= 0 || u.fileKB <= 0 || u.anonKB+u.fileKB > u.rssKB {
		t.Errorf("RssAnon %d kB + RssFile %d kB against VmRSS %d kB", u.anonKB, u.fileKB, u.rssKB)
	}
}
