"""Delivery guarantees end to end (issue 8, Done when 1-4): the real ``forwarder run`` CLI as a subprocess, a
numbered stream from its child, Datadog and New Relic intake emulators on loopback (pytest-httpserver over HTTPS
with a trustme CA, trusted through ``SSL_CERT_FILE``), the durable spool in ``FORWARDER_STATE_DIR``.

Every wait polls a condition with a bounded deadline; ports come from the OS (an emulator that must come back on
the same port re-binds the port its first instance got; "connection refused" is a port whose listener is closed).
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from forwarder.delivery.spool import SPOOL_FILE, decode_chunk, read_stored_chunks
from tests.e2e.conftest import forwarder_cmd, own_log, poll, run_forwarder

DD_API_KEY = "0123456789abcdef0123456789abcdef"
NR_LICENSE_KEY = "delivery0123456789abcdef0123456789abNRAL"

STREAM_SCRIPT = r"""
import os, sys, time
stop = sys.argv[1] if len(sys.argv) > 1 else None
i = 0
while stop is None or not os.path.exists(stop):
    print(f"n {i}", flush=True)
    i += 1
    time.sleep(0.002)
"""
"""The agent: ``n 0``, ``n 1``, ... about 400 lines a second, until the file named by ``argv[1]`` exists."""


def number(message: str) -> int:
    """The number of a ``n 123`` line."""
    assert message.startswith("n "), message
    return int(message[2:])


# --- emulators ----------------------------------------------------------------------------------------------------


class Intake:
    """A Datadog (``/api/v2/logs``) or New Relic (``/log/v1``) intake: records the numbers of every accepted log
    and when each request arrived (``time.monotonic()``), answers 202."""

    def __init__(self, kind: str, latency_s: float = 0.0) -> None:
        self.kind = kind
        self.latency_s = latency_s
        self.lock = threading.Lock()
        self.numbers: list[int] = []
        self.arrivals: list[float] = []

    def __call__(self, request: Request) -> Response:
        body = json.loads(gzip.decompress(request.get_data()))
        if self.kind == "datadog":
            messages = [obj["message"] for obj in body]
        else:
            messages = [entry["message"] for group in body for entry in group["logs"]]
        with self.lock:
            self.numbers.extend(number(m) for m in messages)
            self.arrivals.append(time.monotonic())
        if self.latency_s:
            time.sleep(self.latency_s)  # a slow intake (answers after the records were taken), not synchronisation
        return Response("{}", status=202, content_type="application/json")

    def received(self) -> list[int]:
        with self.lock:
            return list(self.numbers)

    def count(self) -> int:
        with self.lock:
            return len(self.numbers)

    def arrivals_between(self, start: float, end: float) -> list[float]:
        with self.lock:
            return [t for t in self.arrivals if start <= t <= end]


PATHS = {"datadog": "/api/v2/logs", "newrelic": "/log/v1"}


@pytest.fixture
def servers(httpserver_ssl_context: ssl.SSLContext) -> Iterator[Callable[[Intake, int], HTTPServer]]:
    """``servers(intake, port)`` starts an HTTPS emulator serving ``intake`` (``port`` 0: chosen by the OS)."""
    started: list[HTTPServer] = []

    def make(intake: Intake, port: int = 0) -> HTTPServer:
        server = HTTPServer(host="127.0.0.1", port=port, ssl_context=httpserver_ssl_context)
        server.expect_request(PATHS[intake.kind], method="POST").respond_with_handler(intake)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        if server.is_running():
            take_down(server)


def take_down(server: HTTPServer) -> None:
    """Stop an emulator and close its listening socket: connections to its port are then refused."""
    inner = server.server
    server.stop()
    if inner is not None:
        inner.server_close()


def closed_port() -> int:
    """A loopback port the OS just handed out and that nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class HangingServer:
    """Listens on ``port``, accepts every connection and never sends a byte (not even a TLS handshake)."""

    def __init__(self, port: int) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.lock = threading.Lock()
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections.append(conn)

    def accepted(self) -> int:
        with self.lock:
            return len(self.connections)

    def close(self) -> None:
        """Close the listener and every held connection (the client sees them end)."""
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=5)
        with self.lock:
            for conn in self.connections:
                conn.close()


