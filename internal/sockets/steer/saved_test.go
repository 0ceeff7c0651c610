package steer

import (
	"net/netip"
	"os"
	"reflect"
	"testing"

	"golang.org/x/sys/unix"
)

// crossed returns s with every fd replaced by a duplicate, as if s had
// crossed an exec: the same sockets under other numbers, so that the group
// that saved s keeps its own files open.
func crossed(t *testing.T, s Saved) Saved {
	t.Helper()
	dup := func(ms []SavedMember) []SavedMember {
		var out []SavedMember
		for _, m := range ms {
			fd, err := unix.FcntlInt(uintptr(m.FD), unix.F_DUPFD_CLOEXEC, 3)
			if err != nil {
				t.Fatal(err)
			}
			m.FD = fd
			out = append(out, m)
		}
		return out
	}
	c := s
	c.Members, c.Evicted = dup(s.Members), dup(s.Evicted)
	return c
}

// restored restores s, crossed, and closes what it restored at the end.
func restored(t *testing.T, s Saved) (*Group, Saved) {
	t.Helper()
	c := crossed(t, s)
	r, err := Restore("test", c, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if f := r.Original(); f != nil {
			f.Close()
		}
		r.Close()
	})
	return r, c
}

func inode(t *testing.T, fd int) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func statusFlags(t *testing.T, f *os.File) int {
	t.Helper()
	var fl int
	var ferr error
	if err := control(f, func(fd int) error { fl, ferr = unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); return ferr }); err != nil {
		t.Fatal(err)
	}
	return fl
}

// gens are the generations of g's members, in the kernel's order.
func (g *Group) gens() []int {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []int
	for _, m := range g.members {
		out = append(out, m.gen)
	}
	return out
}

