package takeover

import "golang.org/x/sys/unix"

// auditArch is the architecture whose system calls the filter looks at.
// Calls made through another ABI (32-bit int 0x80) are let through.
const auditArch = unix.AUDIT_ARCH_X86_64

// archSupported: this architecture has a filter.
const archSupported = true
