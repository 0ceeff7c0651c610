package report

import (
	"strings"
	"testing"
)

func TestPoolRatioAndShares(t *testing.T) {
	p := &Pool{BurnMs: 2, DurationS: 10, Concurrency: 32, Mode: "new-conn", Runs: []PoolRun{
		{Workers: 2, OK: 800, OKPerSec: 80, Copies: []PoolCopy{{Pid: 11, OK: 500}, {Pid: 12, OK: 300}}},
		{Workers: 1, OK: 500, OKPerSec: 50, Copies: []PoolCopy{{Pid: 10, OK: 500}}},
	}}
	if x, ok := p.Ratio(2); !ok || x != 1.6 {
		t.Errorf("Ratio(2) = %v, %v, want 1.6", x, ok)
	}
	if _, ok := p.Ratio(4); ok {
		t.Error("Ratio(4) with no run of 4 workers")
	}
	if got := p.Runs[0].Shares(); got != "62.5% / 37.5%" {
		t.Errorf("Shares() = %q", got)
	}
	var b strings.Builder
	p.writeMarkdown(&b)
	for _, want := range []string{"| 1 | 500 | 0 | 50 | - | 100.0% |\n", "| 2 | 800 | 0 | 80 | 1.60× | 62.5% / 37.5% |\n"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("the table lacks %q:\n%s", want, b.String())
		}
	}
}
