package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// TestConformance runs real servers from Debian's packages under relay, each
// in the mode its users run it (the socket inherited where the server reads
// LISTEN_FDS or another inherited-fd protocol, its own bind, taken over by
// relay, where it binds itself) and with its documented graceful stop
// signal. Each is restarted RELAY_CONFORMANCE_RESTARTS times (3) with `relay
// restart`, with a slow request in flight in the old generation at every
// restart and a load of new connections throughout, and must fail no
// request: every slow request is answered 200, in full, by the generation
// that received it. docs/servers.md tables the servers.
//
// The slow request goes to the apps of testdata/conformance: a worker that
// receives it writes a marker file naming its pid, then holds it until the
// test has seen relay stop the old generation, and answers
// RELAY_CONFORMANCE_SLOW (1.5s) after that. nginx, which runs no app,
// proxies it to a backend in the test process that does the same in the
// app's place, the nginx worker that proxies it named by a request header
// (startConformanceBackend): so for every server the slow request is in
// flight at the stop by construction, with no time bound.
//
// .ci/run installs the servers and sets RELAY_REQUIRE_CONFORMANCE=1, where
// a missing one fails its test; elsewhere it is skipped.
func TestConformance(t *testing.T) {
	t.Parallel()
	cfg := conformanceSettings(t)
	for _, c := range conformanceCases() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			runConformance(t, c, cfg)
		})
	}
}

