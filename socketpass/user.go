package socketpass

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// User is who the children run as (relay run --user): the exec shim takes
// these credentials after it has installed what needs relay's privileges,
// and before it execs the command.
type User struct {
	UID, GID uint32
	// Groups are the supplementary groups: the user's own from the group
	// database, or none when a group was given.
	Groups []uint32
	// Name and Home are the user's, for USER, LOGNAME and HOME; Home is
	// "/" for a user with none.
	Name, Home string
	// unlisted: given by a number the user database does not have.
	unlisted bool
}

// noID is the id that set*id(2) read as "leave this one as it is": a
// server given it would keep relay's.
const noID = ^uint32(0)

// parseID reads a uid or gid given by number; noID is none.
func parseID(s string) (uint32, bool) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || uint32(n) == noID {
		return 0, false
	}
	return uint32(n), true
}

// ErrUserSpec is wrapped by LookupUser's errors about the spec itself: an
// unknown user or group, or one relay may not become.
var ErrUserSpec = errors.New("bad --user")

// LookupUser resolves a --user value, USER or USER:GROUP, names or numbers,
// from the user and group databases (the files: relay is built without
// cgo). A user given by number need not exist there, but then its group
// must be given too (a group of the same number may be a privileged one):
// it gets no supplementary groups, and HOME=/. Root is refused: the server
// would keep every capability. euid is relay's effective uid: only root may
// run a child as anyone but itself.
func LookupUser(spec string, euid int) (*User, error) {
	name, group, hasGroup := strings.Cut(spec, ":")
	if name == "" || (hasGroup && group == "") {
		return nil, fmt.Errorf("%w %q: want USER or USER:GROUP, names or numbers, e.g. --user www-data or --user 33:33", ErrUserSpec, spec)
	}
	u, err := lookupAccount(name)
	if err != nil {
		return nil, err
	}
	if u.unlisted && !hasGroup {
		return nil, fmt.Errorf("%w %q: uid %d is not in the user database, so relay cannot tell its group; give it, e.g. --user %d:%d", ErrUserSpec, spec, u.UID, u.UID, u.UID)
	}
	if u.UID == 0 {
		return nil, fmt.Errorf("%w %q: the server would run as root, with every capability; name an unprivileged user, or drop --user", ErrUserSpec, spec)
	}
	if hasGroup {
		gid, err := lookupGroup(group)
		if err != nil {
			return nil, err
		}
		u.GID, u.Groups = gid, nil
	}
	if euid != 0 && (int(u.UID) != euid || int(u.GID) != os.Getegid()) {
		return nil, fmt.Errorf("%w %q: relay runs as uid %d, and only root can run the server as another user or group; run relay as root (it binds, then the server runs as %s), or drop --user", ErrUserSpec, spec, euid, name)
	}
	return u, nil
}

// lookupAccount finds the user name (or number) names.
func lookupAccount(name string) (*User, error) {
	acct, err := user.Lookup(name)
	if err != nil {
		acct, err = user.LookupId(name)
	}
	if err != nil {
		n, ok := parseID(name)
		if !ok {
			return nil, fmt.Errorf("%w: no user %q in the user database; give an existing user (getent passwd) or a number below %d", ErrUserSpec, name, noID)
		}
		return &User{UID: n, GID: n, Name: name, Home: "/", unlisted: true}, nil
	}
	uid, ok1 := parseID(acct.Uid)
	gid, ok2 := parseID(acct.Gid)
	if !ok1 || !ok2 {
		return nil, fmt.Errorf("%w: user %q has uid %q and gid %q, which are not numbers relay can set", ErrUserSpec, name, acct.Uid, acct.Gid)
	}
	u := &User{UID: uid, GID: gid, Name: acct.Username, Home: acct.HomeDir}
	if u.Home == "" {
		u.Home = "/"
	}
	ids, err := acct.GroupIds()
	if err != nil {
		return nil, fmt.Errorf("%w: reading the groups of user %q: %w", ErrUserSpec, name, err)
	}
	for _, id := range ids {
		if g, ok := parseID(id); ok && g != u.GID && !slices.Contains(u.Groups, g) {
			u.Groups = append(u.Groups, g)
		}
	}
	return u, nil
}

