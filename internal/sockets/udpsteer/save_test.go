package udpsteer

import (
	"encoding/json"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// execLike does to s's fds what relay's exec of itself does: they stay
// open, under new numbers here (duplicates without close-on-exec, as the
// exec leaves them), and s goes through JSON. It returns the new Saved,
// and the new number of each old one; closing them is the caller's, those
// Restore did not take (an fd closed twice may be another by then).
func execLike(t *testing.T, s Saved) (Saved, map[int]int) {
	t.Helper()
	moved := map[int]int{}
	for _, fd := range s.FDs() {
		dup, err := unix.Dup(fd)
		must(t, err)
		moved[fd] = dup
	}
	b, err := json.Marshal(s)
	must(t, err)
	var out Saved
	must(t, json.Unmarshal(b, &out))
	if !reflect.DeepEqual(out, s) {
		t.Fatalf("Saved changed through JSON:\n%+v\n%+v", s, out)
	}
	out.Program = moved[out.Program]
	for _, f := range out.Maps.byName() {
		*f.fd = moved[*f.fd]
	}
	out.Members = slices.Clone(out.Members)
	for i := range out.Members {
		out.Members[i].FD = moved[out.Members[i].FD]
	}
	return out, moved
}

// restoreAcross is Restore of s in the next image: execLike, then Restore,
// closing the moved fds if it fails.
func restoreAcross(t *testing.T, s Saved) *Group {
	t.Helper()
	s2, moved := execLike(t, s)
	r, err := Restore(s2, nil)
	if err != nil {
		for _, fd := range moved {
			unix.Close(fd)
		}
		t.Fatal(err)
	}
	return r
}

// isOpen says whether fd is open, and its close-on-exec flag.
func isOpen(fd int) (open, cloexec bool) {
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil {
		return false, false
	}
	return true, fl&unix.FD_CLOEXEC != 0
}

// restoredSocks takes each generation's socket from the restored group,
// checking the freshness saved.
func restoredSocks(t *testing.T, r *Group, want map[int]bool) gens {
	t.Helper()
	socks := gens{}
	for gen, fresh := range want {
		takeFresh(t, r, gen, socks, fresh)
	}
	return socks
}

// A group saved, its fds carried over an exec and restored steers as it
// did: known flows stick, the flow counts and the QUIC flags are kept, and
// Take, Switch, Retire and Release work on the restored group, also once
// the old group's copies are closed.
func TestSaveRestore(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			g := newGroup(t, fam.addr, Options{QUIC: true, IdleTimeout: time.Hour})
			socks := gens{}
			take(t, g, 1, socks)
			must(t, g.Switch(1))
			a := clients(t, g, 3)
			for _, c := range a {
				expect(t, "gen 1 serving", sends(t, c, socks, packet(dnsQuery, 0)), 1)
			}
			q := newClient(t, g)
			expect(t, "a QUIC connection, gen 1 serving", sends(t, q, socks, packet(v1Initial, 1200)), 1)
			take(t, g, 2, socks)
			must(t, g.Switch(2))
			b := clients(t, g, 3)
			for _, c := range b {
				expect(t, "gen 2 serving", sends(t, c, socks, packet(dnsQuery, 0)), 2)
			}
			expectFlows(t, g, map[int]int{1: 4, 2: 3})

			s, err := g.Save()
			must(t, err)
			if fds := s.FDs(); len(fds) != 1+5+len(s.Members) || len(s.Members) != 2 {
				t.Fatalf("FDs() = %v for a program, 5 maps and members %+v", fds, s.Members)
			}
			for _, fd := range s.FDs() {
				if open, cloexec := isOpen(fd); !open || !cloexec {
					t.Fatalf("after Save, fd %d: open %v, close-on-exec %v", fd, open, cloexec)
				}
			}
			s2, moved := execLike(t, s)
			before := openFDs(t)
			if err := s2.Check(); err != nil {
				t.Fatalf("Check of a good document: %v", err)
			}
			if after := openFDs(t); after != before {
				t.Fatalf("%d fds open before Check, %d after", before, after)
			}
			r, err := Restore(s2, nil)
			if err != nil {
				for _, fd := range moved {
					unix.Close(fd)
				}
				t.Fatal(err)
			}
			t.Cleanup(r.Close) // every fd moved is r's now
			// The saved fds of the program and the maps stay open until
			// Settle, for a failed upgrade's way back; then they close
			// (the group holds duplicates).
			progMaps := []int{s2.Program, s2.Maps.Socks, s2.Maps.Serving, s2.Maps.Flows, s2.Maps.Seen, s2.Maps.Retired}
			for _, fd := range progMaps {
				if open, _ := isOpen(fd); !open {
					t.Fatalf("Restore closed the saved fd %d of the program or a map before Settle", fd)
				}
			}
			r.Settle()
			for _, fd := range progMaps {
				if open, _ := isOpen(fd); open {
					t.Fatalf("Settle left the saved fd %d of the program or a map open: the group holds duplicates", fd)
				}
			}
			for _, m := range s2.Members {
				if open, cloexec := isOpen(m.FD); !open || !cloexec {
					t.Fatalf("after Restore, member fd %d: open %v, close-on-exec %v", m.FD, open, cloexec)
				}
			}
			if r.Instructions() != g.Instructions() || r.Addr() != g.Addr() {
				t.Fatalf("restored: %d instructions on %v; saved: %d on %v", r.Instructions(), r.Addr(), g.Instructions(), g.Addr())
			}
			expectFlows(t, r, map[int]int{1: 4, 2: 3})

			// The old group goes, as the old relay's copies do at the
			// exec: the kernel objects live on through the new numbers.
			g.Close()
			rs := restoredSocks(t, r, map[int]bool{1: true, 2: true})
			if r.Held(1) != rs[1] || r.Held(2) != rs[2] || r.Held(3) != nil {
				t.Fatal("Held does not give what Take gave")
			}
			for _, c := range a {
				expect(t, "a flow of gen 1, restored", sends(t, c, rs, packet(dnsQuery, 0)), 1)
			}
			for _, c := range b {
				expect(t, "a flow of gen 2, restored", sends(t, c, rs, packet(dnsQuery, 0)), 2)
			}
			expect(t, "a QUIC connection of gen 1, restored", sends(t, q, rs, packet(short, 60)), 1)
			expect(t, "a new flow, restored", sends(t, newClient(t, r), rs, packet(dnsQuery, 0)), 2)

			takeFresh(t, r, 3, rs, true)
			must(t, r.Switch(3))
			expect(t, "a new flow after a switch, restored", sends(t, newClient(t, r), rs, packet(dnsQuery, 0)), 3)
			expect(t, "a flow of gen 1 after a switch, restored", sends(t, a[0], rs, packet(dnsQuery, 0)), 1)
			if err := r.Retire(3); err == nil {
				t.Fatal("the restored serving generation retired")
			}
			must(t, r.Retire(1))
			expect(t, "a plain flow of retired gen 1", sends(t, a[1], rs, packet(dnsQuery, 0)), 3)
			expect(t, "a QUIC connection of retired gen 1", sends(t, q, rs, packet(short, 60)), 1)
			r.Release(1)
			delete(rs, 1)
			expect(t, "a QUIC connection of released gen 1", sends(t, q, rs, packet(short, 60)), 3)
			expect(t, "a flow of gen 2", sends(t, b[0], rs, packet(dnsQuery, 0)), 2)
			// Gen 2: b and the new flow; gen 3: its new flow, a[1] and
			// q; a[0] and a[2] named a slot that is empty now.
			expectFlows(t, r, map[int]int{2: 4, 3: 3})
		})
	}
}

