"""Telemetry in process: the /logs ring, query parsing, health rules, the Prometheus collector, the real HTTP
endpoint (hypercorn on a port chosen by the OS) and the ``forwarder logs`` client against it."""

from __future__ import annotations

import argparse
import io
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import structlog
import trio
from prometheus_client.parser import text_string_to_metric_families

from forwarder import __version__, _logs_client, telemetry
from forwarder._metrics import LATENCY_BUCKETS_S, METRICS, RuntimeCollector, make_registry
from forwarder.app import Runtime
from forwarder.config import Config
from forwarder.delivery.buffer import MemoryBuffer
from forwarder.delivery.destination import DestinationStats
from forwarder.record import Level, Record, Tags
from forwarder.telemetry import (
    ADDR_FILE,
    LOGS_DEFAULT_N,
    LOGS_RING_RECORDS,
    LogQuery,
    QueryError,
    RecordRing,
    check_health,
    health_body,
    parse_log_query,
)

TAGS = Tags("test-host", "agent", "svc")


def rec(i: int, stream: str = "stdout", level: Level | None = None, message: str | None = None) -> Record:
    return Record(1_700_000_000_000_000_000 + i, message if message is not None else f"line {i}", stream, TAGS, level)


def make_runtime(tmp_path: Path, *destinations: str, grace_s: float = 60.0, http_addr: str | None = None) -> Runtime:
    config = Config(tags=TAGS, state_dir=tmp_path, http_addr=http_addr, health_grace_s=grace_s)
    rt = Runtime(config=config, mode="run")
    rt.buffer = MemoryBuffer(10**9)
    rt.buffer.register(list(destinations))
    for name in destinations:
        rt.destinations[name] = DestinationStats(name)
    return rt


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


# --- the ring -----------------------------------------------------------------------------------------------------


def test_ring_keeps_the_newest_records_and_counts_every_one() -> None:
    ring = RecordRing(max_records=5)
    ring.add([rec(i) for i in range(3)])
    ring.add([rec(i) for i in range(3, 12)])
    assert ring.total == 12
    assert [r.message for r in ring.last(100)] == [f"line {i}" for i in range(7, 12)]
    assert [r.message for r in ring.last(2)] == ["line 10", "line 11"]
    assert ring.last(0) == []


def test_ring_is_bounded_by_bytes_too() -> None:
    ring = RecordRing(max_records=100, max_bytes=3 * (1000 + telemetry._RECORD_OVERHEAD))
    ring.add([rec(i, message="x" * 1000) for i in range(10)])
    assert len(ring) == 3
    assert ring.last(10)[0].timestamp_ns == rec(7).timestamp_ns


def test_ring_since_reports_what_a_slow_reader_missed() -> None:
    ring = RecordRing(max_records=4)
    ring.add([rec(i) for i in range(3)])
    records, skipped = ring.since(1)
    assert ([r.message for r in records], skipped) == (["line 1", "line 2"], 0)
    ring.add([rec(i) for i in range(3, 10)])  # records 3..9; only 6..9 kept
    records, skipped = ring.since(3)
    assert ([r.message for r in records], skipped) == ([f"line {i}" for i in range(6, 10)], 3)
    assert ring.since(10) == ([], 0)


@pytest.mark.parametrize("seed", range(5))
def test_ring_matches_a_plain_list_whatever_the_batch_sizes(seed: int) -> None:
    rng = random.Random(seed)
    ring = RecordRing(max_records=50, max_bytes=60 * (10 + telemetry._RECORD_OVERHEAD))
    everything: list[Record] = []
    for _ in range(200):
        batch = [
            rec(len(everything) + i, message="m" * rng.choice((1, 10, 10, 10, 400)))
            for i in range(rng.choice((0, 1, 3, 20, 49, 50, 51, 170)))
        ]
        everything.extend(batch)
        ring.add(batch)
        assert ring.total == len(everything)
        kept = ring.last(10**6)
        assert kept == everything[len(everything) - len(kept) :]  # a suffix, in order
        assert len(kept) == len(ring) <= 50
        size = sum(len(r.message) + telemetry._RECORD_OVERHEAD for r in kept)
        assert size <= ring.max_bytes or len(kept) == 1
        if len(everything) > len(kept) < 50:  # the next older record did not fit in the byte bound
            older = everything[len(everything) - len(kept) - 1]
            assert size + len(older.message) + telemetry._RECORD_OVERHEAD > ring.max_bytes
        seen = rng.randrange(0, len(everything) + 1)
        since, skipped = ring.since(seen)
        assert since == everything[seen + skipped :] and seen + skipped >= len(everything) - len(kept)


