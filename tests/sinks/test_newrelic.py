"""New Relic sink: a pytest-httpserver Log API over HTTPS (trustme), plus table tests of the pure parts."""

from __future__ import annotations

import datetime
import decimal
import email.utils
import enum
import gzip
import io
import itertools
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import trio
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from forwarder import log as forwarder_log
from forwarder.config import ConfigError, HttpSettings, Secret
from forwarder.delivery.buffer import MemoryBuffer
from forwarder.delivery.destination import DestinationRunner, DestinationStats
from forwarder.delivery.retry import RetryPolicy, deliver
from forwarder.record import TRUNCATED, Level, Record, Tags
from forwarder.sinks import newrelic
from forwarder.sinks._protocol import Outcome, Sink
from forwarder.sinks.newrelic import (
    EU_URL,
    FOLDED_ATTRIBUTE,
    MAX_ATTRIBUTES_PER_EVENT,
    MAX_PAYLOAD_BYTES,
    MAX_VALUE_BYTES,
    US_URL,
    NewRelicConfig,
    NewRelicSink,
    classify,
    config_from_env,
    encode,
)

US_KEY = "0123456789abcdef0123456789abcdef0123NRAL"
EU_KEY = "eu01xx0123456789abcdef0123456789abcdNRAL"
TAGS = Tags(host="worker-7", source="my-agent", service="cloud.livekit.io")
T0 = 1_763_700_000_123_456_789
"""A capture time in ns (2025-11-21), not a whole millisecond."""
PATH = "/log/v1"


def rec(
    i: int,
    *,
    message: str | None = None,
    stream: str = "stdout",
    level: Level | None = Level.INFO,
    attributes: dict[str, Any] | None = None,
    tags: Tags = TAGS,
    event_time_ns: int | None = None,
) -> Record:
    return Record(
        timestamp_ns=T0 + i * 1_000_000,
        message=f"record {i}" if message is None else message,
        stream=stream,
        tags=tags,
        level=level,
        attributes=attributes,
        event_time_ns=event_time_ns,
    )


def decode_body(data: bytes) -> list[dict[str, Any]]:
    body = json.loads(gzip.decompress(data))
    assert isinstance(body, list)
    return body


