package takeover

import "golang.org/x/sys/unix"

// auditArch is the architecture whose system calls the filter looks at.
const auditArch = unix.AUDIT_ARCH_AARCH64

// archSupported: this architecture has a filter.
const archSupported = true

// unlinkCalls are the system calls that remove a file by name.
func unlinkCalls() []uint32 { return []uint32{unix.SYS_UNLINKAT} }

// plainUnlink: arm64 has unlinkat only.
func plainUnlink(uint32) bool { return false }