# --- the forwarder ------------------------------------------------------------------------------------------------


class Forwarder:
    """``forwarder run --no-mirror -- python -c STREAM_SCRIPT [stop-file]`` in its own session (process group)."""

    def __init__(self, env: dict[str, str], log: Path, *child: str) -> None:
        self.log_path = log
        self._err: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(
            forwarder_cmd("run", "--no-mirror", "--", *child),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            start_new_session=True,
        )

    def rss_kib(self) -> int | None:
        """The forwarder's resident set size (``VmRSS`` of ``/proc/<pid>/status``), KiB; None once it exited."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return None

    def wait(self, timeout: float) -> tuple[int, bytes]:
        """Exit status and stderr once it exited (at most ``timeout`` seconds)."""
        status = self.proc.wait(timeout=timeout)
        self._err.close()
        return status, self.log_path.read_bytes()

    def kill_group(self) -> None:
        """SIGKILL the forwarder and its child (one process group) and reap the forwarder."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._err.close()


@pytest.fixture
def forwarders() -> Iterator[Callable[..., Forwarder]]:
    started: list[Forwarder] = []

    def start(env: dict[str, str], log: Path, *child: str) -> Forwarder:
        fwd = Forwarder(env, log, *child)
        started.append(fwd)
        return fwd

    yield start
    for fwd in started:
        if fwd.proc.poll() is None:
            fwd.kill_group()


@pytest.fixture
def env(base_env: dict[str, str], ca_file: Path) -> dict[str, str]:
    """``base_env`` with the durable spool (the default), fast retries, the test CA trusted."""
    out = dict(base_env)
    out.pop("FORWARDER_BUFFER", None)
    out.update(FORWARDER_RETRY_MAX_BACKOFF="0.3", SSL_CERT_FILE=str(ca_file))
    return out


def summary(stderr: bytes, destination: str) -> dict[str, Any]:
    """The exit summary line of ``destination``."""
    lines = [s for s in own_log(stderr, "destination_summary") if s["destination"] == destination]
    assert len(lines) == 1, stderr.decode(errors="replace")[-3000:]
    return lines[0]


def spool_state(state_dir: Path, destination: str) -> tuple[int, list[tuple[int, list[int]]]]:
    """``destination``'s cursor (last acknowledged chunk id) and every stored chunk as (id, numbers), read from
    the spool database left on disk (the forwarder is not running)."""
    path = state_dir / "spool" / SPOOL_FILE
    db = sqlite3.connect(path)
    try:
        row = db.execute("SELECT acked_id FROM cursors WHERE destination = ?", (destination,)).fetchone()
    finally:
        db.close()
    assert row is not None, "no cursor for the destination"
    chunks = read_stored_chunks(state_dir / "spool")
    return int(row[0]), [(cid, [number(r.message) for r in decode_chunk(blob)]) for cid, _, blob in chunks]


# --- Done when 1: SIGKILL, restart on the same state directory -------------------------------------------------------


INTAKE_LATENCY_S = 0.3
"""How long the intake of the SIGKILL test takes to answer, seconds."""


