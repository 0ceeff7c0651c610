# The conformance suite's WSGI app (uwsgi, gunicorn).
#
# GET /slow?id=N&ms=M is the slow request: it writes the file N.pid, holding
# this process's pid, into the directory $CONFORMANCE_DIR (the test's sign
# that the server has received it), waits until the test creates N.go there
# (the test does once relay has sent the old generation its stop signal;
# 120 s at most), then takes M ms more, and answers 200 with a body of
# known content: 64 KiB of a fixed pattern, then "id=N pid=PID gen=GEN\n",
# GEN being $RELAY_GENERATION. Any other path answers at once with the pid,
# also in the X-Pid header.
import os
import time
from urllib.parse import parse_qs

FILL = b"0123456789abcdef" * 4096
GATE_POLL = 0.01
GATE_MAX = 120.0


def mark(d, slow_id, pid):
    tmp = os.path.join(d, slow_id + ".tmp")
    with open(tmp, "w") as f:
        f.write("%d\n" % pid)
    os.rename(tmp, os.path.join(d, slow_id + ".pid"))


def sleep_until(deadline):
    # time.sleep resumes after a signal whose handler returns, but not
    # after one that raises; the loop keeps the full time either way.
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(left)


def slow(environ, pid):
    q = parse_qs(environ.get("QUERY_STRING", ""))
    slow_id = q.get("id", [""])[0]
    ms = q.get("ms", [""])[0]
    if not slow_id.isdigit() or not ms.isdigit():
        return None
    d = os.environ["CONFORMANCE_DIR"]
    mark(d, slow_id, pid)
    gate = os.path.join(d, slow_id + ".go")
    give_up = time.monotonic() + GATE_MAX
    while not os.path.exists(gate) and time.monotonic() < give_up:
        time.sleep(GATE_POLL)
    sleep_until(time.monotonic() + int(ms) / 1000)
    gen = os.environ.get("RELAY_GENERATION", "0")
    return FILL + ("id=%s pid=%d gen=%s\n" % (slow_id, pid, gen)).encode()


def application(environ, start_response):
    pid = os.getpid()
    path = environ.get("PATH_INFO", "/")
    if path == "/healthz":
        body = b"ok\n"
    elif path == "/slow":
        body = slow(environ, pid)
        if body is None:
            start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"want id and ms, numbers\n"]
    else:
        body = b"%d\n" % pid
    start_response("200 OK", [
        ("Content-Type", "text/plain"),
        ("Content-Length", str(len(body))),
        ("X-Pid", str(pid)),
    ])
    return [body]
