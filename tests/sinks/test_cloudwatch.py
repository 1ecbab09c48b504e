"""CloudWatch Logs destination: config, the pure batcher, classify, and the sink against moto's server mode and a
loopback HTTPS server playing CloudWatch's error answers.

Limits below are written as the API reference states them
(https://docs.aws.amazon.com/AmazonCloudWatchLogs/latest/APIReference/API_PutLogEvents.html), not read from the
module, so that a wrong constant fails here.
"""

from __future__ import annotations

import itertools
import json
import random
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from botocore import exceptions as bce
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from forwarder.config import ConfigError, HttpSettings
from forwarder.delivery.buffer import MemoryBuffer
from forwarder.delivery.destination import DestinationRunner, DestinationStats
from forwarder.delivery.retry import RetryPolicy
from forwarder.record import TRUNCATED, Level, Record, Tags
from forwarder.sinks import cloudwatch as cw
from forwarder.sinks import sink_configs_from_env
from forwarder.sinks._protocol import Batch, Encoded, Outcome
from tests.sinks.moto_server import (
    TEST_ACCESS_KEY_ID,
    TEST_SECRET_ACCESS_KEY,
    NotLoopbackError,
    admin_client,
    aws_env,
    isolated_aws_env,
    require_loopback,
    running_moto,
)

API_MAX_EVENTS = 10_000
API_MAX_BATCH_BYTES = 1_048_576
API_EVENT_OVERHEAD = 26
API_MAX_SPAN_MS = 24 * 3600 * 1000
HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS
NOW_MS = 1_795_000_000_000  # a fixed "now" for the pure tests (November 2026)
TAGS = Tags(host="worker-1", source="agent-a", service="cloud.livekit.io")


def rec(
    message: str,
    t_ms: int = NOW_MS,
    *,
    tags: Tags = TAGS,
    stream: str = "stdout",
    level: Level | None = None,
    attributes: dict[str, Any] | None = None,
    event_time_ms: int | None = None,
) -> Record:
    return Record(
        timestamp_ns=t_ms * 1_000_000 + 123,
        message=message,
        stream=stream,
        tags=tags,
        level=level,
        attributes=attributes,
        event_time_ns=None if event_time_ms is None else event_time_ms * 1_000_000,
    )


def encode(records: Sequence[Record], now_ms: int = NOW_MS) -> Encoded:
    return cw.encode_events(records, cw.DEFAULT_LOG_GROUP, cw.DEFAULT_LOG_STREAM, now_ms)


def event_cost(event: dict[str, Any]) -> int:
    return len(event["message"].encode("utf-8")) + API_EVENT_OVERHEAD


def check_batch(batch: Batch) -> None:
    """Every PutLogEvents rule, checked on one batch."""
    payload = batch.payload
    assert set(payload) == {"logGroupName", "logStreamName", "logEvents"}  # no sequence token
    events = payload["logEvents"]
    assert 1 <= len(events) <= API_MAX_EVENTS
    assert len(batch.records) == len(events)
    size = sum(event_cost(e) for e in events)
    assert size <= API_MAX_BATCH_BYTES
    assert batch.size == size
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)
    assert stamps[-1] - stamps[0] < API_MAX_SPAN_MS
    for event in events:
        assert set(event) == {"timestamp", "message"}
        assert isinstance(event["timestamp"], int)
        assert event_cost(event) <= API_MAX_BATCH_BYTES


def bodies(batch: Batch) -> list[dict[str, Any]]:
    return [json.loads(e["message"]) for e in batch.payload["logEvents"]]


# --- config ---------------------------------------------------------------------------------------------------


def test_not_enabled_without_keys_or_group() -> None:
    assert cw.config_from_env({}) is None
    assert cw.config_from_env({"AWS_REGION": "eu-west-1", "CLOUDWATCH_LOG_STREAM": "x"}) is None


def test_enabled_by_keys_with_documented_defaults() -> None:
    config = cw.config_from_env(
        {
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID1234",
            "AWS_SECRET_ACCESS_KEY": "s3cr3t-value-xyz-123",
            "AWS_SESSION_TOKEN": "session-token-value-456",
        }
    )
    assert config is not None
    assert config.name == "cloudwatch"
    assert config.region == "us-west-2"
    assert config.log_group == "/forwarder/{source}"
    assert config.log_stream == "{host}/{source}"
    assert config.retention_days is None
    assert config.endpoint_url is None
    assert config.endpoint() == "https://logs.us-west-2.amazonaws.com group=/forwarder/{source} stream={host}/{source}"
    assert sorted(config.secret_values()) == sorted(
        ["AKIAEXAMPLEKEYID1234", "s3cr3t-value-xyz-123", "session-token-value-456"]
    )
    shown = repr(config) + str(config) + config.endpoint()
    for secret in config.secret_values():
        assert secret not in shown


def test_enabled_by_log_group_alone_uses_default_credential_chain() -> None:
    config = cw.config_from_env({"CLOUDWATCH_LOG_GROUP": "/team/agents", "AWS_SESSION_TOKEN": "ignored-alone"})
    assert config is not None
    assert config.log_group == "/team/agents"
    assert config.access_key_id is None and config.secret_access_key is None and config.session_token is None
    assert config.secret_values() == []


