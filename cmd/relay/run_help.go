package main

// The long help of relay run: the short reference, shown by relay run --help.

const runDescription = `relay binds every --listen socket once, for its whole life, and runs COMMAND on them.
The server needs no relay-specific code, whichever way it gets its port:

   It binds its own port (http.ListenAndServe(":8080"), nginx "listen 8080;",
   python3 -m http.server): the bind lands on relay's socket (--takeover auto). The
   exec shim installs a seccomp filter that hands relay every bind(2) of the child and
   of everything it starts; a bind of an address a --listen covers (its port, and its
   address or a wildcard) gets relay's socket at the same fd number, and any other
   bind (another port, port 0) runs untouched. The child's listen(2) on it keeps
   relay's backlog. Linux 5.9+ on amd64 or arm64; without it, relay logs why once and
   goes on with inherited sockets only. Not a sandbox: without CAP_SYS_ADMIN (not
   root), the child's tree runs with no_new_privs (setuid and file-capability
   programs lose their privileges).

   It takes inherited sockets (systemd socket activation): the sockets are fds 3, 4, ...
   in --listen order, and the environment has LISTEN_FDS, LISTEN_FDNAMES and
   LISTEN_PID (the child's own pid). It gets the same socket either way.

Every child also gets RELAY_GENERATION, RELAY_WORKER, a private NOTIFY_SOCKET and RELAY_HEALTH_ADDR.

Family rule for taken-over binds: an IPv6 socket may get an IPv4 listener (Go's ":8080"
with --listen 127.0.0.1:8080), an IPv4 socket never gets an IPv6 one: nginx's
"listen 8080;" or Python's --bind 0.0.0.0 need --listen 0.0.0.0:8080 (or 127.0.0.1:8080),
not --listen :8080. Such a bind fails with one log line naming the --listen to use.

Control it with 'relay restart', 'relay status' and 'relay stop' (--name NAME), or signals.

Under systemd (see examples/systemd): with NOTIFY_SOCKET set, relay sends READY=1 once the
first generation is ready, RELOADING=1 and READY=1 around every restart, STATUS= lines,
STOPPING=1, and WATCHDOG=1 pings (WatchdogSec=). Sockets passed to relay in LISTEN_FDS (a
.socket unit) come first, under their LISTEN_FDNAMES names, then one per --listen; a --listen
uses a passed socket on its own address instead of binding. With FileDescriptorStoreMax= and
$FDSTORE, relay keeps its sockets in systemd's fd store, so a restart of relay itself
refuses no connection.

Signals to relay:
   HUP              restart: start a new generation on the same sockets, wait until it is
                    ready (--health), switch new connections to it, let the old one take
                    what was already on its way to it (--drain at most), then stop it (see
                    Stopping a generation). A new generation that fails is killed; the old
                    one is never touched.
   TERM, INT, QUIT  stop every generation gracefully and exit with the child's status.
                    A second one kills them at once. With --shutdown-delay D, the first
                    one makes relay keep serving for D first ("shutdown delay: serving on
                    until ..."; restarts refused, crashes replaced), the second ends the
                    delay and stops gracefully at once, the third kills.

Stopping a generation (--kill-mode mixed, the default, as systemd's KillMode=mixed):
--stop-signal goes to its main process alone, then SIGCONT to every process of it; a prefork
master (nginx, starman, unicorn, gunicorn, uwsgi) passes its graceful stop on to its workers,
which finish their requests (a worker signalled directly often drops its request). After
--stop-timeout, SIGKILL to every process of it (its cgroup). --kill-mode control-group sends
--stop-signal to every process at once, for a main process that does not pass it on (a shell
that runs the server without exec). A generation is gone only when every process of it is:
workers still finishing after their master exited, or a daemon it started, keep it listed in
relay status, count against --max-draining, and hold relay restart until they are gone
(SIGKILL at --stop-timeout at the latest).

As PID 1 (a container's entrypoint), relay reaps every orphan of the container, exits with
the serving child's status, and passes the children's stdout and stderr through as its own.
Signals it does not act on are ignored; SIGKILL and SIGSTOP sent from inside the container
are dropped by the kernel.
   USR1, WINCH  forwarded to the serving child.
   USR2         upgrades relay itself in place, the server untouched (relay upgrade).

Listen forms (each may start with NAME= to set its LISTEN_FDNAMES entry):
   :8080  127.0.0.1:8080  [::1]:8080   TCP           (default name tcp-PORT)
   udp:127.0.0.1:5353                  UDP           (default name udp-PORT)
   unix:/run/app.sock                  unix stream   (default name unix-FILENAME)

Drain (--steer auto, the default): each generation gets a socket of its own in the TCP
listener's SO_REUSEPORT group, and a BPF program sends new connections to the old
generation until the new one is ready, then to the new one only. The old one gets its stop
signal as soon as its socket's accept queue is empty and every handshake begun before the
switch has completed (tens of milliseconds; "old generation drained" logs how long), at
most --drain (5s) after the switch, so even a plain http.Server.Shutdown loses nothing.
UDP listeners are steered by flow where relay may load eBPF (CAP_BPF): new flows go to the
serving generation, a known flow (a QUIC connection) stays with the generation it began on.
Unix sockets, and TCP or UDP sockets the kernel or relay's privileges will not steer
(logged), stay one socket shared by every generation.

Readiness (--health) must be specific to the new child: a probe the old one could answer
proves nothing. The default, auto, needs nothing from the server:
   auto                       ready at READY=1 on the child's own NOTIFY_SOCKET; or, while
                              neither it nor an earlier generation has sent any sd_notify
                              message, once it has accepted relay's probe on each steered
                              TCP listener (relay steers the probe to the new generation's
                              own socket) and has bound and listened on each other listener
                              itself. Once any sd_notify message was heard, every later
                              generation is waited for until READY=1 (a server may accept
                              before it is warm; one that sends STATUS= but never READY=1 is
                              never ready). Use notify to wait for READY=1 from the start,
                              accept never to wait for it.
   accept                     only the accept half of auto
   notify                     the child sends READY=1 to its own NOTIFY_SOCKET (sd_notify)
   http://{health_addr}/path  GET must answer 2xx; {health_addr} is a loopback address relay
                              picks for each child and passes as RELAY_HEALTH_ADDR (and as
                              {health_addr}/{health_port} in COMMAND's arguments). A probe of a
                              steered listener's public address is steered to the new
                              generation's socket, so it is exact; on a shared socket it is not.
   tcp://{health_addr}        a connection must be accepted by the server (not just made)
   exec:CMD ARGS              CMD must exit 0; it gets RELAY_CHILD_PID, RELAY_GENERATION and
                              RELAY_HEALTH_ADDR; {pid} is replaced in ARGS. No shell is used.
   delay:2s                   the weakest form: only waits, proves nothing

Liveness (opt-in): --liveness CHECK (accept, http://…, tcp://… or exec:CMD, probed like
--health, at the serving generation alone) runs every --liveness-interval while no restart is
under way; --liveness-failures in a row, or --child-watchdog D for a child that sent WATCHDOG=1
and then none for D, replace the serving generation with a restart: it serves until the new one
is ready, then drains and stops (SIGKILL after --stop-timeout); if it accepts nothing for 100ms
while connections wait on its steered sockets (it hung), they move to the new generation at once
(net.ipv4.tcp_migrate_req) instead of waiting out --drain. Replacements back off.

Confirmation window (opt-in): --confirm D keeps the old generation warm for D after the switch
of a requested restart (no new connections, no stop signal). If the new one exits, fails
--liveness (probed every tenth of D), sends STOPPING=1 or ERRNO=, or relay rollback is run,
new connections go back to the warm one at once and the new one drains and stops; relay restart
then exits 3. Otherwise the warm one drains and stops when D ends. Needs a steered listener.

Workers (opt-in): --workers N runs N copies of COMMAND in each generation (--workers cpus: one
per CPU), for servers that use one core (Node.js, asyncio, python3 -m http.server). Each copy
gets a socket of its own on every TCP listener (its own bind lands on it, or it is its fd 3),
RELAY_WORKER (0..N-1) and {worker} in its arguments; new connections spread over the copies by
a hash of the client's address and port. UDP and unix listeners are shared by the copies (not
for QUIC). A generation is ready when every copy is, each proven on its own socket; a copy that
exits while serving, or fails --liveness or --child-watchdog (each copy is watched on its own),
is replaced alone (backoff), its siblings taking its share meanwhile. A restart starts all N new
copies at once; --rolling K starts K at a time, each batch replacing as many old copies once
ready, so at most N+K are alive. Not yet with --confirm or relay upgrade. docs/workers.md says
everything.

Admin listener (opt-in): --metrics ADDR binds a listener of relay's own (never passed to a
child) serving GET /metrics (Prometheus text format: relay_restarts_total{outcome}, readiness
and restart-duration histograms, the serving generation, ...; docs/containers.md tables them),
/healthz (200 while relay's supervisor answers within 1s, else 503) and /readyz (200 while a
generation serves and relay is not stopping nor in its shutdown delay, else 503): point a
Kubernetes liveness probe at /healthz and a readiness probe at /readyz. Anything else is 404.`