// The caller's socket (FromFile) is restored through a duplicate the
// group owns, which a second exec carries as the group's; the caller's
// own copy stays open whatever the group does.
func TestSaveRestoreFromFile(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("eBPF steering unavailable here: %v", err)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	must(t, err)
	must(t, unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1))
	must(t, unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}))
	f := os.NewFile(uintptr(fd), "udp")
	t.Cleanup(func() { f.Close() })
	g, err := FromFile(f, Options{})
	must(t, err)
	t.Cleanup(g.Close)
	socks := gens{}
	take(t, g, 1, socks)
	must(t, g.Switch(1))
	a := newClient(t, g)
	expect(t, "gen 1 serving", sends(t, a, socks, packet(dnsQuery, 0)), 1)
	take(t, g, 2, socks)
	must(t, g.Switch(2))

	s, err := g.Save()
	must(t, err)
	if !s.Detach || s.First != 0 || s.Members[0].Owned || s.Members[0].Dup || s.Members[0].FD != fd {
		t.Fatalf("the caller's socket saved as %+v (detach %v, first %d)", s.Members[0], s.Detach, s.First)
	}
	s2, moved := execLike(t, s)
	callers := moved[fd] // the caller's copy after the exec, the caller's to close
	t.Cleanup(func() { unix.Close(callers) })
	r, err := Restore(s2, nil)
	if err != nil {
		for _, fd := range moved {
			if fd != callers {
				unix.Close(fd)
			}
		}
		t.Fatal(err)
	}
	t.Cleanup(r.Close) // every fd moved but the caller's is r's now
	rs := restoredSocks(t, r, map[int]bool{1: true, 2: true})
	rfd := int(rs[1].Fd())
	if rfd == callers {
		t.Fatal("the restored group wraps the caller's fd in a file of its own")
	}
	if cookie(t, rfd) != cookie(t, callers) {
		t.Fatal("the restored group's first socket is not the caller's")
	}
	expect(t, "a flow of gen 1, restored", sends(t, a, rs, packet(dnsQuery, 0)), 1)
	expect(t, "a new flow, restored", sends(t, newClient(t, r), rs, packet(dnsQuery, 0)), 2)

	// A second exec: the duplicate is the group's.
	s3, err := r.Save()
	must(t, err)
	if s3.Members[0].Owned || !s3.Members[0].Dup || s3.Members[0].FD != rfd || slices.Contains(s3.FDs(), callers) {
		t.Fatalf("the restored caller's socket saved as %+v, FDs %v (the caller's fd %d)", s3.Members[0], s3.FDs(), callers)
	}
	s4, moved2 := execLike(t, s3)
	r2, err := Restore(s4, nil)
	if err != nil {
		for _, fd := range moved2 {
			unix.Close(fd)
		}
		t.Fatal(err)
	}
	rs2 := restoredSocks(t, r2, map[int]bool{1: true, 2: true})
	if int(rs2[1].Fd()) != s4.Members[0].FD {
		t.Fatalf("the duplicate, fd %d after the exec, was not taken as the group's: it gives fd %d", s4.Members[0].FD, rs2[1].Fd())
	}
	expect(t, "a flow of gen 1, restored twice", sends(t, a, rs2, packet(dnsQuery, 0)), 1)
	r2.Close()
	if open, _ := isOpen(s4.Members[0].FD); open {
		t.Fatal("Close left the group's duplicate of the caller's socket open")
	}
	if open, _ := isOpen(callers); !open {
		t.Fatal("a restored group closed the caller's socket")
	}
}