def test_enabled_switch() -> None:
    keys = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secretvalue"}
    assert cw.config_from_env({**keys, "CLOUDWATCH_ENABLED": "false"}) is None
    assert cw.config_from_env({"CLOUDWATCH_ENABLED": "true"}) is not None
    with pytest.raises(ConfigError) as info:
        cw.config_from_env({"CLOUDWATCH_ENABLED": "maybe"})
    assert info.value.variable == "CLOUDWATCH_ENABLED"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"AWS_ACCESS_KEY_ID": "AKIAONLYTHEID"}, "AWS_SECRET_ACCESS_KEY"),
        ({"AWS_SECRET_ACCESS_KEY": "only-the-secret-value"}, "AWS_ACCESS_KEY_ID"),
        ({"CLOUDWATCH_LOG_GROUP": "/g", "AWS_SECRET_ACCESS_KEY": "only-the-secret-value"}, "AWS_ACCESS_KEY_ID"),
    ],
)
def test_half_a_key_pair_is_an_error_that_shows_no_secret(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        cw.config_from_env(env)
    assert info.value.variable == variable
    for value in env.values():
        if value != "/g":
            assert value not in str(info.value)


def test_region_precedence_and_validation() -> None:
    base = {"CLOUDWATCH_LOG_GROUP": "/g"}
    assert cw.config_from_env({**base, "AWS_DEFAULT_REGION": "eu-west-1"}).region == "eu-west-1"  # type: ignore[union-attr]
    assert (
        cw.config_from_env(  # type: ignore[union-attr]
            {**base, "AWS_DEFAULT_REGION": "eu-west-1", "AWS_REGION": "ap-south-1"}
        ).region
        == "ap-south-1"
    )
    with pytest.raises(ConfigError) as info:
        cw.config_from_env({**base, "AWS_REGION": "US West 2"})
    assert info.value.variable == "AWS_REGION"
    with pytest.raises(ConfigError) as info:
        cw.config_from_env({**base, "AWS_DEFAULT_REGION": "us_west_2"})
    assert info.value.variable == "AWS_DEFAULT_REGION"


def test_endpoint_variables() -> None:
    base = {"CLOUDWATCH_LOG_GROUP": "/g"}
    both = {**base, "AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": "http://127.0.0.1:2"}
    assert cw.config_from_env(both).endpoint_url == "http://127.0.0.1:2"  # type: ignore[union-attr]
    generic = {**base, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}
    assert cw.config_from_env(generic).endpoint_url == "http://127.0.0.1:1"  # type: ignore[union-attr]
    ignored = {**both, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}
    assert cw.config_from_env(ignored).endpoint_url is None  # type: ignore[union-attr]
    assert cw.config_from_env(both).endpoint().startswith("http://127.0.0.1:2 ")  # type: ignore[union-attr]
    with pytest.raises(ConfigError) as info:
        cw.config_from_env({**base, "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": "localhost:4566"})
    assert info.value.variable == "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS"


@pytest.mark.parametrize("days", ["1", "7", "30", "365", "3653"])
def test_retention_accepted(days: str) -> None:
    config = cw.config_from_env({"CLOUDWATCH_LOG_GROUP": "/g", "CLOUDWATCH_RETENTION_DAYS": days})
    assert config is not None and config.retention_days == int(days)


@pytest.mark.parametrize("days", ["0", "2", "31", "3654", "-1", "seven", "7.0"])
def test_retention_refused_lists_accepted_values(days: str) -> None:
    with pytest.raises(ConfigError) as info:
        cw.config_from_env({"CLOUDWATCH_LOG_GROUP": "/g", "CLOUDWATCH_RETENTION_DAYS": days})
    assert info.value.variable == "CLOUDWATCH_RETENTION_DAYS"
    assert "1, 3, 5, 7, 14, 30" in info.value.problem and "3653" in info.value.problem


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CLOUDWATCH_LOG_GROUP", "/bad group"),
        ("CLOUDWATCH_LOG_GROUP", "/g/{agent}"),
        ("CLOUDWATCH_LOG_GROUP", "/g/{source"),
        ("CLOUDWATCH_LOG_GROUP", "/g" * 300),
        ("CLOUDWATCH_LOG_STREAM", "host:stream"),
        ("CLOUDWATCH_LOG_STREAM", "a*b"),
        ("CLOUDWATCH_LOG_STREAM", "{pod}"),
    ],
)
def test_invalid_names_are_refused(variable: str, value: str) -> None:
    env = {"CLOUDWATCH_LOG_GROUP": "/g", variable: value}
    with pytest.raises(ConfigError) as info:
        cw.config_from_env(env)
    assert info.value.variable == variable


def test_registered_in_sink_registry() -> None:
    configs = sink_configs_from_env({"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secretvalue"})
    assert [c.name for c in configs if c.name == "cloudwatch"] == ["cloudwatch"]
    assert "CLOUDWATCH_LOG_GROUP" in cw.ENV_VARS and "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS" in cw.ENV_VARS


# --- names ----------------------------------------------------------------------------------------------------


def test_names_from_tags_are_sanitised() -> None:
    tags = Tags(host="pod:7*x", source="my agent/ü", service="svc")
    group, stream = cw.resolve_names("/forwarder/{source}", "{host}/{source}", tags)
    assert group == "/forwarder/my_agent/_"
    assert stream == "pod_7_x/my agent/ü"
    long_group, _ = cw.resolve_names("/{source}", "{host}", Tags(host="h", source="s" * 600, service="x"))
    assert len(long_group) == 512
    assert cw.resolve_names("{source}", "{host}", Tags(host="", source="", service=""))[0] == "_"


def test_records_of_different_sources_go_to_their_own_group_and_stream() -> None:
    other = Tags(host="worker-2", source="agent-b", service="svc")
    encoded = encode([rec("a1"), rec("b1", tags=other), rec("a2"), rec("b2", tags=other)])
    targets = {
        (b.payload["logGroupName"], b.payload["logStreamName"]): [x["message"] for x in bodies(b)]
        for b in encoded.batches
    }
    assert targets == {
        ("/forwarder/agent-a", "worker-1/agent-a"): ["a1", "a2"],
        ("/forwarder/agent-b", "worker-2/agent-b"): ["b1", "b2"],
    }


# --- encode: event shape and time -----------------------------------------------------------------------------


