// Command quicserver is an HTTP/3 server (quic-go's http3 package) for the
// integration tests of relay's UDP listeners: it serves HTTP/3 on a UDP
// socket and, with -tcp, HTTP/1.1 over TLS on a TCP socket of the same
// port, both with a self-signed certificate made in memory at start.
//
// It binds its sockets itself (net.ListenPacket, net.Listen), as a plain
// server does, or with -inherited takes them from LISTEN_FDS (systemd
// socket activation, as relay passes them): the first UDP socket for
// HTTP/3 and the first TCP one for -tcp.
//
// Endpoints, on both protocols:
//
//	GET /           200 "quicserver pid N gen G\n", headers X-Pid and X-Generation
//	GET /slow?ms=M  the same after M ms (at most 60 s); logs "slow request
//	                begun" as it begins
//
// On SIGTERM (or SIGINT) it stops gracefully: it stops accepting
// connections, sends HTTP/3 GOAWAY on each QUIC connection (and closes idle
// HTTP/1.1 ones), waits for the open requests and connections to finish
// for at most -grace, closes what is left, and exits 0.
//
// Every event is one line on stderr, with the pid and RELAY_GENERATION.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

func main() {
	os.Exit(run())
}

// counters are the connections and requests seen, for the log.
type counters struct {
	quicOpen, quicTotal atomic.Int64
	tcpOpen, tcpTotal   atomic.Int64
	requests            atomic.Int64
}

func run() int {
	addr := flag.String("addr", "127.0.0.1:8443", "the UDP (and with -tcp TCP) address to bind, HOST:PORT; unused with -inherited")
	inherited := flag.Bool("inherited", false, "take the sockets from LISTEN_FDS (socket activation) instead of binding -addr")
	withTCP := flag.Bool("tcp", false, "also serve HTTP/1.1 over TLS on TCP, on the same port (bound, or inherited with -inherited)")
	grace := flag.Duration("grace", 10*time.Second, "on SIGTERM, how long to wait for open requests and connections before closing them")
	notify := flag.Bool("notify", false, "send sd_notify READY=1 on $NOTIFY_SOCKET once serving")
	flag.Parse()

	pid := os.Getpid()
	gen := os.Getenv("RELAY_GENERATION")
	if gen == "" {
		gen = "0"
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("prog", "quicserver", "pid", pid, "generation", gen)
	log.Info("started", "args", os.Args[1:])

	// Ask for the stop signals first: one that comes during the start
	// still stops the server gracefully, after it started.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	tlsConf, err := selfSigned()
	if err != nil {
		log.Error("certificate", "err", err)
		return 1
	}

	var pc net.PacketConn
	var tln net.Listener
	if *inherited {
		pc, tln, err = inheritedSockets(*withTCP)
	} else {
		pc, tln, err = bindSockets(*addr, *withTCP)
	}
	if err != nil {
		log.Error("sockets", "err", err)
		return 1
	}
	defer pc.Close()

	var cnt counters
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		cnt.requests.Add(1)
		answer(w, pid, gen)
	})
	mux.HandleFunc("GET /slow", func(w http.ResponseWriter, r *http.Request) {
		cnt.requests.Add(1)
		ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
		if err != nil || ms < 0 || ms > 60000 {
			http.Error(w, "ms must be 0..60000", http.StatusBadRequest)
			return
		}
		// One line per slow request, as it begins: a test waits for it
		// to know the request reached the server.
		log.Info("slow request begun", "ms", ms, "proto", r.Proto)
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
		case <-r.Context().Done():
			return
		}
		answer(w, pid, gen)
	})

	// HTTP/3 on a quic.Transport of our own over the socket, so that the
	// listener can be closed (stop accepting) apart from the connections,
	// and the socket itself is ours to close last.
	tr := &quic.Transport{Conn: pc}
	qln, err := tr.ListenEarly(http3.ConfigureTLSConfig(tlsConf), &quic.Config{Allow0RTT: true})
	if err != nil {
		log.Error("quic listen", "err", err)
		return 1
	}
	h3 := &http3.Server{
		Handler: mux,
		ConnContext: func(ctx context.Context, c *quic.Conn) context.Context {
			cnt.quicOpen.Add(1)
			cnt.quicTotal.Add(1)
			context.AfterFunc(c.Context(), func() { cnt.quicOpen.Add(-1) })
			return ctx
		},
	}
	h3done := make(chan error, 1)
	go func() { h3done <- h3.ServeListener(qln) }()

	var hs *http.Server
	h1done := make(chan error, 1)
	if tln != nil {
		hs = &http.Server{
			Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				h3.SetQUICHeaders(w.Header()) // Alt-Svc: h3=":PORT"
				mux.ServeHTTP(w, r)
			}),
			// HTTP/1.1 only: no HTTP/2 over TLS.
			TLSConfig:    &tls.Config{Certificates: tlsConf.Certificates, NextProtos: []string{"http/1.1"}},
			TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
			ConnState: func(_ net.Conn, st http.ConnState) {
				switch st {
				case http.StateNew:
					cnt.tcpOpen.Add(1)
					cnt.tcpTotal.Add(1)
				case http.StateClosed, http.StateHijacked:
					cnt.tcpOpen.Add(-1)
				}
			},
			ReadHeaderTimeout: 10 * time.Second,
		}
		go func() { h1done <- hs.ServeTLS(tln, "", "") }()
	}

	tcpAddr := ""
	if tln != nil {
		tcpAddr = tln.Addr().String()
	}
	log.Info("listening", "udp", pc.LocalAddr().String(), "tcp", tcpAddr, "inherited", *inherited, "grace", grace.String())
	if *notify {
		sent, err := daemon.SdNotify(false, daemon.SdNotifyReady)
		switch {
		case err != nil:
			log.Error("sd_notify READY=1", "err", err)
		case !sent:
			log.Warn("sd_notify READY=1 not sent: no NOTIFY_SOCKET")
		default:
			log.Info("ready", "notified", true)
		}
	}

	var sig os.Signal
	select {
	case sig = <-sigs:
	case err := <-h3done:
		log.Error("http3 server stopped", "err", err)
		return 1
	case err := <-h1done:
		log.Error("http/1.1 server stopped", "err", err)
		return 1
	}

	begun := time.Now()
	log.Info("shutdown begun", "signal", sig.String(), "grace", grace.String(),
		"quic_conns", cnt.quicOpen.Load(), "tcp_conns", cnt.tcpOpen.Load())
	// Stop accepting first: a QUIC handshake the listener completed but
	// nobody accepts would hang its client.
	qln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *grace)
	defer cancel()
	shut := make(chan error, 2)
	go func() { shut <- h3.Shutdown(ctx) }()
	waiting := 1
	if hs != nil {
		waiting++
		go func() { shut <- hs.Shutdown(ctx) }()
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var shutErrs []error
	for waiting > 0 {
		select {
		case err := <-shut:
			waiting--
			if err != nil {
				shutErrs = append(shutErrs, err)
			}
		case <-tick.C:
			log.Info("connections left", "quic_conns", cnt.quicOpen.Load(), "tcp_conns", cnt.tcpOpen.Load(),
				"since_shutdown", time.Since(begun).Round(time.Millisecond).String())
		}
	}
	forced := ctx.Err() != nil
	if hs != nil && forced {
		hs.Close()
	}
	log.Info("connections left", "quic_conns", cnt.quicOpen.Load(), "tcp_conns", cnt.tcpOpen.Load(),
		"forced", forced, "err", errors.Join(shutErrs...),
		"since_shutdown", time.Since(begun).Round(time.Millisecond).String())
	// The transport stops reading the socket (it is not the transport's to
	// close, so it stays open until pc.Close).
	tr.Close()
	log.Info("exiting", "after", time.Since(begun).Round(time.Millisecond).String(), "forced", forced,
		"requests", cnt.requests.Load(), "quic_conns_total", cnt.quicTotal.Load(), "tcp_conns_total", cnt.tcpTotal.Load())
	return 0
}

