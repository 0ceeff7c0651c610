package supervisor

import (
	"strings"
	"testing"
)

func TestNewRefusesAnIncompleteConfig(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	for _, c := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no command", Config{RuntimeDir: dir}, "no command to run"},
		{"no reaper", Config{Command: testCommand, RuntimeDir: dir}, "no reaper"},
		{"no runtime directory", Config{Command: testCommand}, "no runtime directory"},
		{"bad takeover", Config{Command: testCommand, RuntimeDir: dir, Takeover: "sometimes"}, `unknown takeover mode "sometimes"`},
		{"negative max draining", Config{Command: testCommand, RuntimeDir: dir, MaxDraining: -1}, "max draining -1 is negative"},
	} {
		if _, err := New(c.cfg); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: New = %v, want an error saying %q", c.name, err, c.want)
		}
	}
}