async def test_ring_wakes_a_waiting_reader() -> None:
    ring = RecordRing()
    woke = trio.Event()

    async def reader() -> None:
        await ring.wait_beyond(0)
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        ring.add([rec(1)])
        with trio.fail_after(5):
            await woke.wait()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", LogQuery()),
        (b"n=5", LogQuery(n=5)),
        (b"n=0&follow=1", LogQuery(n=0, follow=True)),
        (b"follow=true&stream=stderr", LogQuery(follow=True, stream="stderr")),
        (b"min_level=warn", LogQuery(min_level=Level.WARNING)),
        (f"n={LOGS_RING_RECORDS}".encode(), LogQuery(n=LOGS_RING_RECORDS)),
    ],
)
def test_log_query(query: bytes, expected: LogQuery) -> None:
    assert parse_log_query(query) == expected


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (b"n=ten", "not a number"),
        (b"n=-1", "out of range"),
        (f"n={LOGS_RING_RECORDS + 1}".encode(), "out of range"),
        (b"stream=stdin", "stdout, stderr"),
        (b"min_level=LOUD", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ],
)
def test_log_query_errors_say_what_is_accepted(query: bytes, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        parse_log_query(query)


def test_log_query_filters_keep_records_without_a_level() -> None:
    query = LogQuery(stream="stderr", min_level=Level.WARNING)
    assert query.keeps(rec(1, "stderr", Level.ERROR))
    assert query.keeps(rec(1, "stderr", None))
    assert not query.keeps(rec(1, "stderr", Level.INFO))
    assert not query.keeps(rec(1, "stdout", Level.ERROR))


# --- health -------------------------------------------------------------------------------------------------------

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("pending", "failing_since", "healthy"),
    [
        (0, None, True),  # idle
        (3, None, True),  # sending, nothing failed
        (0, NOW - 3600, True),  # failed long ago but nothing is waiting
        (3, NOW - 59.9, True),  # failing, still within the grace
        (3, NOW - 60.0, False),  # failing for the whole grace with records waiting
        (3, NOW - 3600, False),
    ],
)
def test_health_rule(tmp_path: Path, pending: int, failing_since: float | None, healthy: bool) -> None:
    rt = make_runtime(tmp_path, "datadog", "file")
    assert rt.buffer is not None
    trio.run(rt.buffer.append, [rec(i) for i in range(pending)])
    trio.run(rt.buffer.ack, "file", 10**9)
    stats = rt.destinations["datadog"]
    stats.failing_since = failing_since
    stats.last_error = "network: ConnectError" if failing_since else None
    report = {d.destination: d for d in check_health(rt, 60.0, NOW)}
    assert report["datadog"].healthy is healthy
    assert report["datadog"].pending == pending
    assert report["file"].healthy and report["file"].pending == 0
    status, body = health_body(list(report.values()), 60.0)
    assert status == (200 if healthy else 503)
    if not healthy:
        assert body["failing"] == ["datadog"]
        assert body["reason"].startswith("datadog: network: ConnectError (failing for ")


def test_health_error_is_scrubbed(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, "datadog")
    assert rt.buffer is not None
    trio.run(rt.buffer.append, [rec(1)])
    rt.destinations["datadog"].failing_since = NOW - 100
    rt.destinations["datadog"].last_error = "http_403: key SECRETKEY1234 rejected"
    (report,) = check_health(rt, 60.0, NOW, scrub=lambda s: s.replace("SECRETKEY1234", "[REDACTED]"))
    assert report.error == "http_403: key [REDACTED] rejected"


# --- metrics ------------------------------------------------------------------------------------------------------


