package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/relaysh/relay/bench/report"
)

// memoryMark reports whether the memory run reads relay's memory after
// restart i of n: the 1st, 10th, 100th, 250th, 500th and 1000th, and the
// last.
func memoryMark(i, n int) bool {
	return i == n || slices.Contains([]int{1, 10, 100, 250, 500, 1000}, i)
}

// memoryQuiet is how long relay's RssAnon must stay the same for the final
// wait to end before s.memorySettle.
const memoryQuiet = 2 * time.Second

// runMemory runs relay (--health notify, steered, --drain s.memoryDrain if
// set, its defaults otherwise) with hello -startup 0 -lame-duck 0,
// restarts it s.memoryRestarts times in a row with "relay restart", and
// reads its memory before the first restart, after the restarts memoryMark
// names, and once more after a wait of at most s.memorySettle, which
// ends early once RssAnon has stayed the same for memoryQuiet.
func runMemory(ctx context.Context, s *settings) (*report.Memory, error) {
	ms := *s
	ms.startup, ms.lameDuck, ms.plainShutdown = 0, 0, false
	sc := scenario{name: "memory", health: "notify", launch: launchRelay}
	if s.memoryDrain != "" {
		sc.relayArgs = []string{"--drain", s.memoryDrain}
	}
	m := &report.Memory{Restarts: s.memoryRestarts, Drain: s.memoryDrain, Points: []report.MemoryPoint{}, RestartMs: []float64{}}
	run, err := launchServing(ctx, &ms, sc, "memory")
	if err != nil {
		return nil, err
	}
	defer run.close()
	pid := run.pid()
	read := func(after int) (report.MemoryPoint, error) {
		u, err := readUsage(pid)
		return report.MemoryPoint{After: after, RSSKB: u.rssKB, RSSAnonKB: u.anonKB, RSSFileKB: u.fileKB, FDs: u.fds}, err
	}
	p, err := read(0)
	if err != nil {
		return nil, err
	}
	m.Points = append(m.Points, p)
	fmt.Fprintf(os.Stderr, "memory: %d restarts with relay restart (each at least relay's drain)\n", s.memoryRestarts)
	var restartErr error
	for i := 1; i <= s.memoryRestarts; i++ {
		t0 := time.Now()
		if err := restartAndWait(ctx, &ms, run); err != nil {
			if ctx.Err() != nil {
				return m, ctx.Err()
			}
			restartErr = fmt.Errorf("memory run, restart %d: %w", i, err)
			break
		}
		m.RestartMs = append(m.RestartMs, float64(time.Since(t0))/float64(time.Millisecond))
		if memoryMark(i, s.memoryRestarts) {
			p, err := read(i)
			if err != nil {
				return m, err
			}
			m.Points = append(m.Points, p)
			fmt.Fprintf(os.Stderr, "memory: after %4d restarts  VmRSS %6d kB  RssAnon %6d kB  RssFile %6d kB\n", i, p.RSSKB, p.RSSAnonKB, p.RSSFileKB)
		}
	}
	if restartErr == nil && s.memoryRestarts > 0 {
		settled, waited, err := settleMemory(ctx, s.memorySettle, func() (report.MemoryPoint, error) { return read(s.memoryRestarts) })
		if err != nil {
			return m, err
		}
		m.Settled, m.SettleS = &settled, waited.Seconds()
		fmt.Fprintf(os.Stderr, "memory: after %.1f s idle  VmRSS %6d kB  RssAnon %6d kB  RssFile %6d kB\n", m.SettleS, settled.RSSKB, settled.RSSAnonKB, settled.RSSFileKB)
	}
	return m, errors.Join(restartErr, run.finish())
}

// settleMemory reads the memory every 250 ms until RssAnon has stayed the
// same for memoryQuiet, or until within has passed, and returns the last
// reading and how long it waited. This is a benchmark's bounded wait for
// the Go runtime's background scavenger, not an ordering of events.
func settleMemory(ctx context.Context, within time.Duration, read func() (report.MemoryPoint, error)) (report.MemoryPoint, time.Duration, error) {
	t0 := time.Now()
	p, err := read()
	if err != nil {
		return p, 0, err
	}
	since := t0
	for time.Since(t0) < within && time.Since(since) < memoryQuiet {
		select {
		case <-ctx.Done():
			return p, time.Since(t0), ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
		q, err := read()
		if err != nil {
			return p, time.Since(t0), err
		}
		if q.RSSAnonKB != p.RSSAnonKB {
			since = time.Now()
		}
		p = q
	}
	return p, time.Since(t0), nil
}
