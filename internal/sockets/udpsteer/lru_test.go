package udpsteer

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// vmRSS is this process's resident memory, in KiB.
func vmRSS(t *testing.T) int {
	t.Helper()
	f, err := os.Open("/proc/self/status")
	must(t, err)
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "VmRSS:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			must(t, err)
			return n
		}
	}
	t.Fatal("no VmRSS in /proc/self/status")
	return 0
}

// entries counts the flow table's entries, stale ones included.
func entries(t *testing.T, g *Group) int {
	t.Helper()
	n := 0
	g.mu.Lock()
	defer g.mu.Unlock()
	must(t, g.eachFlowLocked(func(flowKey, flowValue) { n++ }))
	return n
}

func memlock(t *testing.T, g *Group) uint64 {
	t.Helper()
	info, err := g.maps.flows.Info()
	must(t, err)
	n, _ := info.Memlock()
	return n
}

// checkBound checks the table after a flood of flows, and that the flow
// first (on gen 1) goes where the table says: new if the flood pushed it
// out, gen 1's if it is kept.
func checkBound(t *testing.T, g *Group, sent, maxFlows int, took time.Duration, rss0 int, first *client, socks gens) {
	t.Helper()
	n := entries(t, g)
	start := time.Now()
	flows := g.Flows()
	flowsTook := time.Since(start)
	rss := vmRSS(t)
	t.Logf("%d flows sent in %v: the table holds %d of at most %d (Flows() = %v in %v); the map's memlock %.1f MiB of kernel memory; test process RSS %d -> %d KiB",
		sent, took.Round(time.Millisecond), n, maxFlows, flows, flowsTook.Round(time.Millisecond), float64(memlock(t, g))/(1<<20), rss0, rss)
	if n > maxFlows {
		t.Fatalf("the table holds %d flows, more than its bound %d", n, maxFlows)
	}
	if n < maxFlows*3/4 {
		t.Fatalf("the table holds %d flows after %d: an LRU table of %d should be about full", n, sent, maxFlows)
	}
	if grew := rss - rss0; grew > 32<<10 {
		t.Fatalf("RSS grew by %d KiB", grew)
	}
	// The kernel's LRU is approximate: an entry made on one CPU waits in
	// that CPU's local list, out of reach of eviction, until that CPU
	// takes free entries again, so a flood that another CPU handles may
	// leave the first flow in. Either way its next datagram must go where
	// the table says: a forgotten flow is new (gen 2, serving), a kept one
	// stays with gen 1.
	_, kept := flowAge(t, g, first)
	drain(t, socks)
	if kept {
		t.Logf("the first flow is still in the table after the flood (made on another CPU than the flood's)")
		expect(t, "a flow the table kept", landsOn(t, first, socks, 0), 1)
		return
	}
	expect(t, "a flow the table forgot", landsOn(t, first, socks, 0), 2)
}

// drain reads what the flood left in the generations' sockets: as many
// datagrams as their receive buffers took.
func drain(t *testing.T, socks gens) {
	t.Helper()
	buf := make([]byte, 64)
	for gen, f := range socks {
		n := 0
		for {
			_, _, err := unix.Recvfrom(int(f.Fd()), buf, unix.MSG_DONTWAIT)
			if err == unix.EAGAIN {
				break
			}
			must(t, err)
			n++
		}
		t.Logf("generation %d's socket held %d of the flood's datagrams", gen, n)
	}
}

// 100,000 IPv4 flows leave the table at its bound (65536 by default): one
// datagram each from 10 sockets, with the source address (one of 10,000 in
// 127.0.0.0/8, all loopback) set per datagram with IP_PKTINFO. A port alone
// could not make 100,000 flows: there are 65535.
func TestFlowTableBoundIPv4(t *testing.T) {
	g := newGroup(t, "127.0.0.1:0", Options{})
	socks := gens{}
	take(t, g, 1, socks)
	must(t, g.Switch(1))
	first := newClient(t, g)
	expect(t, "gen 1 serving", landsOn(t, first, socks, 0), 1)
	take(t, g, 2, socks)
	must(t, g.Switch(2))
	rss0 := vmRSS(t)

	const nSocks, nAddrs = 10, 10000
	var fds []int
	for range nSocks {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		must(t, err)
		t.Cleanup(func() { unix.Close(fd) })
		must(t, unix.Bind(fd, &unix.SockaddrInet4{}))
		fds = append(fds, fd)
	}
	start := time.Now()
	deadline := start.Add(2 * time.Minute)
	payload := []byte{0}
	for i := range nAddrs {
		src := [4]byte{127, 1, byte(i >> 8), byte(i)}
		oob := unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: src})
		for _, fd := range fds {
			if err := unix.Sendmsg(fd, payload, oob, g.sa, 0); err != nil {
				t.Fatalf("sending from %v: %v", src, err)
			}
		}
		if i%1000 == 0 && time.Now().After(deadline) {
			t.Fatalf("only %d flows sent in 2 minutes", i*nSocks)
		}
	}
	checkBound(t, g, nSocks*nAddrs, defaultMaxFlows, time.Since(start), rss0, first, socks)
}

// On [::1] there is one address: flows from 10 batches of 1000 sockets,
// each sending one datagram and closed, on a table of 4096.
func TestFlowTableBoundIPv6(t *testing.T) {
	const maxFlows = 4096
	g := newGroup(t, "[::1]:0", Options{MaxFlows: maxFlows})
	socks := gens{}
	take(t, g, 1, socks)
	must(t, g.Switch(1))
	first := newClient(t, g)
	expect(t, "gen 1 serving", landsOn(t, first, socks, 0), 1)
	take(t, g, 2, socks)
	must(t, g.Switch(2))
	rss0 := vmRSS(t)

	const batches, batch = 10, 1000
	start := time.Now()
	deadline := start.Add(2 * time.Minute)
	payload := []byte{0}
	loopback := &unix.SockaddrInet6{Addr: [16]byte{15: 1}}
	for range batches {
		fds := make([]int, 0, batch)
		for range batch {
			fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			must(t, err)
			fds = append(fds, fd)
			must(t, unix.Bind(fd, loopback))
			must(t, unix.Sendto(fd, payload, 0, g.sa))
		}
		for _, fd := range fds {
			unix.Close(fd)
		}
		if time.Now().After(deadline) {
			t.Fatal("the batches took more than 2 minutes")
		}
	}
	checkBound(t, g, batches*batch, maxFlows, time.Since(start), rss0, first, socks)
}