def test_collector_reads_the_runtime_at_scrape_time(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, "datadog", "newrelic")
    assert rt.buffer is not None
    rt.ingest_stats.lines.update({"stdout": 7, "stderr": 2})
    rt.ingest_stats.bytes.update({"stdout": 70, "stderr": 20})
    rt.ingest_stats.records = 8
    rt.ingest_stats.filtered = 1
    trio.run(rt.buffer.append, [rec(i) for i in range(8)])
    trio.run(rt.buffer.ack, "datadog", 10**9)
    dd = rt.destinations["datadog"]
    dd.delivered, dd.batches, dd.bytes_sent, dd.retries, dd.last_success = 8, 2, 1234, 1, 1_800_000_000.5
    for latency in (0.003, 0.2, 0.2, 42.0):
        dd.observe(latency)
    nr = rt.destinations["newrelic"]
    nr.dropped.update({"http_400": 5, "too_large": 1})
    rt.child_exit_status = 3
    rt.child_restarts = 0
    collector = RuntimeCollector(rt, lambda: {"datadog": True, "newrelic": False})
    from prometheus_client import generate_latest

    text = generate_latest(make_registry(collector, process=False)).decode()
    got = samples(text)
    expect = {
        ("forwarder_input_lines_total", (("stream", "stdout"),)): 7,
        ("forwarder_input_lines_total", (("stream", "stderr"),)): 2,
        ("forwarder_input_bytes_total", (("stream", "stdout"),)): 70,
        ("forwarder_records_total", ()): 8,
        ("forwarder_records_filtered_total", ()): 1,
        ("forwarder_delivered_records_total", (("destination", "datadog"),)): 8,
        ("forwarder_delivered_records_total", (("destination", "newrelic"),)): 0,
        ("forwarder_dropped_records_total", (("destination", "newrelic"), ("reason", "http_400"))): 5,
        ("forwarder_dropped_records_total", (("destination", "newrelic"), ("reason", "too_large"))): 1,
        ("forwarder_retries_total", (("destination", "datadog"),)): 1,
        ("forwarder_pending_records", (("destination", "datadog"),)): 0,
        ("forwarder_pending_records", (("destination", "newrelic"),)): 8,
        ("forwarder_sent_batches_total", (("destination", "datadog"),)): 2,
        ("forwarder_sent_bytes_total", (("destination", "datadog"),)): 1234,
        ("forwarder_last_success_timestamp_seconds", (("destination", "datadog"),)): 1_800_000_000.5,
        ("forwarder_last_success_timestamp_seconds", (("destination", "newrelic"),)): 0,
        ("forwarder_destination_healthy", (("destination", "datadog"),)): 1,
        ("forwarder_destination_healthy", (("destination", "newrelic"),)): 0,
        ("forwarder_request_duration_seconds_count", (("destination", "datadog"),)): 4,
        ("forwarder_request_duration_seconds_bucket", (("destination", "datadog"), ("le", "0.005"))): 1,
        ("forwarder_request_duration_seconds_bucket", (("destination", "datadog"), ("le", "0.25"))): 3,
        ("forwarder_request_duration_seconds_bucket", (("destination", "datadog"), ("le", "30.0"))): 3,
        ("forwarder_request_duration_seconds_bucket", (("destination", "datadog"), ("le", "+Inf"))): 4,
        ("forwarder_spool_chunks", ()): 1,
        ("forwarder_child_exit_status", ()): 3,
        ("forwarder_child_restarts_total", ()): 0,
        ("forwarder_build_info", (("mode", "run"), ("version", __version__))): 1,
    }
    for key, value in expect.items():
        assert got.get(key) == pytest.approx(value), key
    assert got[("forwarder_request_duration_seconds_sum", (("destination", "datadog"),))] == pytest.approx(42.403)
    assert got[("forwarder_spool_bytes", ())] > 0
    assert dd.latencies == []  # drained into the histogram

    # Counters only grow: a second scrape sees the new latencies added to the old ones.
    dd.observe(0.01)
    again = samples(generate_latest(make_registry(collector, process=False)).decode())
    assert again[("forwarder_request_duration_seconds_count", (("destination", "datadog"),))] == 5


def test_every_exposed_family_is_documented(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, "file")
    rt.child_exit_status = 0
    rt.checkpoint_lag = lambda: {"/var/log/agent.log": 42}
    from prometheus_client import generate_latest

    text = generate_latest(make_registry(RuntimeCollector(rt, dict), process=False)).decode()
    exposed = {(family.name, family.type) for family in text_string_to_metric_families(text)}
    documented = {(name.removesuffix("_total"), type_) for name, type_, _labels, _help in METRICS}
    assert exposed == documented
    assert samples(text)[("forwarder_checkpoint_lag_bytes", (("source", "/var/log/agent.log"),))] == 42
    assert tuple(sorted(LATENCY_BUCKETS_S)) == LATENCY_BUCKETS_S


