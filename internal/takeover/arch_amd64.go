package takeover

import "golang.org/x/sys/unix"

// auditArch is the architecture whose system calls the filter looks at.
// Calls made through another ABI (32-bit int 0x80) are let through.
const auditArch = unix.AUDIT_ARCH_X86_64

// archSupported: this architecture has a filter.
const archSupported = true

// unlinkCalls are the system calls that remove a file by name.
func unlinkCalls() []uint32 { return []uint32{unix.SYS_UNLINK, unix.SYS_UNLINKAT} }

// plainUnlink: nr is unlink(path) rather than unlinkat.
func plainUnlink(nr uint32) bool { return nr == unix.SYS_UNLINK }
