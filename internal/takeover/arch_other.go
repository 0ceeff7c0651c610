//go:build linux && !amd64 && !arm64

package takeover

// auditArch is unset: relay has no filter for this architecture, and
// Install refuses.
const auditArch = 0

// archSupported: this architecture has no filter.
const archSupported = false

func unlinkCalls() []uint32 { return nil }

func plainUnlink(uint32) bool { return false }