def test_event_message_is_json_with_the_record_fields() -> None:
    records = [
        rec("hello ☃", level=Level.WARNING, attributes={"room": "r1", "pid": 7, "nested": {"a": [1, 2]}}),
        rec("raw line", stream="stderr"),
    ]
    (batch,) = encode(records).batches
    check_batch(batch)
    first, second = bodies(batch)
    assert first == {
        "message": "hello ☃",
        "level": "WARNING",
        "host": "worker-1",
        "source": "agent-a",
        "service": "cloud.livekit.io",
        "stream": "stdout",
        "attributes": {"room": "r1", "pid": 7, "nested": {"a": [1, 2]}},
    }
    assert list(first) == ["message", "level", "host", "source", "service", "stream", "attributes"]
    assert second == {
        "message": "raw line",
        "host": "worker-1",
        "source": "agent-a",
        "service": "cloud.livekit.io",
        "stream": "stderr",
    }
    assert [e["timestamp"] for e in batch.payload["logEvents"]] == [NOW_MS, NOW_MS]


@pytest.mark.parametrize(
    ("capture_ms", "event_ms", "expected_ms"),
    [
        (NOW_MS, NOW_MS - 5000, NOW_MS - 5000),  # the line's own time is used
        (NOW_MS, NOW_MS - 13 * DAY_MS, NOW_MS - 13 * DAY_MS),  # old but inside the window
        (NOW_MS, NOW_MS - 20 * DAY_MS, NOW_MS),  # line time too old: capture time
        (NOW_MS, NOW_MS - 14 * DAY_MS + 60_000, NOW_MS),  # inside the 10-minute margin: capture time
        (NOW_MS, NOW_MS + 3 * HOUR_MS, NOW_MS),  # line time too far ahead: capture time
        (NOW_MS, NOW_MS + HOUR_MS, NOW_MS + HOUR_MS),  # ahead but accepted
        (NOW_MS - 2 * DAY_MS, None, NOW_MS - 2 * DAY_MS),  # spooled two days: kept as is
        (NOW_MS + 5 * HOUR_MS, None, NOW_MS),  # clock stepped back: re-stamped to now
    ],
)
def test_event_timestamp_choice(capture_ms: int, event_ms: int | None, expected_ms: int) -> None:
    (batch,) = encode([rec("x", capture_ms, event_time_ms=event_ms)]).batches
    assert batch.payload["logEvents"][0]["timestamp"] == expected_ms


def test_capture_time_older_than_14_days_is_dropped_and_counted() -> None:
    records = [
        rec("old", NOW_MS - 15 * DAY_MS),
        rec("old2", NOW_MS - 14 * DAY_MS - 1),
        rec("ok", NOW_MS - DAY_MS),
        rec("old-but-stated", NOW_MS - 15 * DAY_MS, event_time_ms=NOW_MS - HOUR_MS),
    ]
    encoded = encode(records)
    assert encoded.dropped == {"too_old": 2}
    kept = [b["message"] for batch in encoded.batches for b in bodies(batch)]
    assert sorted(kept) == ["ok", "old-but-stated"]


# --- encode: limits -------------------------------------------------------------------------------------------


def test_25000_mixed_events_every_batch_satisfies_every_limit() -> None:
    """25,000 records in shuffled time order over 30 h, multi-byte messages (some 120 KB), across two streams."""
    rng = random.Random(25_000)
    other = Tags(host="worker-2", source="agent-a", service="cloud.livekit.io")
    start = NOW_MS - 30 * HOUR_MS
    records = []
    for i in range(25_000):
        text = f"{i} " + "héllo wörld ☃ 😀 " * (i % 9 + 1)
        if i % 97 == 0:
            text = f"{i} " + "€" * 40_000  # 120,000 UTF-8 bytes for 40,000 characters
        t = start + (30 * HOUR_MS * i) // 25_000
        records.append(rec(text, t, tags=other if i % 3 == 0 else TAGS, attributes={"i": i}))
    assert any(len(r.message.encode()) > len(r.message) * 2 for r in records)
    rng.shuffle(records)
    encoded = encode(records)
    assert encoded.dropped == {}
    seen: Counter[int] = Counter()
    for batch in encoded.batches:
        check_batch(batch)
        for record, body in zip(batch.records, bodies(batch), strict=True):
            assert body["message"] == record.message
            assert record.attributes is not None
            assert body["attributes"] == {"i": record.attributes["i"]}
            seen[body["attributes"]["i"]] += 1
    assert len(seen) == 25_000 and set(seen.values()) == {1}
    # ~35 MB in two streams: the byte limit binds (batches filled to within one large event of 1 MiB)
    assert sum(1 for b in encoded.batches if b.size > API_MAX_BATCH_BYTES - 130_000) >= 25
    assert {b.payload["logStreamName"] for b in encoded.batches} == {"worker-1/agent-a", "worker-2/agent-a"}


def test_count_limit_10000() -> None:
    tiny = Tags(host="h", source="s", service="v")  # ~70-byte events: 10,000 fit in the byte limit
    records = [rec(f"m{i}", NOW_MS - 60_000 + i % 60_000, tags=tiny) for i in range(25_000)]
    encoded = encode(records)
    assert [len(b.payload["logEvents"]) for b in encoded.batches] == [10_000, 10_000, 5_000]
    for batch in encoded.batches:
        check_batch(batch)


def test_byte_limit_counts_utf8_bytes_and_26_per_event() -> None:
    # 300,000 characters but 900,000 bytes each: by characters two would fit in a batch, by bytes only one.
    records = [rec("€" * 300_000, NOW_MS - i) for i in range(3)]
    encoded = encode(records)
    assert [len(b.payload["logEvents"]) for b in encoded.batches] == [1, 1, 1]
    # 1,000 events of 1,000 "é" (2,000 bytes): greedy cuts land exactly where the next event would not fit.
    records = [rec("é" * 1_000, NOW_MS - 1000 + i) for i in range(1_000)]
    batches = encode(records).batches
    assert len(batches) == 3
    for batch, following in itertools.pairwise(batches):
        check_batch(batch)
        assert batch.size + event_cost(following.payload["logEvents"][0]) > API_MAX_BATCH_BYTES
    check_batch(batches[-1])
    assert sum(len(b.records) for b in batches) == 1_000


