// Command demo shows relay at work: it builds relay and examples/hello,
// runs hello under relay on a loopback port as a plain server that binds
// the port itself (relay takes its bind over; -inherited runs it on the
// inherited socket instead), keeps a stream of requests
// going (a new connection for each), restarts hello a few times with
// SIGHUP, and prints which pids answered and how many requests failed.
//
//	go run ./examples/demo
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	restarts := flag.Int("restarts", 3, "how many restarts to show")
	workers := flag.Int("workers", 4, "concurrent clients")
	inherited := flag.Bool("inherited", false, "run hello on the inherited socket (LISTEN_FDS, --health notify) instead of as a plain server that binds its own port")
	flag.Parse()
	if err := demo(*restarts, *workers, *inherited); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func demo(restarts, workers int, inherited bool) error {
	dir, err := os.MkdirTemp("", "relay-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	relay, hello := filepath.Join(dir, "relay"), filepath.Join(dir, "hello")
	fmt.Println("building relay and examples/hello ...")
	for bin, pkg := range map[string]string{relay: "./cmd/relay", hello: "./examples/hello"} {
		cmd := exec.Command("go", "build", "-o", bin, pkg)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("building %s (run the demo from the repository root): %w", pkg, err)
		}
	}

	// By default hello runs as a plain server: it binds its own port, as
	// http.ListenAndServe does, and says nothing to relay; relay takes
	// its bind over and sees it accept. -inherited shows the other way.
	addr, err := freeLoopbackAddr()
	if err != nil {
		return err
	}
	args := []string{"run", "--listen", addr, "--log-format", "json",
		"--control", filepath.Join(dir, "ctl", "demo.sock"), "--", hello, "-bind", "-addr", addr, "-lame-duck", "200ms"}
	if inherited {
		args = []string{"run", "--listen", "127.0.0.1:0", "--health", "notify", "--log-format", "json",
			"--control", filepath.Join(dir, "ctl", "demo.sock"), "--", hello, "-lame-duck", "200ms"}
	}
	fmt.Printf("\n$ relay %s\n\n", join(args))
	cmd := exec.Command(relay, args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	defer cmd.Process.Kill()

	// relay logs JSON lines; the demo follows the ones it needs.
	events := make(chan map[string]any, 64)
	go func() {
		defer close(events)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			var l map[string]any
			if json.Unmarshal(sc.Bytes(), &l) != nil || l["msg"] == nil {
				continue // the child's own log lines
			}
			fmt.Printf("  relay: %-30s gen=%v pid=%v\n", l["msg"], or(l["gen"]), or(l["pid"]))
			events <- l
		}
	}()
	waitFor := func(msg string) (map[string]any, error) {
		timeout := time.After(30 * time.Second)
		for {
			select {
			case l, ok := <-events:
				if !ok {
					return nil, errors.New("relay exited")
				}
				if l["msg"] == msg {
					return l, nil
				}
			case <-timeout:
				return nil, fmt.Errorf("no %q from relay in 30s", msg)
			}
		}
	}
	l, err := waitFor("listening")
	if err != nil {
		return err
	}
	url := fmt.Sprintf("http://%s/", l["addr"])
	if _, err := waitFor("generation ready"); err != nil {
		return err
	}

	var ok, failed atomic.Int64
	var mu sync.Mutex
	pids := map[string]int{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := client.Get(url)
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				if err != nil || resp.StatusCode != 200 {
					failed.Add(1)
					continue
				}
				ok.Add(1)
				mu.Lock()
				pids[resp.Header.Get("X-Pid")]++
				mu.Unlock()
			}
		}()
	}
	fmt.Printf("\nsending requests to %s, each on a new connection, and restarting %d times\n\n", url, restarts)
	for i := 0; i < restarts; i++ {
		time.Sleep(500 * time.Millisecond) // pacing for people to read; nothing waits on it
		fmt.Printf("$ kill -HUP %d\n", cmd.Process.Pid)
		cmd.Process.Signal(syscall.SIGHUP)
		if _, err := waitFor("restart finished"); err != nil {
			return err
		}
	}
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()
	fmt.Printf("\n$ kill -TERM %d\n", cmd.Process.Pid)
	cmd.Process.Signal(syscall.SIGTERM)
	err = cmd.Wait()

	fmt.Printf("\nrequests answered: %d, failed: %d\n", ok.Load(), failed.Load())
	fmt.Println("answered by pid:")
	for pid, n := range pids {
		fmt.Printf("  %s: %d\n", pid, n)
	}
	if err != nil {
		return fmt.Errorf("relay: %w", err)
	}
	if failed.Load() > 0 {
		return fmt.Errorf("%d requests failed", failed.Load())
	}
	return nil
}

func or(v any) any {
	if v == nil {
		return "-"
	}
	if f, ok := v.(float64); ok {
		return strconv.Itoa(int(f))
	}
	return v
}

// freeLoopbackAddr returns a loopback address whose port is free now, for a
// server that binds it itself.
func freeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("finding a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func join(args []string) string {
	s := ""
	for i, a := range args {
		if i > 0 {
			s += " "
		}
		s += a
	}
	return s
}
