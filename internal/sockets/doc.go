// Package sockets is relay's set of listening sockets, for relay's whole
// life: what each listener is, the socket group that gives each generation
// a socket of its own, the copy systemd's fd store keeps, which sockets
// each generation holds, and which socket a generation's own bind(2) lands
// on.
//
// Its files, by job:
//
//   - spec.go: what relay is asked to listen on (ParseSpec, the names the
//     children see, --socket-mode);
//   - bind.go: a Listener, and binding one for each spec;
//   - activation.go: adopting the sockets passed to relay itself by socket
//     activation (a .socket unit, or the fd store after a restart of relay),
//     and matching them to the specs;
//   - open.go: Open, which makes the Set from the specs and the passed
//     sockets, steers the TCP ones and stores them in the fd store;
//   - set.go: the Set: what each generation takes, the switch to a new
//     generation, its drain and the hand-over of a hung one's queue;
//   - claim.go: Claim, the address and family rules that decide which
//     listener a child's own bind(2) is given (the bind takeover);
//   - saved.go: the set as it crosses relay's exec of its next image
//     (relay upgrade): Save, Restore, and Held, the sockets a generation
//     an earlier image started took.
//
// The socket group of a TCP listener, its BPF program and its drain
// observation are in the subpackage steer.
package sockets
