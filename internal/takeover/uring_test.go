package takeover

import (
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// envAllowIOURing tells the test's shim (TestMain) to install the filter
// with Options.IOURing.
const envAllowIOURing = "TAKEOVER_TEST_IOURING"

// ringSetup calls io_uring_setup(2) for a ring of one entry and closes the
// ring it gets; it returns the call's errno, 0 for success.
func ringSetup() unix.Errno {
	var params [120]byte // struct io_uring_params, filled in by the kernel
	fd, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, 1, uintptr(unsafe.Pointer(&params[0])), 0)
	if e == 0 {
		unix.Close(int(fd))
	}
	return e
}

// ringEvents returns the RingRefused events of r.
func ringEvents(r run) []Event {
	var out []Event
	for _, e := range r.events {
		if e.Kind == RingRefused {
			out = append(out, e)
		}
	}
	return out
}

// Under the default filter io_uring_setup goes to relay, which answers
// EPERM, so that no ring can bind past the filter (IORING_OP_BIND), and
// Serve reports who called it.
func TestIOURingSetupRefused(t *testing.T) {
	r := runWith(t, Config{Claim: func(Bind) Decision { return Pass }}, "io_uring_setup", "io_uring_setup")
	for _, res := range r.results {
		if unix.Errno(res.Errno) != unix.EPERM {
			t.Errorf("io_uring_setup under the filter: errno %d (%v), want EPERM", res.Errno, unix.Errno(res.Errno))
		}
	}
	evs := ringEvents(r)
	if len(evs) != 2 {
		t.Fatalf("events %+v, want two RingRefused, one per call", r.events)
	}
	for _, e := range evs {
		if e.Pid != r.results[0].Pid || e.Socket != -1 {
			t.Errorf("RingRefused %+v, want Pid %d (the caller) and Socket -1", e, r.results[0].Pid)
		}
	}
}

// With Options.IOURing the filter lets io_uring_setup run: relay hears
// nothing of it, and the kernel answers.
func TestIOURingSetupAllowed(t *testing.T) {
	t.Setenv(envAllowIOURing, "1")
	r := runWith(t, Config{Claim: func(Bind) Decision { return Pass }}, "io_uring_setup")
	if evs := ringEvents(r); len(evs) != 0 {
		t.Errorf("RingRefused events under Options.IOURing: %+v", evs)
	}
	if e := unix.Errno(r.results[0].Errno); e != 0 {
		// Not relay's answer (no event): the kernel's own, with
		// io_uring disabled (kernel.io_uring_disabled) or missing.
		if own := ringSetup(); own == e {
			t.Skipf("io_uring_setup fails here without any filter too: %v", e)
		}
		t.Errorf("io_uring_setup under Options.IOURing: %v, want success", e)
	}
}
