package report

import (
	"fmt"
	"html"
	"io"
	"math"
	"strings"
)

// Chart geometry, in SVG user units.
const (
	chartWidth  = 960
	panelHeight = 130
	stripHeight = 34 // the failures strip under each panel
	panelGap    = 62
	marginLeft  = 64
	marginRight = 24
	marginTop   = 64
	plotWidth   = chartWidth - marginLeft - marginRight
)

// WriteChart draws one panel per run: complete requests per second (a blue
// line) over time, and under it a strip of failed requests per second (red
// bars, at least 2 units tall so a single failure shows), with each restart
// trigger marked by a dashed line. Every panel has the same scales, so the
// runs compare at a glance; the failures have a scale of their own, so that
// a flood of refused connects does not flatten the line above.
func WriteChart(w io.Writer, title string, runs []Result) error {
	var ymax, fmax, xmax float64
	for _, r := range runs {
		xmax = math.Max(xmax, r.DurationS)
		for _, p := range r.Timeline {
			ymax = math.Max(ymax, p.OKPerSec)
			fmax = math.Max(fmax, p.FailPerSec)
		}
	}
	ymax, fmax = niceCeil(ymax), niceCeil(fmax)
	if xmax <= 0 {
		xmax = 1
	}
	height := marginTop + len(runs)*(panelHeight+stripHeight+panelGap)
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif" font-size="12">`+"\n",
		chartWidth, height, chartWidth, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="16" font-weight="bold">%s</text>`+"\n", marginLeft, html.EscapeString(title))
	// Legend.
	lx := marginLeft
	fmt.Fprintf(&b, `<line x1="%d" y1="42" x2="%d" y2="42" stroke="#1f77b4" stroke-width="2"/><text x="%d" y="46">complete requests/s</text>`+"\n", lx, lx+24, lx+30)
	lx += 170
	fmt.Fprintf(&b, `<rect x="%d" y="36" width="12" height="12" fill="#d62728"/><text x="%d" y="46">failed requests/s</text>`+"\n", lx, lx+18)
	lx += 150
	fmt.Fprintf(&b, `<line x1="%d" y1="42" x2="%d" y2="42" stroke="#555" stroke-dasharray="4 3"/><text x="%d" y="46">restart triggered</text>`+"\n", lx, lx+24, lx+30)

	for i, r := range runs {
		top := marginTop + i*(panelHeight+stripHeight+panelGap) + 18
		drawPanel(&b, r, top, xmax, ymax, fmax)
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

func drawPanel(b *strings.Builder, r Result, top int, xmax, ymax, fmax float64) {
	x := func(t float64) float64 { return marginLeft + t/xmax*plotWidth }
	y := func(v float64) float64 { return float64(top+panelHeight) - v/ymax*panelHeight }
	stripTop := top + panelHeight + 4
	bottom := stripTop + stripHeight

	label := fmt.Sprintf("%s, %s: %d complete, %d failed", r.Scenario, r.Mode, r.OK, r.TotalFailed())
	color := "#222"
	if r.TotalFailed() > 0 {
		color = "#b00"
	}
	fmt.Fprintf(b, `<text x="%d" y="%d" font-weight="bold" fill="%s">%s</text>`+"\n", marginLeft, top-6, color, html.EscapeString(label))
	fmt.Fprintf(b, `<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#bbb"/>`+"\n", marginLeft, top, plotWidth, panelHeight)
	fmt.Fprintf(b, `<rect x="%d" y="%d" width="%d" height="%d" fill="#fcf5f5" stroke="#bbb"/>`+"\n", marginLeft, stripTop, plotWidth, stripHeight)

	// Horizontal grid and y labels.
	for _, f := range []float64{0, 0.25, 0.5, 0.75, 1} {
		v := ymax * f
		fmt.Fprintf(b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#eee"/>`, marginLeft, y(v), marginLeft+plotWidth, y(v))
		fmt.Fprintf(b, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", marginLeft-6, y(v)+4, short(v))
	}
	fmt.Fprintf(b, `<text x="%d" y="%d" text-anchor="end" fill="#b00" font-size="10">failed/s</text>`, marginLeft-6, stripTop+13)
	fmt.Fprintf(b, `<text x="%d" y="%d" text-anchor="end" fill="#b00" font-size="10">≤%s</text>`+"\n", marginLeft-6, stripTop+27, short(fmax))
	// X ticks every few seconds.
	step := niceStep(xmax / 10)
	for t := 0.0; t <= xmax+1e-9; t += step {
		fmt.Fprintf(b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#999"/>`, x(t), bottom, x(t), bottom+4)
		fmt.Fprintf(b, `<text x="%.1f" y="%d" text-anchor="middle">%gs</text>`+"\n", x(t), bottom+16, t)
	}
	// Restart triggers, across the panel and the strip.
	for _, t := range r.TriggersS {
		fmt.Fprintf(b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#555" stroke-dasharray="4 3"/>`+"\n", x(t), top, x(t), bottom)
	}
	// Failures, in the strip.
	if len(r.Timeline) > 0 {
		bw := math.Max(1, plotWidth/float64(len(r.Timeline)))
		for _, p := range r.Timeline {
			if p.FailPerSec <= 0 {
				continue
			}
			h := math.Max(2, p.FailPerSec/fmax*stripHeight)
			fmt.Fprintf(b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="#d62728"/>`+"\n", x(p.T), float64(bottom)-h, bw, h)
		}
	}
	if r.TotalFailed() == 0 {
		fmt.Fprintf(b, `<text x="%d" y="%d" fill="#888" font-size="10">no failed request</text>`+"\n", marginLeft+6, stripTop+21)
	}
	// Complete requests per second.
	var pts []string
	for _, p := range r.Timeline {
		pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(p.T), y(p.OKPerSec)))
	}
	if len(pts) > 0 {
		fmt.Fprintf(b, `<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="%s"/>`+"\n", strings.Join(pts, " "))
	}
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if v <= m*p {
			return m * p
		}
	}
	return 10 * p
}

// niceStep is the tick step nearest above v among 1, 2 and 5 times a power
// of ten.
func niceStep(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5} {
		if v <= m*p {
			return m * p
		}
	}
	return 10 * p
}

// short formats a count: 2500 as "2.5k".
func short(v float64) string {
	if v >= 1000 {
		return strings.TrimSuffix(fmt.Sprintf("%.1f", v/1000), ".0") + "k"
	}
	return fmt.Sprintf("%g", v)
}
