"""A fast local intake for the benchmarks: one separate process, HTTP/1.1 keep-alive on 127.0.0.1, gunzip + count.

It plays four destinations at once, told apart by path / header:

* Datadog: ``POST .../api/v2/logs`` (gzip'd JSON array) -> counts ``"message":`` keys;
* New Relic: ``POST /nr/...`` (gzip'd ``[{"common", "logs": [...]}]``) -> counts ``"message":`` keys;
* Sentry: ``POST /api/<project>/envelope/`` (gzip'd envelope) -> sums the ``item_count`` of ``log`` items;
* CloudWatch Logs: ``POST /`` with ``X-Amz-Target: Logs_20140328.<Op>`` (AWS JSON 1.1 protocol, not moto: moto
  parses and stores every event and cannot keep up with 100,000+ events/s). ``CreateLogGroup`` /
  ``CreateLogStream`` answer ``{}`` (or ``ResourceAlreadyExistsException``), ``PutLogEvents`` checks the body has
  ``logGroupName``, ``logStreamName`` and a non-empty ``logEvents`` list and counts its events.

Counting by key occurrence is exact for what the benchmark generates (a JSON string value cannot contain an
unescaped ``"message":``; the generated lines have no nested ``message`` fields); ``--parse`` parses every body
fully instead (slower; used by the latency scenario, which needs each record's embedded send time).

Control (same port): ``GET /_stats`` -> JSON counters and this process's own CPU seconds (to show the intake is not
the bottleneck); ``POST /_status/<code>`` makes every destination answer ``<code>`` (503 = outage, 200 = back).

``--delay-ms N`` holds every log request N milliseconds before it is counted and answered (each request in its own
thread, so overlapping requests wait together): the round trip to a remote intake, for ``run_all.py --rtt-ms``.

Run: ``python bench/_intake.py PORT_FILE [--parse] [--delay-ms N]``; the bound port (OS-chosen) is written to
PORT_FILE.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
from isal import isal_zlib

LATENCY_MARK = re.compile(rb"sent_at=(\d+\.\d+)")


class State:
    def __init__(self, parse: bool, delay_s: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.delay_s = delay_s
        self.counts: dict[str, int] = {"datadog": 0, "newrelic": 0, "sentry": 0, "cloudwatch": 0}
        self.requests = 0
        self.rejected = 0
        self.bytes_in = 0
        self.status = 200
        self.parse = parse
        self.latencies: list[float] = []
        self.first_at: float | None = None
        self.last_at: float | None = None


STATE: State


def _gunzip(data: bytes) -> bytes:
    # gzip or zlib header, auto-detected. ISA-L inflates ~3x faster than zlib (135 against 431 us for a 200 KB
    # Datadog batch): the forwarder waits for every answer, so the intake's own time is part of the measured rate.
    return isal_zlib.decompress(data, 47)


def _count(kind: str, body: bytes) -> int:
    if kind == "sentry":
        total = 0
        lines = body.split(b"\n")
        for line in lines[1:]:
            if line.startswith(b'{"type":"log"') or (line.startswith(b"{") and b'"type":"log"' in line[:200]):
                m = re.search(rb'"item_count":(\d+)', line)
                if m:
                    total += int(m.group(1))
        return total
    return body.count(b'"message":')


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in separate writes: avoid the 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def _reply(self, code: int, body: bytes = b"{}", ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/_stats"):
            ru = resource.getrusage(resource.RUSAGE_SELF)
            with STATE.lock:
                lat = sorted(STATE.latencies)
                out = {
                    "counts": dict(STATE.counts),
                    "requests": STATE.requests,
                    "rejected": STATE.rejected,
                    "bytes_in": STATE.bytes_in,
                    "cpu_s": ru.ru_utime + ru.ru_stime,
                    "maxrss_kib": ru.ru_maxrss,
                    "first_at": STATE.first_at,
                    "last_at": STATE.last_at,
                    "latency_n": len(lat),
                }
            if lat:
                out["latency_p50_s"] = lat[len(lat) // 2]
                out["latency_p99_s"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
                out["latency_max_s"] = lat[-1]
            self._reply(200, json.dumps(out).encode())
        else:
            self._reply(404)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        now = time.time()
        if self.path.startswith("/_status/"):
            STATE.status = int(self.path.rsplit("/", 1)[1])
            self._reply(200)
            return
        target = self.headers.get("X-Amz-Target")
        if target:
            kind = "cloudwatch"
        elif "/api/v2/logs" in self.path:
            kind = "datadog"
        elif self.path.endswith("/envelope/"):
            kind = "sentry"
        elif self.path.startswith("/nr"):
            kind = "newrelic"
        else:
            self._reply(404)
            return
        if STATE.status != 200:
            with STATE.lock:
                STATE.rejected += 1
            self._reply(STATE.status, b'{"error":"bench outage"}')
            return
        if STATE.delay_s:
            time.sleep(STATE.delay_s)  # the network round trip of a remote intake
            now = time.time()
        body = _gunzip(raw) if self.headers.get("Content-Encoding") == "gzip" else raw
        if kind == "cloudwatch":
            op = (target or "").rsplit(".", 1)[-1]
            ctype = "application/x-amz-json-1.1"
            if op in ("CreateLogGroup", "CreateLogStream"):
                self._reply(200, b"{}", ctype)
                return
            if op != "PutLogEvents":
                self._reply(400, b'{"__type":"UnknownOperationException"}', ctype)
                return
            req = orjson.loads(body)
            if not req.get("logGroupName") or not req.get("logStreamName") or not req.get("logEvents"):
                self._reply(400, b'{"__type":"InvalidParameterException","message":"bench: bad request"}', ctype)
                return
            n = len(req["logEvents"])
        else:
            n = _count(kind, body)
        if STATE.parse:
            lats = [now - float(m) for m in LATENCY_MARK.findall(body)]
        with STATE.lock:
            STATE.counts[kind] += n
            STATE.requests += 1
            STATE.bytes_in += len(raw)
            if STATE.first_at is None:
                STATE.first_at = now
            STATE.last_at = now
            if STATE.parse:
                STATE.latencies.extend(lats)
        if kind == "cloudwatch":
            self._reply(200, b'{"nextSequenceToken":"1"}', "application/x-amz-json-1.1")
        elif kind == "sentry":
            self._reply(200, b'{"id":"00000000000000000000000000000000"}')
        else:
            self._reply(202, b"{}")


def main() -> None:
    global STATE
    delay_ms = float(sys.argv[sys.argv.index("--delay-ms") + 1]) if "--delay-ms" in sys.argv else 0.0
    STATE = State(parse="--parse" in sys.argv, delay_s=delay_ms / 1000)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tmp = Path(sys.argv[1] + ".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.replace(sys.argv[1])
    server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    main()