func answer(w http.ResponseWriter, pid int, gen string) {
	w.Header().Set("X-Pid", strconv.Itoa(pid))
	w.Header().Set("X-Generation", gen)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fmt.Fprintf(w, "quicserver pid %d gen %s\n", pid, gen)
}

// bindSockets binds addr over UDP, and with tcp over TCP too.
func bindSockets(addr string, tcp bool) (net.PacketConn, net.Listener, error) {
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return nil, nil, err
	}
	if !tcp {
		return pc, nil, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		pc.Close()
		return nil, nil, err
	}
	return pc, ln, nil
}

// inheritedSockets takes the first UDP socket of LISTEN_FDS, and with tcp
// the first TCP listener too. It reads LISTEN_FDS once, with
// activation.Files: activation.PacketConns and activation.Listeners each
// unset LISTEN_FDS, so the second of them would find nothing, and
// PacketConns leaves the files it cannot use (the TCP socket) to the
// garbage collector, which would close them.
func inheritedSockets(tcp bool) (net.PacketConn, net.Listener, error) {
	files := activation.Files(true)
	var pc net.PacketConn
	var ln net.Listener
	for _, f := range files {
		if p, err := net.FilePacketConn(f); err == nil {
			if _, ok := p.(*net.UDPConn); ok && pc == nil {
				pc = p
			} else {
				p.Close()
			}
		} else if l, err := net.FileListener(f); err == nil {
			if _, ok := l.(*net.TCPListener); ok && ln == nil && tcp {
				ln = l
			} else {
				l.Close()
			}
		}
		f.Close() // the conns above hold dups
	}
	switch {
	case pc == nil:
		if ln != nil {
			ln.Close()
		}
		return nil, nil, fmt.Errorf("no UDP socket among the %d of LISTEN_FDS", len(files))
	case tcp && ln == nil:
		pc.Close()
		return nil, nil, fmt.Errorf("-tcp, but no TCP listener among the %d sockets of LISTEN_FDS", len(files))
	}
	return pc, ln, nil
}

// selfSigned makes a TLS config with a fresh self-signed ECDSA certificate
// for localhost, 127.0.0.1 and ::1.
func selfSigned() (*tls.Config, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "quicserver"},
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		MinVersion:   tls.VersionTLS13,
	}, nil
}
