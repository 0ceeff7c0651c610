// Command seccompdeny runs a program under a seccomp policy that refuses
// seccomp filters, as an old kernel or a container's policy would: it
// installs a classic BPF filter that makes seccomp(2), and prctl's
// PR_SET_SECCOMP, fail with an errno, allows every other call, and execs
// the program. The filter is inherited by everything the program starts.
//
//	seccompdeny [-errno ENOSYS|EINVAL|EPERM] -- PROGRAM [ARG...]
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

func main() {
	errnoName := flag.String("errno", "ENOSYS", "the error seccomp(2) returns: ENOSYS, EINVAL or EPERM")
	flag.Parse()
	errno, ok := map[string]syscall.Errno{"ENOSYS": unix.ENOSYS, "EINVAL": unix.EINVAL, "EPERM": unix.EPERM}[*errnoName]
	if !ok || flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	path, err := exec.LookPath(flag.Arg(0))
	if err != nil {
		fail(err)
	}
	prog, err := filter(errno)
	if err != nil {
		fail(err)
	}
	// The filter and the exec must happen on one thread: seccomp applies
	// to the calling thread, and execve keeps only it.
	runtime.LockOSThread()
	// Without privilege a filter needs no_new_privs; as root it would
	// not, but the policy is the same either way.
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		fail(fmt.Errorf("PR_SET_NO_NEW_PRIVS: %w", err))
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	if err := unix.Prctl(unix.PR_SET_SECCOMP, unix.SECCOMP_MODE_FILTER, uintptr(unsafe.Pointer(&fprog)), 0, 0); err != nil {
		fail(fmt.Errorf("PR_SET_SECCOMP: %w", err))
	}
	fail(unix.Exec(path, flag.Args(), os.Environ()))
}

// filter returns the program: on this architecture, seccomp(2) and
// prctl(PR_SET_SECCOMP, ...) get errno; everything else is allowed.
func filter(errno syscall.Errno) ([]unix.SockFilter, error) {
	arch, ok := map[string]uint32{"amd64": unix.AUDIT_ARCH_X86_64, "arm64": unix.AUDIT_ARCH_AARCH64}[runtime.GOARCH]
	if !ok {
		return nil, fmt.Errorf("no audit arch known for %s", runtime.GOARCH)
	}
	// struct seccomp_data: int nr; __u32 arch; __u64 ip; __u64 args[6].
	const offNr, offArch, offArg0 = 0, 4, 16
	deny := bpf.RetConstant{Val: unix.SECCOMP_RET_ERRNO | uint32(errno)}
	allow := bpf.RetConstant{Val: unix.SECCOMP_RET_ALLOW}
	raw, err := bpf.Assemble([]bpf.Instruction{
		/* 0 */ bpf.LoadAbsolute{Off: offArch, Size: 4},
		/* 1 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: arch, SkipFalse: 5}, // to 7
		/* 2 */ bpf.LoadAbsolute{Off: offNr, Size: 4},
		/* 3 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_SECCOMP, SkipTrue: 4}, // to 8
		/* 4 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_PRCTL, SkipFalse: 2}, // to 7
		/* 5 */ bpf.LoadAbsolute{Off: offArg0, Size: 4}, // the option, low half
		/* 6 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.PR_SET_SECCOMP, SkipTrue: 1}, // to 8
		/* 7 */ allow,
		/* 8 */ deny,
	})
	if err != nil {
		return nil, err
	}
	out := make([]unix.SockFilter, len(raw))
	for i, ins := range raw {
		out[i] = unix.SockFilter{Code: ins.Op, Jt: ins.Jt, Jf: ins.Jf, K: ins.K}
	}
	return out, nil
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "seccompdeny:", err)
	os.Exit(1)
}
