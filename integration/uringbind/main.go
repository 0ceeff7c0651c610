// Command uringbind is a server that puts its own socket on its address
// without bind(2): it binds and listens through io_uring (IORING_OP_BIND
// and IORING_OP_LISTEN, Linux 6.11+), which a seccomp filter cannot see.
// The integration tests run it under relay's bind takeover to show that
// relay refuses io_uring_setup(2) by default, and what such a bind does
// when relay allows rings (relay run --allow-io-uring).
//
// It sets SO_REUSEADDR and SO_REUSEPORT, as SO_REUSEPORT servers do, so
// that its socket may join the group of a listener already on the port.
// It answers every request with "uringbind pid N" and an X-Pid header,
// sends READY=1 if NOTIFY_SOCKET is set, and exits 0 on SIGTERM.
//
// Exit codes: 2 usage, 3 io_uring_setup failed, 4 the bind or the listen
// failed (through the ring), 1 anything else.
//
// Raw system calls only: no liburing, no cgo.
package main

import (
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"sync/atomic"
	"syscall"
	"unsafe"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// The io_uring ABI (include/uapi/linux/io_uring.h); x/sys/unix has only
// the system call numbers.
const (
	opBind   = 56 // IORING_OP_BIND, Linux 6.11
	opListen = 57 // IORING_OP_LISTEN, Linux 6.11

	offSQRing = 0          // IORING_OFF_SQ_RING
	offCQRing = 0x8000000  // IORING_OFF_CQ_RING
	offSQEs   = 0x10000000 // IORING_OFF_SQES

	featSingleMmap = 1 << 0 // IORING_FEAT_SINGLE_MMAP: one mmap for both rings
	enterGetEvents = 1 << 0 // IORING_ENTER_GETEVENTS

	sqeSize = 64 // struct io_uring_sqe
	cqeSize = 16 // struct io_uring_cqe

	entries = 8
	backlog = 128
)

// sqringOffsets is struct io_sqring_offsets: where each field of the SQ
// ring is in its mapping.
type sqringOffsets struct {
	Head, Tail, RingMask, RingEntries, Flags, Dropped, Array, Resv1 uint32
	UserAddr                                                        uint64
}

// cqringOffsets is struct io_cqring_offsets.
type cqringOffsets struct {
	Head, Tail, RingMask, RingEntries, Overflow, CQEs, Flags, Resv1 uint32
	UserAddr                                                        uint64
}

// params is struct io_uring_params (120 bytes), filled in by the kernel.
type params struct {
	SQEntries, CQEntries, Flags, SQThreadCPU, SQThreadIdle, Features, WQFd uint32
	Resv                                                                   [3]uint32
	SQOff                                                                  sqringOffsets
	CQOff                                                                  cqringOffsets
}

// ring is a set-up io_uring: its fd and its three mappings.
type ring struct {
	fd         int
	p          params
	sq, cq     []byte // the rings (the same memory with IORING_FEAT_SINGLE_MMAP)
	sqes       []byte // the submission queue entries
	submitted  uint64 // user_data of the last submission
	sqMask     uint32
	cqMask     uint32
	sqTail     *uint32
	sqArray    []byte
	cqHead     *uint32
	cqTail     *uint32
	cqesOffset uint32
}

func main() {
	addr := flag.String("addr", "", "the `HOST:PORT` to bind through io_uring")
	flag.Parse()
	ap, err := netip.ParseAddrPort(*addr)
	if err != nil || flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "uringbind: usage: uringbind -addr HOST:PORT")
		os.Exit(2)
	}

	// A plain socket(2), which the takeover filter lets through: only its
	// bind is ever redirected, and this one will not go through bind(2).
	family := unix.AF_INET
	if ap.Addr().Is6() && !ap.Addr().Is4In6() {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	check("socket", err)
	// SO_REUSEPORT lets the socket bind a port where relay's group already
	// listens (same user) and join that group at listen.
	check("SO_REUSEADDR", unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1))
	check("SO_REUSEPORT", unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1))

	r, err := setup(entries)
	if err != nil {
		// What relay's default answers (EPERM): the test expects exit 3.
		fmt.Fprintf(os.Stderr, "uringbind: io_uring_setup: %v\n", err)
		os.Exit(3)
	}
	// The bind and the listen, each a ring operation that no seccomp
	// filter sees. The address is the raw sockaddr the kernel copies in.
	sa := rawSockaddr(ap, family)
	if res := r.do(opBind, fd, uint64(uintptr(unsafe.Pointer(&sa[0]))), uint64(len(sa)), 0); res < 0 {
		fmt.Fprintf(os.Stderr, "uringbind: IORING_OP_BIND %s: %v\n", ap, syscall.Errno(-res))
		os.Exit(4)
	}
	runtime.KeepAlive(sa) // the kernel read it during io_uring_enter
	if res := r.do(opListen, fd, 0, 0, backlog); res < 0 {
		fmt.Fprintf(os.Stderr, "uringbind: IORING_OP_LISTEN: %v\n", syscall.Errno(-res))
		os.Exit(4)
	}
	r.close() // the socket needs no ring any more

	// net.FileListener dups the fd; the original is closed after.
	f := os.NewFile(uintptr(fd), "uringbind")
	ln, err := net.FileListener(f)
	check("FileListener", err)
	f.Close()

	pid := os.Getpid()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("X-Pid", strconv.Itoa(pid))
		fmt.Fprintf(w, "uringbind pid %d\n", pid)
	})}
	go srv.Serve(ln)
	fmt.Fprintf(os.Stderr, "uringbind: listening on %s via io_uring\n", ln.Addr())
	// Ready: relay's readiness (auto) takes READY=1 when NOTIFY_SOCKET is
	// set; SdNotify does nothing when it is not.
	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		fmt.Fprintf(os.Stderr, "uringbind: sd_notify: %v\n", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	<-ctx.Done()
	srv.Close()
	os.Exit(0)
}

