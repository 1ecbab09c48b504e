"""Datadog destination: config, encode() and classify() tables, and the sink against an HTTPS intake on loopback.

The intake is pytest-httpserver serving HTTPS with a trustme certificate; every assertion about delivery is made on
what arrived there (path, headers, query, gzip body).
"""

from __future__ import annotations

import gc
import gzip
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import trio
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from forwarder.config import ConfigError, HttpSettings, load
from forwarder.delivery.buffer import MemoryBuffer
from forwarder.delivery.destination import DestinationRunner, DestinationStats
from forwarder.delivery.retry import RetryPolicy, deliver
from forwarder.record import Level, Record, Tags
from forwarder.sinks import datadog
from forwarder.sinks._protocol import Batch, Outcome, Verdict

API_KEY = "0123456789abcdef0123456789abcdef"
CLIENT_TOKEN = "pub0123456789abcdef0123456789abcd"
TAGS = Tags(host="worker-7", source="CA_agent42", service="cloud.livekit.io")
NOW_NS = 1_800_000_000_000_000_000  # 2027-01-15T08:00:00Z
HOUR_NS = 3600 * 1_000_000_000
INTAKE_PATH = "/api/v2/logs"


def rec(
    message: str = "hello",
    *,
    stream: str = "stdout",
    level: Level | None = Level.INFO,
    attributes: dict[str, Any] | None = None,
    ts: int = NOW_NS,
    event: int | None = None,
    tags: Tags = TAGS,
) -> Record:
    return Record(ts, message, stream, tags, level, attributes, event)


def decode_batch(batch: Batch) -> list[dict[str, Any]]:
    raw = gzip.decompress(batch.payload)
    assert len(raw) == batch.size
    objects = json.loads(raw)
    assert isinstance(objects, list)
    return objects


# ---------------------------------------------------------------------------------------------------------------------
# Config

EXPECTED_URLS = [
    # region, API-key URL, client-token URL (hosts as in Datadog's docs and its browser SDK's buildEndpointHost)
    ("us1", "https://http-intake.logs.datadoghq.com", "https://browser-intake-datadoghq.com"),
    ("us3", "https://http-intake.logs.us3.datadoghq.com", "https://browser-intake-us3-datadoghq.com"),
    ("us5", "https://http-intake.logs.us5.datadoghq.com", "https://browser-intake-us5-datadoghq.com"),
    ("eu", "https://http-intake.logs.datadoghq.eu", "https://browser-intake-datadoghq.eu"),
    ("ap1", "https://http-intake.logs.ap1.datadoghq.com", "https://browser-intake-ap1-datadoghq.com"),
    ("ap2", "https://http-intake.logs.ap2.datadoghq.com", "https://browser-intake-ap2-datadoghq.com"),
    ("us1-fed", "https://http-intake.logs.ddog-gov.com", "https://browser-intake-ddog-gov.com"),
]


@pytest.mark.parametrize(("region", "api_url", "client_url"), EXPECTED_URLS)
def test_every_region_and_token_kind_selects_its_intake(region: str, api_url: str, client_url: str) -> None:
    api = datadog.config_from_env({"DATADOG_TOKEN": API_KEY, "DATADOG_REGION": region})
    client = datadog.config_from_env({"DATADOG_TOKEN": CLIENT_TOKEN, "DATADOG_REGION": region.upper()})
    assert api is not None and client is not None
    assert (api.client_token, client.client_token) == (False, True)
    assert api.endpoint() == api_url + "/api/v2/logs"
    assert client.endpoint() == client_url + "/api/v2/logs"
    assert api.region == client.region == region


def test_region_defaults_to_us1_and_token_is_stripped() -> None:
    config = datadog.config_from_env({"DATADOG_TOKEN": f"  {API_KEY}\n"})
    assert config is not None
    assert config.region == "us1"
    assert config.endpoint() == "https://http-intake.logs.datadoghq.com/api/v2/logs"
    assert config.token.reveal() == API_KEY
    assert config.name == "datadog"


@pytest.mark.parametrize("env", [{}, {"DATADOG_TOKEN": ""}, {"DATADOG_TOKEN": "   "}, {"DATADOG_REGION": "mars"}])
def test_not_enabled_without_a_token(env: dict[str, str]) -> None:
    assert datadog.config_from_env(env) is None


def test_unknown_region_names_every_accepted_value_and_not_the_token() -> None:
    with pytest.raises(ConfigError) as info:
        datadog.config_from_env({"DATADOG_TOKEN": CLIENT_TOKEN, "DATADOG_REGION": "mars"})
    assert info.value.variable == "DATADOG_REGION"
    message = str(info.value)
    for region in ("us1", "us3", "us5", "eu", "ap1", "ap2", "us1-fed"):
        assert region in message
    assert "mars" in message
    assert CLIENT_TOKEN not in message and "\n" not in message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://127.0.0.1:8443", "https://127.0.0.1:8443/api/v2/logs"),
        ("http://localhost:9000/", "http://localhost:9000/api/v2/logs"),
        ("https://proxy.internal/datadog", "https://proxy.internal/datadog/api/v2/logs"),
        ("https://proxy.internal/api/v2/logs", "https://proxy.internal/api/v2/logs"),
        ("https://[::1]:8443", "https://[::1]:8443/api/v2/logs"),
    ],
)
def test_url_override_is_a_base_url(raw: str, expected: str) -> None:
    for token in (API_KEY, CLIENT_TOKEN):
        config = datadog.config_from_env({"DATADOG_TOKEN": token, "DATADOG_REGION": "eu", "FORWARDER_DATADOG_URL": raw})
        assert config is not None
        assert config.endpoint() == expected


