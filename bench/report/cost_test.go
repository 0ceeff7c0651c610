package report

import (
	"strings"
	"testing"
)

func TestSpreadOf(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want Spread
	}{
		{nil, Spread{}},
		{[]float64{3, 1, 2}, Spread{N: 3, Median: 2, Min: 1, Max: 3}},
		{[]float64{4, 1, 3, 2}, Spread{N: 4, Median: 2.5, Min: 1, Max: 4}},
	} {
		in := append([]float64(nil), c.in...)
		if got := SpreadOf(c.in); got != c.want {
			t.Errorf("SpreadOf(%v) = %+v, want %+v", c.in, got, c.want)
		}
		for i := range in {
			if in[i] != c.in[i] {
				t.Fatalf("SpreadOf reordered its input: %v", c.in)
			}
		}
	}
}

func testCost() *Cost {
	return &Cost{
		Base:     "inherited",
		Variants: []CostVariant{{Name: "inherited", What: "fds"}, {Name: "taken-over", What: "bind"}, {Name: "standalone", What: "alone"}},
		LoadS:    5,
		Runs: []CostRun{
			// Out of round order, and taken-over's rounds before
			// inherited's: the table follows Variants and rounds.
			{Variant: "taken-over", Round: 2, OKPerSec: 900, ReadyMs: []float64{7.5, 9}, ListenUs: []float64{100, 120}, SeccompFilters: 1},
			{Variant: "taken-over", Round: 1, OKPerSec: 1100, Failed: 2, ReadyMs: []float64{8}, ListenUs: []float64{110}, SeccompFilters: 1},
			{Variant: "inherited", Round: 1, OKPerSec: 1000, ReadyMs: []float64{5, 6}, ListenUs: []float64{40}, SeccompFilters: 0},
			{Variant: "inherited", Round: 2, OKPerSec: 800, ReadyMs: []float64{7}, ListenUs: []float64{50}, SeccompFilters: -1},
			{Variant: "standalone", Round: 1, OKPerSec: 1200, ListenUs: []float64{30}, SeccompFilters: 0},
		},
	}
}

func TestCostRows(t *testing.T) {
	rows := testCost().Rows()
	if len(rows) != 3 || rows[0].Variant != "inherited" || rows[1].Variant != "taken-over" || rows[2].Variant != "standalone" {
		t.Fatalf("rows %+v", rows)
	}
	in, to, sa := rows[0], rows[1], rows[2]
	if in.Throughput.Median != 900 || in.VsBase != 1 || !in.HasAdded || in.AddedMs != 0 || in.AddedMinMs != 0 {
		t.Errorf("inherited %+v", in)
	}
	// taken-over: rounds in order, median 1000 over the base's 900, ready
	// median 8 ms over the base's 6, minimum 7.5 over 5.
	if got := to.OKPerSec; len(got) != 2 || got[0] != 1100 || got[1] != 900 {
		t.Errorf("taken-over ok/s by round %v", got)
	}
	if to.VsBase < 1.1110 || to.VsBase > 1.1112 || to.Failed != 2 {
		t.Errorf("taken-over vs base %v failed %d", to.VsBase, to.Failed)
	}
	if to.Ready != (Spread{N: 3, Median: 8, Min: 7.5, Max: 9}) || !to.HasAdded || to.AddedMs != 2 || to.AddedMinMs != 2.5 {
		t.Errorf("taken-over ready %+v added %v, %v (%v)", to.Ready, to.AddedMs, to.AddedMinMs, to.HasAdded)
	}
	if to.Listen != (Spread{N: 3, Median: 110, Min: 100, Max: 120}) {
		t.Errorf("taken-over listen %+v", to.Listen)
	}
	if len(to.Filters) != 1 || to.Filters[0] != 1 || len(in.Filters) != 2 || in.Filters[0] != -1 || in.Filters[1] != 0 {
		t.Errorf("filters: taken-over %v inherited %v", to.Filters, in.Filters)
	}
	// No relay, no start time: nothing added, but a throughput ratio.
	if sa.Ready.N != 0 || sa.HasAdded || sa.VsBase < 1.333 || sa.VsBase > 1.334 {
		t.Errorf("standalone %+v", sa)
	}
}

// Without the base variant's runs there is nothing to compare with.
func TestCostRowsWithoutBase(t *testing.T) {
	c := testCost()
	var runs []CostRun
	for _, r := range c.Runs {
		if r.Variant != c.Base {
			runs = append(runs, r)
		}
	}
	c.Runs = append(runs, CostRun{Variant: "other", OKPerSec: 1})
	rows := c.Rows()
	if len(rows) != 3 || rows[0].Variant != "taken-over" || rows[2].Variant != "other" {
		t.Fatalf("rows %+v", rows)
	}
	for _, r := range rows {
		if r.VsBase != 0 || r.HasAdded {
			t.Errorf("%s compared with a missing base: %+v", r.Variant, r)
		}
	}
}

func TestCostMarkdown(t *testing.T) {
	rep := Report{Settings: map[string]string{}, Cost: testCost()}
	var b strings.Builder
	if err := rep.WriteMarkdown(&b); err != nil {
		t.Fatal(err)
	}
	md := b.String()
	for _, want := range []string{
		"**Takeover cost.**",
		"| variant | filters | ok/s per round | ok/s median | vs inherited |",
		"| inherited | ?/0 | 1000, 800 | 900 | 1.000 | 0 | 6.00 | 5.00 | 7.00 | 3 | +0.00 / +0.00 | 45 | 40 | 50 | 2 |",
		"| taken-over | 1 | 1100, 900 | 1000 | 1.111 | 2 | 8.00 | 7.50 | 9.00 | 3 | +2.00 / +2.50 | 110 | 100 | 120 | 3 |",
		"| standalone | 0 | 1200 | 1200 | 1.333 | 0 | — | — | — | 0 | — | 30 | 30 | 30 | 1 |",
		"- `taken-over`: bind\n",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	// No cost runs, no cost table.
	b.Reset()
	rep.Cost = &Cost{Base: "inherited"}
	if err := rep.WriteMarkdown(&b); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(b.String(), "Takeover cost") {
		t.Error("a takeover cost table without runs")
	}
}