const runExamples = `
Examples:
   relay run --listen :8080 -- ./server --config prod.yaml
   relay run --listen 127.0.0.1:8000 -- python3 -m http.server --bind 127.0.0.1 8000
   relay run --listen 0.0.0.0:8080 --stop-signal QUIT -- nginx -g 'daemon off;'   # "listen 8080;"
   relay run --listen 127.0.0.1:5000 --stop-signal QUIT -- starman --workers 4 --listen 127.0.0.1:5000 app.psgi
   relay run --listen :8080 --kill-mode control-group -- sh -c './prepare && ./server'
   relay run --listen :8080 --takeover off -- ./server-that-reads-LISTEN_FDS
   relay run --listen http=:8080 --listen admin=127.0.0.1:9090 --drain 2s -- ./server
   relay run --listen :8080 --health http://127.0.0.1:8080/healthz -- ./server
   relay run --listen :8080 --health 'http://{health_addr}/healthz' -- ./server --health-addr '{health_addr}'
   relay run --listen unix:/run/app/app.sock --socket-mode 0660 --stop-signal QUIT -- nginx -g 'daemon off;'
   relay run --listen :8080 --liveness accept --liveness-interval 5s -- ./server
   relay run --listen :8080 --confirm 60s --liveness 'http://{health_addr}/healthz' -- ./server   # relay rollback
   relay run --listen :8080 --child-watchdog 30s -- ./server-that-pings-sd_notify-WATCHDOG
   relay run --listen :8080 --shutdown-delay 5s --stop-timeout 20s -- ./server   # Kubernetes: grace period 30s
   relay run --listen :8080 --metrics :9090 -- ./server   # curl localhost:9090/metrics
   relay run --listen 127.0.0.1:8080 --workers 4 --rolling 1 -- node server.js   # 4 copies, restarted 1 at a time
   relay restart --name api -- ./server-v2     # restart into a new binary
   kill -HUP $(pidof relay)                    # restart`