// lookupGroup finds the group name (or number) names.
func lookupGroup(name string) (uint32, error) {
	g, err := user.LookupGroup(name)
	if err != nil {
		g, err = user.LookupGroupId(name)
	}
	if err != nil {
		n, ok := parseID(name)
		if !ok {
			return 0, fmt.Errorf("%w: no group %q in the group database; give an existing group (getent group) or a number below %d", ErrUserSpec, name, noID)
		}
		return n, nil
	}
	gid, ok := parseID(g.Gid)
	if !ok {
		return 0, fmt.Errorf("%w: group %q has gid %q, which is not a number relay can set", ErrUserSpec, name, g.Gid)
	}
	return gid, nil
}

// Env is what a child running as u finds of itself in its environment.
func (u *User) Env() []string {
	return []string{"USER=" + u.Name, "LOGNAME=" + u.Name, "HOME=" + u.Home}
}

// arg is u as the shim's argument: "UID:GID:G1,G2,...".
func (u *User) arg() string {
	gs := make([]string, len(u.Groups))
	for i, g := range u.Groups {
		gs[i] = strconv.FormatUint(uint64(g), 10)
	}
	return fmt.Sprintf("%d:%d:%s", u.UID, u.GID, strings.Join(gs, ","))
}

// parseUser reads the shim's user argument: "-" for none.
func parseUser(arg string) (*User, error) {
	if arg == "-" {
		return nil, nil
	}
	bad := fmt.Errorf("exec shim: bad user argument %q", arg)
	parts := strings.Split(arg, ":")
	if len(parts) != 3 {
		return nil, bad
	}
	fields := parts[:2]
	if parts[2] != "" {
		fields = append(fields, strings.Split(parts[2], ",")...)
	}
	var ids []uint32
	for _, p := range fields {
		n, ok := parseID(p)
		if !ok {
			return nil, bad
		}
		ids = append(ids, n)
	}
	return &User{UID: ids[0], GID: ids[1], Groups: ids[2:]}, nil
}

// become makes the calling process u: its supplementary groups, then its
// group, then its user (the order in which each step is still allowed). A
// relay that is not root runs children as itself only (LookupUser): then
// its credentials stay as they are.
// From a root relay, changing every uid away from 0 clears the process's
// capabilities, permitted and effective alike, and the kernel clears the
// parent-death signal with the credentials: the caller sets it again. Go's
// syscall package applies each change to every thread of the process.
func (u *User) become() error {
	if os.Geteuid() != 0 && os.Geteuid() == int(u.UID) && os.Getegid() == int(u.GID) {
		return noNewPrivs()
	}
	groups := make([]int, len(u.Groups))
	for i, g := range u.Groups {
		groups[i] = int(g)
	}
	if err := syscall.Setgroups(groups); err != nil {
		return fmt.Errorf("exec shim: setting the supplementary groups %v: %w", u.Groups, err)
	}
	if err := syscall.Setresgid(int(u.GID), int(u.GID), int(u.GID)); err != nil {
		return fmt.Errorf("exec shim: setting gid %d: %w", u.GID, err)
	}
	if err := syscall.Setresuid(int(u.UID), int(u.UID), int(u.UID)); err != nil {
		return fmt.Errorf("exec shim: setting uid %d: %w", u.UID, err)
	}
	// The kernel clears the capabilities with the uids, unless securebits
	// say otherwise; ambient ones would cross the exec. Check rather than
	// trust: the server runs with none, or not at all.
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return fmt.Errorf("exec shim: clearing the ambient capabilities: %w", err)
	}
	if err := checkBecame(u); err != nil {
		return err
	}
	return noNewPrivs()
}

// checkBecame fails unless the process is u, every id of it, with no
// capability left.
func checkBecame(u *User) error {
	ru, eu, su := unix.Getresuid()
	rg, eg, sg := unix.Getresgid()
	for _, id := range []int{ru, eu, su} {
		if uint32(id) != u.UID {
			return fmt.Errorf("exec shim: the uids are %d %d %d after setting %d; not starting the server", ru, eu, su, u.UID)
		}
	}
	for _, id := range []int{rg, eg, sg} {
		if uint32(id) != u.GID {
			return fmt.Errorf("exec shim: the gids are %d %d %d after setting %d; not starting the server", rg, eg, sg, u.GID)
		}
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("exec shim: reading the capabilities: %w", err)
	}
	for _, d := range data {
		if d.Effective != 0 || d.Permitted != 0 || d.Inheritable != 0 {
			return fmt.Errorf("exec shim: capabilities left after becoming uid %d (securebits keep them?); not starting the server", u.UID)
		}
	}
	return nil
}

// noNewPrivs keeps anything the server runs from gaining privileges back
// through a set-user-ID program or file capabilities.
func noNewPrivs() error {
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("exec shim: setting no_new_privs: %w", err)
	}
	return nil
}
