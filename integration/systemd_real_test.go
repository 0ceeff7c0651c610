package integration

// The tests of relay under a real systemd: the example units in
// examples/systemd, as shipped (paths and ports substituted), under systemd
// 254 as PID 1 of a container (nspawn_test.go).

import (
	"strconv"
	"strings"
	"testing"
)

// TestSystemdRealBoot: the harness boots the systemd the units need
// (Type=notify-reload: 253; $FDSTORE, FileDescriptorStorePreserve=: 254).
func TestSystemdRealBoot(t *testing.T) {
	c := bootSystemd(t)
	major, _, _ := strings.Cut(c.version, ".")
	if n, err := strconv.Atoi(major); err != nil || n < 254 {
		t.Fatalf("the container's manager is systemd %q, want 254 or later", c.version)
	}
	if out, err := c.run("test", "-x", "/usr/local/bin/relay", "-a", "-x", "/usr/local/bin/myapp", "-a", "-x", "/usr/local/bin/testchild"); err != nil {
		t.Fatalf("the binaries are not installed in the container: %v %s", err, out)
	}
}
