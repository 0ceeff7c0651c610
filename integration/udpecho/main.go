// Command udpecho is a plain UDP request/response server, DNS-like, for the
// integration tests of relay's UDP listeners (udp_test.go). For every
// datagram it reads it sends one datagram back to the sender: the request's
// bytes followed by " pid=N", N being udpecho's own pid in decimal. So the
// request "07 42" is answered "07 42 pid=1234". It keeps no state between
// datagrams and never answers twice.
//
// It binds its socket itself (-addr, net.ListenUDP), as a plain server does
// (under relay the bind lands on relay's socket: docs/takeover.md), or with
// -inherited takes the first UDP socket of LISTEN_FDS (systemd socket
// activation, as relay passes them). With -notify it sends sd_notify
// READY=1 once its socket is open, just before its first read.
//
// On SIGTERM (or SIGINT) it stops reading at once: the answer to a datagram
// it has already read is sent, nothing more is read, and it exits 0. What is
// still unread in its socket is left there, as any plain UDP server leaves
// it.
//
// It logs its start and its exit, with its pid, RELAY_GENERATION and how
// many datagrams it answered, one line each on stderr.
package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
)

func main() {
	os.Exit(run())
}

func run() int {
	addr := flag.String("addr", "127.0.0.1:5353", "the UDP address to bind, HOST:PORT; unused with -inherited")
	inherited := flag.Bool("inherited", false, "take the first UDP socket of LISTEN_FDS (socket activation) instead of binding -addr")
	notify := flag.Bool("notify", false, "send sd_notify READY=1 on $NOTIFY_SOCKET once the socket is open")
	flag.Parse()

	pid := os.Getpid()
	gen := os.Getenv("RELAY_GENERATION")
	if gen == "" {
		gen = "0"
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("prog", "udpecho", "pid", pid, "generation", gen)

	// Ask for the stop signals before the socket: one that comes during
	// the start still stops the server as it should.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	var conn *net.UDPConn
	var err error
	if *inherited {
		conn, err = inheritedUDP()
	} else {
		var ua *net.UDPAddr
		if ua, err = net.ResolveUDPAddr("udp", *addr); err == nil {
			conn, err = net.ListenUDP("udp", ua)
		}
	}
	if err != nil {
		log.Error("socket", "err", err)
		return 1
	}
	defer conn.Close()
	log.Info("listening", "addr", conn.LocalAddr().String(), "inherited", *inherited)
	if *notify {
		if sent, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil || !sent {
			log.Error("sd_notify READY=1 not sent", "err", err, "notify_socket", os.Getenv("NOTIFY_SOCKET"))
			return 1
		}
	}

	// The stop: a read deadline in the past ends the read in progress
	// (or the next one) without touching an answer being sent.
	stopped := make(chan os.Signal, 1)
	go func() {
		sig := <-sigs
		stopped <- sig
		conn.SetReadDeadline(time.Now())
	}()

	suffix := []byte(" pid=" + strconv.Itoa(pid))
	buf := make([]byte, 64<<10)
	out := make([]byte, 0, len(buf)+len(suffix))
	answered, failed := 0, 0
	for {
		n, from, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				sig := <-stopped
				log.Info("exiting", "signal", sig.String(), "answered", answered, "send_errors", failed)
				return 0
			}
			log.Error("read", "err", err, "answered", answered)
			return 1
		}
		out = append(append(out[:0], buf[:n]...), suffix...)
		if _, err := conn.WriteToUDPAddrPort(out, from); err != nil {
			// A client gone (ICMP unreachable) is no reason to stop.
			failed++
			if failed <= 10 {
				log.Warn("answer not sent", "to", from.String(), "err", err)
			}
			continue
		}
		answered++
	}
}

// inheritedUDP returns the first UDP socket of LISTEN_FDS, closing the
// others.
func inheritedUDP() (*net.UDPConn, error) {
	pcs, err := activation.PacketConns()
	if err != nil {
		return nil, err
	}
	var conn *net.UDPConn
	for _, pc := range pcs {
		if c, ok := pc.(*net.UDPConn); ok && conn == nil {
			conn = c
		} else if pc != nil {
			pc.Close()
		}
	}
	if conn == nil {
		return nil, fmt.Errorf("no UDP socket among LISTEN_FDS=%q", os.Getenv("LISTEN_FDS"))
	}
	return conn, nil
}
