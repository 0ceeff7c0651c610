// Package sdnotify tells the service manager (systemd) what relay is doing:
// READY=1, RELOADING=1 with MONOTONIC_USEC, STOPPING=1, STATUS= lines and
// watchdog pings, through go-systemd's daemon package. It also keeps
// relay's listening sockets in systemd's fd store, which go-systemd cannot
// do: that takes a datagram with SCM_RIGHTS.
//
// Messages go out in the order they were queued, from a goroutine of their
// own, so that a service manager slow to read never stalls the supervisor.
package sdnotify

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// Environment variables systemd sets for relay.
const (
	EnvNotifySocket = "NOTIFY_SOCKET"
	// EnvFDStore is set by systemd 254 and later to FileDescriptorStoreMax=
	// when it is above zero. On older versions, set it in the unit.
	EnvFDStore = "FDSTORE"
)

// maxQueue bounds the messages waiting to be sent. STATUS lines replace
// each other while waiting, so only a service manager that stopped reading
// altogether fills it; the oldest message is then dropped.
const maxQueue = 64

// Notifier sends relay's state to the service manager. All its methods are
// no-ops when relay was not given a NOTIFY_SOCKET.
type Notifier struct {
	log  *slog.Logger
	addr string

	mu     sync.Mutex
	queue  []string
	closed bool
	wake   chan struct{}
	done   chan struct{}
}

// New returns a Notifier for the NOTIFY_SOCKET in relay's environment.
func New(log *slog.Logger) *Notifier {
	n := &Notifier{log: log, addr: os.Getenv(EnvNotifySocket), wake: make(chan struct{}, 1), done: make(chan struct{})}
	if n.addr == "" {
		close(n.done)
		return n
	}
	go n.run()
	return n
}

// Enabled reports whether relay has a service manager to notify.
func (n *Notifier) Enabled() bool { return n.addr != "" }

// Ready says the service is ready: the first generation serves, or a
// restart ended.
func (n *Notifier) Ready() { n.send(daemon.SdNotifyReady) }

// Reloading says a restart began. MONOTONIC_USEC lets systemd match it to
// the reload it asked for (Type=notify-reload).
func (n *Notifier) Reloading() {
	n.send(daemon.SdNotifyReloading + "\n" + strings.TrimSuffix(daemon.SdNotifyMonotonicUsec(), "\n"))
}

// Stopping says relay began to stop.
func (n *Notifier) Stopping() { n.send(daemon.SdNotifyStopping) }

// Status sets the one-line status systemctl status shows.
func (n *Notifier) Status(line string) {
	n.send("STATUS=" + strings.ReplaceAll(line, "\n", " "))
}

// watchdog pings the service manager's watchdog.
func (n *Notifier) watchdog() { n.send(daemon.SdNotifyWatchdog) }

func (n *Notifier) send(msg string) {
	if !n.Enabled() {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return
	}
	last := len(n.queue) - 1
	switch {
	case last >= 0 && strings.HasPrefix(msg, "STATUS=") && strings.HasPrefix(n.queue[last], "STATUS="):
		n.queue[last] = msg // only the newest status matters
	case last >= 0 && msg == daemon.SdNotifyWatchdog && n.queue[last] == msg:
		// one waiting ping is as good as two
	default:
		if len(n.queue) >= maxQueue {
			n.dropOne()
		}
		n.queue = append(n.queue, msg)
	}
	select {
	case n.wake <- struct{}{}:
	default:
	}
}

// dropOne makes room in a full queue: a STATUS line or a ping goes first,
// a READY/RELOADING/STOPPING only if nothing else is waiting.
func (n *Notifier) dropOne() {
	for i, m := range n.queue {
		if strings.HasPrefix(m, "STATUS=") || m == daemon.SdNotifyWatchdog {
			n.queue = append(n.queue[:i], n.queue[i+1:]...)
			return
		}
	}
	n.queue = n.queue[1:]
}

func (n *Notifier) run() {
	defer close(n.done)
	failing := false
	for range n.wake {
		for {
			n.mu.Lock()
			if len(n.queue) == 0 {
				closed := n.closed
				n.mu.Unlock()
				if closed {
					return
				}
				break
			}
			msg := n.queue[0]
			n.queue = n.queue[1:]
			n.mu.Unlock()
			_, err := daemon.SdNotify(false, msg)
			switch {
			case err != nil && !failing:
				failing = true
				n.log.Warn("notifying the service manager failed; later failures are logged at debug level until one succeeds",
					"socket", n.addr, "message", firstLine(msg), "err", err)
			case err != nil:
				n.log.Debug("notifying the service manager", "socket", n.addr, "message", firstLine(msg), "err", err)
			default:
				failing = false
			}
		}
	}
}

