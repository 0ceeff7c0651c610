// Package control is relay's control plane: a unix socket in a private
// directory, a small versioned protocol of JSON lines over it, the server
// relay run answers with (Listen, Server) and the client relay restart,
// status and stop use (Do).
//
// # Requests and responses
//
// A client connects, sends one request line of at most MaxRequest bytes
// and reads response lines until the server closes the connection. Every
// line is one JSON object ending in "\n"; both carry the protocol version
// in "v".
//
//	→ {"v":1,"op":"restart","command":["/srv/api-v2","--flag"],"check":["/srv/api-v2","-t"]}
//	← {"v":1,"type":"event","event":{"phase":"starting","generation":5,"pid":1240}}
//	← {"v":1,"type":"event","event":{"phase":"done","result":{"ok":true,"generation":5,...}}}
//	← {"v":1,"type":"event","event":{"phase":"old_exited","generation":4,"pid":1200,"status":"exit status 0"}}
//
//	→ {"v":1,"op":"status"}   ← {"v":1,"type":"status","status":{...}}
//	→ {"v":1,"op":"stop"}     ← {"v":1,"type":"stopping","pid":1195}  (then open until relay exits)
//
// # Operations
//
//   - restart (Request.Command, Request.Check and Request.NoWait optional):
//     the server answers with Event lines (Response.Event), one per Phase,
//     until PhaseDone, which carries the Result, and PhaseOldExit once the
//     old generation is gone. A restart refused before anything started
//     (command not found, pre-flight check failed, relay stopping) is a
//     PhaseDone event whose Result has Refused set, not an error response.
//     With no_wait the only answer is a line of type accepted.
//   - status: one line of type status whose StatusDoc is what relay status
//     --json prints.
//   - stop: one line of type stopping with relay's pid; the connection then
//     stays open until relay exits, so its end is the client's answer.
//   - rollback: in a confirmation window (relay run --confirm), traffic
//     goes back to the warm generation; one line of type rolled_back whose
//     RollbackDoc names it and the failed one. Outside a window, an error
//     with code nothing_warm.
//
// # Errors
//
// A request the server will not answer gets one line of type error, and
// the connection is closed. Response.Error is for people; Response.Code is
// for programs, one of:
//
//	bad_request          malformed JSON, more than one value, bad arguments, no line in time
//	too_large            a request line over MaxRequest bytes
//	unsupported_version  "v" is not this server's Version
//	unknown_op           "op" is not restart, status, stop, upgrade or rollback
//	permission_denied    the peer's uid is neither relay's nor root's
//	busy                 closed unread to make room for newer connections, or too many restarts followed; try again
//	stopping             relay is stopping and has no status to give
//	nothing_warm         rollback outside a confirmation window: nothing to go back to
//	internal             anything else the server could not do
//
// Do returns an error response as a *ServerError carrying both.
//
// # Versions
//
// A server answers only requests of its own Version. Within a version,
// fields and codes are only ever added: a client ignores fields and
// response types it does not know and treats a code it does not know as
// a failure of no particular kind. A server that predates codes sends an
// error with no "code" field; Do then returns a ServerError whose Code is
// empty, which a client treats the same way (relay's own client exits 1
// rather than 4 for such a server's peer-uid refusal, and prints its
// message). The messages themselves have not changed, so older clients
// that read them keep working.
package control
