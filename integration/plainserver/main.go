// Command plainserver is the server of the Kubernetes guide to graceful
// shutdown, and nothing more: http.Server's ListenAndServe binds its own
// port, and SIGTERM calls Shutdown, with no lame duck. It knows nothing of
// relay: no LISTEN_FDS, no sd_notify. The integration tests run it under
// relay to show that bind takeover serves such a server without loss.
//
// It answers every request with its pid (the X-Pid header and the body),
// so that the tests can tell generations apart. The other flags let a test
// make it bind what a real server might besides its port.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	var also []string
	var (
		port      = flag.Int("port", 0, "the port to serve on, on all addresses (this or -unix)")
		family    = flag.String("family", "", `"4": bind 0.0.0.0:PORT with an IPv4 socket instead of ":PORT", which Go binds dual-stack`)
		portsFile = flag.String("ports-file", "", "write the addresses the -also listeners got, as a JSON list, to this file")
		unixPath  = flag.String("unix", "", "serve on a unix socket at this `PATH` (net.Listen, whose Close removes the path) instead of -port")
	)
	flag.Func("also", "also serve on this `ADDR` (repeat for more; port 0 takes any)", func(s string) error {
		also = append(also, s)
		return nil
	})
	flag.Parse()
	if (*port == 0) == (*unixPath == "") || (*family != "" && *family != "4") {
		flag.Usage()
		os.Exit(2)
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Pid", strconv.Itoa(os.Getpid()))
		fmt.Fprintf(w, "pid=%d\n", os.Getpid())
	})
	srv := &http.Server{Addr: ":" + strconv.Itoa(*port), Handler: mux}

	// The extra listeners are bound first, so that the ports file is
	// written before the main port can answer anyone.
	var extra []*http.Server
	var addrs []string
	for _, a := range also {
		l, err := net.Listen("tcp", a)
		if err != nil {
			fail(err)
		}
		addrs = append(addrs, l.Addr().String())
		s := &http.Server{Handler: mux}
		extra = append(extra, s)
		go s.Serve(l)
	}
	if *portsFile != "" {
		if err := writeJSON(*portsFile, addrs); err != nil {
			fail(err)
		}
	}

	go func() {
		var err error
		if *unixPath != "" {
			var l net.Listener
			l, err = net.Listen("unix", *unixPath)
			if err == nil {
				err = srv.Serve(l)
			}
		} else if *family == "4" {
			var l net.Listener
			l, err = net.Listen("tcp4", "0.0.0.0:"+strconv.Itoa(*port))
			if err == nil {
				err = srv.Serve(l)
			}
		} else {
			err = srv.ListenAndServe()
		}
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			fail(err)
		}
	}()

	quit := make(chan os.Signal, 1)
	signal.Notify(quit, syscall.SIGTERM)
	<-quit
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, s := range append(extra, srv) {
		if err := s.Shutdown(ctx); err != nil {
			fail(err)
		}
	}
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "plainserver: pid %d: %v\n", os.Getpid(), err)
	os.Exit(1)
}

func writeJSON(path string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