// setup calls io_uring_setup(2) and maps the rings and the SQE array.
func setup(n uint32) (*ring, error) {
	r := &ring{}
	// The call relay's takeover filter sends to relay, which answers
	// EPERM unless it runs with --allow-io-uring.
	fd, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(n), uintptr(unsafe.Pointer(&r.p)), 0)
	if e != 0 {
		return nil, e
	}
	r.fd = int(fd)
	p := &r.p
	// The rings' sizes: the SQ ring ends with its index array, the CQ
	// ring with its CQEs. One kernel mapping holds both when the kernel
	// says so (5.4+); map the larger size once, then.
	sqSize := int(p.SQOff.Array + p.SQEntries*4)
	cqSize := int(p.CQOff.CQEs + p.CQEntries*cqeSize)
	single := p.Features&featSingleMmap != 0
	if single {
		sqSize = max(sqSize, cqSize)
	}
	var err error
	r.sq, err = unix.Mmap(r.fd, offSQRing, sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("mmap SQ ring: %w", err)
	}
	r.cq = r.sq
	if !single {
		r.cq, err = unix.Mmap(r.fd, offCQRing, cqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
		if err != nil {
			return nil, fmt.Errorf("mmap CQ ring: %w", err)
		}
	}
	r.sqes, err = unix.Mmap(r.fd, offSQEs, int(p.SQEntries*sqeSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("mmap SQEs: %w", err)
	}
	r.sqMask = *u32(r.sq, p.SQOff.RingMask)
	r.cqMask = *u32(r.cq, p.CQOff.RingMask)
	r.sqTail = u32(r.sq, p.SQOff.Tail)
	r.sqArray = r.sq[p.SQOff.Array:]
	r.cqHead = u32(r.cq, p.CQOff.Head)
	r.cqTail = u32(r.cq, p.CQOff.Tail)
	r.cqesOffset = p.CQOff.CQEs
	return r, nil
}

// do submits one operation on fd and waits for its completion; it returns
// the CQE's res: the operation's result, or -errno.
func (r *ring) do(op uint8, fd int, addr, off uint64, length uint32) int32 {
	// Fill the SQE at the tail's slot; every field not set is zero, as
	// the kernel's prep of BIND and LISTEN demands.
	tail := atomic.LoadUint32(r.sqTail)
	idx := tail & r.sqMask
	sqe := r.sqes[idx*sqeSize : (idx+1)*sqeSize]
	clear(sqe)
	r.submitted++
	sqe[0] = op                                               // opcode
	binary.NativeEndian.PutUint32(sqe[4:], uint32(int32(fd))) // fd
	binary.NativeEndian.PutUint64(sqe[8:], off)               // off (addr2): BIND's addrlen
	binary.NativeEndian.PutUint64(sqe[16:], addr)             // addr: BIND's sockaddr
	binary.NativeEndian.PutUint32(sqe[24:], length)           // len: LISTEN's backlog
	binary.NativeEndian.PutUint64(sqe[32:], r.submitted)      // user_data
	binary.NativeEndian.PutUint32(r.sqArray[idx*4:], idx)     // the SQ array points at it
	atomic.StoreUint32(r.sqTail, tail+1)                      // publish (a release store)

	// io_uring_enter(to_submit=1, min_complete=1, GETEVENTS): submit and
	// wait for the one completion. A signal may interrupt the wait; then
	// wait again, submitting nothing more once the SQE was taken.
	toSubmit := uintptr(1)
	for range 100 { // bounded
		if atomic.LoadUint32(r.cqTail) != atomic.LoadUint32(r.cqHead) {
			break
		}
		n, _, e := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), toSubmit, 1, enterGetEvents, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			fmt.Fprintf(os.Stderr, "uringbind: io_uring_enter: %v\n", e)
			os.Exit(4)
		}
		toSubmit -= min(n, toSubmit) // how many the kernel took
	}
	head := atomic.LoadUint32(r.cqHead)
	if atomic.LoadUint32(r.cqTail) == head { // an acquire load
		fmt.Fprintln(os.Stderr, "uringbind: io_uring_enter returned without a completion")
		os.Exit(4)
	}
	cqe := r.cq[r.cqesOffset+(head&r.cqMask)*cqeSize:]
	res := int32(binary.NativeEndian.Uint32(cqe[8:])) // res, after the u64 user_data
	if got := binary.NativeEndian.Uint64(cqe); got != r.submitted {
		fmt.Fprintf(os.Stderr, "uringbind: completion for %d, want %d\n", got, r.submitted)
		os.Exit(4)
	}
	atomic.StoreUint32(r.cqHead, head+1) // give the CQE back
	return res
}