// A restored group is the saved one: the same sockets in the same order,
// the same targets and flags; the program attached before steers on, and
// later changes steer right.
func TestSaveRestore(t *testing.T) {
	orig := listen(t, "127.0.0.1:0", true)
	g, err := New(orig, Options{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	socks := map[int]*os.File{}
	take(t, g, 1, socks)
	take(t, g, 2, socks)
	if err := g.Switch(2); err != nil {
		t.Fatal(err)
	}
	from := netip.MustParseAddrPort("127.0.0.1:40000")
	if err := g.Probe(1, 0, from); err != nil {
		t.Fatal(err)
	}
	// A bind takeover may have made gen 2's socket non-blocking.
	if err := control(socks[2], func(fd int) error { return unix.SetNonblock(fd, true) }); err != nil {
		t.Fatal(err)
	}
	flags := map[int]int{1: statusFlags(t, socks[1]), 2: statusFlags(t, socks[2])}

	s, err := g.Save()
	if err != nil {
		t.Fatal(err)
	}
	want := Saved{Members: []SavedMember{
		{FD: s.Members[0].FD, Gen: 1, Used: true},
		{FD: s.Members[1].FD, Gen: 2, Owned: true, Used: true},
	}, Active: 1, Probe: 0, ProbeFrom: from.String()}
	if !reflect.DeepEqual(s, want) {
		t.Fatalf("Save: %+v, want %+v", s, want)
	}
	r, c := restored(t, s)

	for i, m := range c.Members {
		if inode(t, m.FD) != inode(t, s.Members[i].FD) || r.members[i].fd != m.FD {
			t.Fatalf("member %d is not the saved one", i)
		}
	}
	if again, err := r.Save(); err != nil || !reflect.DeepEqual(again, c) {
		t.Fatalf("the restored group saves as %+v, %v; want %+v", again, err, c)
	}
	if r.Original() != r.Held(1, 0) || r.Held(3, 0) != nil {
		t.Fatal("Original or Held do not find the sockets")
	}
	rsocks := map[int]*os.File{1: r.Held(1, 0), 2: r.Held(2, 0)}
	dialTo(t, r, "127.0.0.1", nil)
	expect(t, "after the restore", receiver(t, rsocks), 2)

	take(t, r, 3, rsocks)
	r.Release(1) // the probe rule ends; gen 3's socket moves into slot 0
	delete(rsocks, 1)
	if got := r.gens(); !reflect.DeepEqual(got, []int{3, 2}) {
		t.Fatalf("generations after the release: %v, want [3 2]", got)
	}
	dialTo(t, r, "127.0.0.1", nil)
	expect(t, "after the release", receiver(t, rsocks), 2)
	if err := r.Switch(3); err != nil {
		t.Fatal(err)
	}
	dialTo(t, r, "127.0.0.1", nil)
	expect(t, "after the switch", receiver(t, rsocks), 3)

	for gen, fl := range flags {
		if got := statusFlags(t, socks[gen]); got != fl {
			t.Errorf("generation %d's socket flags: %#x, were %#x", gen, got, fl)
		}
	}
}

// An evicted socket crosses, and its generation's Release closes it.
func TestRestoreEvicted(t *testing.T) {
	orig := listen(t, "127.0.0.1:0", true)
	g, err := New(orig, Options{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	socks := map[int]*os.File{}
	take(t, g, 1, socks)
	take(t, g, 2, socks)
	if err := g.Switch(2); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Evict(1); err != nil {
		t.Fatal(err)
	}
	s, err := g.Save()
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Members) != 1 || len(s.Evicted) != 1 || s.Evicted[0].Gen != 1 || s.Evicted[0].Owned {
		t.Fatalf("Save: %+v", s)
	}
	r, c := restored(t, s)
	if r.Original() == nil || r.Original() != r.Held(1, 0) {
		t.Fatal("the evicted original is not generation 1's")
	}
	r.Release(1)
	if r.Original() != nil || r.Held(1, 0) != nil {
		t.Fatal("Release left the evicted socket")
	}
	if _, err := unix.FcntlInt(uintptr(c.Evicted[0].FD), unix.F_GETFD, 0); err == nil {
		t.Fatal("Release did not close the restored copy of the evicted socket")
	}
	rsocks := map[int]*os.File{2: r.Held(2, 0)}
	dialTo(t, r, "127.0.0.1", nil)
	expect(t, "after the release", receiver(t, rsocks), 2)
}

// Restore refuses what is not the saved group, and leaves the fds open.
func TestRestoreRefuses(t *testing.T) {
	orig := listen(t, "127.0.0.1:0", true)
	g, err := New(orig, Options{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	socks := map[int]*os.File{}
	take(t, g, 1, socks)
	take(t, g, 2, socks)
	s, err := g.Save()
	if err != nil {
		t.Fatal(err)
	}
	fdOf := func(f *os.File) int {
		var n int
		control(f, func(fd int) error { n = fd; return nil })
		return n
	}
	file, err := os.CreateTemp(t.TempDir(), "x")
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	plain := listen(t, "127.0.0.1:0", false)
	elsewhere := listen(t, "127.0.0.1:0", true)
	member := func(fd int) SavedMember { return SavedMember{FD: fd, Gen: 2, Owned: true} }
	for _, tc := range []struct {
		name  string
		saved Saved
	}{
		{"not a socket", Saved{Members: []SavedMember{s.Members[0], member(fdOf(file))}, Probe: -1}},
		{"no SO_REUSEPORT", Saved{Members: []SavedMember{s.Members[0], member(fdOf(plain))}, Probe: -1}},
		{"another address", Saved{Members: []SavedMember{s.Members[0], member(fdOf(elsewhere))}, Probe: -1}},
		{"one socket twice", Saved{Members: []SavedMember{s.Members[0], member(s.Members[0].FD)}, Probe: -1}},
		{"active out of range", Saved{Members: s.Members, Active: 2, Probe: -1}},
		{"a generation twice", Saved{Members: []SavedMember{s.Members[0], {FD: s.Members[1].FD, Gen: 1, Owned: true}}, Probe: -1}},
		{"no socket", Saved{Probe: -1}},
	} {
		if _, err := Restore("test", tc.saved, nil); err == nil {
			t.Errorf("%s: restored", tc.name)
		} else {
			t.Logf("%s: %v", tc.name, err)
		}
		for _, m := range tc.saved.Members {
			if _, err := unix.FcntlInt(uintptr(m.FD), unix.F_GETFD, 0); err != nil {
				t.Fatalf("%s: fd %d closed: %v", tc.name, m.FD, err)
			}
		}
	}
	dialTo(t, g, "127.0.0.1", nil)
	expect(t, "after the refusals", receiver(t, socks), 1)
}