def test_byte_limit_exactly_full_batch() -> None:
    """Events sized so that 4 fill the 1,048,576 bytes exactly (overhead included): 4 per batch, not 3."""
    probe = encode([rec("", NOW_MS)]).batches[0].payload["logEvents"][0]["message"]
    per_event = API_MAX_BATCH_BYTES // 4
    padding = per_event - API_EVENT_OVERHEAD - len(probe.encode())
    records = [rec("a" * padding, NOW_MS) for _ in range(8)]
    batches = encode(records).batches
    assert [b.size for b in batches] == [API_MAX_BATCH_BYTES, API_MAX_BATCH_BYTES]
    assert [len(b.records) for b in batches] == [4, 4]


def test_span_cut_at_exactly_24_hours() -> None:
    base = NOW_MS - 30 * HOUR_MS
    records = [rec("c", base + DAY_MS), rec("a", base), rec("b", base + DAY_MS - 1), rec("d", base + DAY_MS + 5)]
    batches = encode(records).batches
    assert [[body["message"] for body in bodies(b)] for b in batches] == [["a", "b"], ["c", "d"]]
    for batch in batches:
        check_batch(batch)


def test_records_straddling_a_24h_boundary_in_random_order() -> None:
    rng = random.Random(7)
    base = NOW_MS - 26 * HOUR_MS
    records = [rec(f"r{i}", base + rng.randrange(26 * HOUR_MS)) for i in range(5_000)]
    batches = encode(records).batches
    assert len(batches) == 2
    for batch in batches:
        check_batch(batch)
    assert sorted(r.message for b in batches for r in b.records) == sorted(r.message for r in records)
    assert batches[0].payload["logEvents"][-1]["timestamp"] <= batches[1].payload["logEvents"][0]["timestamp"]


def test_event_messages_are_the_reference_encoding_byte_for_byte() -> None:
    """The spliced fast path writes exactly ``_dumps(event_body(record))``: same keys, order, escapes and fallbacks
    (lone surrogates, integers beyond 64 bits, non-string keys, objects only ``str()`` can show), whichever tags
    and streams alternate."""
    odd = Tags(host="pod-\udcff", source="agent-a", service="svc")  # undecodable environment byte: stdlib fallback
    twin = Tags(host=TAGS.host, source=TAGS.source, service=TAGS.service)  # equal values, another object
    quoted = Tags(host='h"\\1', source="agent-a", service="sv\u2028c")

    class Shown:
        def __str__(self) -> str:
            return "shown"

    attribute_choices: list[dict[str, Any] | None] = [
        None,
        {},
        {"room": "r1", "pid": 7, "nested": {"a": [1, 2.5, None, True]}},
        {"quote": '"\\', "ctl": "\x00\x1f\n\t", "u": "é€😀\u2028"},
        {"big": 2**70},
        {1: "int key"},  # type: ignore[dict-item]  # a non-string key: the stdlib fallback
        {"obj": Shown()},
        {"s": "\ud800"},
    ]
    messages = ["", "plain", 'q"uote\\back', "ctl\x00\x07\r\n", "é€😀", "lone \udfff", "x" * 3000]
    rng = random.Random(11)
    records = [
        rec(
            rng.choice(messages),
            NOW_MS - rng.randrange(10_000),
            tags=rng.choice([TAGS, twin, odd, quoted]),
            stream=rng.choice(["stdout", "stderr", 'we"ird']),
            level=rng.choice([None, *Level]),
            attributes=rng.choice(attribute_choices),
        )
        for _ in range(600)
    ]
    encoded = cw.encode_events(records, "/fixed", "fixed", NOW_MS)  # one target: both fast-path switches
    assert sum(len(b.records) for b in encoded.batches) == len(records)
    for batch in encoded.batches:
        check_batch(batch)
        for event, record in zip(batch.payload["logEvents"], batch.records, strict=True):
            assert event["message"] == cw._dumps(cw.event_body(record)).decode()


def test_equal_times_keep_their_order_and_every_path_gives_the_same_batches() -> None:
    """Events are sorted by time, ties in arrival order, whether the records come sorted (no copy) or not, for one
    target or several."""
    other = Tags(host="worker-2", source="agent-b", service="svc")
    rng = random.Random(3)
    shuffled = [rec(f"m{i}", NOW_MS - HOUR_MS + rng.randrange(50), tags=rng.choice([TAGS, other])) for i in range(3000)]
    by_time = sorted(shuffled, key=lambda r: r.timestamp_ns)  # stable: ties keep their order
    expected = {
        "/one": [r.message for r in by_time],  # one target for both sources
        "/forwarder/agent-a": [r.message for r in by_time if r.tags is TAGS],
        "/forwarder/agent-b": [r.message for r in by_time if r.tags is other],
    }
    for records in (shuffled, by_time):
        for group, stream in (("/one", "one"), (cw.DEFAULT_LOG_GROUP, cw.DEFAULT_LOG_STREAM)):
            sent: dict[str, list[str]] = {}
            for batch in cw.encode_events(records, group, stream, NOW_MS).batches:
                check_batch(batch)
                events = sent.setdefault(batch.payload["logGroupName"], [])
                events.extend(r.message for r in batch.records)
                assert [body["message"] for body in bodies(batch)] == [r.message for r in batch.records]
            assert sent == {k: v for k, v in expected.items() if (k == "/one") == (group == "/one")}


# --- encode: oversized events ---------------------------------------------------------------------------------


def test_oversized_message_is_cut_and_marked_never_dropped() -> None:
    original_attrs = {"k": "v"}
    big = rec("x" * 1_500_000, attributes=original_attrs)
    wide = rec("€" * 500_000)  # 1,500,000 bytes: the cut must land on a character boundary
    encoded = encode([big, wide])
    assert encoded.dropped == {}
    assert len(encoded.batches) == 2
    for batch in encoded.batches:
        check_batch(batch)
        (event,) = batch.payload["logEvents"]
        assert event_cost(event) <= API_MAX_BATCH_BYTES
        assert event_cost(event) > API_MAX_BATCH_BYTES - 64  # kept as much as fits
        body = json.loads(event["message"].encode("utf-8").decode("utf-8", "strict"))
        assert body["attributes"][TRUNCATED] is True
        assert batch.records[0].message.startswith(body["message"])
    assert original_attrs == {"k": "v"} and big.attributes is original_attrs  # the record is not modified


