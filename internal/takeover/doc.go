// Package takeover lands a child's own bind(2) on a socket relay owns.
//
// Most servers bind their port themselves rather than take an inherited
// socket. The exec shim installs a seccomp filter (Install) that turns the
// child's bind(2) and listen(2) into user notifications (seccomp_unotify(2))
// on a listener fd, which it hands to relay over a socket pair before it
// execs the server. relay reads each notification in a Session: for a bind
// of an address a --listen covers, it puts its own socket in place of the
// child's, at the same fd number (SECCOMP_IOCTL_NOTIF_ADDFD with
// SECCOMP_ADDFD_FLAG_SETFD), and answers success; any other bind proceeds
// as if nothing had looked at it. A listen(2) on a socket relay handed out is
// answered success without running, so the child cannot shrink relay's
// backlog. The filter is inherited across fork and exec, so a server's
// workers behave the same way.
//
// Which socket a bind gets is the caller's decision (Config.Claim); this
// package only reads the request, inspects the child's socket, installs the
// answer, and reports what happened (Config.Event).
//
// # Kernel requirements
//
// Linux 5.9 (SECCOMP_IOCTL_NOTIF_ADDFD); pidfd_getfd (5.6) and
// process_vm_readv to inspect the child's socket and read its address,
// which need ptrace-level access to the child (relay's own descendant, same
// user: Yama's ptrace_scope 0 or 1, or CAP_SYS_PTRACE). From 5.19 the filter
// asks for SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, so a signal to the child
// (Go's runtime sends SIGURG freely) cannot interrupt a bind relay is
// answering; before 5.19 an interrupted bind is restarted by the kernel and
// answered again, at the cost of a slower start. From 6.9 the notifying
// thread is opened directly with PIDFD_THREAD; before, through its thread
// group leader.
//
// # What this is not
//
// It is not a sandbox. The filter only redirects binds; the child can still
// do anything its user may, and another thread of the child can change the
// address between relay's read and the kernel's bind. Without
// CAP_SYS_ADMIN, installing a filter needs no_new_privs, which the shim sets
// for the child's whole tree: setuid and file-capability binaries then run
// without their privileges. If relay dies, every later bind(2) or listen(2)
// in the child's tree fails with ENOSYS. Code the filter does not see
// (32-bit x86 system calls on amd64, io_uring's bind) is not redirected.
package takeover