func (r *ring) close() {
	unix.Munmap(r.sqes)
	if &r.cq[0] != &r.sq[0] {
		unix.Munmap(r.cq)
	}
	unix.Munmap(r.sq)
	unix.Close(r.fd)
}

// u32 is the uint32 at off in a ring's mapping, shared with the kernel.
func u32(b []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }

// rawSockaddr is the sockaddr_in or sockaddr_in6 of ap, as the kernel reads
// it: family in host order, port and address in network order.
func rawSockaddr(ap netip.AddrPort, family int) []byte {
	if family == unix.AF_INET {
		b := make([]byte, unix.SizeofSockaddrInet4)
		binary.NativeEndian.PutUint16(b, unix.AF_INET)
		binary.BigEndian.PutUint16(b[2:], ap.Port())
		a := ap.Addr().Unmap().As4()
		copy(b[4:], a[:])
		return b
	}
	b := make([]byte, unix.SizeofSockaddrInet6)
	binary.NativeEndian.PutUint16(b, unix.AF_INET6)
	binary.BigEndian.PutUint16(b[2:], ap.Port())
	a := ap.Addr().As16()
	copy(b[8:], a[:]) // after sin6_flowinfo
	return b
}

func check(what string, err error) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "uringbind: %s: %v\n", what, err)
		os.Exit(1)
	}
}
