package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// TestUpgradeNginxBindsAfterTheUpgrade: nginx, started before relay
// upgrades itself, binds a second port of relay's on its own reload after
// the upgrade: the new relay takes the bind over, and nginx serves on
// relay's socket.
func TestUpgradeNginxBindsAfterTheUpgrade(t *testing.T) {
	nginx := conformanceProgram(t, "nginx")
	p1, p2 := freeLoopbackPort(t), freeLoopbackPort(t)
	dir := t.TempDir()
	// nginx's workers run as nobody: they must reach the prefix.
	for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	conf := filepath.Join(dir, "nginx.conf")
	writeMode(t, conf, nginxConf(dir, 2, p1, ""))
	second := fmt.Sprintf("127.0.0.1:%d", p2)
	// A fixed delay for readiness: nginx binds the second port only later,
	// so it never claims it before it reloads.
	r := startRelay(t, nil, "--listen", fmt.Sprintf("127.0.0.1:%d", p1), "--listen", second,
		"--health", "delay:1s", "--stop-signal", "QUIT",
		"--", nginx, "-p", dir, "-c", conf, "-e", "stderr",
		"-g", "daemon off; master_process on; pid "+filepath.Join(dir, "nginx.pid")+";")
	names := r.listenAddrs(2)
	ready, _ := r.waitMsg(0, "generation ready", 1)
	master := ready.num("pid")
	if out, code := r.upgrade(""); code != 0 {
		t.Fatalf("upgrade: exit %d:\n%s", code, out)
	}
	_, from := r.waitFor(0, 30*time.Second, "relay upgraded in place", func(l logLine) bool { return l.str("msg") == "relay upgraded in place" })

	// nginx's own reload, with a second listen: its master binds it.
	writeMode(t, conf, nginxConf(dir, 2, p1, "        listen "+second+";\n"))
	if err := syscall.Kill(master, syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	l, _ := r.waitFor(from, 30*time.Second, "the new relay to take nginx's bind over", func(l logLine) bool {
		return l.str("msg") == "bind taken over" && l.num("gen") == 1 && l.str("listener") == names[1].str("name")
	})
	if l.num("bind_pid") != master {
		t.Errorf("bind taken over from pid %d, want nginx's master %d", l.num("bind_pid"), master)
	}
	client := newConnClient()
	var worker int
	waitUntil(t, 30*time.Second, "nginx to answer on the second port", func() bool {
		w, err := get(client, httpURL(second))
		worker = w
		return err == nil
	})
	if ppid := procStatus(t, worker, "PPid"); ppid != strconv.Itoa(master) {
		t.Errorf("answered on the second port by pid %d, whose parent is %s, not nginx's master %d", worker, ppid, master)
	}
	if n := listeningOn(t, p2); n != 1 {
		t.Errorf("%d sockets listen on port %d, want relay's alone", n, p2)
	}
	if _, err := get(client, httpURL(fmt.Sprintf("127.0.0.1:%d", p1))); err != nil {
		t.Errorf("the first port after nginx's reload: %v", err)
	}
	r.signal(syscall.SIGTERM)
	r.wait(30 * time.Second)
}
