package udpsteer

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// The capability bits (linux/capability.h).
const (
	capSysAdmin = 21
	capBPF      = 39
)

var (
	availableOnce sync.Once
	availableErr  error
)

// Available reports whether this kernel, with this process's privileges,
// lets a Group be made: it creates the maps and loads the steering program
// (with small maps), and closes them. The error names what is missing:
// CAP_BPF or CAP_SYS_ADMIN, or what the kernel refused. The answer is
// computed once per process.
func Available() error {
	availableOnce.Do(func() {
		m, err := newMaps(2, 1)
		if err != nil {
			availableErr = err
			return
		}
		defer m.close()
		prog, _, err := load(m, programOptions{idle: defaultIdleTimeout, quic: true, quicIdle: defaultQUICInitialIdle})
		if err != nil {
			availableErr = err
			return
		}
		prog.Close()
	})
	return availableErr
}

// explain wraps err, from creating a map or loading the program, with what
// it most likely means.
func explain(what string, err error) error {
	var verr *ebpf.VerifierError
	switch {
	case errors.As(err, &verr):
		return fmt.Errorf("%s: the kernel's verifier refused it: %w", what, err)
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		eff, ok := effectiveCaps()
		switch {
		case ok && eff&(1<<capBPF) == 0 && eff&(1<<capSysAdmin) == 0:
			// Not cilium's error: its hint at RLIMIT_MEMLOCK misleads here.
			return fmt.Errorf("%s: %w: it needs CAP_BPF (Linux 5.8+) or CAP_SYS_ADMIN, and this process has neither (CapEff %#x)", what, unix.EPERM, eff)
		case ok && eff&(1<<capSysAdmin) == 0:
			return fmt.Errorf("%s: %w although this process has CAP_BPF: a kernel before 5.8 knows only CAP_SYS_ADMIN for it; else a seccomp filter, an LSM (lockdown, SELinux, AppArmor) or, before Linux 5.11, RLIMIT_MEMLOCK refused it", what, err)
		default:
			return fmt.Errorf("%s: %w although this process has CAP_SYS_ADMIN: a seccomp filter, an LSM (lockdown, SELinux, AppArmor) or, before Linux 5.11, RLIMIT_MEMLOCK refused it", what, err)
		}
	case errors.Is(err, ebpf.ErrNotSupported), errors.Is(err, unix.EINVAL), errors.Is(err, unix.EOPNOTSUPP):
		return fmt.Errorf("%s: %w (SK_REUSEPORT programs and REUSEPORT_SOCKARRAY maps need Linux 4.19+ built with CONFIG_BPF_SYSCALL)", what, err)
	case errors.Is(err, unix.ENOSYS):
		return fmt.Errorf("%s: %w: this kernel has no bpf(2), or a seccomp filter hides it", what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// effectiveCaps reads this process's effective capabilities.
func effectiveCaps() (uint64, bool) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, false
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "CapEff:"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return n, err == nil
		}
	}
	return 0, false
}