def logs_of(body: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(common attributes, log) for every log of a request body."""
    return [(group["common"]["attributes"], entry) for group in body for entry in group["logs"]]


class Intake:
    """Records what a fake Log API received and answers with a scripted (or default 202) response."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.script: list[Response] = []
        self.rule: Callable[[list[dict[str, Any]]], Response | None] | None = None

    def handler(self, request: Request) -> Response:
        data = request.get_data()
        self.requests.append((dict(request.headers), data))
        if self.script:
            return self.script.pop(0)
        if self.rule is not None:
            answer = self.rule(decode_body(data))
            if answer is not None:
                return answer
        return Response('{"requestId":"x"}', status=202, content_type="application/json")


@pytest.fixture
def intake(httpserver: HTTPServer) -> Intake:
    fake = Intake()
    httpserver.expect_request(PATH, method="POST").respond_with_handler(fake.handler)
    return fake


def accepted(httpserver: HTTPServer) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every log in requests the fake answered with 2xx."""
    out = []
    for request, response in httpserver.log:
        if 200 <= response.status_code < 300:
            out.extend(logs_of(decode_body(request.get_data())))
    return out


def make_sink(httpserver: HTTPServer, ca_file: Path, key: str = EU_KEY) -> NewRelicSink:
    config = config_from_env({"NEW_RELIC_LICENSE_KEY": key, "FORWARDER_NEW_RELIC_URL": httpserver.url_for(PATH)})
    assert config is not None
    return config.build(HttpSettings(ca_file=str(ca_file)))


def runner_for(sink: Sink) -> DestinationRunner:
    return DestinationRunner(sink, MemoryBuffer(10**9), DestinationStats(sink.name), RetryPolicy(0.001, 0.001))


# --- wire format over HTTPS ------------------------------------------------------------------------------------


async def test_wire_format_over_https(httpserver: HTTPServer, intake: Intake, ca_file: Path) -> None:
    other = Tags(host="worker-7", source="other-agent", service="cloud.livekit.io")
    records = [
        rec(0, message="starting worker", attributes={"name": "livekit.agents", "pid": 27153}),
        rec(1, message="Traceback (most recent call last):\n  boom", stream="stderr", level=Level.ERROR),
        rec(2, message="no level here", level=None, event_time_ns=T0 - 3_600_000_000_000),
        rec(3, message="from another source", tags=other),
    ]
    sink = make_sink(httpserver, ca_file)
    assert isinstance(sink, Sink)
    try:
        stats = runner_for(sink).stats
        await DestinationRunner(sink, MemoryBuffer(10**9), stats, RetryPolicy()).deliver_records(records)
    finally:
        await sink.aclose()
    assert stats.delivered == 4 and not stats.dropped

    assert len(intake.requests) == 1
    headers, data = intake.requests[0]
    assert headers["Api-Key"] == EU_KEY
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"] == "application/json"
    assert data[:2] == b"\x1f\x8b"  # a gzip stream
    body = decode_body(data)
    # The detailed format: one {"common", "logs"} object per run of records sharing tags.
    assert [set(group) for group in body] == [{"common", "logs"}, {"common", "logs"}]
    assert body[0]["common"] == {
        "attributes": {"host": "worker-7", "source": "my-agent", "service": "cloud.livekit.io"}
    }
    assert body[1]["common"]["attributes"]["source"] == "other-agent"
    logs = [entry for group in body for entry in group["logs"]]
    assert logs[0] == {
        "timestamp": (T0) // 1_000_000,
        "message": "starting worker",
        "attributes": {"stream": "stdout", "level": "INFO", "name": "livekit.agents", "pid": 27153},
    }
    assert logs[1]["message"] == "Traceback (most recent call last):\n  boom"
    assert logs[1]["attributes"] == {"stream": "stderr", "level": "ERROR"}
    assert logs[1]["timestamp"] == (T0 + 1_000_000) // 1_000_000
    # No level detected: no level attribute. The line's own time (1 h earlier) is within 48 h: it is used.
    assert logs[2]["attributes"] == {"stream": "stdout"}
    assert logs[2]["timestamp"] == (T0 - 3_600_000_000_000) // 1_000_000
    # Timestamps are integer milliseconds since the epoch (13 digits for the 2020s).
    assert all(isinstance(e["timestamp"], int) and len(str(e["timestamp"])) == 13 for e in logs)


async def test_same_wire_format_as_newrelic_telemetry_sdk(
    httpserver: HTTPServer, intake: Intake, ca_file: Path
) -> None:
    """Our request and the one newrelic-telemetry-sdk's LogClient makes for the same logs agree on the URL path,
    the auth and encoding headers and the JSON envelope (``[{"logs": [...], "common": {...}}]``)."""
    from newrelic_telemetry_sdk import LogClient

    records = [rec(i, attributes={"n": i}) for i in range(3)]
    sink = make_sink(httpserver, ca_file)
    try:
        assert (await sink.send(encode(records).batches[0])).outcome is Outcome.OK
    finally:
        await sink.aclose()
    ours = decode_body(intake.requests[0][1])

    def send_with_log_client() -> int:
        client = LogClient(EU_KEY, host="localhost", port=httpserver.port, ca_certs=str(ca_file))
        try:
            response = client.send_batch(ours[0]["logs"], common=ours[0]["common"])
            return int(response.status)
        finally:
            client.close()

    assert await trio.to_thread.run_sync(send_with_log_client) == 202
    theirs = decode_body(intake.requests[1][1])
    assert theirs == ours
    for name in ("Api-Key", "Content-Encoding", "Content-Type"):
        assert intake.requests[0][0][name] == intake.requests[1][0][name], name
    assert [r.path for r, _ in httpserver.log] == [PATH, PATH]


# --- configuration and region ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "region", "url"),
    [
        ({"NEW_RELIC_LICENSE_KEY": US_KEY}, "us", US_URL),
        ({"NEW_RELIC_LICENSE_KEY": "0123456789abcdef0123456789abcdef01234567"}, "us", US_URL),
        ({"NEW_RELIC_LICENSE_KEY": EU_KEY}, "eu", EU_URL),
        ({"NEW_RELIC_LICENSE_KEY": "eu02xx0123456789abcdef0123456789abcdNRAL"}, "eu", EU_URL),
        ({"NEW_RELIC_LICENSE_KEY": f"  {EU_KEY}\n"}, "eu", EU_URL),
        # A non-EU region prefix has no documented endpoint of its own: US (override for FedRAMP etc.).
        ({"NEW_RELIC_LICENSE_KEY": "gov01x0123456789abcdef0123456789abcdNRAL"}, "us", US_URL),
        (
            {"NEW_RELIC_LICENSE_KEY": EU_KEY, "FORWARDER_NEW_RELIC_URL": "http://127.0.0.1:8080/custom/log"},
            "override",
            "http://127.0.0.1:8080/custom/log",
        ),
        (
            {"NEW_RELIC_LICENSE_KEY": US_KEY, "FORWARDER_NEW_RELIC_URL": "https://gov-log-api.newrelic.com/log/v1"},
            "override",
            "https://gov-log-api.newrelic.com/log/v1",
        ),
    ],
)
def test_region_selection(env: dict[str, str], region: str, url: str) -> None:
    config = config_from_env(env)
    assert config is not None
    assert (config.region, config.url, config.endpoint()) == (region, url, url)
    assert config.name == "newrelic"
    assert config.secret_values() == [env["NEW_RELIC_LICENSE_KEY"].strip()]


@pytest.mark.parametrize(
    ("key", "region"),
    [(US_KEY, None), (EU_KEY, "eu01"), ("eu01x", "eu01"), ("x123", None), ("abcx", "abc"), ("", None)],
)
def test_key_region_follows_the_agents_rule(key: str, region: str | None) -> None:
    """``re.match("^(.+?)x", key)``: the prefix before the first ``x`` (at least one character)."""
    assert newrelic.key_region(key) == region


@pytest.mark.parametrize("env", [{}, {"NEW_RELIC_LICENSE_KEY": ""}, {"NEW_RELIC_LICENSE_KEY": "   "}])
def test_not_enabled_without_a_key(env: dict[str, str]) -> None:
    assert config_from_env(env) is None


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"NEW_RELIC_LICENSE_KEY": "eu01xx secret key"}, "NEW_RELIC_LICENSE_KEY"),
        ({"NEW_RELIC_LICENSE_KEY": "eu01xxsécret"}, "NEW_RELIC_LICENSE_KEY"),
        ({"NEW_RELIC_LICENSE_KEY": EU_KEY, "FORWARDER_NEW_RELIC_URL": "ftp://host/log"}, "FORWARDER_NEW_RELIC_URL"),
        ({"NEW_RELIC_LICENSE_KEY": EU_KEY, "FORWARDER_NEW_RELIC_URL": "https:///log/v1"}, "FORWARDER_NEW_RELIC_URL"),
        ({"NEW_RELIC_LICENSE_KEY": EU_KEY, "FORWARDER_NEW_RELIC_URL": "https://h:port/x"}, "FORWARDER_NEW_RELIC_URL"),
        ({"NEW_RELIC_LICENSE_KEY": EU_KEY, "FORWARDER_NEW_RELIC_URL": "log-api.nr.com"}, "FORWARDER_NEW_RELIC_URL"),
    ],
)
def test_invalid_settings_name_the_variable_not_the_secret(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_env(env)
    assert info.value.variable == variable
    key = env["NEW_RELIC_LICENSE_KEY"]
    assert key not in str(info.value) and "secret" not in str(info.value).replace("secret value", "")


def test_config_never_shows_secrets() -> None:
    url = "https://user:pw@proxy.internal:8443/log/v1?Api-Key=SECRETKEY"
    config = config_from_env({"NEW_RELIC_LICENSE_KEY": EU_KEY, "FORWARDER_NEW_RELIC_URL": url})
    assert config is not None
    assert config.endpoint() == "https://proxy.internal:8443/log/v1"
    assert config.secret_values() == [EU_KEY, url]
    for text in (repr(config), str(config), config.endpoint()):
        assert EU_KEY not in text and "SECRETKEY" not in text and "pw@" not in text


async def test_license_key_never_in_log_output(
    httpserver: HTTPServer, intake: Intake, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every path that logs (credentials rejected, throttled, dropped with the body echoing the key, a TLS
    failure) leaves the key out of our structlog output and out of every stdlib logger (httpx, httpcore...).
    The global scrubber is left empty, so it is the sink that keeps the key out."""
    forwarder_log.set_secrets([])
    stream = io.StringIO()
    forwarder_log.configure("DEBUG", stream=stream)
    caplog.set_level(logging.DEBUG)
    echo = f"invalid payload for key {EU_KEY}"
    intake.script = [
        Response("Unauthorized", status=401),
        Response("Forbidden", status=403),
        Response(echo, status=429, headers={"Retry-After": "0"}),
        Response(echo, status=400),
    ]
    sink = make_sink(httpserver, ca_file)
    untrusted = NewRelicConfig(license_key=Secret(EU_KEY), url=httpserver.url_for(PATH), region="override").build(
        HttpSettings()
    )
    try:
        runner = runner_for(sink)
        await runner.deliver_records([rec(0)])  # 401, 403, 429, then 400: dropped
        await runner.deliver_records([rec(1)])  # 202
        tls = await untrusted.send(encode([rec(2)]).batches[0])
    finally:
        await sink.aclose()
        await untrusted.aclose()
        structlog.reset_defaults()
    assert runner.stats.dropped == Counter({"http_400": 1})
    assert runner.stats.delivered == 1 and runner.stats.retries == 3
    assert tls.outcome is Outcome.RETRY and "CERTIFICATE_VERIFY_FAILED" in tls.detail
    ours = stream.getvalue()
    # The output is really captured: the retries and the drop were logged, with the scrubbed body.
    assert ours.count('"send_retry"') == 3 and '"records_dropped"' in ours and "[REDACTED]" in ours
    assert any(r.name.startswith(("httpx", "httpcore")) for r in caplog.records)
    everything = ours + caplog.text + tls.detail
    assert EU_KEY not in everything
    assert EU_KEY[6:] not in everything  # not even the part after the region prefix


# --- limits --------------------------------------------------------------------------------------------------


async def test_25000_records_arrive_exactly_once_within_the_size_limit(
    httpserver: HTTPServer, intake: Intake, ca_file: Path
) -> None:
    filler = "".join(chr(0x41 + (i * 7919) % 58) for i in range(220))  # not trivially compressible
    records = [
        rec(i, message=f"id={i} {filler[i % 50 :]}", attributes={"id": i, "room": f"room-{i % 97}"})
        for i in range(25_000)
    ]
    sink = make_sink(httpserver, ca_file)
    try:
        runner = runner_for(sink)
        await runner.deliver_records(records)
    finally:
        await sink.aclose()
    assert runner.stats.delivered == 25_000 and not runner.stats.dropped
    assert len(intake.requests) >= 5  # ~8 MB of JSON: several requests
    for _, data in intake.requests:
        assert len(data) <= MAX_PAYLOAD_BYTES
        assert len(gzip.decompress(data)) <= MAX_PAYLOAD_BYTES
    ids = Counter(entry["attributes"]["id"] for _, entry in accepted(httpserver))
    assert len(ids) == 25_000 and set(ids.values()) == {1}
    assert sorted(ids) == list(range(25_000))


def test_batches_are_cut_at_the_limit_and_sized_exactly() -> None:
    records = [rec(i, message="x" * 300, tags=TAGS if i % 3 else Tags("h", f"s{i % 2}", "svc")) for i in range(3000)]
    encoded = encode(records, max_payload_bytes=50_000)
    assert not encoded.dropped
    assert sum(len(b.records) for b in encoded.batches) == 3000
    seen: list[int] = []
    for batch in encoded.batches:
        body = gzip.decompress(batch.payload)
        assert batch.size == len(body) <= 50_000
        assert len(batch.payload) <= 50_000
        decoded = logs_of(json.loads(body))
        seen.extend(entry["timestamp"] for _, entry in decoded)
        for (common, _), record in zip(decoded, batch.records, strict=True):
            assert common == {"host": record.host, "source": record.source, "service": record.service}
    assert seen == [r.timestamp_ns // 1_000_000 for r in records]  # every record once, in order
    # Full batches come close to the limit (the last may be short).
    assert min(b.size for b in encoded.batches[:-1]) > 50_000 - 400


def test_record_with_400_attributes_keeps_all_of_them() -> None:
    attributes: dict[str, Any] = {f"field_{i:03d}": (i if i % 2 else f"value {i}") for i in range(400)}
    (batch,) = encode([rec(0, attributes=attributes)]).batches
    ((common, entry),) = logs_of(decode_body(batch.payload))
    attrs = entry["attributes"]
    # Everything the stored event gets counts: timestamp, message, the common tags and the log's attributes.
    assert 2 + len(common) + len(attrs) == MAX_ATTRIBUTES_PER_EVENT
    direct = {k: v for k, v in attrs.items() if k.startswith("field_")}
    folded = json.loads(attrs[FOLDED_ATTRIBUTE])
    assert len(direct) == 400 - len(folded) == 247  # 255 - 5 fixed - stream, level, folded_attributes
    assert not set(direct) & set(folded)
    assert {**direct, **folded} == attributes
    assert list(direct) == list(attributes)[:247]  # the first ones stay searchable
    assert attrs["stream"] == "stdout" and attrs["level"] == "INFO" and TRUNCATED not in attrs


def test_folded_attributes_too_long_are_cut_and_marked_within_the_count() -> None:
    attributes = {f"f{i:03d}": f"{i:03d}" + "v" * 1_000 for i in range(400)}  # ~150 KB would be folded
    (batch,) = encode([rec(0, attributes=attributes)]).batches
    ((common, entry),) = logs_of(decode_body(batch.payload))
    attrs = entry["attributes"]
    assert 2 + len(common) + len(attrs) == MAX_ATTRIBUTES_PER_EVENT
    assert attrs[TRUNCATED] is True
    assert len(attrs[FOLDED_ATTRIBUTE].encode()) <= MAX_VALUE_BYTES
    assert attrs[FOLDED_ATTRIBUTE].startswith('{"f246":"246vvv')  # 246 direct: one slot went to truncated
    assert [k for k in attrs if k[1:].isdigit()] == [f"f{i:03d}" for i in range(246)]


def test_nested_objects_count_per_leaf_and_long_names_are_folded() -> None:
    nested = {"user": {f"k{i}": i for i in range(300)}, "n" * 300: "long name", "ok": 1}
    (batch,) = encode([rec(0, attributes=nested, level=None)]).batches
    ((common, entry),) = logs_of(decode_body(batch.payload))
    attrs = entry["attributes"]
    assert 2 + len(common) + len(attrs) <= MAX_ATTRIBUTES_PER_EVENT
    folded = json.loads(attrs[FOLDED_ATTRIBUTE])
    flat = {k: v for k, v in attrs.items() if k not in ("stream", FOLDED_ATTRIBUTE)}
    assert {**flat, **folded} == {**{f"user.k{i}": i for i in range(300)}, "n" * 300: "long name", "ok": 1}


def test_reserved_names_are_renamed_and_arrays_become_json_strings() -> None:
    attributes = {
        "host": "spoofed",
        "message": "inner",
        "timestamp": "2026-11-21T13:52:58+00:00",
        "level": "debug",
        "accountId": 42,
        "eventType": "X",
        "entity.guid": "g",
        "packages": ["a", "b"],
        "user": {"id": 1, "name": "alice", "roles": ["x"]},
        "empty": {},
        "big": 2**70,
        "pi": 3.5,
        "flag": True,
        "nothing": None,
    }
    (batch,) = encode([rec(0, attributes=attributes)]).batches
    ((common, entry),) = logs_of(decode_body(batch.payload))
    assert common["host"] == "worker-7"
    assert entry["message"] == "record 0"
    assert entry["attributes"] == {
        "stream": "stdout",
        "level": "INFO",
        "attr.host": "spoofed",
        "attr.message": "inner",
        "attr.timestamp": "2026-11-21T13:52:58+00:00",
        "attr.level": "debug",
        "attr.accountId": 42,
        "attr.eventType": "X",
        "attr.entity.guid": "g",
        "packages": '["a","b"]',
        "user.id": 1,
        "user.name": "alice",
        "user.roles": '["x"]',
        "empty": "{}",
        "big": 2**70,
        "pi": 3.5,
        "flag": True,
        "nothing": None,
    }


def test_long_messages_are_kept_whole_up_to_the_blob_limit_then_cut_and_marked() -> None:
    exact = "a" * MAX_VALUE_BYTES
    long_text = "é" * 100_000  # 200,000 UTF-8 bytes
    records = [
        rec(0, message=exact),
        rec(1, message=long_text),
        rec(2, attributes={"exc_info": "b" * 200_000}),
        rec(3, message="part", attributes={TRUNCATED: True, "part": 2}),
    ]
    logs = [entry for batch in encode(records).batches for _, entry in logs_of(decode_body(batch.payload))]
    assert logs[0]["message"] == exact and TRUNCATED not in logs[0]["attributes"]
    cut = logs[1]["message"]
    assert long_text.startswith(cut) and MAX_VALUE_BYTES - 1 <= len(cut.encode()) <= MAX_VALUE_BYTES
    assert logs[1]["attributes"][TRUNCATED] is True
    assert logs[2]["attributes"]["exc_info"] == "b" * MAX_VALUE_BYTES and logs[2]["attributes"][TRUNCATED] is True
    assert logs[3]["attributes"] == {"stream": "stdout", "level": "INFO", TRUNCATED: True, "part": 2}


def test_a_record_larger_than_a_request_is_cut_to_fit_not_dropped() -> None:
    attributes = {f"blob{i}": chr(0x61 + i) * 100_000 for i in range(20)}  # 2 MB of attributes
    encoded = encode([rec(0, message="m" * 120_000, attributes=attributes), rec(1)])
    assert not encoded.dropped
    assert sum(len(b.records) for b in encoded.batches) == 2
    for batch in encoded.batches:
        assert batch.size <= MAX_PAYLOAD_BYTES and len(batch.payload) <= MAX_PAYLOAD_BYTES
    big, small = [e for b in encoded.batches for _, e in logs_of(decode_body(b.payload))]
    assert small["message"] == "record 1" and TRUNCATED not in small["attributes"]
    assert big["attributes"][TRUNCATED] is True and big["attributes"]["level"] == "INFO"
    assert big["message"] == "m" * 120_000  # the message fitted; the folded attributes were cut
    assert big["attributes"][FOLDED_ATTRIBUTE].startswith('{"blob0":"aaaa')


@pytest.mark.parametrize(
    ("event_offset_h", "used"),
    [(None, False), (-1, True), (-47, True), (-49, False), (2, True), (49, False)],
)
def test_a_lines_own_time_is_used_within_48_hours(event_offset_h: int | None, used: bool) -> None:
    event = None if event_offset_h is None else T0 + event_offset_h * 3_600_000_000_000
    (batch,) = encode([rec(0, event_time_ns=event)]).batches
    ((_, entry),) = logs_of(decode_body(batch.payload))
    assert entry["timestamp"] == (event if used and event is not None else T0) // 1_000_000


# --- the fast path and its fallbacks --------------------------------------------------------------------------


def reference_batches(
    records: list[Record], max_payload_bytes: int = MAX_PAYLOAD_BYTES
) -> list[tuple[list[Record], int, Any]]:
    """The per-record model of :func:`encode`: every record through ``log_entry`` and ``_dumps`` (cut by ``_fit``
    when over the budget of one record), bodies filled greedily, one group per run of records with equal tags.
    Returns ``(records, JSON size, decoded body)`` per body."""
    out: list[tuple[list[Record], int, Any]] = []
    groups: list[tuple[bytes, list[bytes]]] = []
    batch: list[Record] = []
    size = 2

    def close() -> None:
        body = b"[" + b",".join(head + b",".join(logs) + b"]}" for head, logs in groups) + b"]"
        assert len(body) == size
        out.append((batch, size, json.loads(body)))

    for record in records:
        head = newrelic._group_head(record.tags)
        budget = max_payload_bytes - 2 - len(head) - 2 - newrelic._gzip_slack(max_payload_bytes)
        entry = newrelic._dumps(newrelic.log_entry(record))
        if len(entry) > budget:
            entry = newrelic._fit(newrelic.log_entry(record), budget)
        same = bool(groups) and groups[-1][0] == head
        extra = 1 + len(entry) if same else (1 if groups else 0) + len(head) + 2 + len(entry)
        if batch and size + extra > max_payload_bytes:
            close()
            groups, batch, size = [], [], 2
            same, extra = False, len(head) + 2 + len(entry)
        if same:
            groups[-1][1].append(entry)
        else:
            groups.append((head, [entry]))
        batch.append(record)
        size += extra
    if batch:
        close()
    return out


def assert_same_as_reference(records: list[Record], max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> None:
    """encode() cuts ``records`` into the very bodies of the per-record model (same records, same JSON sizes,
    same JSON values; only the order of object members may differ), and leaves the records as they were."""
    before = [(r.message, json.dumps(r.attributes, default=repr)) for r in records]
    encoded = encode(records, max_payload_bytes=max_payload_bytes)
    after = [(r.message, json.dumps(r.attributes, default=repr)) for r in records]
    assert after == before
    expected = reference_batches(records, max_payload_bytes)
    assert not encoded.dropped
    assert [[id(r) for r in b.records] for b in encoded.batches] == [[id(r) for r in rs] for rs, _, _ in expected]
    for batch, (_, size, body) in zip(encoded.batches, expected, strict=True):
        data = gzip.decompress(batch.payload)
        assert batch.size == len(data) == size <= max_payload_bytes
        assert len(batch.payload) <= max_payload_bytes
        assert json.loads(data) == body


class Shout(str):
    """A str subclass: log_entry sends ``str(value)``, orjson would send it as it is (so it must not see it)."""


class Colour(enum.Enum):
    RED = "red"


def json_line_record(i: int, **extra: Any) -> Record:
    """What the shaper makes of a JSON line: its own fields (and ``timestamp``, renamed ``attr.timestamp``)."""
    attributes: dict[str, Any] = {
        "name": "livekit.agents",
        "pid": 4242 + i % 7,
        "job_id": f"AJ_{i:08d}",
        "timestamp": "2025-11-21T04:40:00.123456+00:00",
        **extra,
    }
    return rec(i, message=f"participant joined the room #{i}", attributes=attributes, event_time_ns=T0 - i)


def mixed_records() -> list[Record]:
    """Records as the shaper makes them of JSON and text lines, with every case that needs care: first each alone
    among plain records (300 apart: never two in one block), then all of them close together."""
    other = Tags(host="worker-8", source="other-agent", service="cloud.livekit.io")
    int_key: dict[Any, Any] = {1: "int key", "ok": True}
    special: list[Callable[[int], Record]] = [
        lambda i: json_line_record(i, user={"id": i, "roles": ["a"]}),  # nested: flattened
        lambda i: json_line_record(i, packages=["a", "b"], pair=(1, 2), empty={}),  # arrays: JSON strings
        lambda i: json_line_record(i, pair=(1, 2)),  # an atomic tuple: the dict is not tracked by the gc
        lambda i: json_line_record(i, level="debug", stream="stderr"),  # our own fields: renamed
        lambda i: json_line_record(i, **{"n" * 300: "long name"}),  # folded
        lambda i: json_line_record(i, **{f"k{j}": j for j in range(300)}),  # too many: folded
        lambda i: json_line_record(i, big=2**70),  # orjson refuses
        lambda i: json_line_record(i, text="lone \ud800 surrogate"),  # orjson refuses
        lambda i: rec(i, message="lone \udfff in the message"),
        lambda i: json_line_record(i, when=datetime.datetime(2025, 11, 21, 4, 40, tzinfo=datetime.UTC)),
        lambda i: json_line_record(i, price=decimal.Decimal("1.50"), raw=b"bytes", colour=Colour.RED),
        lambda i: json_line_record(i, level_int=Level.ERROR, shout=Shout("hey"), tags={"x"}),
        lambda i: json_line_record(i, ratio=float("nan"), inf=float("inf")),  # null, as orjson sends them
        lambda i: json_line_record(i, exc_info="é" * 70_000),  # 140 kB of UTF-8: cut and marked
        lambda i: rec(i, message="m" * 130_000),  # cut and marked
        lambda i: rec(i, stream="console"),  # not stdout/stderr
        lambda i: rec(i, level=None, attributes=int_key),
        lambda i: rec(i, tags=other, attributes={"truncated": True, "part": 2}),
        lambda i: rec(i, message="x" * 60_000, attributes={"y": "y" * 60_000}),  # large, nothing to cut
    ]
    out: list[Record] = []
    spread = 300 * len(special)
    for i in range(spread + 200):
        if (i % 300 == 150 and i < spread) or (i > spread and i % 3 == 0):
            out.append(special[(i // 300 if i < spread else i) % len(special)](i))
        elif i % 5 < 3:
            out.append(json_line_record(i))
        else:
            out.append(rec(i, message=f"2025-11-21 04:40:00,123 - INFO livekit.agents - text line {i}"))
    return out


@pytest.mark.parametrize("max_payload_bytes", [MAX_PAYLOAD_BYTES, 200_000, 30_000])
def test_fast_path_sends_what_the_per_record_path_sends(max_payload_bytes: int) -> None:
    records = mixed_records()
    assert_same_as_reference(records, max_payload_bytes)
    # The shared attributes of logs without attributes of their own were not changed by any of this.
    assert newrelic._BASE_ATTRIBUTES["stdout"][Level.INFO] == {"stream": "stdout", "level": "INFO"}
    assert newrelic._BASE_ATTRIBUTES["stderr"][None] == {"stream": "stderr"}


def test_plain_records_never_take_the_per_record_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records as the shaper makes them (JSON lines with their own timestamp, text lines with or without a level,
    both streams) go through the block path only, also where bodies are full and blocks are cut."""
    records = [
        json_line_record(i) if i % 3 else rec(i, stream="stderr" if i % 2 else "stdout", level=None)
        for i in range(3000)
    ]
    expected = reference_batches(records, 50_000)

    def forbidden(*args: object, **kwargs: object) -> Any:
        raise AssertionError("per-record path taken")

    for name in ("log_entry", "_dumps", "_fit", "_serialised"):
        monkeypatch.setattr(newrelic, name, forbidden)
    encoded = encode(records, max_payload_bytes=50_000)
    assert len(encoded.batches) == len(expected) > 10
    for batch, (batch_records, size, body) in zip(encoded.batches, expected, strict=True):
        assert batch.records == batch_records and batch.size == size
        assert json.loads(gzip.decompress(batch.payload)) == body
    attrs = logs_of(json.loads(gzip.decompress(encoded.batches[0].payload)))[1][1]["attributes"]  # a JSON line's
    assert attrs["attr.timestamp"] == "2025-11-21T04:40:00.123456+00:00" and "timestamp" not in attrs


def test_a_record_needing_care_sends_only_its_block_the_per_record_way(monkeypatch: pytest.MonkeyPatch) -> None:
    records = [json_line_record(i) for i in range(2000)]
    records[1000] = json_line_record(1000, user={"id": 7})
    calls: list[Record] = []
    log_entry = newrelic.log_entry

    def spy(record: Record) -> dict[str, Any]:
        calls.append(record)
        return log_entry(record)

    monkeypatch.setattr(newrelic, "log_entry", spy)
    ((_, entry),) = [(c, e) for b in encode(records).batches for c, e in logs_of(decode_body(b.payload))][1000:1001]
    assert entry["attributes"]["user.id"] == 7 and "user" not in entry["attributes"]
    assert any(r is records[1000] for r in calls)
    assert 0 < len(calls) <= newrelic._BLOCK_RECORDS  # the other blocks took the fast path


def test_each_run_of_a_source_is_one_group_whatever_the_tags_objects() -> None:
    """Consecutive records of one source share a group, also when their (equal) tags are distinct objects."""
    shared = [Tags("w", f"agent-{k}", "svc") for k in range(3)]
    records = [
        rec(i, tags=shared[(i // 7) % 3] if i < 140 else Tags("w", f"agent-{(i // 7) % 3}", "svc")) for i in range(280)
    ]
    assert_same_as_reference(records)
    (batch,) = encode(records).batches
    body = decode_body(batch.payload)
    assert [g["common"]["attributes"]["source"] for g in body] == [f"agent-{k % 3}" for k in range(40)]
    assert all(len(g["logs"]) == 7 for g in body)


def test_a_block_over_the_body_limit_is_cut_exactly_where_the_body_is_full() -> None:
    """Blocks straddle body boundaries (including a body whose room is already negative for the next group):
    each body still ends with the last log that fits, and the next one starts with the log that did not."""
    other = Tags(host="h", source="s", service="svc")
    records = [
        rec(i, message="y" * (150 + i % 400), tags=other if i % 700 < 3 else TAGS, attributes={"id": i})
        for i in range(4000)
    ]
    assert_same_as_reference(records, 20_000)
    encoded = encode(records, max_payload_bytes=20_000)
    entries = {id(r): len(newrelic._dumps(newrelic.log_entry(r))) for r in records}
    for batch, following in itertools.pairwise(encoded.batches):
        assert batch.size + 1 + entries[id(following.records[0])] > 20_000 - 60  # full: no room for the next log


def test_a_record_over_the_per_record_limits_is_cut_and_its_neighbours_are_not() -> None:
    records = [json_line_record(i) for i in range(600)]
    records[100] = json_line_record(100, exc_info="b" * 200_000)  # a value over MAX_VALUE_BYTES
    blobs = {f"blob{j}": chr(0x61 + j) * 100_000 for j in range(12)}
    records[300] = rec(300, attributes=blobs)  # a log over the body: folded and cut
    assert_same_as_reference(records)
    logs = [e for b in encode(records).batches for _, e in logs_of(decode_body(b.payload))]
    assert logs[100]["attributes"]["exc_info"] == "b" * MAX_VALUE_BYTES and logs[100]["attributes"][TRUNCATED]
    assert logs[300]["attributes"][TRUNCATED] is True and FOLDED_ATTRIBUTE in logs[300]["attributes"]
    assert sum(TRUNCATED in e["attributes"] for e in logs) == 2


def test_a_log_over_a_small_body_limit_is_cut_though_it_has_nothing_too_long() -> None:
    """With a body limit under MAX_VALUE_BYTES, a log between the two is cut by the body limit alone."""
    records = [json_line_record(i) for i in range(300)]
    records[150] = rec(150, message="x" * 20_000, attributes={"y": "y" * 20_000})
    assert_same_as_reference(records, 30_000)
    logs = [e for b in encode(records, max_payload_bytes=30_000).batches for _, e in logs_of(decode_body(b.payload))]
    assert logs[150]["attributes"][TRUNCATED] is True and logs[150]["message"] == "x" * 20_000
    assert logs[150]["attributes"][FOLDED_ATTRIBUTE].startswith('{"y":"yyy')
    assert sum(TRUNCATED in e["attributes"] for e in logs) == 1


def test_unencodable_attribute_values_are_sent_as_the_per_record_path_sends_them() -> None:
    when = datetime.datetime(2025, 11, 21, 4, 40, tzinfo=datetime.UTC)
    special = {
        "big": 2**70,
        "lone": "a \ud800 b",
        "when": when,
        "price": decimal.Decimal("1.50"),
        "raw": b"bytes",
        "colour": Colour.RED,
        "level_int": Level.ERROR,
        "shout": Shout("hey"),
    }
    records = [json_line_record(i) for i in range(300)]
    for j, (name, value) in enumerate(special.items()):
        records[10 + 30 * j] = json_line_record(10 + 30 * j, **{name: value})
    assert_same_as_reference(records)
    logs = [e for b in encode(records).batches for _, e in logs_of(decode_body(b.payload))]
    got = {name: logs[10 + 30 * j]["attributes"][name] for j, name in enumerate(special)}
    assert got == {
        "big": 2**70,
        "lone": "a ? b",
        "when": str(when),
        "price": "1.50",
        "raw": "b'bytes'",
        "colour": "Colour.RED",
        "level_int": str(Level.ERROR),
        "shout": "hey",
    }
    assert all(TRUNCATED not in e["attributes"] for e in logs)


# --- classify ------------------------------------------------------------------------------------------------


def _response(status: int, headers: dict[str, str] | None = None, text: str = "") -> httpx.Response:
    return httpx.Response(status, headers=headers, text=text)


@pytest.mark.parametrize(
    ("status", "headers", "outcome", "after", "loud"),
    [
        (200, None, Outcome.OK, None, False),
        (202, None, Outcome.OK, None, False),
        (400, None, Outcome.DROP, None, True),
        (401, None, Outcome.RETRY, None, True),
        (403, None, Outcome.RETRY, None, True),
        (404, None, Outcome.DROP, None, True),
        (408, None, Outcome.RETRY, None, False),
        (413, None, Outcome.SPLIT, None, False),
        (415, None, Outcome.DROP, None, True),
        (429, {"Retry-After": "7"}, Outcome.RETRY, 7.0, False),
        (429, None, Outcome.RETRY, None, False),
        (500, None, Outcome.RETRY, None, False),
        (502, None, Outcome.RETRY, None, False),
        (503, {"Retry-After": "2"}, Outcome.RETRY, 2.0, False),
        (504, None, Outcome.RETRY, None, False),
    ],
)
def test_classify(
    status: int, headers: dict[str, str] | None, outcome: Outcome, after: float | None, loud: bool
) -> None:
    verdict = classify(_response(status, headers, "body"))
    assert (verdict.outcome, verdict.after, verdict.loud) == (outcome, after, loud)
    if outcome is not Outcome.OK:
        assert verdict.reason in (f"http_{status}", "too_large")


def test_classify_429_with_an_http_date() -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    verdict = classify(_response(429, {"Retry-After": when}))
    assert verdict.outcome is Outcome.RETRY and verdict.after is not None and 100 < verdict.after <= 120


async def test_network_errors_are_retried(ca_file: Path) -> None:
    with socket.socket() as probe:  # a port the OS just handed out, closed again: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = config_from_env(
        {"NEW_RELIC_LICENSE_KEY": EU_KEY, "FORWARDER_NEW_RELIC_URL": f"https://127.0.0.1:{port}/log/v1"}
    )
    assert config is not None
    sink = config.build(HttpSettings(ca_file=str(ca_file)))
    try:
        verdict = await sink.send(encode([rec(0)]).batches[0])
    finally:
        await sink.aclose()
    assert verdict.outcome is Outcome.RETRY and verdict.reason == "network"
    assert "ConnectError" in verdict.detail


# --- retry and split end to end ------------------------------------------------------------------------------


async def test_429_then_503_then_202_delivers_every_record_once(
    httpserver: HTTPServer, intake: Intake, ca_file: Path
) -> None:
    intake.script = [
        Response("slow down", status=429, headers={"Retry-After": "7"}),
        Response("unavailable", status=503),
    ]
    records = [rec(i, attributes={"id": i}) for i in range(1000)]
    (batch,) = encode(records).batches
    sleeps: list[float] = []

    async def recorded_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    retried: list[str] = []
    sink = make_sink(httpserver, ca_file)
    try:
        verdict = await deliver(
            lambda: sink.send(batch),
            RetryPolicy(initial_s=0.5, max_s=30.0),
            on_retry=lambda v, _wait: retried.append(v.reason),
            sleep=recorded_sleep,
        )
    finally:
        await sink.aclose()
    assert verdict.outcome is Outcome.OK
    assert [response.status_code for _, response in httpserver.log] == [429, 503, 202]
    assert retried == ["http_429", "http_503"]
    assert len(sleeps) == 2
    assert sleeps[0] >= 7.0  # Retry-After honoured
    assert 0.0 <= sleeps[1] <= 0.5 * 2**2  # plain full-jitter backoff for the 503
    ids = [entry["attributes"]["id"] for _, entry in accepted(httpserver)]
    assert ids == list(range(1000))
    # Every attempt carried the very same payload.
    assert len({data for _, data in intake.requests}) == 1


async def test_413_is_resolved_by_splitting(httpserver: HTTPServer, intake: Intake, ca_file: Path) -> None:
    def too_many(body: list[dict[str, Any]]) -> Response | None:
        if len(logs_of(body)) > 300:
            return Response("payload too large", status=413)
        return None

    intake.rule = too_many
    records = [rec(i, attributes={"id": i}) for i in range(2000)]
    sink = make_sink(httpserver, ca_file)
    try:
        runner = runner_for(sink)
        await runner.deliver_records(records)
    finally:
        await sink.aclose()
    statuses = Counter(response.status_code for _, response in httpserver.log)
    assert statuses[413] >= 7 and statuses[202] >= 7
    assert runner.stats.delivered == 2000 and not runner.stats.dropped and runner.stats.retries == 0
    ids = Counter(entry["attributes"]["id"] for _, entry in accepted(httpserver))
    assert sorted(ids) == list(range(2000)) and set(ids.values()) == {1}


async def test_a_single_record_still_refused_as_too_large_is_counted(
    httpserver: HTTPServer, intake: Intake, ca_file: Path
) -> None:
    intake.rule = lambda body: Response("too large", status=413)
    sink = make_sink(httpserver, ca_file)
    try:
        runner = runner_for(sink)
        await runner.deliver_records([rec(0), rec(1)])
    finally:
        await sink.aclose()
    assert runner.stats.dropped == Counter({"too_large": 2}) and runner.stats.delivered == 0


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