def test_sigkill_then_restart_delivers_every_persisted_number(
    env: dict[str, str], tmp_path: Path, servers: Callable[..., HTTPServer], forwarders: Callable[..., Forwarder]
) -> None:
    """SIGKILL the forwarder (and its child) while it forwards ``n 0, n 1, ...`` to a Datadog intake, read the
    spool it left, restart it on the same state directory with a child that prints nothing (``true``).

    Persisted before the kill = the numbers in the chunks left in the spool, plus the numbers the intake had received
    (chunks already acknowledged were deleted, so they had been delivered). Asserted:

    * the persisted numbers are exactly ``0..max`` (no gap: the spool keeps a prefix of the stream);
    * after the restart, the set of numbers at the intake is exactly that set (every persisted number arrived,
      nothing else);
    * duplicates (numbers received more than once, counted) all belong to the one chunk that was in flight at the
      kill (the first chunk after the Datadog cursor): each is received at most twice and their count is at most
      that chunk's record count;
    * some persisted records had never been sent (the intake answers after :data:`INTAKE_LATENCY_S`, longer than
      the 0.2 s between chunks, so a backlog of persisted chunks builds up before the kill);
    * the restarted forwarder delivers exactly the records of the chunks after the cursor and leaves nothing
      pending.
    """
    intake = Intake("datadog", latency_s=INTAKE_LATENCY_S)
    server = servers(intake)
    env.update(DATADOG_TOKEN=DD_API_KEY, FORWARDER_DATADOG_URL=server.url_for("/"))
    fwd = forwarders(env, tmp_path / "first.err", sys.executable, "-c", STREAM_SCRIPT)
    poll(lambda: intake.count() >= 600, 30, "the intake to receive 600 numbers")
    fwd.kill_group()
    before = intake.received()

    acked, chunks = spool_state(Path(env["FORWARDER_STATE_DIR"]), "datadog")
    pending_chunks = [(cid, nums) for cid, nums in chunks if cid > acked]
    assert [cid for cid, _ in chunks] == [cid for cid, _ in pending_chunks], "acknowledged chunks were kept"
    persisted = set(before).union(*(nums for _, nums in pending_chunks))
    assert persisted == set(range(max(persisted) + 1))
    assert persisted - set(before), "the kill should leave persisted records that were never sent"

    result = run_forwarder(["run", "--no-mirror", "--", "true"], env, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    after = intake.received()
    assert set(after) == persisted

    counts = Counter(after)
    duplicates = {n: c - 1 for n, c in counts.items() if c > 1}
    in_flight = set(pending_chunks[0][1]) if pending_chunks else set()
    assert set(duplicates) <= in_flight
    assert max(duplicates.values(), default=0) <= 1
    assert sum(duplicates.values()) <= len(in_flight)
    replayed = sum(len(nums) for _, nums in pending_chunks)
    restarted = summary(result.stderr, "datadog")
    assert restarted["delivered"] == replayed and restarted["pending"] == 0 and restarted["dropped"] == {}
    print(
        f"\nSIGKILL: {len(before)} received before the kill, {len(persisted)} persisted, {replayed} replayed "
        f"from {len(pending_chunks)} chunk(s), {sum(duplicates.values())} duplicate(s) "
        f"(in-flight chunk: {len(in_flight)} records)"
    )


# --- Done when 2: one of two destinations refused, then hanging ------------------------------------------------------

MAX_GAP_S = 3.0
"""The longest the healthy destination may go without a request while the other one is down (it gets one about
every 0.2 s, ``FORWARDER_FLUSH_INTERVAL``, when healthy)."""


def test_one_destination_refused_then_hanging_does_not_hold_back_the_other(
    env: dict[str, str], tmp_path: Path, servers: Callable[..., HTTPServer], forwarders: Callable[..., Forwarder]
) -> None:
    """A steady stream to Datadog and New Relic; New Relic is taken down (connection refused), then hangs (accepts,
    never answers), then comes back on the same port. Asserted: during each outage phase Datadog keeps receiving
    new numbers with no gap over :data:`MAX_GAP_S` between its requests; at the end both intakes hold every number
    the child printed exactly once, and both summaries show everything delivered, nothing pending."""
    dd, nr = Intake("datadog"), Intake("newrelic")
    dd_server = servers(dd)
    nr_server = servers(nr)
    nr_port = nr_server.port
    stop = tmp_path / "stop"
    env.update(
        DATADOG_TOKEN=DD_API_KEY,
        FORWARDER_DATADOG_URL=dd_server.url_for("/"),
        NEW_RELIC_LICENSE_KEY=NR_LICENSE_KEY,
        FORWARDER_NEW_RELIC_URL=nr_server.url_for("/log/v1"),
        FORWARDER_SHUTDOWN_TIMEOUT="30",
    )
    fwd = forwarders(env, tmp_path / "fwd.err", sys.executable, "-c", STREAM_SCRIPT, str(stop))
    poll(lambda: dd.count() >= 200 and nr.count() >= 200, 30, "both intakes to receive 200 numbers")

    def healthy_keeps_delivering(phase: str) -> None:
        start, start_count = time.monotonic(), dd.count()
        poll(lambda: dd.count() >= start_count + 800, 30, f"Datadog to receive 800 more numbers ({phase})")
        end = time.monotonic()
        arrivals = [start, *dd.arrivals_between(start, end), end]
        gap = max(b - a for a, b in itertools.pairwise(arrivals))
        assert gap <= MAX_GAP_S, f"Datadog waited {gap:.2f} s for a request while New Relic was {phase}"

    # Phase 1: connection refused.
    take_down(nr_server)
    nr_before_outage = nr.count()
    healthy_keeps_delivering("refusing connections")

    # Phase 2: hanging (New Relic's client is stuck on a connection that never answers).
    hanging = HangingServer(nr_port)
    try:
        poll(hanging.accepted, 30, "New Relic's client to connect to the hanging server")
        healthy_keeps_delivering("hanging")
        assert nr.count() == nr_before_outage
    finally:
        hanging.close()

    # Phase 3: New Relic back on the same port; the child stops, the forwarder flushes and exits.
    servers(nr, nr_port)
    poll(lambda: nr.count() > nr_before_outage, 30, "New Relic to receive again")
    stop.touch()
    status, stderr = fwd.wait(timeout=60)
    assert status == 0, stderr.decode(errors="replace")[-3000:]
    total = max(dd.received()) + 1
    assert Counter(dd.received()) == Counter(range(total))
    assert Counter(nr.received()) == Counter(range(total))
    for name in ("datadog", "newrelic"):
        line = summary(stderr, name)
        assert line["delivered"] == total and line["pending"] == 0 and line["dropped"] == {}
    retries = [e for e in own_log(stderr, "send_retry") if e.get("destination") == "newrelic"]
    assert retries, "New Relic's outage was never noticed"
    assert not [e for e in own_log(stderr, "send_retry") if e.get("destination") == "datadog"]


# --- Done when 3: a small spool fills while the only destination is down ---------------------------------------------

SPOOL_MAX = 2 * 1024 * 1024
FLOOD_LINES = 50_000
FLOOD_LINE_CHARS = 512
FLOOD_LINES_PER_S = 10_000
"""50,000 lines of 512 random base64 characters (~26 MB; zlib shrinks random base64 to ~3/4 only, so ~10x the
spool bound once compressed), written at a steady 10,000 lines/s (the issue's rate; the forwarder keeps up with
it, so what is measured is what a down destination costs, not a backlog of unread input)."""
RSS_BOUND_KIB = 120 * 1024
"""Peak resident set size allowed for the forwarder process while it reads ~26 MB into a 2 MiB spool, KiB."""
RSS_GROWTH_BOUND_KIB = 48 * 1024
"""Peak minus the RSS of the started forwarder before the child writes, KiB: staging (4 x 1 MiB chunks), the
chunk cache (16 x 1 MiB of records, ~3-4x that as Python objects) and the shaping slice fit in it; the 26 MB
stream (~50,000 records of ~1 KiB of Python objects each) would not."""

FLOOD_SCRIPT = rf"""
import base64, os, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
out = sys.stdout
start = time.monotonic()
for i in range({FLOOD_LINES}):
    out.write(f"n {{i}} " + base64.b64encode(os.urandom({FLOOD_LINE_CHARS * 3 // 4})).decode() + "\n")
    if i % 100 == 99:
        out.flush()
        ahead = start + (i + 1) / {FLOOD_LINES_PER_S} - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)  # pacing: a steady rate, not synchronisation
"""


def test_small_spool_full_drops_oldest_counts_spool_full_keeps_reading_bounded_rss(
    env: dict[str, str], tmp_path: Path, forwarders: Callable[..., Forwarder]
) -> None:
    """Datadog refuses connections; the child writes :data:`FLOOD_LINES` lines into a forwarder whose spool is
    bounded at 2 MiB (``FORWARDER_SPOOL_MAX_BYTES=2MiB``), then exits. Asserted: every line was read (the ingest
    summary counts them all; the local file sink wrote, in order, every number it was not counted as having
    missed); Datadog's
    summary accounts for every record as either dropped ``spool_full`` (> 0) or pending (nothing else); the
    spool left on disk holds the newest records only (oldest chunks went first); the forwarder's RSS never
    exceeded :data:`RSS_BOUND_KIB` nor grew by more than :data:`RSS_GROWTH_BOUND_KIB`."""
    env.update(
        DATADOG_TOKEN=DD_API_KEY,
        FORWARDER_DATADOG_URL=f"https://localhost:{closed_port()}/",
        FORWARDER_SPOOL_MAX_BYTES="2MiB",
        FORWARDER_SHUTDOWN_TIMEOUT="1",
        FORWARDER_FILE_SINK="on",
    )
    go = tmp_path / "go"
    fwd = forwarders(env, tmp_path / "fwd.err", sys.executable, "-c", FLOOD_SCRIPT, str(go))
    # Baseline: the forwarder is up (sinks built, a first delivery attempt failed) before the child starts writing.
    poll(lambda: own_log(fwd.log_path.read_bytes(), "forwarder_started"), 30, "the forwarder to start")
    baseline = poll(fwd.rss_kib, 5, "the forwarder's RSS")
    go.touch()
    samples: list[int] = []
    deadline = time.monotonic() + 120
    while fwd.proc.poll() is None:
        rss = fwd.rss_kib()
        if rss is not None:
            samples.append(rss)
        assert time.monotonic() < deadline, "the forwarder did not finish"
        time.sleep(0.02)  # sampling period, not synchronisation
    status, stderr = fwd.wait(timeout=10)
    assert status == 0, stderr.decode(errors="replace")[-3000:]
    peak = max(samples)
    print(f"\nRSS: baseline {baseline} KiB, peak {peak} KiB over {len(samples)} samples:")
    print("  ", samples[:: max(1, len(samples) // 25)])

    ingest = own_log(stderr, "forwarder_summary")
    assert ingest and ingest[0]["lines"] == {"stdout": FLOOD_LINES}
    # The local file sink lags too (writing ~26 MB of NDJSON is slower than reading): what it missed is counted.
    file_line = summary(stderr, "file")
    assert file_line["delivered"] + file_line["dropped"].get("spool_full", 0) == FLOOD_LINES
    with (Path(env["FORWARDER_STATE_DIR"]) / "records.ndjson").open() as ndjson:
        written = [int(json.loads(row)["message"].split(" ", 2)[1]) for row in ndjson]
    assert len(written) == file_line["delivered"] and written == sorted(set(written))

    line = summary(stderr, "datadog")
    dropped = line["dropped"]
    assert set(dropped) == {"spool_full"} and dropped["spool_full"] > 0
    assert line["delivered"] == 0
    assert dropped["spool_full"] + line["pending"] == FLOOD_LINES
    assert own_log(stderr, "records_dropped")

    _acked, chunks = spool_state_flood(Path(env["FORWARDER_STATE_DIR"]))
    kept = [n for _, nums in chunks for n in nums]
    assert len(kept) == line["pending"]
    assert kept == list(range(FLOOD_LINES - len(kept), FLOOD_LINES)), "the spool must keep the newest records"
    stored = sum(size for size, _ in chunks)
    assert stored <= SPOOL_MAX

    print(f"spool full: {dropped['spool_full']} dropped, {line['pending']} kept ({stored} B stored)")
    assert peak <= RSS_BOUND_KIB
    assert peak - baseline <= RSS_GROWTH_BOUND_KIB


def spool_state_flood(state_dir: Path) -> tuple[int, list[tuple[int, list[int]]]]:
    """Datadog's cursor and every stored chunk as (stored bytes, numbers of its ``n <i> <noise>`` records)."""
    db = sqlite3.connect(state_dir / "spool" / SPOOL_FILE)
    try:
        row = db.execute("SELECT acked_id FROM cursors WHERE destination = 'datadog'").fetchone()
    finally:
        db.close()
    assert row is not None
    chunks = read_stored_chunks(state_dir / "spool")
    return int(row[0]), [
        (size, [int(r.message.split(" ", 2)[1]) for r in decode_chunk(blob)]) for _, size, blob in chunks
    ]


# --- Done when 4: SIGTERM with the destination down, then the next start ---------------------------------------------

SHUTDOWN_TIMEOUT_S = 2.0


def test_sigterm_with_destination_down_exits_in_time_and_next_start_delivers(
    env: dict[str, str], tmp_path: Path, servers: Callable[..., HTTPServer], forwarders: Callable[..., Forwarder]
) -> None:
    """Datadog refuses connections; the child prints ``n 0..n 499`` then waits. SIGTERM to the forwarder:
    asserted it exits within ``FORWARDER_SHUTDOWN_TIMEOUT`` (2 s) + 1 s of the signal, logs ``shutdown_deadline``
    and reports 500 pending, 0 delivered, nothing dropped. The next start on the same state directory with Datadog
    up (and a child that prints nothing) delivers exactly those 500 records, once each, and leaves 0 pending."""
    total = 500
    env.update(
        DATADOG_TOKEN=DD_API_KEY,
        FORWARDER_DATADOG_URL=f"https://localhost:{closed_port()}/",
        FORWARDER_SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT_S),
    )
    ready = tmp_path / "ready"
    script = (
        f"import time\nfor i in range({total}): print(f'n {{i}}', flush=True)\n"
        f"open({str(ready)!r}, 'w').close()\nwhile True: time.sleep(1)\n"
    )
    fwd = forwarders(env, tmp_path / "first.err", sys.executable, "-c", script)
    poll(ready.exists, 30, "the child to print its lines")
    # The child's lines were read and persisted once the forwarder's own log shows a failed attempt to send them.
    poll(lambda: own_log(fwd.log_path.read_bytes(), "send_retry"), 30, "a first delivery attempt")
    started = time.monotonic()
    fwd.proc.send_signal(signal.SIGTERM)
    status, stderr = fwd.wait(timeout=30)
    elapsed = time.monotonic() - started
    print(f"\nSIGTERM with Datadog down: exited after {elapsed:.2f} s (timeout {SHUTDOWN_TIMEOUT_S} s)")
    assert elapsed <= SHUTDOWN_TIMEOUT_S + 1.0
    assert status == 128 + signal.SIGTERM
    assert own_log(stderr, "shutdown_deadline")
    first = summary(stderr, "datadog")
    assert first["delivered"] == 0 and first["dropped"] == {} and first["pending"] == total

    intake = Intake("datadog")
    server = servers(intake)
    env.update(FORWARDER_DATADOG_URL=server.url_for("/"))
    result = run_forwarder(["run", "--no-mirror", "--", "true"], env, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert Counter(intake.received()) == Counter(range(total))
    second = summary(result.stderr, "datadog")
    assert second["delivered"] == total and second["pending"] == 0 and second["dropped"] == {}