// Close sends what is queued, waiting at most timeout, and stops.
func (n *Notifier) Close(timeout time.Duration) {
	if !n.Enabled() {
		return
	}
	n.mu.Lock()
	if !n.closed {
		n.closed = true
		close(n.wake)
	}
	n.mu.Unlock()
	select {
	case <-n.done:
	case <-time.After(timeout):
		n.log.Warn("the service manager did not take relay's last messages", "socket", n.addr, "waited", timeout)
	}
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// MinWatchdog is the shortest watchdog relay pings. relay pings at half
// the interval, after its supervisor has answered; on a busy host a
// goroutine can wait tens of milliseconds for a core, so under 100ms the
// watchdog would fire while relay is healthy. No service keeps a watchdog
// that short, and pinging at its pace (WATCHDOG_USEC=5 is every 2.5µs)
// only burns a core.
const MinWatchdog = 100 * time.Millisecond

// WatchdogInterval returns the interval of the watchdog systemd expects
// relay to ping (WATCHDOG_USEC, for relay's WATCHDOG_PID), or 0. One
// shorter than MinWatchdog is an error: relay does not ping it, and the
// service manager acts on its own watchdog as it would on a hung relay.
func WatchdogInterval() (time.Duration, error) {
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		return 0, fmt.Errorf("reading WATCHDOG_USEC: %w", err)
	}
	if d > 0 && d < MinWatchdog {
		return 0, fmt.Errorf("WATCHDOG_USEC=%d (%s) is shorter than the %s relay can keep: set WatchdogSec= to 1s or more in the unit", d.Microseconds(), d, MinWatchdog)
	}
	return d, nil
}

// FDStoreMax returns how many fds systemd will keep for relay ($FDSTORE),
// or 0 if it offers no fd store.
func FDStoreMax() int {
	v := os.Getenv(EnvFDStore)
	if v == "" {
		return 0
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0
	}
	return n
}

// StoreFD asks systemd to keep a duplicate of f in relay's fd store under
// name, and to hand it back when relay is started again. It is sent at
// once, before anything queued.
func (n *Notifier) StoreFD(name string, f *os.File) error {
	return n.sendRights("FDSTORE=1\nFDNAME="+name, f)
}

// RemoveFD asks systemd to drop the fds stored under name.
func (n *Notifier) RemoveFD(name string) error {
	return n.sendRights("FDSTOREREMOVE=1\nFDNAME="+name, nil)
}

func (n *Notifier) sendRights(msg string, f *os.File) error {
	what := strings.ReplaceAll(msg, "\n", " ")
	if !n.Enabled() {
		return fmt.Errorf("sending %s: no NOTIFY_SOCKET", what)
	}
	sock, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("sending %s: creating a socket: %w", what, err)
	}
	defer unix.Close(sock)
	// A service manager that does not read must not hang relay's start.
	if err := unix.SetsockoptTimeval(sock, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Sec: 2}); err != nil {
		return fmt.Errorf("sending %s: setting a send timeout: %w", what, err)
	}
	to := &unix.SockaddrUnix{Name: n.addr} // "@name" is an abstract address
	if f == nil {
		if err := unix.Sendmsg(sock, []byte(msg), nil, to, 0); err != nil {
			return fmt.Errorf("sending %s to %s: %w", what, n.addr, err)
		}
		return nil
	}
	raw, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("sending %s: %w", what, err)
	}
	var sendErr error
	// Control keeps f open, so its fd stays valid while it is sent.
	if err := raw.Control(func(fd uintptr) {
		sendErr = unix.Sendmsg(sock, []byte(msg), unix.UnixRights(int(fd)), to, 0)
	}); err != nil {
		return fmt.Errorf("sending %s: %w", what, err)
	}
	if sendErr != nil {
		return fmt.Errorf("sending %s to %s: %w", what, n.addr, sendErr)
	}
	return nil
}

// Barrier waits, at most timeout, until the service manager has processed
// every message sent before it (BARRIER=1, as sd_notify_barrier(3) does):
// it sends the write end of a pipe and waits for the read end to see the
// service manager close its copy. Older systemd, which does not know
// BARRIER=1, closes the fd at once, with the same effect.
func (n *Notifier) Barrier(timeout time.Duration) error {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return fmt.Errorf("barrier: creating a pipe: %w", err)
	}
	r, w := os.NewFile(uintptr(p[0]), "barrier-r"), os.NewFile(uintptr(p[1]), "barrier-w")
	defer r.Close()
	err := n.sendRights("BARRIER=1", w)
	w.Close()
	if err != nil {
		return err
	}
	fds := []unix.PollFd{{Fd: int32(r.Fd()), Events: unix.POLLIN}}
	for deadline := time.Now().Add(timeout); ; {
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("barrier: the service manager did not answer within %s", timeout)
		}
		n, err := unix.Poll(fds, int(left.Milliseconds())+1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("barrier: waiting: %w", err)
		}
		if n > 0 && fds[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0 {
			return nil
		}
	}
}

// PingInterval is how often relay pings a watchdog of the given interval:
// at half of it, as sd_watchdog_enabled(3) advises, and never more often
// than every MinWatchdog/2.
func PingInterval(watchdog time.Duration) time.Duration { return max(watchdog/2, MinWatchdog/2) }

// RunWatchdog pings the watchdog at once and then at every tick, until ctx
// ends, each time after alive returns true. alive proves that relay's
// supervisor still answers; if it hangs, the pings stop and systemd acts
// (WatchdogSec=, Restart=). Pass a ticker of PingInterval(WATCHDOG_USEC).
func (n *Notifier) RunWatchdog(ctx context.Context, tick <-chan time.Time, alive func() bool) {
	for {
		if alive() {
			n.watchdog()
		}
		select {
		case <-ctx.Done():
			return
		case <-tick:
		}
	}
}
