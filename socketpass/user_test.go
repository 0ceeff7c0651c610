package socketpass

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// The user crosses to the shim as one argument and comes back the same.
func TestUserArgRoundTrip(t *testing.T) {
	for _, u := range []*User{
		{UID: 65534, GID: 65534},
		{UID: 33, GID: 33, Groups: []uint32{4, 27}},
	} {
		got, err := parseUser(u.arg())
		if err != nil || got.UID != u.UID || got.GID != u.GID || !slices.Equal(got.Groups, u.Groups) {
			t.Errorf("parseUser(%q) = %+v, %v; want %+v", u.arg(), got, err, u)
		}
	}
	if u, err := parseUser("-"); u != nil || err != nil {
		t.Errorf(`parseUser("-") = %+v, %v; want none`, u, err)
	}
	for _, bad := range []string{"", "1", "1:2", "a:b:", "1:2:x", "1::", ":5:7", "4294967295:1:", "1:2:3,,4"} {
		if _, err := parseUser(bad); err == nil {
			t.Errorf("parseUser(%q) accepted", bad)
		}
	}
}

// LookupUser takes names and numbers; a group given replaces the user's
// groups; what relay may not do is refused.
func TestLookupUser(t *testing.T) {
	u, err := LookupUser("nobody", 0)
	if err != nil || u.UID != 65534 || u.Name != "nobody" || u.Home == "" {
		t.Fatalf("LookupUser(nobody) = %+v, %v", u, err)
	}
	if env := u.Env(); !slices.Contains(env, "USER=nobody") || !slices.Contains(env, "LOGNAME=nobody") || !slices.Contains(env, "HOME="+u.Home) {
		t.Errorf("Env() = %q", env)
	}
	u, err = LookupUser("nobody:12345", 0)
	if err != nil || u.UID != 65534 || u.GID != 12345 || len(u.Groups) != 0 {
		t.Errorf("LookupUser(nobody:12345) = %+v, %v; want uid 65534, gid 12345, no supplementary groups", u, err)
	}
	u, err = LookupUser("54321:54321", 0)
	if err != nil || u.UID != 54321 || u.GID != 54321 || u.Home != "/" {
		t.Errorf("LookupUser(54321:54321) = %+v, %v; want uid and gid 54321, HOME=/", u, err)
	}
	for _, c := range []struct{ spec, want string }{
		{"no-such-user-relay-test", `no user "no-such-user-relay-test" in the user database`},
		{"nobody:no-such-group-relay-test", `no group "no-such-group-relay-test" in the group database`},
		{"", "want USER or USER:GROUP"},
		{"nobody:", "want USER or USER:GROUP"},
		// A uid the database does not have: its group must be given,
		// not guessed (a group of that number may be privileged).
		{"54321", "uid 54321 is not in the user database, so relay cannot tell its group; give it, e.g. --user 54321:54321"},
		// The id set*id(2) reads as "unchanged": the server would
		// stay root.
		{"4294967295", `no user "4294967295"`},
		{"nobody:4294967295", `no group "4294967295"`},
		{"root", "the server would run as root"},
		{"0:12345", "the server would run as root"},
	} {
		if _, err := LookupUser(c.spec, 0); !errors.Is(err, ErrUserSpec) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("LookupUser(%q) = %v; want ErrUserSpec saying %q", c.spec, err, c.want)
		}
	}
	// A relay that is not root may run children as itself only.
	if _, err := LookupUser("nobody", 1000); !errors.Is(err, ErrUserSpec) || !strings.Contains(err.Error(), "only root can run the server as another user") {
		t.Errorf("LookupUser(nobody) from uid 1000 = %v; want a refusal", err)
	}
}
