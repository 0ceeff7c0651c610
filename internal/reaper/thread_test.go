package reaper

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/relaysh/relay/internal/procfs"
)

// The exec tests run this test binary as a helper process that forks a
// child through a Reaper and then execs itself, as relay does when it
// upgrades: envExecHelper says how it execs, envExecChild (set for the
// new image) which child to look at.
const (
	envExecHelper = "RELAY_REAPER_TEST_EXEC"
	envExecChild  = "RELAY_REAPER_TEST_CHILD"
)

func TestMain(m *testing.M) {
	if how := os.Getenv(envExecHelper); how != "" {
		// As relay's main does: the main goroutine keeps the main
		// thread and serves the Thread there.
		runtime.LockOSThread()
		os.Exit(execHelper(how))
	}
	os.Exit(m.Run())
}

// execHelper is the helper process. Before the exec, it starts /bin/sleep
// through a Reaper served on the main thread, and execs itself from that
// thread (how "thread") or from another one (how "other"). After it, it
// reports the child's state: "child <pid> alive ppid <ppid>" or "child
// <pid> exited: <status>".
func execHelper(how string) int {
	if s := os.Getenv(envExecChild); s != "" {
		pid, _ := strconv.Atoi(s)
		if how == "adopt" {
			return adoptHelper(pid)
		}
		var ws unix.WaitStatus
		got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		switch {
		case err != nil:
			fmt.Printf("child %d: wait4: %v\n", pid, err)
		case got == pid:
			fmt.Printf("child %d exited: %s\n", pid, Status{Pid: pid, WaitStatus: ws})
		default:
			ppid := int64(-1)
			if st, err := procfs.ReadStatus(pid); err == nil {
				ppid, _ = st.Int("PPid")
			}
			var sub int32
			unix.Prctl(unix.PR_GET_CHILD_SUBREAPER, uintptr(unsafe.Pointer(&sub)), 0, 0, 0)
			fmt.Printf("child %d alive ppid %d pid %d subreaper %d\n", pid, ppid, os.Getpid(), sub)
			unix.Kill(pid, unix.SIGKILL)
			unix.Wait4(pid, &ws, 0, nil)
		}
		return 0
	}
	t := NewThread()
	done := make(chan struct{})
	code := 1
	go func() {
		defer close(done)
		code = execHelperBefore(t, how)
	}()
	t.Serve(done)
	return code
}

// execHelperBefore starts the child and execs; it returns only on failure.
func execHelperBefore(t *Thread, how string) int {
	r, err := New(slog.New(slog.DiscardHandler), t)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	argv := []string{"/bin/sleep", "60"}
	if how == "adopt" {
		// It exits while relay's image is being replaced.
		argv = []string{"/bin/sh", "-c", "exit 7"}
	}
	p, err := r.Start(argv[0], argv, Attr{Files: []*os.File{devnull, devnull, devnull}})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	env := append(os.Environ(), envExecChild+"="+strconv.Itoa(p.Pid))
	// As relay's handoff does: no exit is reaped by this image from here.
	release := r.Hold()
	defer release()
	switch how {
	case "thread", "adopt":
		err = t.Exec(os.Args[0], os.Args, env)
	case "other":
		ch := make(chan error)
		go func() {
			runtime.LockOSThread() // a thread of its own, not the forker
			ch <- unix.Exec(os.Args[0], os.Args, env)
		}()
		err = <-ch
	}
	fmt.Println("exec failed:", err)
	p.Signal(unix.SIGKILL)
	return 1
}

// adoptHelper is the new image of the "adopt" helper: its Reaper adopts
// the child, which exited during the exec, and reports its status.
func adoptHelper(pid int) int {
	r, err := New(slog.New(slog.DiscardHandler), nil, SavedProc{Pid: pid})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer r.Close()
	r.Begin()
	p := r.Process(pid)
	if p == nil {
		fmt.Printf("child %d: not adopted\n", pid)
		return 0
	}
	<-p.Done()
	fmt.Printf("child %d exited: %s\n", pid, p.Status())
	return 0
}

// runExecHelper runs the helper and returns its one line of report.
func runExecHelper(t *testing.T, how string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envExecHelper+"="+how)
	// A helper that hangs dumps its goroutines on its way out.
	cmd.Cancel = func() error { return cmd.Process.Signal(unix.SIGQUIT) }
	cmd.WaitDelay = waitLimit
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper (%s): %v: %s", how, err, out)
	}
	return strings.TrimSpace(string(out))
}

// TestExecOnTheThreadKeepsChildren: an exec on the Thread that forked a
// child leaves it alive, and still the child of the same process, which is
// still a child subreaper.
func TestExecOnTheThreadKeepsChildren(t *testing.T) {
	line := runExecHelper(t, "thread")
	var child, ppid, pid, sub int
	if _, err := fmt.Sscanf(line, "child %d alive ppid %d pid %d subreaper %d", &child, &ppid, &pid, &sub); err != nil {
		t.Fatalf("after the exec: %q, want the child alive", line)
	}
	if ppid != pid {
		t.Errorf("the child's parent is %d after the exec, want the helper %d", ppid, pid)
	}
	if sub != 1 {
		t.Errorf("the helper is no child subreaper after the exec (%d): orphans would go to init", sub)
	}
}

// TestExecOnAnotherThreadKillsChildren shows why Exec runs on the Thread:
// an exec from any other thread ends the forking thread, and the child
// gets its parent-death signal.
func TestExecOnAnotherThreadKillsChildren(t *testing.T) {
	line := runExecHelper(t, "other")
	if !strings.HasSuffix(line, "exited: killed by signal 9 (SIGKILL)") {
		t.Fatalf("after an exec from another thread: %q, want the child killed by its parent-death signal", line)
	}
}

// TestExecRefusedOffTheMainThread: a Thread served off the process's
// main thread refuses to exec, rather than kill children of an earlier
// image.
func TestExecRefusedOffTheMainThread(t *testing.T) {
	th := NewThread()
	th.main <- false // as Serve says on a thread other than the main one
	if err := th.Exec("/bin/true", []string{"/bin/true"}, nil); !errors.Is(err, ErrNotMainThread) {
		t.Fatalf("Exec off the main thread: %v, want ErrNotMainThread", err)
	}
}

// sigIgnored reports whether sig is ignored, from /proc/self/status.
func sigIgnored(t *testing.T, sig unix.Signal) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "SigIgn:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return mask&(1<<(uint(sig)-1)) != 0
		}
	}
	t.Fatal("no SigIgn in /proc/self/status")
	return false
}

// TestSignalsIgnoredAcrossTheExec: a stop signal that comes while relay's
// image is replaced is ignored rather than fatal, and after a failed exec
// relay's handlers are back.
func TestSignalsIgnoredAcrossTheExec(t *testing.T) {
	c := make(chan os.Signal, 1)
	signal.Notify(c, unix.SIGHUP)
	defer signal.Stop(c)
	restore, err := ignoreAcrossExec()
	if err != nil {
		t.Fatal(err)
	}
	for _, sig := range gapSignals() {
		if !sigIgnored(t, sig) {
			restore()
			t.Fatalf("%s is not ignored", unix.SignalName(sig))
		}
	}
	unix.Kill(os.Getpid(), unix.SIGHUP) // ignored, not fatal
	restore()
	if sigIgnored(t, unix.SIGHUP) {
		t.Fatal("SIGHUP still ignored after restore")
	}
	unix.Kill(os.Getpid(), unix.SIGHUP)
	select {
	case <-c:
	case <-time.After(10 * time.Second):
		t.Fatal("SIGHUP did not reach signal.Notify after restore")
	}
}