// conformanceCases are the servers and their modes.
func conformanceCases() []conformanceCase {
	return []conformanceCase{
		{
			// Perl's prefork PSGI server. It inherits a socket through
			// Server::Starter's SERVER_STARTER_PORT (host:port=fd), not
			// LISTEN_FDS. QUIT is its graceful stop: the master sends its
			// workers HUP, and each finishes its request.
			name: "starman-inherited", takes: "fd",
			setup: func(t *testing.T, port int, _ string, _ conformanceConfig) ([]string, []string) {
				starman := conformanceProgram(t, "starman")
				listen := "127.0.0.1:" + strconv.Itoa(port)
				return []string{"--stop-signal", "QUIT"},
					[]string{"env", "SERVER_STARTER_PORT=" + listen + "=3", starman, "--workers", "2", "--listen", listen, conformanceApp(t, "app.psgi")}
			},
		},
		{
			// starman binding its own port: relay takes the bind over.
			name: "starman-bind", takes: "bind",
			setup: func(t *testing.T, port int, _ string, _ conformanceConfig) ([]string, []string) {
				starman := conformanceProgram(t, "starman")
				return []string{"--stop-signal", "QUIT"},
					[]string{starman, "--workers", "2", "--listen", "127.0.0.1:" + strconv.Itoa(port), conformanceApp(t, "app.psgi")}
			},
		},
		{
			// uWSGI's master and two workers, with its python3 plugin.
			// uWSGI takes LISTEN_FDS by itself ("SystemD socket
			// activation detected"), and with it ignores a --http-socket
			// address, serving the inherited socket with its own binary
			// protocol; --protocol http makes that socket speak HTTP.
			// uWSGI 2.0's TERM is a brutal reload; its documented way to
			// make TERM a graceful stop is the hook below.
			name: "uwsgi-inherited", takes: "fd",
			setup: func(t *testing.T, port int, _ string, _ conformanceConfig) ([]string, []string) {
				uwsgi := conformanceProgram(t, "uwsgi")
				if out, err := exec.Command(uwsgi, "--need-plugin", "python3", "--version").CombinedOutput(); err != nil {
					conformanceMissing(t, fmt.Sprintf("uwsgi has no python3 plugin (Debian's uwsgi-plugin-python3): %v: %s", err, out))
				}
				return []string{"--health", fmt.Sprintf("http://127.0.0.1:%d/healthz", port)},
					[]string{uwsgi, "--plugin", "python3", "--protocol", "http", "--wsgi-file", conformanceApp(t, "app.py"),
						"--master", "--processes", "2", "--hook-master-start", "unix_signal:15 gracefully_kill_them_all"}
			},
		},
		{
			// gunicorn's master and two sync workers. It takes LISTEN_FDS
			// by itself (its --bind is then not bound); TERM is its
			// graceful stop.
			name: "gunicorn-inherited", takes: "fd",
			setup: func(t *testing.T, port int, _ string, _ conformanceConfig) ([]string, []string) {
				gunicorn := conformanceProgram(t, "gunicorn")
				app := conformanceApp(t, "app.py")
				return nil, []string{gunicorn, "--workers", "2", "--bind", "127.0.0.1:" + strconv.Itoa(port),
					"--chdir", filepath.Dir(app), "app:application"}
			},
		},
		{
			// Puma in cluster mode (two workers, threads). It takes
			// LISTEN_FDS by itself, for the --bind it matches; TERM is
			// its graceful stop.
			name: "puma-inherited", takes: "fd",
			setup: func(t *testing.T, port int, _ string, _ conformanceConfig) ([]string, []string) {
				puma := conformanceProgram(t, "puma")
				return nil, []string{puma, "--workers", "2", "--threads", "1:4",
					"--bind", "tcp://127.0.0.1:" + strconv.Itoa(port), conformanceApp(t, "config.ru")}
			},
		},
		{
			// unicorn's master and two workers (unicorn.conf.rb). It
			// takes LISTEN_FDS by itself; QUIT is its graceful stop.
			name: "unicorn-inherited", takes: "fd",
			setup: func(t *testing.T, port int, _ string, _ conformanceConfig) ([]string, []string) {
				unicorn := conformanceProgram(t, "unicorn")
				return []string{"--stop-signal", "QUIT"},
					[]string{unicorn, "-c", conformanceApp(t, "unicorn.conf.rb"), "--listen", "127.0.0.1:" + strconv.Itoa(port), conformanceApp(t, "config.ru")}
			},
		},
		{
			// A Node.js http.Server that binds its own port
			// (server.listen(PORT, HOST)), as most Node servers do;
			// relay takes the bind over. Its SIGTERM handler is the
			// usual one: server.close() and closeIdleConnections().
			name: "node-bind", takes: "bind",
			setup: func(t *testing.T, port int, _ string, _ conformanceConfig) ([]string, []string) {
				node := conformanceProgram(t, "node")
				return nil, []string{node, conformanceApp(t, "app.js"), "127.0.0.1:" + strconv.Itoa(port)}
			},
		},
		{
			// nginx's master and two workers, binding a stock
			// `listen 127.0.0.1:PORT;`; QUIT is its graceful stop, which
			// lets a proxied request in flight finish.
			name: "nginx-bind", takes: "bind", childWorkers: true,
			setup: func(t *testing.T, port int, dir string, cfg conformanceConfig) ([]string, []string) {
				nginx := conformanceProgram(t, "nginx")
				backend := startConformanceBackend(t, dir)
				conf := conformanceNginx(t, dir, port, backend, cfg.slowTimeout()+time.Minute)
				return []string{"--stop-signal", "QUIT"},
					[]string{nginx, "-p", dir, "-c", conf, "-e", "stderr",
						"-g", "daemon off; master_process on; pid " + filepath.Join(dir, "nginx-{generation}.pid") + ";"}
			},
		},
	}
}

// conformanceNginx writes nginx's configuration into prefix and returns its
// path. GET /slow is proxied to backend (startConformanceBackend), with the
// worker's pid in the request header X-Worker-Pid, unbuffered, and read for
// up to readTimeout (above the slow request's timeout); every answer
// carries the worker's pid in X-Pid. nginx's workers run as nobody: the
// directories down to prefix must let them through.
func conformanceNginx(t *testing.T, prefix string, port int, backend string, readTimeout time.Duration) string {
	t.Helper()
	for d := prefix; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	conf := filepath.Join(prefix, "nginx.conf")
	writeMode(t, conf, nginxConf(prefix, 2, port, fmt.Sprintf(`        location = /slow {
            proxy_pass http://%s;
            proxy_set_header X-Worker-Pid $pid;
            proxy_buffering off;
            proxy_read_timeout %ds;
            proxy_send_timeout %[2]ds;
            add_header X-Pid $pid;
        }
`, backend, int((readTimeout+time.Second-1)/time.Second))))
	return conf
}
