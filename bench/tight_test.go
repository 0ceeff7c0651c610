package main

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/relaysh/relay/bench/report"
)

func TestTightOver(t *testing.T) {
	l, err := parseRunLog(strings.NewReader(strings.Join(fixedDrainLog, "\n")), base0)
	if err != nil {
		t.Fatal(err)
	}
	// pid 102 started at 1000 ms (its own line, cut to the millisecond)
	// and is ready; pid 101, ready before it, has its stop signal.
	if !tightOver(l, 1000*time.Millisecond+500*time.Microsecond) {
		t.Error("not over after a restart answered by pid 102")
	}
	// No process started after 1100 ms.
	if tightOver(l, 1100*time.Millisecond) {
		t.Error("over with no process started after the last restart")
	}
	// Ready, but the old one has no stop signal yet.
	delete(l.stops, 101)
	if tightOver(l, time.Second) {
		t.Error("over before the old process got its stop signal")
	}
}

func TestMemoryMark(t *testing.T) {
	var got []int
	for i := 1; i <= 1200; i++ {
		if memoryMark(i, 1200) {
			got = append(got, i)
		}
	}
	if want := []int{1, 10, 100, 250, 500, 1000, 1200}; !slices.Equal(got, want) {
		t.Errorf("marks of 1200 restarts %v, want %v", got, want)
	}
	got = nil
	for i := 1; i <= 20; i++ {
		if memoryMark(i, 20) {
			got = append(got, i)
		}
	}
	if want := []int{1, 10, 20}; !slices.Equal(got, want) {
		t.Errorf("marks of 20 restarts %v, want %v", got, want)
	}
}

func TestSettleMemoryBounded(t *testing.T) {
	// With no time to wait, one reading.
	n := 0
	p, _, err := settleMemory(context.Background(), 0, func() (report.MemoryPoint, error) {
		n++
		return report.MemoryPoint{RSSAnonKB: 100}, nil
	})
	if err != nil || n != 1 || p.RSSAnonKB != 100 {
		t.Errorf("settle with no time: %d readings, %+v, %v", n, p, err)
	}
	// A reading that fails is an error.
	boom := errors.New("no such process")
	if _, _, err := settleMemory(context.Background(), time.Minute, func() (report.MemoryPoint, error) {
		return report.MemoryPoint{}, boom
	}); !errors.Is(err, boom) {
		t.Errorf("settle with a failing read: %v", err)
	}
	// A cancelled context ends the wait at once.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, err := settleMemory(ctx, time.Minute, func() (report.MemoryPoint, error) {
		return report.MemoryPoint{}, nil
	}); !errors.Is(err, context.Canceled) {
		t.Errorf("settle after cancel: %v", err)
	}
}
