package steer

import (
	"bytes"
	"fmt"
	"os"
)

// migrateReqPath is the sysctl that makes the kernel move the connections
// queued on a closing member of a reuseport group to another member,
// instead of resetting them (Linux 5.14+). It applies to the whole network
// namespace.
const migrateReqPath = "/proc/sys/net/ipv4/tcp_migrate_req"

// Migration states EnableMigration reports.
const (
	MigrationOn      = "on"      // it was on already
	MigrationEnabled = "enabled" // relay turned it on
)

// EnableMigration turns net.ipv4.tcp_migrate_req on if it is off and the
// process may write it. It returns MigrationOn or MigrationEnabled, or an
// error saying why it stays off (an older kernel, or no CAP_NET_ADMIN).
func EnableMigration() (string, error) {
	b, err := os.ReadFile(migrateReqPath)
	if err != nil {
		return "", fmt.Errorf("reading net.ipv4.tcp_migrate_req (Linux 5.14+): %w", err)
	}
	if string(bytes.TrimSpace(b)) != "0" {
		return MigrationOn, nil
	}
	f, err := os.OpenFile(migrateReqPath, os.O_WRONLY, 0)
	if err != nil {
		return "", fmt.Errorf("turning on net.ipv4.tcp_migrate_req: %w", err)
	}
	_, err = f.Write([]byte("1\n"))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("turning on net.ipv4.tcp_migrate_req: %w", err)
	}
	return MigrationEnabled, nil
}
