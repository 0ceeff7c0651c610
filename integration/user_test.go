package integration

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/relaysh/relay/internal/procfs"
)

// freePrivilegedAddr returns a loopback address on a port below 1024 that
// nothing listens on now (root binds it to look).
func freePrivilegedAddr(t *testing.T) string {
	t.Helper()
	for port := 990; port > 600; port-- {
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		if l, err := net.Listen("tcp", addr); err == nil {
			l.Close()
			return addr
		}
	}
	t.Fatal("no free loopback port below 1024")
	return ""
}

// procEnv reads the environment of pid.
func procEnv(t *testing.T, pid int) []string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
}

// needRootAndNobody skips unless the test runs as root on a system that
// has the user nobody.
func needRootAndNobody(t *testing.T) *user.User {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: only root may run the server as another user")
	}
	u, err := user.Lookup("nobody")
	if err != nil {
		t.Skip("no user nobody here")
	}
	return u
}

// relay run --user nobody, as root, on a privileged port: the server, a
// plain one that binds the port itself, gets relay's socket with no
// privilege, runs as nobody with no capability and no_new_privs, finds
// itself in USER, LOGNAME and HOME, reaches its notify socket (given to
// nobody alone), and a restart runs its next generation the same way.
func TestRunAsUser(t *testing.T) {
	nobody := needRootAndNobody(t)
	addr := freePrivilegedAddr(t)
	r := startRelay(t, nil, "--user", "nobody", "--listen", addr, "--", built.hello, "-bind", "-notify", "-addr", addr, "-lame-duck", "100ms")
	for gen := 1; gen <= 2; gen++ {
		ready, _ := r.waitMsg(0, "generation ready", gen)
		pid := ready.num("pid")
		// hello -bind -notify sends READY=1 once it serves: through the
		// socket only nobody (and relay) can reach.
		r.waitMsg(0, "child sent READY=1", gen)
		who, err := get(newConnClient(), httpURL(addr))
		if err != nil || who != pid {
			t.Fatalf("GET %s: answered by pid %d, %v; want generation %d's pid %d", addr, who, err, gen, pid)
		}
		raw, err := procfs.ReadStatus(pid)
		if err != nil {
			t.Fatal(err)
		}
		st := map[string]string{}
		for k, v := range raw {
			st[k] = strings.Join(strings.Fields(v), " ")
		}
		want := nobody.Uid + " " + nobody.Uid + " " + nobody.Uid + " " + nobody.Uid
		t.Logf("generation %d (pid %d): Uid %s, Gid %s, Groups %q, CapEff %s, CapPrm %s, NoNewPrivs %s",
			gen, pid, st["Uid"], st["Gid"], st["Groups"], st["CapEff"], st["CapPrm"], st["NoNewPrivs"])
		if st["Uid"] != want || !strings.HasPrefix(st["Gid"], nobody.Gid+" ") {
			t.Errorf("generation %d runs as Uid %q Gid %q, want nobody's (%s, %s)", gen, st["Uid"], st["Gid"], nobody.Uid, nobody.Gid)
		}
		// A session of its own, with no controlling terminal: it
		// cannot type into relay's.
		if st["NSsid"] != strconv.Itoa(pid) {
			t.Errorf("generation %d is in session %s, want a session of its own (%d)", gen, st["NSsid"], pid)
		}
		if st["CapEff"] != "0000000000000000" || st["CapPrm"] != "0000000000000000" || st["NoNewPrivs"] != "1" {
			t.Errorf("generation %d keeps CapEff %s, CapPrm %s, NoNewPrivs %s; want no capability and no_new_privs", gen, st["CapEff"], st["CapPrm"], st["NoNewPrivs"])
		}
		env := procEnv(t, pid)
		for _, kv := range []string{"USER=nobody", "LOGNAME=nobody", "HOME=" + nobody.HomeDir} {
			if !slices.Contains(env, kv) {
				t.Errorf("generation %d's environment lacks %s", gen, kv)
			}
		}
		var notify string
		for _, kv := range env {
			if v, ok := strings.CutPrefix(kv, "NOTIFY_SOCKET="); ok {
				notify = v
			}
		}
		var sst syscall.Stat_t
		if err := syscall.Stat(notify, &sst); err != nil || fmt.Sprint(sst.Uid) != nobody.Uid || sst.Mode&0o777 != 0o600 {
			t.Errorf("notify socket %s: %v, owner %d, mode %o; want nobody's, 0600", notify, err, sst.Uid, sst.Mode&0o777)
		}
		if dst, err := os.Stat(filepath.Dir(notify)); err != nil || dst.Mode().Perm() != 0o711 {
			t.Errorf("notify directory %s: %v; want mode 0711", filepath.Dir(notify), err)
		}
		if gen == 1 {
			if out, errOut, code := r.client("restart"); code != 0 {
				t.Fatalf("relay restart: exit %d\n%s%s", code, out, errOut)
			}
		}
	}
	r.signal(syscall.SIGTERM)
	if code := r.wait(30 * time.Second); code != 0 {
		t.Errorf("relay exited %d, want 0", code)
	}
}

// Bad --user values are usage errors, one line each, found before anything
// is bound or created.
func TestRunAsUserBadInput(t *testing.T) {
	needRootAndNobody(t)
	for _, c := range []struct {
		name  string
		args  []string
		asUID int // run relay as this uid; -1: as the test
		want  string
	}{
		{"unknown user", []string{"--user", "no-such-user-relay"}, -1, `no user "no-such-user-relay" in the user database`},
		{"unknown group", []string{"--user", "nobody:no-such-group-relay"}, -1, `no group "no-such-group-relay" in the group database`},
		{"empty group", []string{"--user", "nobody:"}, -1, "want USER or USER:GROUP"},
		{"not root", []string{"--user", "nobody:nogroup"}, 1, "only root can run the server as another user"},
		{"root", []string{"--user", "root"}, -1, "the server would run as root"},
		{"unlisted uid without a group", []string{"--user", "54321"}, -1, "give it, e.g. --user 54321:54321"},
		{"the id that means unchanged", []string{"--user", "4294967295"}, -1, `no user "4294967295"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir, err := os.MkdirTemp("", "relay-user-")
			if err != nil {
				t.Fatal(err)
			}
			defer os.RemoveAll(dir)
			os.Chmod(dir, 0o777)
			sock := filepath.Join(dir, "s.sock")
			args := append([]string{"run", "--listen", "unix:" + sock}, c.args...)
			cmd := exec.Command(built.relay, append(args, "--", built.hello)...)
			cmd.Env = append(os.Environ(), "XDG_RUNTIME_DIR="+dir, "TMPDIR="+dir)
			if c.asUID >= 0 {
				cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(c.asUID), Gid: uint32(c.asUID)}}
			}
			var stderr strings.Builder
			cmd.Stderr = &stderr
			err = cmd.Run()
			code := cmd.ProcessState.ExitCode()
			lines := strings.Split(strings.TrimRight(stderr.String(), "\n"), "\n")
			if code != 2 || len(lines) != 1 || !strings.Contains(lines[0], c.want) {
				t.Errorf("relay %s: exit %d (%v), stderr %q; want exit 2 and one line with %q", strings.Join(args, " "), code, err, stderr.String(), c.want)
			}
			if left, _ := os.ReadDir(dir); len(left) != 0 {
				var names []string
				for _, e := range left {
					names = append(names, e.Name())
				}
				t.Errorf("left behind in %s: %v", dir, names)
			}
		})
	}
}