# --- the HTTP endpoint --------------------------------------------------------------------------------------------


class Served:
    """A Telemetry served on a real socket by :func:`telemetry.start`, and an httpx client for it."""

    def __init__(self, rt: Runtime, tel: telemetry.Telemetry, client: httpx.AsyncClient, nursery: trio.Nursery) -> None:
        self.rt, self.tel, self.client, self.nursery = rt, tel, client, nursery


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    rt = make_runtime(tmp_path, "datadog", "file", http_addr="127.0.0.1:0", grace_s=5.0)
    async with trio.open_nursery() as nursery:
        tel = await telemetry.start(nursery, rt)
        assert tel is not None and tel.address is not None
        addr = (tmp_path / ADDR_FILE).read_text().strip()
        assert addr == tel.address and not addr.endswith(":0")
        async with httpx.AsyncClient(base_url=f"http://{addr}", trust_env=False, timeout=10) as client:
            yield Served(rt, tel, client, nursery)
        nursery.cancel_scope.cancel()
    assert not (tmp_path / ADDR_FILE).exists()  # removed at exit


async def test_metrics_endpoint(served: Served) -> None:
    served.rt.destinations["datadog"].delivered = 11
    response = await served.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    got = samples(response.text)
    assert got[("forwarder_delivered_records_total", (("destination", "datadog"),))] == 11
    assert ("process_resident_memory_bytes", ()) in got
    openmetrics = await served.client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")


async def test_healthz_turns_503_naming_the_destination(served: Served) -> None:
    assert served.rt.buffer is not None
    ok = await served.client.get("/healthz")
    assert ok.status_code == 200 and ok.json()["status"] == "ok"
    await served.rt.buffer.append([rec(1)])
    stats = served.rt.destinations["datadog"]
    stats.failing_since = time.time() - 10  # grace is 5 s
    stats.last_error = "network: ConnectError: [Errno 111] Connection refused"
    bad = await served.client.get("/healthz")
    assert bad.status_code == 503
    body = bad.json()
    assert body["failing"] == ["datadog"]
    assert "Connection refused" in body["reason"]
    assert {d["destination"]: d["healthy"] for d in body["destinations"]} == {"datadog": False, "file": True}
    metrics = samples((await served.client.get("/metrics")).text)
    assert metrics[("forwarder_destination_healthy", (("destination", "datadog"),))] == 0
    stats.failing_since = None
    assert (await served.client.get("/healthz")).status_code == 200


async def test_livez_and_errors(served: Served) -> None:
    assert (await served.client.get("/livez")).json() == {"status": "ok"}
    assert (await served.client.get("/nope")).status_code == 404
    post = await served.client.post("/metrics")
    assert post.status_code == 405 and post.headers["allow"] == "GET"
    bad = await served.client.get("/logs", params={"n": "many"})
    assert bad.status_code == 400 and "not a number" in bad.json()["error"]


async def test_logs_snapshot_and_filters(served: Served) -> None:
    for observer in served.rt.observers:
        observer(
            [rec(i, "stderr" if i % 2 else "stdout", Level.ERROR if i % 3 == 0 else Level.INFO) for i in range(200)]
        )
    default = (await served.client.get("/logs")).text.splitlines()
    assert len(default) == LOGS_DEFAULT_N
    last = [orjson.loads(line) for line in (await served.client.get("/logs", params={"n": 50})).text.splitlines()]
    assert [r["message"] for r in last] == [f"line {i}" for i in range(150, 200)]
    assert last[0]["host"] == "test-host" and last[0]["stream"] == "stdout"
    errors = (await served.client.get("/logs", params={"n": 3, "stream": "stderr", "min_level": "ERROR"})).text
    assert [orjson.loads(line)["message"] for line in errors.splitlines()] == ["line 183", "line 189", "line 195"]


