package fdlimit

import (
	"testing"

	"golang.org/x/sys/unix"
)

// Soft follows the soft limit as the process changes it.
func TestSoft(t *testing.T) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	if got := Soft(); got != rl.Cur {
		t.Fatalf("Soft() = %d, the soft limit is %d", got, rl.Cur)
	}
	lower := rl
	lower.Cur = min(rl.Cur, 512) - 1
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lower); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Setrlimit(unix.RLIMIT_NOFILE, &rl) })
	if got := Soft(); got != lower.Cur {
		t.Fatalf("Soft() = %d after lowering the soft limit to %d", got, lower.Cur)
	}
}