def test_oversized_attributes_are_folded_into_the_message() -> None:
    record = rec("head", attributes={"blob": "y" * 1_200_000, "room": "r"})
    (batch,) = encode([record]).batches
    check_batch(batch)
    body = json.loads(batch.payload["logEvents"][0]["message"])
    assert body["attributes"] == {TRUNCATED: True}
    assert body["message"].startswith('head\n{"blob":"yyy')


def test_unencodable_values_fall_back_without_losing_the_record() -> None:
    records = [rec("lone \ud800 surrogate", attributes={"big": 2**70, "s": "\udfff"}), rec("fine")]
    (batch,) = encode(records).batches
    check_batch(batch)
    first, second = bodies(batch)
    assert first["attributes"]["big"] == 2**70
    assert first["message"].startswith("lone ")
    assert second["message"] == "fine"
    for event in batch.payload["logEvents"]:
        event["message"].encode("utf-8")  # valid UTF-8 on the wire


# --- classify -------------------------------------------------------------------------------------------------


def client_error(code: str, status: int, message: str = "m", operation: str = "PutLogEvents") -> bce.ClientError:
    return bce.ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},  # type: ignore[typeddict-item]
        operation,
    )


@pytest.mark.parametrize(
    ("error", "events", "outcome", "reason", "loud"),
    [
        (client_error("ThrottlingException", 400), 10, Outcome.RETRY, "throttled", False),
        (client_error("ServiceUnavailableException", 503), 10, Outcome.RETRY, "unavailable", False),
        (client_error("InternalFailure", 500), 10, Outcome.RETRY, "server_error", False),
        (client_error("SomethingNew", 502), 10, Outcome.RETRY, "server_error", False),
        (client_error("LimitExceededException", 400), 10, Outcome.RETRY, "limit_exceeded", False),
        (client_error("OperationAbortedException", 400), 10, Outcome.RETRY, "conflict", False),
        (client_error("ResourceNotFoundException", 400), 10, Outcome.RETRY, "not_found", False),
        (client_error("InvalidSequenceTokenException", 400), 10, Outcome.RETRY, "sequence_token", False),
        (client_error("UnrecognizedClientException", 400), 10, Outcome.RETRY, "credentials", True),
        (client_error("AccessDeniedException", 400), 10, Outcome.RETRY, "credentials", True),
        (client_error("InvalidSignatureException", 400), 10, Outcome.RETRY, "credentials", True),
        (client_error("ExpiredTokenException", 400), 10, Outcome.RETRY, "credentials", True),
        (client_error("", 403), 10, Outcome.RETRY, "credentials", True),
        (client_error("", 401), 10, Outcome.RETRY, "credentials", True),
        (client_error("InvalidParameterException", 400), 10, Outcome.SPLIT, "too_large", False),
        (client_error("InvalidParameterException", 400), 1, Outcome.DROP, "invalid_parameter", True),
        (client_error("SerializationException", 400), 2, Outcome.SPLIT, "too_large", False),
        (client_error("", 413), 5, Outcome.SPLIT, "too_large", False),
        (client_error("DataAlreadyAcceptedException", 400), 10, Outcome.OK, "", False),
        (client_error("BrandNewClientError", 400), 10, Outcome.RETRY, "client_error", True),
        (client_error("KMSDisabled", 409), 10, Outcome.RETRY, "client_error", True),
        (bce.EndpointConnectionError(endpoint_url="https://logs"), 10, Outcome.RETRY, "network", False),
        (bce.ConnectTimeoutError(endpoint_url="https://logs"), 10, Outcome.RETRY, "network", False),
        (bce.ReadTimeoutError(endpoint_url="https://logs"), 10, Outcome.RETRY, "network", False),
        (bce.ConnectionClosedError(endpoint_url="https://logs"), 10, Outcome.RETRY, "network", False),
        (ConnectionResetError("reset"), 10, Outcome.RETRY, "network", False),
        (bce.SSLError(endpoint_url="https://logs", error=OSError("bad cert")), 10, Outcome.RETRY, "tls", True),
        (bce.NoCredentialsError(), 10, Outcome.RETRY, "credentials", True),
        (
            bce.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
            10,
            Outcome.RETRY,
            "credentials",
            True,
        ),
        (bce.ParamValidationError(report="bad"), 3, Outcome.SPLIT, "too_large", False),
        (bce.ParamValidationError(report="bad"), 1, Outcome.DROP, "invalid_parameter", True),
        (ValueError("unexpected"), 10, Outcome.RETRY, "internal_error", True),
    ],
)
def test_classify_errors(error: BaseException, events: int, outcome: Outcome, reason: str, loud: bool) -> None:
    verdict = cw.classify(None, error, events)
    assert verdict.outcome is outcome
    assert verdict.reason == reason
    assert verdict.loud is loud
    if outcome is Outcome.RETRY:
        assert verdict.after is None
        assert verdict.detail  # something to log


@pytest.mark.parametrize(
    ("info", "events", "dropped"),
    [
        (None, 5, {}),
        ({}, 5, {}),
        ({"tooOldLogEventEndIndex": 3}, 10, {"too_old": 3}),
        ({"tooNewLogEventStartIndex": 7}, 10, {"too_new": 3}),
        ({"tooNewLogEventStartIndex": 0}, 10, {"too_new": 10}),
        ({"expiredLogEventEndIndex": 2}, 10, {"expired": 2}),
        ({"expiredLogEventEndIndex": 2, "tooOldLogEventEndIndex": 5}, 10, {"expired": 2, "too_old": 3}),
        ({"expiredLogEventEndIndex": 5, "tooOldLogEventEndIndex": 2}, 10, {"expired": 5}),
        ({"tooOldLogEventEndIndex": 2, "tooNewLogEventStartIndex": 8}, 10, {"too_old": 2, "too_new": 2}),
        ({"tooOldLogEventEndIndex": 50}, 10, {"too_old": 10}),  # out of range: clamped
        ({"tooOldLogEventEndIndex": 6, "tooNewLogEventStartIndex": 4}, 10, {"too_old": 6, "too_new": 4}),
        ({"tooOldLogEventEndIndex": "3"}, 10, {}),  # not an index: ignored
    ],
)
def test_classify_accepted_with_rejected_events(
    info: dict[str, Any] | None, events: int, dropped: dict[str, int]
) -> None:
    response: dict[str, Any] = {"nextSequenceToken": "1"}
    if info is not None:
        response["rejectedLogEventsInfo"] = info
    verdict = cw.classify(response, None, events)
    assert verdict.outcome is Outcome.OK
    assert dict(verdict.dropped) == dropped
    assert sum(dropped.values()) <= events


