"""Sentry destination: config, traceback parsing, encode, classify (tables), and the sink against a pytest-httpserver
playing Sentry's envelope endpoint over HTTPS (trustme), asserting on what arrived on the wire."""

from __future__ import annotations

import functools
import gzip
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sentry_sdk
from pytest_httpserver import HTTPServer
from sentry_sdk.envelope import Envelope, Item, PayloadRef
from werkzeug import Request, Response

from forwarder.config import ConfigError, HttpSettings, Secret
from forwarder.delivery.buffer import MemoryBuffer
from forwarder.delivery.destination import DestinationRunner, DestinationStats
from forwarder.delivery.retry import RetryPolicy, deliver
from forwarder.record import Level, Record, Tags
from forwarder.sinks import sentry
from forwarder.sinks._protocol import Outcome, Verdict
from forwarder.sinks._traceback import in_app, module_of, parse_traceback
from forwarder.sinks.sentry import (
    EVENT_CATEGORIES,
    LOG_CATEGORIES,
    MAX_LOG_ITEM_BYTES,
    MAX_LOGS_PER_ENVELOPE,
    RateLimit,
    RateLimiter,
    SentryConfig,
    SentrySink,
    classify,
    config_from_env,
    encode,
    log_entry,
    parse_rate_limits,
)

KEY = "0123456789abcdef0123456789abcdef"
TAGS = Tags(host="worker-7", source="agent-a", service="cloud.livekit.io")
TRACE = "f" * 32
PATH = "/api/42/envelope/"


def rec(message: str, *, level: Level | None = Level.INFO, stream: str = "stdout", **attrs: Any) -> Record:
    return Record(1_763_733_178_043_707_123, message, stream, TAGS, level, dict(attrs) or None)


def decode(body: bytes) -> Envelope:
    return Envelope.deserialize(gzip.decompress(body))


def logs_of(envelope: Envelope) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in envelope.items:
        if item.headers["type"] == "log":
            out.extend(orjson.loads(item.get_bytes())["items"])
    return out


def events_of(envelope: Envelope) -> list[dict[str, Any]]:
    return [orjson.loads(item.get_bytes()) for item in envelope.items if item.headers["type"] == "event"]


def received(server: HTTPServer) -> list[tuple[Request, Envelope]]:
    return [(request, decode(request.get_data())) for request, _ in server.log]


# --- a real chained exception, raised by code in this file -------------------------------------------------------


def _lookup() -> int:
    table: dict[str, int] = {}
    return table["missing"]


def _handle() -> None:
    try:
        _lookup()
    except KeyError as exc:
        raise RuntimeError("job failed while handling the room") from exc


def chained_traceback() -> tuple[str, list[BaseException]]:
    try:
        _handle()
    except RuntimeError as exc:
        assert exc.__cause__ is not None
        return traceback.format_exc().rstrip("\n"), [exc.__cause__, exc]
    raise AssertionError("unreachable")


# --- config -----------------------------------------------------------------------------------------------------


def test_config_absent_or_empty_is_disabled() -> None:
    assert config_from_env({}) is None
    assert config_from_env({"SENTRY_DSN": "  "}) is None
    assert sentry.ENV_VARS == ("SENTRY_DSN",)


def test_config_valid_dsn_endpoint_has_no_key() -> None:
    config = config_from_env({"SENTRY_DSN": f"https://{KEY}@o1.ingest.sentry.io/4242"})
    assert config is not None
    assert config.name == "sentry"
    assert config.endpoint() == "https://o1.ingest.sentry.io/api/4242/envelope/"
    assert KEY in config.secret_values()
    assert KEY not in repr(config) and KEY not in config.endpoint()


