package health

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// maxNotifyMsg bounds one datagram; sd_notify messages are short.
const maxNotifyMsg = 4096

// NotifySocket is one generation's private sd_notify socket. The child
// finds it in NOTIFY_SOCKET. Because the path is private to one child, a
// READY=1 that arrives on it proves that this child, and not an older
// generation sharing the listeners, is ready.
type NotifySocket struct {
	Path string

	conn   *net.UnixConn
	readyC chan struct{}
	once   sync.Once
	doneC  chan struct{}
}

// NotifyMessage is one datagram from the child, split into assignments.
type NotifyMessage struct {
	Vars map[string]string
	Raw  string
}

// MakeNotifyDir creates the private (0700) directory for the children's
// notify sockets: under $XDG_RUNTIME_DIR when set, else $TMPDIR or /tmp,
// whichever first leaves room for a socket path (108 bytes on Linux) such
// as DIR/gen-N.notify. The caller removes it.
func MakeNotifyDir() (string, error) {
	const room = len("/relay-0123456789/gen-0123456789.notify")
	var tried []string
	for _, base := range []string{os.Getenv("XDG_RUNTIME_DIR"), os.TempDir(), "/tmp"} {
		if st, err := os.Stat(base); base == "" || err != nil || !st.IsDir() {
			continue
		}
		if len(base)+room >= len(unix.RawSockaddrUnix{}.Path) {
			tried = append(tried, base+" (path too long for a unix socket)")
			continue
		}
		dir, err := os.MkdirTemp(base, "relay-")
		if err != nil {
			tried = append(tried, fmt.Sprintf("%s (%v)", base, err))
			continue
		}
		return dir, nil
	}
	return "", fmt.Errorf("creating relay's runtime directory: no usable base among %s; set XDG_RUNTIME_DIR or TMPDIR to a short writable directory", strings.Join(tried, ", "))
}

// ListenNotify creates the socket at path (in a directory only relay may
// enter) and reads messages until Close. onMsg, if not nil, sees every
// message, from the reading goroutine.
func ListenNotify(path string, onMsg func(NotifyMessage)) (*NotifySocket, error) {
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("creating notify socket %s: %w", path, err)
	}
	// The child may run under the same uid only; the directory is 0700.
	if err := os.Chmod(path, 0o600); err != nil {
		conn.Close()
		return nil, fmt.Errorf("setting mode of notify socket %s: %w", path, err)
	}
	n := &NotifySocket{Path: path, conn: conn, readyC: make(chan struct{}), doneC: make(chan struct{})}
	go n.read(onMsg)
	return n, nil
}

func (n *NotifySocket) read(onMsg func(NotifyMessage)) {
	defer close(n.doneC)
	buf := make([]byte, maxNotifyMsg)
	for {
		nr, _, err := n.conn.ReadFromUnix(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // a transient error on a datagram socket loses one message
		}
		msg := parseNotify(buf[:nr])
		if msg.Vars["READY"] == "1" {
			n.once.Do(func() { close(n.readyC) })
		}
		if onMsg != nil {
			onMsg(msg)
		}
	}
}

// Ready is closed once the child has sent READY=1.
func (n *NotifySocket) Ready() <-chan struct{} { return n.readyC }

// Close stops reading and removes the socket file.
func (n *NotifySocket) Close() error {
	err := n.conn.Close()
	<-n.doneC
	if rmErr := os.Remove(n.Path); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) && err == nil {
		err = rmErr
	}
	return err
}

// parseNotify splits an sd_notify datagram into its newline-separated
// KEY=VALUE assignments.
func parseNotify(b []byte) NotifyMessage {
	msg := NotifyMessage{Vars: make(map[string]string), Raw: string(bytes.TrimRight(b, "\n"))}
	for _, line := range strings.Split(msg.Raw, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && k != "" {
			msg.Vars[k] = v
		}
	}
	return msg
}