func cookie(t *testing.T, fd int) uint64 {
	t.Helper()
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	must(t, err)
	return c
}

// openFDs counts this process's open fds.
func openFDs(t *testing.T) int {
	t.Helper()
	d, err := os.ReadDir("/proc/self/fd")
	must(t, err)
	return len(d)
}

// Restore refuses fds that are not what s says, says what, and closes
// none of them (and leaks nothing of its own).
func TestRestoreRefuses(t *testing.T) {
	g := newGroup(t, "127.0.0.1:0", Options{})
	socks := gens{}
	take(t, g, 1, socks)
	take(t, g, 2, socks)
	s, err := g.Save()
	must(t, err)
	s2, moved := execLike(t, s)
	t.Cleanup(func() {
		for _, fd := range moved {
			unix.Close(fd)
		}
	})
	// Another group's program: it uses maps of its own.
	other := newGroup(t, "127.0.0.1:0", Options{})
	so, err := other.Save()
	must(t, err)
	otherProg, err := unix.Dup(so.Program)
	must(t, err)
	t.Cleanup(func() { unix.Close(otherProg) })
	for _, tc := range []struct {
		name, err string
		edit      func(*Saved)
	}{
		{"another group's program", "does not use the socks map", func(s *Saved) { s.Program = otherProg }},
		{"another layout", "layout 99", func(s *Saved) { s.Version = 99 }},
		{"two maps swapped", "the flows map", func(s *Saved) { s.Maps.Flows, s.Maps.Seen = s.Maps.Seen, s.Maps.Flows }},
		{"other sizes", "the socks map", func(s *Saved) { s.Options.Slots++ }},
		{"a map for the program", "the program", func(s *Saved) { s.Program = s.Maps.Serving }},
		{"two sockets swapped", "the socket map holds another socket", func(s *Saved) {
			s.Members[0].FD, s.Members[1].FD = s.Members[1].FD, s.Members[0].FD
		}},
		{"a map for a socket", "slot 1", func(s *Saved) { s.Members[1].FD = s.Maps.Seen }},
		{"no serving socket", "serving slot", func(s *Saved) { s.Serving = 5 }},
		{"another serving socket", "the serving map names slot 0, not 1", func(s *Saved) { s.Serving = 1 }},
		{"a retirement the maps do not know", "retired false in the map", func(s *Saved) { s.Members[1].Retired = true }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := s2
			bad.Members = slices.Clone(s2.Members)
			tc.edit(&bad)
			before := openFDs(t)
			if err := bad.Check(); err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("Check: %v; want an error naming %q", err, tc.err)
			}
			if after := openFDs(t); after != before {
				t.Fatalf("%d fds open before the failed Check, %d after", before, after)
			}
			r, err := Restore(bad, nil)
			if err == nil {
				r.Close()
				t.Fatal("Restore took it")
			}
			if !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("Restore: %v; want an error naming %q", err, tc.err)
			}
			if after := openFDs(t); after != before {
				t.Fatalf("%d fds open before the failed Restore, %d after", before, after)
			}
			for _, fd := range s2.FDs() {
				if open, _ := isOpen(fd); !open {
					t.Fatalf("the failed Restore closed fd %d", fd)
				}
			}
			t.Log(err)
		})
	}
}