@pytest.mark.parametrize(
    ("dsn", "problem"),
    [
        (KEY, "scheme"),
        (f"ftp://{KEY}@host/1", "scheme"),
        ("https://o1.ingest.sentry.io/42", "public key"),
        (f"https://{KEY}@/42", "host"),
        (f"https://{KEY}@host/not-a-project", "project id"),
        (f"https://{KEY}@host:port{KEY}/1", "cannot be parsed"),
    ],
)
def test_config_malformed_dsn_names_variable_never_the_key(dsn: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_env({"SENTRY_DSN": dsn})
    assert info.value.variable == "SENTRY_DSN"
    assert problem in info.value.problem
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    assert info.value.__cause__ is None


# --- traceback parsing --------------------------------------------------------------------------------------------

SIMPLE = """Traceback (most recent call last):
  File "/app/agent_prewarm.py", line 7, in prewarm
    1 / 0
    ~~^~~
ZeroDivisionError: division by zero"""

CONTEXT_NO_TB = """Traceback (most recent call last):
  File "/app/.venv/lib/python3.11/site-packages/aiohttp/connector.py", line 1025, in _wrap_create_connection
    return await self._loop.create_connection(*args, **kwargs)
  File "/usr/lib/python3.11/asyncio/base_events.py", line 1085, in create_connection
    raise exceptions[0]
ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 7880)

During handling of the above exception, another exception occurred:

aiohttp.client_exceptions.ClientConnectorError: Cannot connect to host 127.0.0.1:7880"""

RECURSION = """Traceback (most recent call last):
  File "/app/r.py", line 3, in <module>
    f()
  File "/app/r.py", line 2, in f
    def f(): return f()
                    ^^^
  [Previous line repeated 996 more times]
RecursionError: maximum recursion depth exceeded"""

SYNTAX = """Traceback (most recent call last):
  File "/app/main.py", line 1, in <module>
    import broken
  File "/app/broken.py", line 1
    def f(:
          ^
SyntaxError: invalid syntax"""

GROUP = """  + Exception Group Traceback (most recent call last):
  |   File "/app/g.py", line 16, in <module>
  |     raise ExceptionGroup("eg", [ValueError(1), TypeError(2)])
  | ExceptionGroup: eg (2 sub-exceptions)
  +-+---------------- 1 ----------------
    | ValueError: 1
    +---------------- 2 ----------------
    | TypeError: 2
    +------------------------------------"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SIMPLE, [("ZeroDivisionError", None, "division by zero", [("/app/agent_prewarm.py", 7, "prewarm", "1 / 0")])]),
        (
            "prewarm caught an error\n" + SIMPLE,
            [("ZeroDivisionError", None, "division by zero", [("/app/agent_prewarm.py", 7, "prewarm", "1 / 0")])],
        ),
        (
            CONTEXT_NO_TB,
            [
                (
                    "ConnectionRefusedError",
                    None,
                    "[Errno 111] Connect call failed ('127.0.0.1', 7880)",
                    [
                        (
                            "/app/.venv/lib/python3.11/site-packages/aiohttp/connector.py",
                            1025,
                            "_wrap_create_connection",
                            "return await self._loop.create_connection(*args, **kwargs)",
                        ),
                        (
                            "/usr/lib/python3.11/asyncio/base_events.py",
                            1085,
                            "create_connection",
                            "raise exceptions[0]",
                        ),
                    ],
                ),
                ("ClientConnectorError", "aiohttp.client_exceptions", "Cannot connect to host 127.0.0.1:7880", []),
            ],
        ),
        (
            RECURSION,
            [
                (
                    "RecursionError",
                    None,
                    "maximum recursion depth exceeded",
                    [("/app/r.py", 3, "<module>", "f()"), ("/app/r.py", 2, "f", "def f(): return f()")],
                )
            ],
        ),
        (
            SYNTAX,
            [
                (
                    "SyntaxError",
                    None,
                    "invalid syntax",
                    [("/app/main.py", 1, "<module>", "import broken"), ("/app/broken.py", 1, None, "def f(:")],
                )
            ],
        ),
        (
            GROUP,
            [
                (
                    "ExceptionGroup",
                    None,
                    "eg (2 sub-exceptions)",
                    [("/app/g.py", 16, "<module>", 'raise ExceptionGroup("eg", [ValueError(1), TypeError(2)])')],
                )
            ],
        ),
        ("KeyError: 'x' without a traceback header", []),
        ("plain line", []),
        ('Traceback (most recent call last):\n  File "/a.py", line 1, in f\n', []),
    ],
)
def test_parse_traceback_table(text: str, expected: list[tuple[Any, ...]]) -> None:
    parsed = parse_traceback(text)
    got = [
        (e.type, e.module, e.value, [(f.filename, f.lineno, f.function, f.context_line) for f in e.frames])
        for e in parsed
    ]
    assert got == expected


def test_parse_traceback_of_a_real_chained_exception_matches_the_interpreter() -> None:
    text, chain = chained_traceback()
    parsed = parse_traceback(text)
    assert [e.type for e in parsed] == ["KeyError", "RuntimeError"]
    assert [e.chained_by for e in parsed] == ["__cause__", None]
    for exc, real in zip(parsed, chain, strict=True):
        expected = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(real.__traceback__)]
        assert [(f.filename, f.lineno, f.function) for f in exc.frames] == expected


@pytest.mark.parametrize(
    ("path", "app", "module"),
    [
        ("/app/agent.py", True, None),
        ("/app/.venv/lib/python3.11/site-packages/livekit/agents/worker.py", False, "livekit.agents.worker"),
        ("/usr/lib/python3/dist-packages/pkg/__init__.py", False, "pkg"),
        ("/usr/lib/python3.11/asyncio/base_events.py", False, None),
        ("<frozen importlib._bootstrap>", False, None),
        ("<string>", True, None),
    ],
)
def test_in_app_and_module_guess(path: str, app: bool, module: str | None) -> None:
    assert in_app(path) is app
    assert module_of(path) == module


# --- encode -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "name", "number"),
    [
        (None, "info", 9),
        (Level.DEBUG, "debug", 5),
        (Level.INFO, "info", 9),
        (Level.WARNING, "warn", 13),
        (Level.ERROR, "error", 17),
        (Level.CRITICAL, "fatal", 21),
    ],
)
def test_log_levels(level: Level | None, name: str, number: int) -> None:
    entry = log_entry(rec("m", level=level), TRACE)
    assert (entry["level"], entry["severity_number"]) == (name, number)


class _Color(int):
    pass


@pytest.mark.parametrize(
    ("value", "typed"),
    [
        ("text", {"value": "text", "type": "string"}),
        (123, {"value": 123, "type": "integer"}),
        (-(2**63), {"value": -(2**63), "type": "integer"}),
        (2**64, {"value": str(2**64), "type": "string"}),
        (0.25, {"value": 0.25, "type": "double"}),
        (float("nan"), {"value": "nan", "type": "string"}),
        (True, {"value": True, "type": "boolean"}),
        (Level.ERROR, {"value": 40, "type": "integer"}),
        (_Color(3), {"value": 3, "type": "integer"}),
        (None, {"value": "null", "type": "string"}),
        (["a", 1], {"value": '["a",1]', "type": "string"}),
        ({"k": {"n": 1}}, {"value": '{"k":{"n":1}}', "type": "string"}),
    ],
)
def test_attribute_types(value: Any, typed: dict[str, Any]) -> None:
    entry = log_entry(rec("m", field=value), TRACE)
    assert entry["attributes"]["field"] == typed


def test_log_entry_shape_tags_and_times() -> None:
    record = rec("hello", name="livekit.agents", pid=27153)
    record.event_time_ns = record.timestamp_ns - 5_000_000_000
    entry = log_entry(record, TRACE)
    assert entry["timestamp"] == pytest.approx(record.event_time_ns / 1e9, abs=1e-6)
    assert entry["timestamp"] % 1 != 0  # the fraction is kept
    assert entry["trace_id"] == TRACE and entry["body"] == "hello"
    assert entry["attributes"]["host"] == {"value": "worker-7", "type": "string"}
    assert entry["attributes"]["source"] == {"value": "agent-a", "type": "string"}
    assert entry["attributes"]["service"] == {"value": "cloud.livekit.io", "type": "string"}
    assert entry["attributes"]["stream"] == {"value": "stdout", "type": "string"}
    assert entry["attributes"]["pid"] == {"value": 27153, "type": "integer"}
    # a stated time outside Sentry's window (30 days back, 60 s ahead) falls back to the capture time
    record.event_time_ns = record.timestamp_ns + 3600 * 10**9
    assert log_entry(record, TRACE)["timestamp"] == pytest.approx(record.timestamp_ns / 1e9, abs=1e-6)


def test_trace_and_span_ids_from_the_record() -> None:
    entry = log_entry(rec("m", trace_id="0AF7651916CD43DD8448EB211C80319C", span_id="b7ad6b7169203331"), TRACE)
    assert entry["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert entry["span_id"] == "b7ad6b7169203331"
    assert log_entry(rec("m", trace_id="not-hex" * 4 + "zzzz"), TRACE)["trace_id"] == TRACE
    assert log_entry(rec("m", trace_id="0" * 32), TRACE)["trace_id"] == TRACE


def test_encode_at_most_100_logs_per_envelope_in_order() -> None:
    records = [rec(f"line {i}") for i in range(250)]
    encoded = encode(records, TRACE)
    assert encoded.dropped == {}
    assert [len(b.records) for b in encoded.batches] == [100, 100, 50]
    bodies = []
    for batch in encoded.batches:
        envelope = decode(batch.payload.body)
        assert batch.size == len(gzip.decompress(batch.payload.body))
        assert batch.payload.categories == LOG_CATEGORIES
        (item,) = envelope.items
        assert item.headers["item_count"] == len(batch.records)
        bodies += [log["body"] for log in logs_of(envelope)]
    assert bodies == [f"line {i}" for i in range(250)]


def test_encode_respects_item_bytes_and_cuts_a_huge_log() -> None:
    records = [rec("x" * 300_000) for _ in range(7)] + [rec("é" * 3_000_000, blob="y" * 900_000)]
    encoded = encode(records, TRACE)
    assert sum(len(b.records) for b in encoded.batches) == 8
    for batch in encoded.batches:
        (item,) = decode(batch.payload.body).items
        assert len(item.get_bytes()) <= MAX_LOG_ITEM_BYTES
    last = logs_of(decode(encoded.batches[-1].payload.body))[-1]
    assert last["attributes"]["truncated"] == {"value": True, "type": "boolean"}
    assert last["body"].startswith("éééé") and len(last["body"]) < 3_000_000


def test_encode_traceback_record_gives_event_first_and_a_log() -> None:
    text, _ = chained_traceback()
    records = [rec("before"), rec("prewarm caught an error\n" + text, level=Level.ERROR), rec("after")]
    encoded = encode(records, TRACE)
    assert [b.payload.categories for b in encoded.batches] == [EVENT_CATEGORIES, LOG_CATEGORIES]
    assert list(encoded.batches[0].records) == []  # the record is counted once, by its log
    assert len(encoded.batches[1].records) == 3
    # deterministic event id: re-encoding (a split) yields the same event
    assert encode(records[1:2], TRACE).batches[0].payload.event_id == encoded.batches[0].payload.event_id


def test_log_envelope_is_byte_for_byte_what_sentry_sdk_writes() -> None:
    records = [rec("plain"), rec("with attrs", level=Level.ERROR, job_id="AJ_1", pid=7, ratio=0.5, ok=True)]
    (batch,) = encode(records, TRACE).batches
    raw = gzip.decompress(batch.payload.body)
    (item,) = decode(batch.payload.body).items
    expected = Envelope(
        headers={"sdk": sentry.sdk_info()},
        items=[
            Item(
                payload=PayloadRef(bytes=item.get_bytes()),
                type="log",
                content_type=sentry.LOG_CONTENT_TYPE,
                headers={"item_count": 2},
            )
        ],
    ).serialize()
    assert raw == expected
    assert batch.size == len(raw) and batch.payload.items == 2


OTHER_TAGS = Tags(host="worker-8", source="agent-b", service="cloud.livekit.io")


def test_encoded_logs_are_the_plain_log_entries() -> None:
    """Pre-serialised tag attributes and the one dump per item give exactly the JSON of :func:`log_entry`, key order
    included, across changes of source and stream and with a record attribute named like a tag."""
    records = [
        rec("no attributes"),
        rec("attributes", name="livekit.agents", pid=4242, job_id="AJ_1"),
        rec("stderr line", stream="stderr"),
        rec("names a tag", host="spoofed", level=Level.WARNING, n=2**70, f=float("inf"), nested={"a": [1]}),
        Record(1_763_733_178_043_707_123, "other source", "stdout", OTHER_TAGS, Level.DEBUG, {"k": "v"}),
        Record(1_763_733_178_043_707_123, "other, bare", "stdout", OTHER_TAGS, None, None),
        rec("ids", trace_id="0AF7651916CD43DD8448EB211C80319C", span_id="b7ad6b7169203331"),
        rec("back to the first"),
    ]
    (batch,) = encode(records, TRACE).batches
    (item,) = decode(batch.payload.body).items
    expected = b'{"items":[' + b",".join(orjson.dumps(log_entry(r, TRACE)) for r in records) + b"]}"
    assert item.get_bytes() == expected
    logs = logs_of(decode(batch.payload.body))
    assert list(logs[3]["attributes"])[:2] == ["host", "n"]  # the record's key keeps its place...
    assert logs[3]["attributes"]["host"] == {"value": "worker-7", "type": "string"}  # ...with the tag's value
    assert logs[4]["attributes"]["host"] == {"value": "worker-8", "type": "string"}
    assert logs[5]["attributes"] == {
        "host": {"value": "worker-8", "type": "string"},
        "source": {"value": "agent-b", "type": "string"},
        "service": {"value": "cloud.livekit.io", "type": "string"},
        "stream": {"value": "stdout", "type": "string"},
    }
    assert logs[2]["attributes"]["stream"] == {"value": "stderr", "type": "string"}
    assert (logs[6]["trace_id"], logs[6]["span_id"]) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    assert "span_id" not in logs[7] and logs[7]["trace_id"] == TRACE


def test_encode_packs_greedily_when_100_logs_pass_the_item_limit() -> None:
    """Logs of ~15 kB (100 of them pass 1 MiB) and one that alone passes it, mid-chunk: every item within the limit,
    each item full (the next log would not have fit), nothing lost or reordered."""
    records = [rec(f"{i:04d} " + "z" * (15_000 + 37 * (i % 11))) for i in range(400)]
    records[150] = rec("0150 " + "q" * 2_000_000)
    encoded = encode(records, TRACE)
    sizes = [len(orjson.dumps(log_entry(r, TRACE))) for r in records]
    bodies: list[str] = []
    at = 0
    for batch in encoded.batches:
        (item,) = decode(batch.payload.body).items
        payload = item.get_bytes()
        count = len(batch.records)
        assert len(payload) <= MAX_LOG_ITEM_BYTES and 0 < count <= MAX_LOGS_PER_ENVELOPE
        assert item.headers["item_count"] == count and list(batch.records) == records[at : at + count]
        at += count
        if at < len(records) and count < MAX_LOGS_PER_ENVELOPE:
            assert len(payload) + 1 + min(sizes[at], MAX_LOG_ITEM_BYTES) > MAX_LOG_ITEM_BYTES
        bodies += [log["body"][:4] for log in logs_of(decode(batch.payload.body))]
    assert at == len(records) and bodies == [f"{i:04d}" for i in range(400)]
    assert len(encoded.batches) > 400 // MAX_LOGS_PER_ENVELOPE  # the byte limit, not the count, cut them
    cut = [log for batch in encoded.batches for log in logs_of(decode(batch.payload.body)) if log["body"][:4] == "0150"]
    assert cut[0]["attributes"]["truncated"] == {"value": True, "type": "boolean"}


def test_encode_events_first_in_record_order_across_envelopes() -> None:
    text, _ = chained_traceback()
    records = [rec(f"line {i}") for i in range(250)]
    for i in (5, 150, 240):
        records[i] = rec(f"job {i} crashed\n" + text, level=Level.ERROR)
    records[200] = rec("structured", level=Level.ERROR, exc_info=SIMPLE)
    encoded = encode(records, TRACE)
    events = [b for b in encoded.batches if b.payload.categories == EVENT_CATEGORIES]
    logs = [b for b in encoded.batches if b.payload.categories == LOG_CATEGORIES]
    assert encoded.batches == events + logs
    assert [len(b.records) for b in logs] == [100, 100, 50]
    singles = [encode([records[i]], TRACE).batches[0].payload.event_id for i in (5, 150, 200, 240)]
    assert [b.payload.event_id for b in events] == singles


# --- classify -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "categories", "outcome", "after", "loud"),
    [
        (200, {}, LOG_CATEGORIES, Outcome.OK, None, False),
        (202, {"X-Sentry-Rate-Limits": "60::organization"}, LOG_CATEGORIES, Outcome.OK, None, False),
        (429, {"X-Sentry-Rate-Limits": "2:log_item:organization"}, LOG_CATEGORIES, Outcome.RETRY, 2.0, False),
        (
            429,
            {"X-Sentry-Rate-Limits": "2:log_item:organization", "Retry-After": "30"},
            EVENT_CATEGORIES,
            Outcome.RETRY,
            30.0,
            False,
        ),
        (
            429,
            {"X-Sentry-Rate-Limits": "60:transaction:key, 2700:default;error;security:organization"},
            EVENT_CATEGORIES,
            Outcome.RETRY,
            2700.0,
            False,
        ),
        (429, {"X-Sentry-Rate-Limits": "5::organization:quota"}, LOG_CATEGORIES, Outcome.RETRY, 5.0, False),
        (
            429,
            {"X-Sentry-Rate-Limits": "7.5:log_byte:project:usage_exceeded"},
            LOG_CATEGORIES,
            Outcome.RETRY,
            7.5,
            False,
        ),
        (429, {"Retry-After": "12"}, LOG_CATEGORIES, Outcome.RETRY, 12.0, False),
        (429, {}, LOG_CATEGORIES, Outcome.RETRY, 60.0, False),
        (413, {}, LOG_CATEGORIES, Outcome.SPLIT, None, False),
        (400, {}, LOG_CATEGORIES, Outcome.DROP, None, True),
        (401, {}, LOG_CATEGORIES, Outcome.RETRY, None, True),
        (403, {"Retry-After": "5"}, LOG_CATEGORIES, Outcome.RETRY, 5.0, True),
        (408, {}, LOG_CATEGORIES, Outcome.RETRY, None, False),
        (500, {}, LOG_CATEGORIES, Outcome.RETRY, None, False),
        (503, {"Retry-After": "3"}, EVENT_CATEGORIES, Outcome.RETRY, 3.0, False),
        (404, {}, LOG_CATEGORIES, Outcome.DROP, None, True),
    ],
)
def test_classify_table(
    status: int,
    headers: dict[str, str],
    categories: frozenset[str],
    outcome: Outcome,
    after: float | None,
    loud: bool,
) -> None:
    verdict = classify(status, httpx.Headers(headers), "body", categories)
    assert (verdict.outcome, verdict.after, verdict.loud) == (outcome, after, loud)
    if outcome is Outcome.DROP:
        assert verdict.reason == f"http_{status}"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, []),
        ("2:log_item:organization", [RateLimit(2.0, frozenset({"log_item"}))]),
        (
            "60:transaction:key, 2700:default;error;security:organization",
            [
                RateLimit(60.0, frozenset({"transaction"})),
                RateLimit(2700.0, frozenset({"default", "error", "security"})),
            ],
        ),
        ("60::organization, 2700::organization", [RateLimit(60.0, frozenset()), RateLimit(2700.0, frozenset())]),
        ("2700:metric_bucket:organization:quota_exceeded:custom", [RateLimit(2700.0, frozenset({"metric_bucket"}))]),
        (" 1.5 : log_item ; log_byte : key ", [RateLimit(1.5, frozenset({"log_item", "log_byte"}))]),
        ("soon:error:key, -1:error:key, 3", [RateLimit(3.0, frozenset())]),
    ],
)
def test_parse_rate_limits_table(header: str | None, expected: list[RateLimit]) -> None:
    assert parse_rate_limits(header) == expected


def test_rate_limiter_keeps_longest_per_category_and_all() -> None:
    limiter = RateLimiter()
    limiter.apply([RateLimit(2.0, frozenset({"log_item"}))], now=100.0)
    limiter.apply([RateLimit(1.0, frozenset({"log_item"}))], now=100.0)  # shorter: ignored
    limiter.apply([RateLimit(10.0, frozenset({"unknown_category"}))], now=100.0)
    assert limiter.remaining(LOG_CATEGORIES, 100.5) == pytest.approx(1.5)
    assert limiter.remaining(EVENT_CATEGORIES, 100.5) == 0.0
    assert limiter.remaining(LOG_CATEGORIES, 102.0) == 0.0
    limiter.apply([RateLimit(4.0, frozenset())], now=200.0)
    assert limiter.remaining(EVENT_CATEGORIES, 201.0) == pytest.approx(3.0)


# --- the sink on the wire -------------------------------------------------------------------------------------------


class FakeClock:
    """The sink's rate-limit clock, advanced by the retry loop's recorded sleeps (no wall-clock waiting)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def dsn(httpserver: HTTPServer) -> str:
    return f"https://{KEY}@localhost:{httpserver.port}/42"


@pytest.fixture
def http(ca_file: Path) -> HttpSettings:
    return HttpSettings(ca_file=str(ca_file), timeout_s=10.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sink(dsn: str, http: HttpSettings, clock: FakeClock) -> AsyncIterator[SentrySink]:
    config = config_from_env({"SENTRY_DSN": dsn})
    assert config is not None
    made = SentrySink(config, http, clock=clock)
    yield made
    await made.aclose()


def runner_for(sink: SentrySink) -> DestinationRunner:
    return DestinationRunner(sink, MemoryBuffer(10**9), DestinationStats("sentry"), RetryPolicy(initial_s=0.001))


async def test_wire_envelope_headers_auth_and_typed_tags(httpserver: HTTPServer, sink: SentrySink) -> None:
    """Done when 1: envelope header, item headers, X-Sentry-Auth, four typed tags, <= 100 logs per envelope."""
    httpserver.expect_request(PATH, method="POST").respond_with_json({})
    records = [rec(f"line {i}", level=Level.WARNING if i % 2 else None, job_id="AJ_1") for i in range(230)]
    runner = runner_for(sink)
    await runner.deliver_records(records)
    assert runner.stats.delivered == 230 and not runner.stats.dropped
    got = received(httpserver)
    assert len(got) == 3
    bodies = []
    for request, envelope in got:
        assert request.headers["Content-Encoding"] == "gzip"
        assert request.headers["Content-Type"] == "application/x-sentry-envelope"
        auth = request.headers["X-Sentry-Auth"]
        assert auth.startswith("Sentry ")
        fields = dict(part.strip().split("=", 1) for part in auth[len("Sentry ") :].split(","))
        assert fields == {"sentry_key": KEY, "sentry_version": "7", "sentry_client": sentry.SENTRY_CLIENT}
        assert envelope.headers["sdk"]["name"] == "forwarder"
        assert {"name": "pypi:sentry-sdk", "version": sentry_sdk.VERSION} in envelope.headers["sdk"]["packages"]
        (item,) = envelope.items
        assert item.headers["type"] == "log"
        assert item.headers["content_type"] == "application/vnd.sentry.items.log+json"
        logs = logs_of(envelope)
        assert item.headers["item_count"] == len(logs) <= MAX_LOGS_PER_ENVELOPE
        for log in logs:
            assert log["trace_id"] == sink.trace_id and len(log["trace_id"]) == 32
            assert isinstance(log["timestamp"], float)
            assert log["level"] in ("info", "warn")
            assert log["severity_number"] == {"info": 9, "warn": 13}[log["level"]]
            for tag, value in (
                ("host", "worker-7"),
                ("source", "agent-a"),
                ("service", "cloud.livekit.io"),
                ("stream", "stdout"),
            ):
                assert log["attributes"][tag] == {"value": value, "type": "string"}
            assert log["attributes"]["job_id"] == {"value": "AJ_1", "type": "string"}
            bodies.append(log["body"])
    assert bodies == [f"line {i}" for i in range(230)]


async def test_ten_thousand_records_arrive_exactly_once(httpserver: HTTPServer, sink: SentrySink) -> None:
    """Done when 2: 10,000 records sent as fast as possible all arrive, once, in order."""
    httpserver.expect_request(PATH, method="POST").respond_with_json({})
    records = [rec(f"record {i}", seq=i) for i in range(10_000)]
    runner = runner_for(sink)
    await runner.deliver_records(records)
    seqs = [log["attributes"]["seq"]["value"] for _, envelope in received(httpserver) for log in logs_of(envelope)]
    assert seqs == list(range(10_000))
    assert len(httpserver.log) == 100
    assert runner.stats.delivered == 10_000 and not runner.stats.dropped and runner.stats.retries == 0


@pytest.mark.parametrize("where", ["message", "exc_info"])
async def test_chained_traceback_arrives_as_event_and_log(httpserver: HTTPServer, sink: SentrySink, where: str) -> None:
    """Done when 3: the event's exception list and frames match the traceback; the record is also a log."""
    httpserver.expect_request(PATH, method="POST").respond_with_json({})
    text, chain = chained_traceback()
    if where == "message":
        record = rec("job crashed\n" + text, level=Level.ERROR, name="demo-agent")
    else:
        record = rec("job crashed\n" + text, level=Level.ERROR, name="demo-agent", exc_info=text)
    runner = runner_for(sink)
    await runner.deliver_records([rec("first"), record])
    assert runner.stats.delivered == 2
    events = [e for _, env in received(httpserver) for e in events_of(env)]
    logs = [log for _, env in received(httpserver) for log in logs_of(env)]
    assert [log["body"] for log in logs] == ["first", "job crashed\n" + text]
    assert logs[1]["level"] == "error"
    (event,) = events
    (_, envelope) = received(httpserver)[0]
    assert envelope.headers["event_id"] == event["event_id"] and len(event["event_id"]) == 32
    assert envelope.items[0].headers["type"] == "event"
    assert event["level"] == "error" and event["platform"] == "python" and event["logger"] == "demo-agent"
    assert event["tags"] == {"host": "worker-7", "source": "agent-a", "service": "cloud.livekit.io", "stream": "stdout"}
    assert event["logentry"] == {"formatted": "job crashed"}
    assert event["contexts"]["trace"]["trace_id"] == sink.trace_id
    values = event["exception"]["values"]
    assert [(v["type"], v["value"]) for v in values] == [
        ("KeyError", "'missing'"),
        ("RuntimeError", "job failed while handling the room"),
    ]
    for value, real in zip(values, chain, strict=True):
        expected = [(f.filename, f.lineno, f.name, f.line) for f in traceback.extract_tb(real.__traceback__)]
        frames = value["stacktrace"]["frames"]
        assert [(f["filename"], f["lineno"], f["function"], f["context_line"]) for f in frames] == expected
        assert all(f["in_app"] for f in frames)
        assert value["mechanism"] == {"type": "forwarder", "handled": True}
    assert "exc_info" not in event.get("extra", {})


async def test_raw_stderr_traceback_is_unhandled_and_deduplicated(httpserver: HTTPServer, sink: SentrySink) -> None:
    httpserver.expect_request(PATH, method="POST").respond_with_json({})
    record = rec(SIMPLE, level=None, stream="stderr")
    encoded = sink.encode([record])
    event_batch = encoded.batches[0]
    assert (await sink.send(event_batch)).outcome is Outcome.OK
    # the same event again (a re-encoded split, or a replay): not sent twice
    assert (await sink.send(sink.encode([record]).batches[0])).outcome is Outcome.OK
    (event,) = [e for _, env in received(httpserver) for e in events_of(env)]
    assert event["tags"]["stream"] == "stderr"
    assert event["exception"]["values"][0]["mechanism"]["handled"] is False
    assert "logentry" not in event


async def test_log_rate_limit_delays_only_logs(httpserver: HTTPServer, sink: SentrySink, clock: FakeClock) -> None:
    """Done when 4: a 429 with ``2:log_item:organization`` delays logs by 2 s (recorded, not slept); issue events
    go out meanwhile; every record is delivered afterwards."""
    calls: list[str] = []

    def handler(request: Request) -> Response:
        kind = decode(request.get_data()).items[0].headers["type"]
        calls.append(kind)
        if kind == "log" and calls.count("log") == 1:
            return Response(
                "", status=429, headers={"X-Sentry-Rate-Limits": "2:log_item:organization", "Retry-After": "2"}
            )
        return Response("{}", status=200)

    httpserver.expect_request(PATH, method="POST").respond_with_handler(handler)
    logs_a = sink.encode([rec(f"a{i}") for i in range(150)]).batches
    event_b = sink.encode([rec(SIMPLE, level=Level.ERROR)]).batches[0]

    first = await sink.send(logs_a[0])
    assert (first.outcome, first.after, first.reason) == (Outcome.RETRY, 2.0, "rate_limited")
    # logs are held without a request while the limit lasts; issue events are not
    held = await sink.send(logs_a[1])
    assert (held.outcome, held.after) == (Outcome.RETRY, 2.0)
    assert calls == ["log"]
    assert (await sink.send(event_b)).outcome is Outcome.OK
    assert calls == ["log", "event"]

    verdicts: list[Verdict] = []
    for batch in logs_a:
        verdicts.append(
            await deliver(functools.partial(sink.send, batch), RetryPolicy(initial_s=0.001), sleep=clock.sleep)
        )
    assert all(v.outcome is Outcome.OK for v in verdicts)
    assert clock.sleeps == [pytest.approx(2.0)]
    assert calls == ["log", "event", "log", "log"]
    bodies = [log["body"] for _, env in received(httpserver) for log in logs_of(env)]
    assert bodies == [f"a{i}" for i in range(100)] + [f"a{i}" for i in range(150)]  # first try was refused


async def test_long_error_quota_drops_events_not_logs(httpserver: HTTPServer, sink: SentrySink) -> None:
    httpserver.expect_request(PATH, method="POST").respond_with_data(
        "", status=200, headers={"X-Sentry-Rate-Limits": "86400:error:organization:usage_exceeded"}
    )
    encoded = sink.encode([rec("ok"), rec(SIMPLE, level=Level.ERROR)])
    event_batch, log_batch = encoded.batches
    assert (await sink.send(log_batch)).outcome is Outcome.OK  # announces the error quota (200 + header)
    verdict = await sink.send(event_batch)
    assert (verdict.outcome, verdict.reason) == (Outcome.DROP, "rate_limited")
    assert sink.events_dropped == {"rate_limited": 1}
    assert len(httpserver.log) == 1  # the event was not sent
    assert (await sink.send(sink.encode([rec("more")]).batches[0])).outcome is Outcome.OK


async def test_413_splits_until_accepted(httpserver: HTTPServer, sink: SentrySink) -> None:
    def handler(request: Request) -> Response:
        count = decode(request.get_data()).items[0].headers["item_count"]
        return Response("", status=413) if count > 30 else Response("{}", status=200)

    httpserver.expect_request(PATH, method="POST").respond_with_handler(handler)
    runner = runner_for(sink)
    await runner.deliver_records([rec(f"s{i}") for i in range(100)])
    accepted = [
        log["body"]
        for (_, response), (_, envelope) in zip(httpserver.log, received(httpserver), strict=True)
        if response.status_code == 200
        for log in logs_of(envelope)
    ]
    assert accepted == [f"s{i}" for i in range(100)]
    assert runner.stats.delivered == 100 and not runner.stats.dropped


async def test_400_drops_logs_counted_and_events_counted(httpserver: HTTPServer, sink: SentrySink) -> None:
    httpserver.expect_request(PATH, method="POST").respond_with_data('{"detail":"invalid envelope"}', status=400)
    runner = runner_for(sink)
    await runner.deliver_records([rec("a"), rec(SIMPLE, level=Level.ERROR)])
    assert runner.stats.delivered == 0
    assert runner.stats.dropped == {"http_400": 2}
    assert sink.events_dropped == {"http_400": 1}
    assert len(httpserver.log) == 2  # one attempt each, no retries


async def test_401_is_a_loud_retry_and_5xx_retries(httpserver: HTTPServer, sink: SentrySink) -> None:
    httpserver.expect_oneshot_request(PATH, method="POST").respond_with_data("bad key", status=401)
    httpserver.expect_oneshot_request(PATH, method="POST").respond_with_data("oops", status=502)
    batch = sink.encode([rec("a")]).batches[0]
    first = await sink.send(batch)
    assert (first.outcome, first.loud, first.reason) == (Outcome.RETRY, True, "http_401")
    assert KEY not in first.detail
    second = await sink.send(batch)
    assert (second.outcome, second.reason) == (Outcome.RETRY, "http_502")


async def test_network_error_is_retry(http: HttpSettings) -> None:
    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    port = server.port
    server.stop()  # nothing listens there any more
    made = SentryConfig(Secret(f"http://{KEY}@127.0.0.1:{port}/42")).build(http)
    try:
        verdict = await made.send(made.encode([rec("a")]).batches[0])
    finally:
        await made.aclose()
    assert (verdict.outcome, verdict.reason) == (Outcome.RETRY, "network")
    assert KEY not in verdict.detail and KEY not in repr(made)


def test_untrusted_tls_is_rejected(httpserver: HTTPServer, dsn: str) -> None:
    # without our CA the trustme certificate is not trusted: a network RETRY, never plaintext fallback
    import trio

    async def main() -> Verdict:
        made = SentryConfig(Secret(dsn)).build(HttpSettings())
        try:
            return await made.send(made.encode([rec("a")]).batches[0])
        finally:
            await made.aclose()

    verdict = trio.run(main)
    assert verdict.outcome is Outcome.RETRY
    assert "certificate" in verdict.detail.lower() or "ssl" in verdict.detail.lower()
    assert len(httpserver.log) == 0
