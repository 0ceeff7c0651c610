// The conformance suite's Node.js server: a plain http.Server that binds
// its own port, as `server.listen(PORT)` does, and stops gracefully on
// SIGTERM the way Node servers in containers usually do (stop accepting,
// close idle keep-alive connections, let requests in flight finish).
//
// Usage: node app.js HOST:PORT
//
// GET /slow?id=N&ms=M is the slow request: it writes the file N.pid, holding
// this process's pid, into the directory $CONFORMANCE_DIR (the test's sign
// that the server has received it), waits until the test creates N.go there
// (the test does once relay has sent the old generation its stop signal;
// 120 s at most), then takes M ms more, and answers 200 with a body of
// known content: 64 KiB of a fixed pattern, then "id=N pid=PID gen=GEN\n",
// GEN being $RELAY_GENERATION. Any other path answers at once with the pid,
// also in the X-Pid header.
"use strict";

const fs = require("fs");
const http = require("http");
const path = require("path");

const FILL = Buffer.from("0123456789abcdef".repeat(4096));
const GATE_POLL_MS = 10;
const GATE_MAX_MS = 120000;

const [host, port] = (process.argv[2] || "").split(/:(?=[^:]*$)/);
// FAIL_WORKER=W makes copy W (relay run --workers) fail at its start: a
// bad version of one copy, for the tests of a rolling restart that fails
// half-way.
if (process.env.FAIL_WORKER !== undefined && process.env.FAIL_WORKER === process.env.RELAY_WORKER) {
  console.error(`node app copy ${process.env.RELAY_WORKER}: failing at start (FAIL_WORKER)`);
  process.exit(4);
}
if (!host || !port) {
  console.error("usage: node app.js HOST:PORT");
  process.exit(2);
}
let closing = false;

function mark(dir, id) {
  const tmp = path.join(dir, id + ".tmp");
  fs.writeFileSync(tmp, process.pid + "\n");
  fs.renameSync(tmp, path.join(dir, id + ".pid"));
}

function slow(url, res) {
  const id = url.searchParams.get("id") || "";
  const ms = url.searchParams.get("ms") || "";
  if (!/^\d+$/.test(id) || !/^\d+$/.test(ms)) {
    res.writeHead(400, { "Content-Type": "text/plain" });
    res.end("want id and ms, numbers\n");
    return;
  }
  const dir = process.env.CONFORMANCE_DIR;
  mark(dir, id);
  const gate = path.join(dir, id + ".go");
  const giveUp = Date.now() + GATE_MAX_MS;
  const wait = () => {
    if (!fs.existsSync(gate) && Date.now() < giveUp) {
      setTimeout(wait, GATE_POLL_MS);
      return;
    }
    setTimeout(() => {
      const gen = process.env.RELAY_GENERATION || "0";
      answer(res, Buffer.concat([FILL, Buffer.from(`id=${id} pid=${process.pid} gen=${gen}\n`)]));
    }, Number(ms));
  };
  wait();
}

function answer(res, body) {
  const headers = { "Content-Type": "text/plain", "Content-Length": body.length, "X-Pid": String(process.pid) };
  if (closing) {
    headers.Connection = "close";
  }
  res.writeHead(200, headers);
  res.end(body);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://localhost");
  if (url.pathname === "/slow") {
    slow(url, res);
  } else if (url.pathname === "/healthz") {
    answer(res, Buffer.from("ok\n"));
  } else {
    answer(res, Buffer.from(process.pid + "\n"));
  }
});

process.on("SIGTERM", () => {
  closing = true;
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});

server.listen(Number(port), host, () => {
  console.error(`node app pid ${process.pid} listening on ${host}:${port}`);
});