async def test_logs_follow_streams_new_records(served: Served) -> None:
    observe = served.rt.observers[0]
    observe([rec(i) for i in range(5)])
    async with served.client.stream("GET", "/logs", params={"n": 2, "follow": 1, "stream": "stdout"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = response.aiter_lines()
        with trio.fail_after(5):
            assert orjson.loads(await anext(lines))["message"] == "line 3"
            assert orjson.loads(await anext(lines))["message"] == "line 4"
            observe([rec(5, "stderr"), rec(6)])  # the stderr record is filtered out
            assert orjson.loads(await anext(lines))["message"] == "line 6"


async def test_a_follower_that_hangs_up_is_forgotten(served: Served) -> None:
    async with served.client.stream("GET", "/logs", params={"follow": 1}) as response:
        assert response.status_code == 200
        await trio.testing.wait_all_tasks_blocked()
        assert served.tel.followers == 1
    with trio.fail_after(5):
        while served.tel.followers:  # the server notices the closed connection
            await trio.sleep(0.01)
    served.tel.observe([rec(1)])  # nothing left to write to
    assert (await served.client.get("/livez")).status_code == 200


async def test_a_slow_follower_is_told_what_it_missed(served: Served) -> None:
    served.tel.ring = RecordRing(max_records=3)
    served.rt.observers[:] = [served.tel.observe]
    async with served.client.stream("GET", "/logs", params={"n": 0, "follow": 1}) as response:
        lines = response.aiter_lines()
        await trio.testing.wait_all_tasks_blocked()
        served.tel.observe([rec(i) for i in range(10)])  # more than the ring keeps, at once
        with trio.fail_after(5):
            assert orjson.loads(await anext(lines)) == {"skipped": 7}
            assert [orjson.loads(await anext(lines))["message"] for _ in range(3)] == ["line 7", "line 8", "line 9"]


async def test_shutdown_is_not_delayed_by_a_follower(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, "file", http_addr="127.0.0.1:0")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            tel = await telemetry.start(nursery, rt)
            assert tel is not None and tel.address is not None
            async with (
                httpx.AsyncClient(base_url=f"http://{tel.address}", trust_env=False) as client,
                client.stream("GET", "/logs", params={"follow": 1}) as response,
            ):
                assert response.status_code == 200
                nursery.cancel_scope.cancel()  # what app.serve does after the flush
                with pytest.raises(httpx.RemoteProtocolError):
                    async for _line in response.aiter_lines():
                        pass


@pytest.fixture
def busy_port() -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


async def test_port_in_use_logs_one_warning_and_carries_on(tmp_path: Path, busy_port: str) -> None:
    rt = make_runtime(tmp_path, "file", http_addr=busy_port)
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            tel = await telemetry.start(nursery, rt)
            nursery.cancel_scope.cancel()
    assert tel is not None and tel.address is None
    assert rt.observers == [tel.observe]  # /logs data is still collected
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["event"] == "http_unavailable"
    assert warnings[0]["addr"] == busy_port and "in use" in warnings[0]["error"]
    assert not (tmp_path / ADDR_FILE).exists()


async def test_off_serves_nothing_but_keeps_the_ring(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, "file", http_addr=None)
    async with trio.open_nursery() as nursery:
        tel = await telemetry.start(nursery, rt)
        nursery.cancel_scope.cancel()
    assert tel is not None and tel.address is None and rt.observers == [tel.observe]
    assert not (tmp_path / ADDR_FILE).exists()


# --- forwarder logs (the client) ----------------------------------------------------------------------------------


def client_args(**kw: Any) -> argparse.Namespace:
    """What ``forwarder logs`` parses (defaults: -n 20, no follow, no filter)."""
    base: dict[str, Any] = {"lines": 20, "follow": False, "stream": None, "min_level": None, "http_addr": None}
    base.update(kw)
    return argparse.Namespace(**base)


async def test_logs_client_prints_the_last_records(served: Served, tmp_path: Path) -> None:
    served.rt.observers[0]([rec(i, level=Level.WARNING if i == 59 else None) for i in range(60)])
    out = io.StringIO()
    env = {"FORWARDER_STATE_DIR": str(tmp_path)}  # found through the http.addr file
    status = await trio.to_thread.run_sync(_logs_client.run, client_args(lines=50), env, out)
    assert status == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 50
    assert lines[0] == "2023-11-14T22:13:20.000Z stdout -        line 10"
    assert lines[-1] == "2023-11-14T22:13:20.000Z stdout WARNING  line 59"
    assert "\x1b[" not in out.getvalue()  # not a terminal: no colour


async def test_logs_client_follow_ends_cleanly_when_the_forwarder_stops(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, "file", http_addr="127.0.0.1:0")
    out = io.StringIO()
    statuses: list[int] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as clients, trio.open_nursery() as forwarder:
            tel = await telemetry.start(forwarder, rt)
            assert tel is not None
            args = client_args(lines=0, follow=True, http_addr=tel.address)

            async def client() -> None:
                statuses.append(await trio.to_thread.run_sync(_logs_client.run, args, {}, out))

            clients.start_soon(client)
            while "line 1" not in out.getvalue():  # the client attaches in its own thread: feed until it shows
                tel.observe([rec(1)])
                await trio.sleep(0.05)
            forwarder.cancel_scope.cancel()  # the forwarder stops: the stream ends
    assert statuses == [0]


async def test_logs_client_reports_no_forwarder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    addr = f"127.0.0.1:{free.getsockname()[1]}"
    free.close()
    status = await trio.to_thread.run_sync(_logs_client.run, client_args(http_addr=addr), {}, io.StringIO())
    assert status == 1
    err = capsys.readouterr().err
    assert f"no forwarder answers at {addr} (address from --http-addr)" in err


@pytest.mark.parametrize(
    ("flag", "env", "file", "expected"),
    [
        ("10.0.0.1:1234", {"FORWARDER_HTTP_ADDR": "127.0.0.1:9"}, "127.0.0.1:5", ("10.0.0.1:1234", "--http-addr")),
        (None, {"FORWARDER_HTTP_ADDR": "0.0.0.0:9999"}, "127.0.0.1:5", ("127.0.0.1:9999", "FORWARDER_HTTP_ADDR")),
        (None, {"FORWARDER_HTTP_ADDR": "127.0.0.1:0"}, "127.0.0.1:5", ("127.0.0.1:5", "FILE")),
        (None, {"FORWARDER_HTTP_ADDR": "off"}, "[::1]:5", ("[::1]:5", "FILE")),
        (None, {}, None, ("127.0.0.1:9880", "default")),
    ],
)
def test_logs_client_finds_the_address(
    tmp_path: Path, flag: str | None, env: dict[str, str], file: str | None, expected: tuple[str, str]
) -> None:
    if file is not None:
        (tmp_path / ADDR_FILE).write_text(file + "\n")
    env = {**env, "FORWARDER_STATE_DIR": str(tmp_path)}
    addr, origin = _logs_client.resolve_address(flag, env)
    assert (addr, origin.replace(str(tmp_path / ADDR_FILE), "FILE")) == expected


def test_logs_client_off_without_a_running_forwarder(tmp_path: Path) -> None:
    with pytest.raises(_logs_client.UsageError, match="--http-addr"):
        _logs_client.resolve_address(None, {"FORWARDER_HTTP_ADDR": "off", "FORWARDER_STATE_DIR": str(tmp_path)})


@pytest.mark.parametrize(("kw", "message"), [({"lines": -1}, "-n -1"), ({"min_level": "LOUD"}, "--min-level 'LOUD'")])
def test_logs_client_rejects_bad_options(kw: dict[str, Any], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _logs_client.run(client_args(**kw), {}, io.StringIO()) == 2
    assert message in capsys.readouterr().err


def test_format_record_plain_and_coloured() -> None:
    obj = {
        "timestamp": "2026-11-21T14:42:07.144941147Z",
        "message": "job failed\nTraceback (most recent call last):\n  boom\x1b[31m",
        "stream": "stderr",
        "level": "ERROR",
        "attributes": {"job_id": "AJ_1", "pid": 7, "room": "my room", "code.file.path": "/a.py", "n": {"a": 1}},
    }
    plain = _logs_client.format_record(obj, colour=False)
    assert plain.splitlines() == [
        '2026-11-21T14:42:07.144Z stderr ERROR    job failed job_id=AJ_1 room="my room" n={"a":1}',
        "    Traceback (most recent call last):",
        "      boom\\x1b[31m",
    ]
    coloured = _logs_client.format_record(obj, colour=True)
    assert "\x1b[31mERROR" in coloured and "\x1b[35mstderr" in coloured
    assert "\x1b[31m" not in coloured.splitlines()[-1]  # the message's own escape code is shown, not obeyed
    bare = _logs_client.format_record({"message": "x" * 5, "attributes": {"long": "y" * 500}}, colour=False)
    assert bare.startswith("- -      -        xxxxx long=") and bare.endswith("\u2026")
    assert len(bare.split("long=")[1]) == _logs_client.MAX_ATTRIBUTE_CHARS
