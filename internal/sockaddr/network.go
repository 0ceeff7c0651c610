package sockaddr

// Network is the kind of a socket: what a --listen spec asks for, what
// relay's listener is, and what a child's bind is made on.
type Network string

// The networks relay listens on and takes binds over on.
const (
	TCP  Network = "tcp"
	UDP  Network = "udp"
	Unix Network = "unix"
	// Other is any other socket a child binds (raw, netlink, packet...):
	// never one of relay's.
	Other Network = ""
)