@pytest.mark.parametrize(
    "raw",
    ["ftp://host", "localhost:8080", "https://", "https://u:p@host", "https://host?x=1", "https://host#f",
     "https://host:99999", "not a url"],
)  # fmt: skip
def test_bad_url_override_is_a_config_error(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        datadog.config_from_env({"DATADOG_TOKEN": API_KEY, "FORWARDER_DATADOG_URL": raw})
    assert info.value.variable == "FORWARDER_DATADOG_URL"
    assert "http(s)://HOST" in info.value.problem
    assert "u:p" not in info.value.problem


def test_token_with_whitespace_inside_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as info:
        datadog.config_from_env({"DATADOG_TOKEN": "abc def0123456789"})
    assert info.value.variable == "DATADOG_TOKEN"
    assert "abc def" not in str(info.value)


def test_config_never_shows_the_token() -> None:
    for token in (API_KEY, CLIENT_TOKEN):
        config = datadog.config_from_env({"DATADOG_TOKEN": token})
        assert config is not None
        for text in (repr(config), str(config), config.endpoint(), repr(config.build(HttpSettings()))):
            assert token not in text
        assert token in config.secret_values()


# ---------------------------------------------------------------------------------------------------------------------
# encode()


def test_record_shape_status_tags_and_attributes() -> None:
    records = [
        rec("job started", level=Level.INFO, attributes={"job_id": "AJ_1", "pid": 7, "code.line.number": 12}),
        rec("Traceback (most recent call last):\n  boom", stream="stderr", level=Level.ERROR),
        rec("plain line", level=None),
        rec("warned", level=Level.WARNING, attributes={}),
        rec("dbg", level=Level.DEBUG),
        rec("fatal", level=Level.CRITICAL),
    ]
    [batch] = datadog.encode(records, now_ns=NOW_NS).batches
    assert list(batch.records) == records
    objects = decode_batch(batch)
    base = {
        "hostname": "worker-7",
        "ddsource": "CA_agent42",
        "service": "cloud.livekit.io",
        "timestamp": 1_800_000_000_000,
    }
    out = {"ddtags": "stream:stdout", "stream": "stdout"}
    err = {"ddtags": "stream:stderr", "stream": "stderr"}
    assert objects == [
        {**base, **out, "message": "job started", "status": "info", "job_id": "AJ_1", "pid": 7, "code.line.number": 12},
        {**base, **err, "message": "Traceback (most recent call last):\n  boom", "status": "error"},
        {**base, **out, "message": "plain line"},  # no level: no status (Datadog shows info)
        {**base, **out, "message": "warned", "status": "warning"},
        {**base, **out, "message": "dbg", "status": "debug"},
        {**base, **out, "message": "fatal", "status": "critical"},
    ]


def test_attributes_never_overwrite_reserved_fields() -> None:
    attributes = {
        "message": "from json",
        "status": "ok",
        "timestamp": "2026-11-21T13:52:58.043707+00:00",
        "host": "other",
        "hostname": "other",
        "service": "other",
        "ddtags": "evil:1",
        "stream": "x",
        "level": "INFO",
        "name": "livekit.agents",
    }
    [batch] = datadog.encode([rec("real", attributes=attributes)], now_ns=NOW_NS).batches
    [obj] = decode_batch(batch)
    assert obj["message"] == "real"
    assert obj["status"] == "info"
    assert obj["timestamp"] == NOW_NS // 1_000_000
    assert (obj["hostname"], obj["service"], obj["ddtags"], obj["stream"]) == (
        "worker-7",
        "cloud.livekit.io",
        "stream:stdout",
        "stdout",
    )
    assert "host" not in obj
    assert (obj["level"], obj["name"]) == ("INFO", "livekit.agents")
    clashing = {k: v for k, v in attributes.items() if k not in ("level", "name")}
    assert obj["attributes"] == clashing


@pytest.mark.parametrize(
    ("event", "captured", "expected_ms", "original_ms"),
    [
        (NOW_NS - 5 * HOUR_NS, NOW_NS, (NOW_NS - 5 * HOUR_NS) // 10**6, None),  # event time, recent: used
        (None, NOW_NS - 1000, (NOW_NS - 1000) // 10**6, None),  # no event time: capture time
        (NOW_NS - 19 * HOUR_NS, NOW_NS, NOW_NS // 10**6, None),  # event too old for Datadog: capture time
        (NOW_NS + 3 * HOUR_NS, NOW_NS, NOW_NS // 10**6, None),  # event far in the future: capture time
        (NOW_NS + HOUR_NS, NOW_NS, (NOW_NS + HOUR_NS) // 10**6, None),  # small clock skew: event time
        (None, NOW_NS - 20 * HOUR_NS, NOW_NS // 10**6, (NOW_NS - 20 * HOUR_NS) // 10**6),  # spooled > 18 h: now
        (NOW_NS - 30 * HOUR_NS, NOW_NS - 20 * HOUR_NS, NOW_NS // 10**6, (NOW_NS - 30 * HOUR_NS) // 10**6),
    ],
)
def test_timestamp_stays_inside_datadogs_18_hour_window(
    event: int | None, captured: int, expected_ms: int, original_ms: int | None
) -> None:
    [batch] = datadog.encode([rec(ts=captured, event=event)], now_ns=NOW_NS).batches
    [obj] = decode_batch(batch)
    assert obj["timestamp"] == expected_ms
    assert obj.get("original_timestamp") == original_ms
    assert NOW_NS // 10**6 - obj["timestamp"] <= datadog.MAX_AGE_NS // 10**6


def test_fast_path_and_dict_path_agree() -> None:
    other_tags = Tags(host='h"ost', source="src\\x", service="svc é")
    records = [
        rec(),
        rec('ünïcødé ✓ \x00\x1f "quoted"', stream="stderr", level=None, tags=other_tags),
        rec("attrs", attributes={"a": [1, 2.5, None, True], "b": {"c": "d"}, "e": "é"}, level=Level.ERROR),
        rec("odd stream", stream="custom", level=Level.DEBUG, event=NOW_NS - HOUR_NS),
        rec("clash", attributes={"timestamp": 1, "x": 2}),
        rec("old", ts=NOW_NS - 30 * HOUR_NS),
    ]
    [batch] = datadog.encode(records, now_ns=NOW_NS).batches
    via_dict = [json.loads(datadog.encode_record(r, NOW_NS)) for r in records]
    assert decode_batch(batch) == via_dict


def test_unencodable_values_still_make_valid_json() -> None:
    weird: dict[Any, Any] = {"surrogate": "\ud800x", "big": 2**70, "nan": float("nan"), "obj": object(), 5: "int key"}
    records = [rec("bad \udcff message"), rec("fine", attributes=weird), rec("after")]
    [batch] = datadog.encode(records, now_ns=NOW_NS).batches
    objects = decode_batch(batch)
    assert [o["message"] for o in objects] == ["bad \ufffd message", "fine", "after"]
    assert objects[1]["big"] == str(2**70)
    assert objects[1]["nan"] is None
    assert objects[1]["surrogate"] == "\ufffdx"
    assert objects[1]["5"] == "int key"
    assert objects[1]["obj"].startswith("<object object")


def test_batches_respect_entry_and_byte_limits_in_order() -> None:
    # 2,500 small records (count-bound) then 600 of ~20 KB (byte-bound).
    records = [rec(f"small {i}") for i in range(2500)] + [rec(f"big {i} " + "x" * 20_000) for i in range(600)]
    encoded = datadog.encode(records, now_ns=NOW_NS)
    assert encoded.dropped == {}
    seen: list[str] = []
    for batch in encoded.batches:
        objects = decode_batch(batch)
        assert len(objects) == len(batch.records) <= datadog.MAX_ENTRIES
        assert batch.size <= datadog.BATCH_GOAL_BYTES < datadog.MAX_CONTENT_BYTES
        assert [o["message"] for o in objects] == [r.message for r in batch.records]
        seen.extend(o["message"] for o in objects)
    assert seen == [r.message for r in records]
    sizes = [len(b.records) for b in encoded.batches]
    assert sizes[:2] == [1000, 1000]
    assert max(sizes[3:]) < 1000  # the big records filled batches by bytes
    # Byte-bound batches are nearly full: the next record would not have fitted.
    assert encoded.batches[3].size > datadog.BATCH_GOAL_BYTES - 21_000


def test_custom_goal_and_entries_are_capped_by_the_api_limits() -> None:
    records = [rec(f"m{i}") for i in range(30)]
    encoded = datadog.encode(records, now_ns=NOW_NS, max_entries=7)
    assert [len(b.records) for b in encoded.batches] == [7, 7, 7, 7, 2]
    encoded = datadog.encode(records, now_ns=NOW_NS, max_entries=10**6, goal_bytes=10**9)
    assert [len(b.records) for b in encoded.batches] == [30]


@pytest.mark.parametrize(
    "message",
    [
        "a" * 3_000_000,  # ASCII
        "é" * 1_500_000,  # 2-byte characters: cut on a character boundary
        "\x01" * 400_000,  # each byte escaped to 6 in JSON
        "x" * 999_900,  # just over the limit once the other fields are added
    ],
)
def test_over_long_message_is_cut_and_marked(message: str) -> None:
    [batch] = datadog.encode([rec(message, attributes={"job_id": "AJ_1"})], now_ns=NOW_NS).batches
    [obj] = decode_batch(batch)
    assert batch.size - 2 <= datadog.CUT_TO_BYTES < datadog.MAX_LOG_BYTES
    assert obj["truncated"] is True
    assert message.startswith(obj["message"])
    assert len(obj["message"]) > 0.9 * min(len(message), datadog.MAX_LOG_BYTES / len(json.dumps(message[0])[1:-1]))
    assert obj["job_id"] == "AJ_1"
    assert obj["hostname"] == "worker-7"


def test_message_under_the_limit_is_not_marked() -> None:
    [batch] = datadog.encode([rec("y" * 900_000)], now_ns=NOW_NS).batches
    [obj] = decode_batch(batch)
    assert "truncated" not in obj
    assert len(obj["message"]) == 900_000


def test_huge_attributes_are_folded_into_the_cut_message() -> None:
    attributes = {"exc_info": "z" * 2_000_000, "timestamp": "clash"}
    [batch] = datadog.encode([rec("boom", attributes=attributes, level=Level.ERROR)], now_ns=NOW_NS).batches
    [obj] = decode_batch(batch)
    assert batch.size - 2 <= datadog.CUT_TO_BYTES < datadog.MAX_LOG_BYTES
    assert obj["truncated"] is True
    assert obj["message"].startswith('boom {"exc_info":"zzz')
    assert (obj["status"], obj["hostname"], obj["stream"]) == ("error", "worker-7", "stdout")
    assert "exc_info" not in obj and "attributes" not in obj


# encode() converts a whole batch with one orjson.dumps when it can; these check it against encoding each record
# alone (encode_record) and packing greedily, for inputs that take every fallback of that fast path.


def reference_batches(
    records: list[Record], *, max_entries: int = 1000, goal: int = datadog.BATCH_GOAL_BYTES
) -> list[tuple[int, list[dict[str, Any]], int]]:
    """(records in the batch, objects, array bytes) per batch, from encode_record and greedy packing."""
    batches: list[tuple[int, list[dict[str, Any]], int]] = []
    items: list[bytes] = []
    size = 1
    for record in records:
        item = datadog.encode_record(record, NOW_NS)
        if items and (len(items) >= max_entries or size + len(item) + 1 > goal):
            batches.append((len(items), [json.loads(i) for i in items], size))
            items, size = [], 1
        items.append(item)
        size += len(item) + 1
    if items:
        batches.append((len(items), [json.loads(i) for i in items], size))
    return batches


def assert_same_as_record_by_record(records: list[Record], **limits: int) -> list[Batch]:
    encoded = datadog.encode(records, now_ns=NOW_NS, **limits)
    assert encoded.dropped == {}
    expected = reference_batches(
        records, max_entries=limits.get("max_entries", 1000), goal=limits.get("goal_bytes", datadog.BATCH_GOAL_BYTES)
    )
    got = [(len(b.records), decode_batch(b), b.size) for b in encoded.batches]
    assert [(n, size) for n, _, size in got] == [(n, size) for n, _, size in expected]
    assert [objects for _, objects, _ in got] == [objects for _, objects, _ in expected]
    assert [r for b in encoded.batches for r in b.records] == records
    return encoded.batches


def json_line_record(i: int, **overrides: Any) -> Record:
    attributes = {"name": "livekit.agents", "pid": 4242, "job_id": f"AJ_{i}", "timestamp": f"2027-01-15T07:59:{i % 60}"}
    kwargs: dict[str, Any] = {"attributes": attributes, "event": NOW_NS - i * 1000, **overrides}
    return rec(f"json line {i}", **kwargs)


def test_fast_path_matches_record_by_record_on_typical_lines() -> None:
    records = [
        json_line_record(i) if i % 5 < 3 else rec(f"text {i}", level=None if i % 7 == 0 else Level.WARNING)
        for i in range(2_345)
    ]
    batches = assert_same_as_record_by_record(records)
    assert [len(b.records) for b in batches] == [1000, 1000, 345]


def test_fast_path_batch_over_the_byte_goal_is_packed_like_record_by_record() -> None:
    # 1,000 records of ~6 KB are ~6 MB, over BATCH_GOAL_BYTES; ~2 KB ones make a 1,000-entry batch over 1 MB.
    for size in (6_000, 2_000):
        records = [rec(f"{i} " + "w" * (size + 37 * (i % 11))) for i in range(2_500)]
        batches = assert_same_as_record_by_record(records)
        assert all(b.size <= datadog.BATCH_GOAL_BYTES for b in batches)
        if size == 6_000:
            assert all(len(b.records) < 1000 for b in batches)
            assert batches[0].size > datadog.BATCH_GOAL_BYTES - 7_000  # filled: the next record did not fit
        else:
            assert [len(b.records) for b in batches] == [1000, 1000, 500]
            assert batches[0].size > datadog.MAX_LOG_BYTES


def test_fast_path_with_a_record_over_the_log_limit_among_small_ones() -> None:
    records = [json_line_record(i) for i in range(1_500)]
    records[700] = rec("huge " + "h" * 1_200_000, attributes={"job_id": "AJ_huge", "timestamp": "t"})
    batches = assert_same_as_record_by_record(records)
    objects = [o for b in batches for o in decode_batch(b)]
    assert objects[700]["truncated"] is True and objects[700]["job_id"] == "AJ_huge"
    assert len(json.dumps(objects[700], separators=(",", ":")).encode()) <= datadog.CUT_TO_BYTES
    assert not any("truncated" in o for i, o in enumerate(objects) if i != 700)
    assert [o["message"] for o in objects[:3]] == ["json line 0", "json line 1", "json line 2"]


def test_fast_path_with_unencodable_values_among_fine_ones() -> None:
    records = [json_line_record(i) for i in range(1_200)]
    records[5] = rec("surrogate", attributes={"x": "\ud800"})
    int_key: dict[Any, Any] = {7: "seven", "timestamp": 1}
    records[600] = rec("int key", attributes=int_key)
    records[601] = rec("big int", attributes={"n": 2**70})
    records[1_100] = rec("bad \udcff message")
    batches = assert_same_as_record_by_record(records)
    objects = [o for b in batches for o in decode_batch(b)]
    assert objects[5]["x"] == "\ufffd"
    assert (objects[600]["7"], objects[600]["attributes"]) == ("seven", {"timestamp": 1})
    assert objects[601]["n"] == str(2**70)
    assert objects[1_100]["message"] == "bad \ufffd message"
    assert objects[4]["job_id"] == "AJ_4" and objects[1_199]["job_id"] == "AJ_1199"


def test_fast_path_with_old_records_and_reserved_attribute_names() -> None:
    records = [json_line_record(i) for i in range(1_000)]
    records[10] = json_line_record(10, ts=NOW_NS - 20 * HOUR_NS, event=None)
    records[11] = json_line_record(11, ts=NOW_NS - 30 * HOUR_NS, event=NOW_NS - 40 * HOUR_NS)
    records[12] = json_line_record(12, event=NOW_NS - 20 * HOUR_NS)  # event too old, capture time fresh
    records[13] = rec("clash", attributes={"host": "h", "status": "s", "date": "d", "timestamp": 1, "k": 2})
    records[14] = rec("attributes clash", attributes={"attributes": {"a": 1}})
    [batch] = assert_same_as_record_by_record(records)
    objects = decode_batch(batch)
    assert (objects[10]["timestamp"], objects[10]["original_timestamp"]) == (
        NOW_NS // 10**6,
        (NOW_NS - 20 * HOUR_NS) // 10**6,
    )
    assert objects[11]["original_timestamp"] == (NOW_NS - 40 * HOUR_NS) // 10**6
    assert objects[12]["timestamp"] == NOW_NS // 10**6 and "original_timestamp" not in objects[12]
    assert objects[13]["attributes"] == {"host": "h", "status": "s", "date": "d", "timestamp": 1}
    assert (objects[13]["k"], objects[13]["status"], objects[13]["hostname"]) == (2, "info", "worker-7")
    assert objects[14]["attributes"] == {"attributes": {"a": 1}}
    assert sum("original_timestamp" in o for o in objects) == 2


def test_fast_path_with_several_sources_streams_and_small_limits() -> None:
    other = Tags(host="worker-8", source="CA_other", service="svc")
    records = [
        json_line_record(i, tags=other if i % 3 == 0 else TAGS, stream="stderr" if i % 4 == 0 else "stdout")
        for i in range(300)
    ]
    records += [rec(f"custom {i}", stream="agent", level=Level(10 * (1 + i % 5))) for i in range(50)]
    assert_same_as_record_by_record(records)
    assert_same_as_record_by_record(records, max_entries=7)
    assert_same_as_record_by_record(records, goal_bytes=5_000)
    batches = assert_same_as_record_by_record(records, goal_bytes=100)  # each record alone is over the goal
    assert all(len(b.records) == 1 for b in batches)


def test_tags_that_do_not_encode_are_sanitised_like_attributes() -> None:
    bad = Tags(host="worker-\ud800", source="CA_agent42", service="cloud.livekit.io")
    records = [rec("a", tags=bad), rec("b"), json_line_record(1, tags=bad)]
    batches = assert_same_as_record_by_record(records)
    assert [o["hostname"] for o in decode_batch(batches[0])] == ["worker-\ufffd", "worker-7", "worker-\ufffd"]


# ---------------------------------------------------------------------------------------------------------------------
# classify()


def response(status: int, headers: dict[str, str] | None = None, body: str = "") -> httpx.Response:
    return httpx.Response(status, headers=headers, text=body)


@pytest.mark.parametrize(
    ("status", "headers", "outcome", "reason", "after", "loud"),
    [
        (200, {}, Outcome.OK, "", None, False),
        (202, {}, Outcome.OK, "", None, False),
        (204, {}, Outcome.OK, "", None, False),
        (400, {}, Outcome.DROP, "http_400", None, True),
        (401, {}, Outcome.RETRY, "http_401", None, True),
        (403, {"Retry-After": "30"}, Outcome.RETRY, "http_403", 30.0, True),
        (404, {}, Outcome.DROP, "http_404", None, True),
        (408, {}, Outcome.RETRY, "http_408", None, False),
        (413, {}, Outcome.SPLIT, "too_large", None, False),
        (429, {"Retry-After": "1"}, Outcome.RETRY, "http_429", 1.0, False),
        (429, {"Retry-After": "soon"}, Outcome.RETRY, "http_429", None, False),
        (429, {}, Outcome.RETRY, "http_429", None, False),
        (500, {}, Outcome.RETRY, "http_500", None, False),
        (502, {"Retry-After": "2.5"}, Outcome.RETRY, "http_502", 2.5, False),
        (503, {"Retry-After": "7"}, Outcome.RETRY, "http_503", 7.0, False),
        (599, {}, Outcome.RETRY, "http_599", None, False),
        (301, {"Location": "https://elsewhere"}, Outcome.RETRY, "http_301", None, True),
    ],
)
def test_classify_table(
    status: int, headers: dict[str, str], outcome: Outcome, reason: str, after: float | None, loud: bool
) -> None:
    verdict = datadog.classify(response(status, headers, body='{"errors":["x"]}'))
    assert (verdict.outcome, verdict.reason, verdict.after, verdict.loud) == (outcome, reason, after, loud)


def test_classify_keeps_an_excerpt_of_a_400_body() -> None:
    verdict = datadog.classify(response(400, body="invalid JSON at offset 3" + "." * 1000))
    assert verdict.detail.startswith("invalid JSON at offset 3")
    assert len(verdict.detail) == datadog.BODY_EXCERPT_CHARS


def test_classify_honours_an_http_date_retry_after() -> None:
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 120))
    verdict = datadog.classify(response(429, {"Retry-After": when}))
    assert verdict.after is not None and 100 < verdict.after <= 120


# ---------------------------------------------------------------------------------------------------------------------
# The sink against an HTTPS intake


@dataclass
class Arrival:
    """One request as the intake saw it."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def objects(self) -> list[dict[str, Any]]:
        assert self.headers.get("Content-Encoding") == "gzip"
        objects = json.loads(gzip.decompress(self.body))
        assert isinstance(objects, list)
        return objects

    @property
    def raw_size(self) -> int:
        return len(gzip.decompress(self.body))


@dataclass
class Intake:
    """A Datadog-like intake: answers each request with ``script`` (in order, then ``default``) or ``decide``."""

    script: list[tuple[int, dict[str, str], str]] = field(default_factory=list)
    default: int = 202
    decide: Callable[[bytes], int] | None = None
    arrivals: list[Arrival] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, request: Request) -> Response:
        body = request.get_data()
        with self.lock:
            if self.script:
                status, headers, text = self.script.pop(0)
            else:
                status, headers, text = (self.decide(body) if self.decide else self.default), {}, "{}"
            self.arrivals.append(Arrival(request.path, dict(request.args), dict(request.headers), body, status))
        return Response(text, status=status, headers=headers)

    def accepted(self) -> list[dict[str, Any]]:
        return [obj for a in self.arrivals if 200 <= a.status < 300 for obj in a.objects]


@pytest.fixture
def intake(httpserver: HTTPServer) -> Iterator[Intake]:
    fake = Intake()
    httpserver.expect_request(INTAKE_PATH, method="POST").respond_with_handler(fake.handle)
    yield fake
    httpserver.check_assertions()


def make_sink(httpserver: HTTPServer, ca_file: Path, token: str = API_KEY, **env: str) -> datadog.DatadogSink:
    config = datadog.config_from_env({"DATADOG_TOKEN": token, "FORWARDER_DATADOG_URL": httpserver.url_for("/"), **env})
    assert config is not None
    return config.build(HttpSettings(ca_file=str(ca_file)))


def runner_for(sink: datadog.DatadogSink) -> DestinationRunner:
    return DestinationRunner(sink, MemoryBuffer(10**9), DestinationStats("datadog"), RetryPolicy(0.001, 0.001))


async def test_a_sent_request_leaves_no_reference_cycle(httpserver: HTTPServer, ca_file: Path, intake: Intake) -> None:
    """httpx 0.28 keeps each response in a cycle with its stream (and the request body); the sink breaks it, so a
    delivered payload is freed by reference counting, not at the garbage collector's next pass (peak RSS)."""
    sink = make_sink(httpserver, ca_file)
    [batch] = sink.encode([rec("one"), rec("two")]).batches
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            assert (await sink.send(batch)).outcome is Outcome.OK
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if type(o).__module__.startswith(("httpx", "httpcore"))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        await sink.aclose()
    assert len(intake.arrivals) == 3
    assert left == []


@pytest.mark.parametrize("token", [API_KEY, CLIENT_TOKEN])
async def test_wire_format_per_token_kind(httpserver: HTTPServer, ca_file: Path, intake: Intake, token: str) -> None:
    sink = make_sink(httpserver, ca_file, token, DATADOG_REGION="eu")
    now = time.time_ns()
    sent_ms = now // 10**6
    records = [
        rec("agent ready", attributes={"job_id": "AJ_9"}, ts=now),
        rec("Traceback (most recent call last):", stream="stderr", level=Level.ERROR, ts=now),
    ]
    try:
        [batch] = sink.encode(records).batches
        verdict = await sink.send(batch)
    finally:
        await sink.aclose()
    assert verdict.outcome is Outcome.OK
    [arrival] = intake.arrivals
    assert arrival.path == INTAKE_PATH
    assert arrival.headers["Content-Encoding"] == "gzip"
    assert arrival.headers["Content-Type"] == "application/json"
    assert arrival.headers["User-Agent"] == "forwarder/0.1"
    assert "Cookie" not in arrival.headers
    if token.startswith("pub"):
        assert arrival.query == {"dd-api-key": CLIENT_TOKEN}
        assert "Dd-Api-Key" not in arrival.headers
    else:
        assert arrival.query == {}
        assert arrival.headers["Dd-Api-Key"] == API_KEY
    first, second = arrival.objects
    for obj, stream in ((first, "stdout"), (second, "stderr")):
        assert obj["hostname"] == "worker-7"
        assert obj["ddsource"] == "CA_agent42"
        assert obj["service"] == "cloud.livekit.io"
        assert obj["stream"] == stream
        assert obj["ddtags"] == f"stream:{stream}"
        assert isinstance(obj["timestamp"], int)
        assert abs(obj["timestamp"] - sent_ms) < 60_000  # ms since the epoch, the capture time
    assert (first["message"], first["status"], first["job_id"]) == ("agent ready", "info", "AJ_9")
    assert (second["status"], second["message"]) == ("error", "Traceback (most recent call last):")


async def test_25000_records_arrive_once_within_limits_and_a_3mb_message_is_cut(
    httpserver: HTTPServer, ca_file: Path, intake: Intake
) -> None:
    now = time.time_ns()
    # 20,000 short records (requests bound by the 1,000-entry limit), then 5,000 where every third is 20 KB
    # (requests bound by bytes).
    records = [
        rec(f"#{i} " + ("b" * 20_000 if i >= 20_000 and i % 3 == 0 else "s" * 50), ts=now) for i in range(25_000)
    ]
    records.insert(12_345, rec("#huge " + "h" * 3_000_000, ts=now, level=Level.ERROR))
    sink = make_sink(httpserver, ca_file)
    runner = runner_for(sink)
    try:
        await runner.deliver_records(records)
    finally:
        await sink.aclose()
    assert runner.stats.delivered == 25_001 and not runner.stats.dropped
    for arrival in intake.arrivals:
        assert arrival.status == 202
        assert len(arrival.objects) <= 1000
        assert arrival.raw_size < 5_000_000
    counts = Counter(obj["message"].split(" ", 1)[0] for obj in intake.accepted())
    assert set(counts.values()) == {1}
    assert len(counts) == 25_001
    [huge] = [obj for obj in intake.accepted() if obj["message"].startswith("#huge")]
    assert huge["truncated"] is True
    assert len(json.dumps(huge, separators=(",", ":")).encode()) < 1_000_000
    assert len(huge["message"]) > 900_000
    entries = [len(a.objects) for a in intake.arrivals]
    assert entries.count(1000) >= 20
    assert any(n < 1000 and a.raw_size > 4_000_000 for n, a in zip(entries, intake.arrivals, strict=True))


async def test_429_twice_then_500_then_202_delivers_once_and_waits_as_asked(
    httpserver: HTTPServer, ca_file: Path, intake: Intake
) -> None:
    intake.script = [
        (429, {"Retry-After": "1"}, "slow down"),
        (429, {"Retry-After": "1"}, "slow down"),
        (500, {}, "oops"),
    ]
    sleeps: list[float] = []

    async def recorded_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await trio.lowlevel.checkpoint()

    retries: list[tuple[str, float]] = []
    sink = make_sink(httpserver, ca_file)
    records = [rec(f"r{i}", ts=time.time_ns()) for i in range(50)]
    try:
        [batch] = sink.encode(records).batches
        verdict = await deliver(
            lambda: sink.send(batch),
            RetryPolicy(initial_s=0.5, max_s=30.0),
            on_retry=lambda v, wait: retries.append((v.reason, wait)),
            sleep=recorded_sleep,
        )
    finally:
        await sink.aclose()
    assert verdict.outcome is Outcome.OK
    assert [a.status for a in intake.arrivals] == [429, 429, 500, 202]
    assert len({a.body for a in intake.arrivals}) == 1  # the same payload each time
    assert [o["message"] for o in intake.accepted()] == [f"r{i}" for i in range(50)]
    assert len(sleeps) == 3
    assert sleeps[0] >= 1.0 and sleeps[1] >= 1.0  # Retry-After: 1 honoured
    assert 0 <= sleeps[2] <= 0.5 * 2**3  # no Retry-After on the 500: the jittered backoff alone
    assert [r for r, _ in retries] == ["http_429", "http_429", "http_500"]


async def test_413_over_100kb_splits_and_a_single_too_large_record_is_dropped_and_counted(
    httpserver: HTTPServer, ca_file: Path, intake: Intake
) -> None:
    intake.decide = lambda body: 413 if len(gzip.decompress(body)) > 100_000 else 202
    now = time.time_ns()
    records = [rec(f"m{i} " + "q" * 300, ts=now) for i in range(2_000)]
    records.insert(777, rec("too-large " + "L" * 150_000, ts=now))
    sink = make_sink(httpserver, ca_file)
    runner = runner_for(sink)
    try:
        await runner.deliver_records(records)
    finally:
        await sink.aclose()
    accepted = [obj["message"].split(" ", 1)[0] for obj in intake.accepted()]
    assert sorted(accepted) == sorted(f"m{i}" for i in range(2_000))
    assert len(set(accepted)) == len(accepted)
    assert runner.stats.delivered == 2_000
    assert runner.stats.dropped == Counter({"too_large": 1})
    too_large_attempts = [a for a in intake.arrivals if a.status == 413 and len(a.objects) == 1]
    assert len(too_large_attempts) == 1  # tried once, not retried forever
    assert all(a.raw_size <= 100_000 for a in intake.arrivals if a.status == 202)


async def test_400_drops_the_batch_and_logs_the_body_once(
    httpserver: HTTPServer, ca_file: Path, intake: Intake
) -> None:
    intake.script = [(400, {}, "malformed payload: field 'message'")]
    sink = make_sink(httpserver, ca_file)
    with structlog.testing.capture_logs() as logs:
        runner = runner_for(sink)
        try:
            await runner.deliver_records([rec(f"x{i}") for i in range(10)])
            await runner.deliver_records([rec("after")])
        finally:
            await sink.aclose()
    assert runner.stats.dropped == Counter({"http_400": 10})
    assert runner.stats.delivered == 1
    drops = [e for e in logs if e["event"] == "records_dropped"]
    assert len(drops) == 1
    assert drops[0]["records"] == 10
    assert "malformed payload" in drops[0]["detail"]
    assert [a.status for a in intake.arrivals] == [400, 202]


@pytest.mark.parametrize("token", [API_KEY, CLIENT_TOKEN])
async def test_token_never_in_verdicts_or_logs_even_when_echoed(
    httpserver: HTTPServer, ca_file: Path, intake: Intake, token: str
) -> None:
    # A hostile or debugging proxy echoing the request URL and key back in error bodies.
    echo = f"request https://x/api/v2/logs?dd-api-key={token} DD-API-KEY={token}"
    intake.script = [(503, {}, echo), (401, {}, echo), (403, {}, echo), (400, {}, echo)]
    sink = make_sink(httpserver, ca_file, token)
    with structlog.testing.capture_logs() as logs:
        runner = runner_for(sink)
        try:
            await runner.deliver_records([rec("secret-free")])
        finally:
            await sink.aclose()
    assert [a.status for a in intake.arrivals] == [503, 401, 403, 400]
    assert runner.stats.dropped == Counter({"http_400": 1})
    assert [e["reason"] for e in logs if e["event"] == "send_retry"] == ["http_503", "http_401", "http_403"]
    loud = [e for e in logs if e["event"] == "send_retry" and e["log_level"] == "error"]
    assert [e["reason"] for e in loud] == ["http_401", "http_403"]
    assert "DATADOG_TOKEN" in loud[0]["detail"]
    assert token not in repr(logs) + (runner.stats.last_error or "")
    assert "<redacted>" in repr(logs)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("token", [API_KEY, CLIENT_TOKEN])
async def test_network_and_tls_errors_are_retries_without_the_token(
    httpserver: HTTPServer, ca_file: Path, intake: Intake, token: str
) -> None:
    [batch] = datadog.encode([rec()]).batches
    verdicts: list[Verdict] = []
    refused = datadog.config_from_env(
        {"DATADOG_TOKEN": token, "FORWARDER_DATADOG_URL": f"https://127.0.0.1:{_closed_port()}"}
    )
    untrusted = datadog.config_from_env({"DATADOG_TOKEN": token, "FORWARDER_DATADOG_URL": httpserver.url_for("/")})
    assert refused is not None and untrusted is not None
    for config, http in ((refused, HttpSettings(ca_file=str(ca_file))), (untrusted, HttpSettings())):
        sink = config.build(http)
        try:
            verdicts.append(await sink.send(batch))
        finally:
            await sink.aclose()
    assert [(v.outcome, v.reason) for v in verdicts] == [(Outcome.RETRY, "network")] * 2
    assert "Connect" in verdicts[0].detail
    assert "CERTIFICATE_VERIFY_FAILED" in verdicts[1].detail
    assert intake.arrivals == []  # the untrusted TLS handshake never got as far as a request
    for verdict in verdicts:
        assert token not in repr(verdict)


def test_every_limit_constant_matches_the_documented_value() -> None:
    assert datadog.MAX_ENTRIES == 1000
    assert datadog.MAX_CONTENT_BYTES == 5_000_000
    assert datadog.BATCH_GOAL_BYTES == 4_250_000
    assert datadog.MAX_LOG_BYTES <= 1_000_000
    assert datadog.MAX_AGE_NS == 18 * HOUR_NS
    assert set(datadog.ENV_VARS) == {"DATADOG_TOKEN", "DATADOG_REGION", "FORWARDER_DATADOG_URL"}


async def test_sink_satisfies_the_protocol(ca_file: Path) -> None:
    from forwarder.sinks._protocol import Sink

    config = datadog.config_from_env({"DATADOG_TOKEN": API_KEY})
    assert config is not None
    sink = config.build(HttpSettings(ca_file=str(ca_file)))
    try:
        assert isinstance(sink, Sink)
        assert sink.name == config.name == "datadog"
    finally:
        await sink.aclose()


async def test_batches_of_a_chunk_are_in_flight_at_once_up_to_the_request_concurrency(
    https_servers: Callable[..., HTTPServer], ca_file: Path
) -> None:
    """``FORWARDER_REQUEST_CONCURRENCY=3`` and a chunk of 5 full batches: the intake (answering concurrently) sees
    three requests open at once, each on its own connection from the sink's pool, and never more; every record
    arrives once."""
    server = https_servers(threaded=True)
    lock = threading.Condition()
    open_now = 0
    most = 0
    received: list[str] = []

    def handle(request: Request) -> Response:
        nonlocal open_now, most
        with lock:
            open_now += 1
            most = max(most, open_now)
            lock.notify_all()
            lock.wait_for(lambda: most >= 3, timeout=5)  # hold each request until 3 are open
            received.extend(obj["message"] for obj in json.loads(gzip.decompress(request.get_data())))
            open_now -= 1
        return Response("{}", status=202)

    server.expect_request(INTAKE_PATH, method="POST").respond_with_handler(handle)
    config = datadog.config_from_env({"DATADOG_TOKEN": API_KEY, "FORWARDER_DATADOG_URL": server.url_for("/")})
    assert config is not None
    sink = config.build(HttpSettings(ca_file=str(ca_file), concurrency=3))
    stats = DestinationStats("datadog")
    buffer = MemoryBuffer(10**9)
    buffer.register(["datadog"])
    count = 5 * datadog.MAX_ENTRIES
    await buffer.append([rec(f"m{i}") for i in range(count)])  # one chunk
    await buffer.close_input()
    runner = DestinationRunner(sink, buffer, stats, RetryPolicy(0.001, 0.001), concurrency=3)
    try:
        with trio.fail_after(30):
            await runner.run()
    finally:
        await sink.aclose()
    assert most == 3
    assert stats.batches == 5 and stats.delivered == count and buffer.pending("datadog") == 0
    assert sorted(received) == sorted(f"m{i}" for i in range(count))


async def test_request_timeout_setting_bounds_a_request_to_a_hanging_intake(tmp_path: Path) -> None:
    """``FORWARDER_REQUEST_TIMEOUT=0.2``: a request to an intake that accepts the connection and never answers ends
    as ``RETRY`` with reason ``timeout`` long before the 10 s default would."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # connections complete in the backlog; nothing ever reads or answers them
        port = listener.getsockname()[1]
        config = load(
            {
                "DATADOG_TOKEN": API_KEY,
                "FORWARDER_DATADOG_URL": f"http://127.0.0.1:{port}/",
                "FORWARDER_REQUEST_TIMEOUT": "0.2",
                "FORWARDER_STATE_DIR": str(tmp_path),
            }
        )
        assert config.http.timeout_s == 0.2
        [sink_config] = config.sinks
        sink = sink_config.build(config.http)
        try:
            [batch] = sink.encode([rec("one")]).batches
            with trio.fail_after(5):  # the default timeout (10 s) would fail here
                verdict = await sink.send(batch)
        finally:
            await sink.aclose()
    assert verdict.outcome is Outcome.RETRY
    assert verdict.reason == "timeout"
