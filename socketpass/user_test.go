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
	for _, bad := range []string{"", "1", "1:2", "a:b:", "1:2:x", "1::"} {
		if _, err := parseUser(bad); err == nil {
			t.Errorf("parseUser(%q) accepted", bad)
		}
	}
}

// LookupUser takes names and numbers; a group given replaces the user's
// groups; what relay may not do is refused.
func TestLookupUser(t *testing.T) {
	u, err := LookupUser("root", 0)
	if err != nil || u.UID != 0 || u.GID != 0 || u.Name != "root" || u.Home == "" {
		t.Fatalf("LookupUser(root) = %+v, %v", u, err)
	}
	if env := u.Env(); !slices.Contains(env, "USER=root") || !slices.Contains(env, "LOGNAME=root") || !slices.Contains(env, "HOME="+u.Home) {
		t.Errorf("Env() = %q", env)
	}
	u, err = LookupUser("0:12345", 0)
	if err != nil || u.UID != 0 || u.GID != 12345 || len(u.Groups) != 0 {
		t.Errorf("LookupUser(0:12345) = %+v, %v; want uid 0, gid 12345, no supplementary groups", u, err)
	}
	u, err = LookupUser("54321", 0)
	if err != nil || u.UID != 54321 || u.GID != 54321 || u.Home != "/" {
		t.Errorf("LookupUser(54321) = %+v, %v; want uid and gid 54321, HOME=/", u, err)
	}
	for _, c := range []struct{ spec, want string }{
		{"no-such-user-relay-test", `no user "no-such-user-relay-test" in the user database`},
		{"root:no-such-group-relay-test", `no group "no-such-group-relay-test" in the group database`},
		{"", "want USER or USER:GROUP"},
		{"root:", "want USER or USER:GROUP"},
	} {
		if _, err := LookupUser(c.spec, 0); !errors.Is(err, ErrUserSpec) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("LookupUser(%q) = %v; want ErrUserSpec saying %q", c.spec, err, c.want)
		}
	}
	// A relay that is not root may run children as itself only.
	if _, err := LookupUser("root", 1000); !errors.Is(err, ErrUserSpec) || !strings.Contains(err.Error(), "only root can run the server as another user") {
		t.Errorf("LookupUser(root) from uid 1000 = %v; want a refusal", err)
	}
}
