// Package fdlimit reads how many files relay may have open, for the caps
// its servers (the control socket, the metrics endpoint) put on their
// connections so that a flood of clients leaves relay the fds it needs to
// start generations.
package fdlimit

import "golang.org/x/sys/unix"

// guess is the limit assumed when it cannot be read: Linux's default soft
// RLIMIT_NOFILE.
const guess = 1024

// Soft is relay's soft RLIMIT_NOFILE, or 1024 if it cannot be read.
func Soft() uint64 {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return guess
	}
	return rl.Cur
}