# --- against moto (server mode, loopback) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with running_moto() as endpoint:
        yield endpoint


@pytest.fixture(autouse=True)
def _isolated_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolated_aws_env(monkeypatch, tmp_path)


def make_sink(
    endpoint: str, *, http: HttpSettings | None = None, clock: Any = time.time, **env: str
) -> cw.CloudWatchSink:
    config = cw.config_from_env(aws_env(endpoint, **env))
    assert config is not None
    assert config.endpoint_url is not None and require_loopback(config.endpoint_url)
    return cw.CloudWatchSink(config, http or HttpSettings(timeout_s=5.0), clock=clock)


def make_runner(sink: cw.CloudWatchSink) -> DestinationRunner:
    return DestinationRunner(sink, MemoryBuffer(10**9), DestinationStats("cloudwatch"), RetryPolicy())


def read_back(endpoint: str, group: str, stream: str) -> list[dict[str, Any]]:
    client = admin_client(endpoint)
    events: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"logGroupName": group, "logStreamName": stream, "startFromHead": True}
        if token:
            kwargs["nextToken"] = token
        page = client.get_log_events(**kwargs)
        events.extend(page["events"])  # type: ignore[arg-type]
        if not page["events"] or page.get("nextForwardToken") == token:
            break
        token = page.get("nextForwardToken")
    client.close()
    return events


def unique_tags() -> Tags:
    return Tags(host=f"host-{uuid.uuid4().hex[:8]}", source=f"agent-{uuid.uuid4().hex[:8]}", service="svc")


