// Package procfs reads what relay, its tests and the benchmark need to know
// about processes from /proc: the children of a process, and the fields of
// /proc/PID/stat and /proc/PID/status.
package procfs

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Children lists the pids whose parent is pid, from the children files of
// each of its threads. A process that is gone has none.
func Children(pid int) []int {
	var out []int
	files, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, field := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(field); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}