def test_loopback_guard_refuses_other_hosts() -> None:
    assert require_loopback("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert require_loopback("https://localhost:1/") == "https://localhost:1/"
    assert require_loopback("http://[::1]:80") == "http://[::1]:80"
    for url in ("https://logs.us-west-2.amazonaws.com", "http://10.0.0.1:4566", "http://example.com", None, ""):
        with pytest.raises(NotLoopbackError):
            require_loopback(url)
    with pytest.raises(NotLoopbackError):
        aws_env("https://logs.us-west-2.amazonaws.com")


async def test_delivers_every_record_once_creating_group_and_stream(moto_endpoint: str) -> None:
    tags = unique_tags()
    sink = make_sink(moto_endpoint, CLOUDWATCH_RETENTION_DAYS="7")
    now_ms = int(time.time() * 1000)
    records = [
        rec(
            f"line {i} ✓",
            now_ms - 1000 + i,
            tags=tags,
            stream="stderr" if i % 4 == 0 else "stdout",
            level=Level.INFO if i % 2 else None,
            attributes={"i": i, "room": "r"} if i % 3 else None,
        )
        for i in range(250)
    ]
    runner = make_runner(sink)
    await runner.deliver_records(records)
    await sink.aclose()
    assert runner.stats.delivered == 250 and not runner.stats.dropped and runner.stats.retries == 0

    group, stream = f"/forwarder/{tags.source}", f"{tags.host}/{tags.source}"
    admin = admin_client(moto_endpoint)
    (described,) = admin.describe_log_groups(logGroupNamePrefix=group)["logGroups"]
    assert described["logGroupName"] == group and described.get("retentionInDays") == 7
    streams = admin.describe_log_streams(logGroupName=group)["logStreams"]
    assert [s["logStreamName"] for s in streams] == [stream]
    admin.close()

    events = read_back(moto_endpoint, group, stream)
    got = [json.loads(e["message"]) for e in events]
    assert sorted(b["message"] for b in got) == sorted(r.message for r in records)
    assert len(got) == 250
    by_message = {r.message: r for r in records}
    for event, body in zip(events, got, strict=True):
        record = by_message[body["message"]]
        assert event["timestamp"] == record.timestamp_ns // 1_000_000
        assert body["host"] == tags.host and body["source"] == tags.source and body["service"] == "svc"
        assert body["stream"] == record.stream
        assert body.get("level") == (record.level.name if record.level else None)
        assert body.get("attributes") == record.attributes


async def test_existing_group_is_used_without_touching_its_retention(moto_endpoint: str) -> None:
    tags = unique_tags()
    group = f"/preexisting/{tags.source}"
    admin = admin_client(moto_endpoint)
    admin.create_log_group(logGroupName=group)  # made by someone else; our stream is missing
    sink = make_sink(moto_endpoint, CLOUDWATCH_LOG_GROUP=group, CLOUDWATCH_RETENTION_DAYS="30")
    runner = make_runner(sink)
    await runner.deliver_records([rec("one", int(time.time() * 1000), tags=tags)])
    await sink.aclose()
    assert runner.stats.delivered == 1
    (described,) = admin.describe_log_groups(logGroupNamePrefix=group)["logGroups"]
    assert "retentionInDays" not in described
    admin.close()
    stored = read_back(moto_endpoint, group, f"{tags.host}/{tags.source}")
    assert [json.loads(e["message"])["message"] for e in stored] == ["one"]


async def test_deleted_group_is_recreated_within_one_attempt(moto_endpoint: str) -> None:
    tags = unique_tags()
    sink = make_sink(moto_endpoint)
    runner = make_runner(sink)
    group, stream = f"/forwarder/{tags.source}", f"{tags.host}/{tags.source}"
    await runner.deliver_records([rec("before", int(time.time() * 1000), tags=tags)])
    admin = admin_client(moto_endpoint)
    admin.delete_log_group(logGroupName=group)
    admin.close()
    await runner.deliver_records([rec("after", int(time.time() * 1000), tags=tags)])
    await sink.aclose()
    assert runner.stats.delivered == 2 and runner.stats.retries == 0
    assert [json.loads(e["message"])["message"] for e in read_back(moto_endpoint, group, stream)] == ["after"]


async def test_rejected_too_old_events_are_counted_not_retried(moto_endpoint: str) -> None:
    """A batch encoded an hour ago whose oldest events have since passed 14 days: moto accepts the request with
    ``rejectedLogEventsInfo``; the rejected events are counted as dropped and nothing is sent again."""
    tags = unique_tags()
    sink = make_sink(moto_endpoint, clock=lambda: time.time() - 3600)  # encoded an hour ago
    now_ms = int(time.time() * 1000)
    old = [rec(f"old {i}", now_ms - 14 * DAY_MS - 600_000 + i, tags=tags) for i in range(3)]
    fresh = [rec(f"fresh {i}", now_ms - 1_800_000 + i, tags=tags) for i in range(2)]
    runner = make_runner(sink)
    await runner.deliver_records(old + fresh)
    await sink.aclose()
    # moto reports tooOldLogEventEndIndex as the index of the last too-old event (2 here); the API reference calls
    # the field exclusive, which is how the sink reads it, so 2 of the 3 are counted against moto (3 against AWS).
    assert runner.stats.dropped == {"too_old": 2}
    assert runner.stats.retries == 0 and runner.stats.batches == 2  # 14 days apart: two batches (24 h span)
    stored = read_back(moto_endpoint, f"/forwarder/{tags.source}", f"{tags.host}/{tags.source}")
    assert [json.loads(e["message"])["message"] for e in stored] == ["fresh 0", "fresh 1"]  # each once


async def test_explicit_env_endpoint_wins_over_process_environment(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """config_from_env may be given a mapping that is not os.environ: its endpoint is the one used."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_CLOUDWATCH_LOGS", "http://127.0.0.1:9")  # closed port, loopback
    tags = unique_tags()
    sink = make_sink(moto_endpoint)
    runner = make_runner(sink)
    await runner.deliver_records([rec("via mapping", int(time.time() * 1000), tags=tags)])
    await sink.aclose()
    assert runner.stats.delivered == 1 and runner.stats.retries == 0


# --- error answers from a loopback HTTPS server playing CloudWatch -----------------------------------------------


class FakeCloudWatch:
    """Answers PutLogEvents with the given error answers first, then 200; records every request body."""

    def __init__(self, answers: list[tuple[int, str]], poison: str | None = None) -> None:
        self.answers = list(answers)
        self.poison = poison
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.raw: list[bytes] = []

    def __call__(self, request: Request) -> Response:
        assert request.headers["X-Amz-Target"] == "Logs_20140328.PutLogEvents"
        self.raw.append(request.get_data())
        body = json.loads(request.get_data())
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if not body.get("logEvents"):  # AWS: logEvents is required, at least one event
            return self._error(400, "InvalidParameterException")
        if self.answers:
            status, code = self.answers.pop(0)
            return self._error(status, code)
        if self.poison and any(self.poison in e["message"] for e in body["logEvents"]):
            return self._error(400, "InvalidParameterException")
        return Response(json.dumps({"nextSequenceToken": "1"}), 200, content_type="application/x-amz-json-1.1")

    @staticmethod
    def _error(status: int, code: str) -> Response:
        payload = json.dumps({"__type": code, "message": f"{code} from the test server"})
        return Response(payload, status, content_type="application/x-amz-json-1.1")


def https_sink(httpserver: HTTPServer, ca_file: Path, **env: str) -> cw.CloudWatchSink:
    return make_sink(httpserver.url_for("/").rstrip("/"), http=HttpSettings(ca_file=str(ca_file), timeout_s=5.0), **env)


async def test_throttled_twice_then_delivered_once(
    httpserver: HTTPServer, ca_file: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeCloudWatch([(400, "ThrottlingException"), (400, "ThrottlingException")])
    httpserver.expect_request("/", method="POST").respond_with_handler(fake)
    sink = https_sink(httpserver, ca_file)
    now_ms = int(time.time() * 1000)
    records = [rec(f"t{i}", now_ms + i) for i in range(20)]
    runner = make_runner(sink)
    await runner.deliver_records(records)
    await sink.aclose()
    assert runner.stats.retries == 2 and runner.stats.delivered == 20 and not runner.stats.dropped
    assert len(fake.requests) == 3  # botocore did not retry on its own: our loop made all three attempts
    assert fake.requests[0] == fake.requests[1] == fake.requests[2]
    delivered = [json.loads(e["message"])["message"] for e in fake.requests[2]["logEvents"]]
    assert delivered == [f"t{i}" for i in range(20)]
    assert "sequenceToken" not in fake.requests[2]
    for headers in fake.headers:
        assert f"Credential={TEST_ACCESS_KEY_ID}/" in headers["Authorization"]
        assert TEST_SECRET_ACCESS_KEY not in json.dumps(headers)


async def test_invalid_event_is_isolated_by_bisection(
    httpserver: HTTPServer, ca_file: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeCloudWatch([], poison="POISON")
    httpserver.expect_request("/", method="POST").respond_with_handler(fake)
    sink = https_sink(httpserver, ca_file)
    now_ms = int(time.time() * 1000)
    records = [rec("POISON" if i == 5 else f"ok{i}", now_ms + i) for i in range(8)]
    runner = make_runner(sink)
    await runner.deliver_records(records)
    await sink.aclose()
    assert runner.stats.delivered == 7
    assert runner.stats.dropped == {"invalid_parameter": 1}
    accepted = [
        json.loads(e["message"])["message"]
        for body in fake.requests
        for e in body["logEvents"]
        if not any("POISON" in x["message"] for x in body["logEvents"])
    ]
    assert sorted(accepted) == sorted(f"ok{i}" for i in range(8) if i != 5)


@pytest.mark.parametrize(
    ("status", "code", "reason", "loud"),
    [
        (400, "UnrecognizedClientException", "credentials", True),
        (400, "AccessDeniedException", "credentials", True),
        (500, "InternalFailure", "server_error", False),
        (503, "ServiceUnavailableException", "unavailable", False),
    ],
)
async def test_one_attempt_error_answers(
    httpserver: HTTPServer, ca_file: Path, status: int, code: str, reason: str, loud: bool
) -> None:
    fake = FakeCloudWatch([(status, code)])
    httpserver.expect_request("/", method="POST").respond_with_handler(fake)
    sink = https_sink(httpserver, ca_file)
    (batch,) = sink.encode([rec("x", int(time.time() * 1000))]).batches
    verdict = await sink.send(batch)
    await sink.aclose()
    assert len(fake.requests) == 1  # exactly one attempt, botocore's retries are off
    assert verdict.outcome is Outcome.RETRY and verdict.reason == reason and verdict.loud is loud
    assert code in verdict.detail
    assert TEST_SECRET_ACCESS_KEY not in verdict.detail and TEST_ACCESS_KEY_ID not in verdict.detail


async def test_request_body_is_the_payload_as_compact_utf8_json_signed_by_botocore(
    httpserver: HTTPServer, ca_file: Path
) -> None:
    """The bytes on the wire are ``orjson.dumps(payload)`` (AWS JSON 1.1), with botocore's headers and SigV4
    signature over them."""
    fake = FakeCloudWatch([])
    httpserver.expect_request("/", method="POST").respond_with_handler(fake)
    sink = https_sink(httpserver, ca_file)
    now_ms = int(time.time() * 1000)
    records = [
        rec('ünïcode "quoted" \\ ☃', now_ms, level=Level.ERROR, attributes={"k": "v€"}),
        rec("second", now_ms + 1),
    ]
    (batch,) = sink.encode(records).batches
    verdict = await sink.send(batch)
    await sink.aclose()
    assert verdict.outcome is Outcome.OK
    (raw,) = fake.raw
    assert raw == orjson.dumps(batch.payload)
    assert "☃".encode() in raw  # UTF-8 on the wire, not \\u escapes
    assert json.loads(raw) == batch.payload
    (headers,) = fake.headers
    assert headers["Content-Type"] == "application/x-amz-json-1.1"
    assert int(headers["Content-Length"]) == len(raw)
    authorization = headers["Authorization"]
    assert authorization.startswith(f"AWS4-HMAC-SHA256 Credential={TEST_ACCESS_KEY_ID}/")
    assert "/us-west-2/logs/aws4_request" in authorization
    assert "x-amz-target" in authorization.split("SignedHeaders=")[1]


async def test_a_put_that_left_without_its_events_is_retried_never_dropped(
    httpserver: HTTPServer, ca_file: Path
) -> None:
    """If botocore ever stopped calling the body handler, the request would carry no events and be refused as
    invalid: the sink reports a loud retry (the records stay in the spool), not a split or a drop."""
    fake = FakeCloudWatch([])
    httpserver.expect_request("/", method="POST").respond_with_handler(fake)
    sink = https_sink(httpserver, ca_file)
    sink._get_client().meta.events.unregister(cw.PUT_BODY_EVENT, unique_id=cw.PUT_BODY_HANDLER_ID)
    (batch,) = sink.encode([rec("a", int(time.time() * 1000)), rec("b", int(time.time() * 1000))]).batches
    verdict = await sink.send(batch)
    await sink.aclose()
    assert [body["logEvents"] for body in fake.requests] == [[]]
    assert verdict.outcome is Outcome.RETRY and verdict.reason == "internal_error" and verdict.loud
    assert "without the prepared body" in verdict.detail


async def test_untrusted_certificate_is_a_loud_retry(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/", method="POST").respond_with_data("{}")
    sink = make_sink(httpserver.url_for("/").rstrip("/"))  # no ca_file: the test CA is not trusted
    (batch,) = sink.encode([rec("x", int(time.time() * 1000))]).batches
    verdict = await sink.send(batch)
    await sink.aclose()
    assert verdict.outcome is Outcome.RETRY and verdict.reason == "tls" and verdict.loud


async def test_refused_connection_is_a_retry() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = make_sink(f"http://127.0.0.1:{port}")
    (batch,) = sink.encode([rec("x", int(time.time() * 1000))]).batches
    verdict = await sink.send(batch)
    await sink.aclose()
    assert verdict.outcome is Outcome.RETRY and verdict.reason == "network" and not verdict.loud


async def test_shutdown_does_not_wait_for_a_hanging_request(autojump_clock: trio.testing.MockClock) -> None:
    """A destination that accepts the connection and never answers: cancelling the send returns at once (the
    worker thread is abandoned) instead of waiting for botocore's read timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        sink = make_sink(f"http://127.0.0.1:{port}", http=HttpSettings(timeout_s=3.0))
        (batch,) = sink.encode([rec("x", int(time.time() * 1000))]).batches
        started = time.monotonic()
        with trio.move_on_after(1) as scope:
            await sink.send(batch)
        elapsed = time.monotonic() - started
        await sink.aclose()
    assert scope.cancelled_caught
    assert elapsed < 2.5  # well under the 3 s read timeout the thread is still waiting on


def test_encode_payload_is_orjson_compatible() -> None:
    """20,000 typical records (several batches) encode; the messages are JSON. Speed is measured in bench/."""
    records = [
        rec(
            f"message number {i} with some text",
            NOW_MS - i,
            level=Level.INFO,
            attributes={"name": "livekit.agents", "pid": 27153, "code.line.number": i},
        )
        for i in range(20_000)
    ]
    encoded = encode(records)
    assert sum(len(b.records) for b in encoded.batches) == 20_000
    assert orjson.loads(encoded.batches[0].payload["logEvents"][0]["message"])["level"] == "INFO"
