"""Record helpers: RFC 3339 formatting (cached per second) and the NDJSON shape."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import orjson
import pytest

from forwarder.record import Level, Record, Tags, format_rfc3339_ns
from forwarder.sinks.file import encode_records


@pytest.mark.parametrize(
    ("ns", "expected"),
    [
        (0, "1970-01-01T00:00:00.000000000Z"),
        (1, "1970-01-01T00:00:00.000000001Z"),
        (1_709_164_799_999_999_999, "2024-02-28T23:59:59.999999999Z"),
        (1_709_164_800_000_000_000, "2024-02-29T00:00:00.000000000Z"),
        (1_795_275_141_123_456_789, "2026-11-21T15:32:21.123456789Z"),
    ],
)
def test_format_rfc3339_ns(ns: int, expected: str) -> None:
    assert format_rfc3339_ns(ns) == expected


def test_format_rfc3339_ns_agrees_with_datetime_across_many_seconds() -> None:
    start = 1_795_275_141 * 10**9
    for step in range(0, 5000):
        ns = start + step * 250_000_123  # crosses ~1250 seconds, more than the cache holds
        secs, frac = divmod(ns, 10**9)
        want = dt.datetime.fromtimestamp(secs, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"
        assert format_rfc3339_ns(ns) == want


def test_file_sink_lines_are_to_dict_as_ndjson() -> None:
    tags = Tags("h", "s", "svc")
    records = [
        Record(1_795_275_141_000_000_005, "hello", "stdout", tags, Level.INFO, {"k": 1}, None),
        Record(1_795_275_142_000_000_000, "a\nb", "stderr", tags, None, None, 7),
    ]
    lines = encode_records(records)
    assert [orjson.loads(line) for line in lines] == [r.to_dict() for r in records]
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)


def test_file_sink_lines_are_byte_for_byte_the_dumps_of_to_dict() -> None:
    """encode_records splices pre-encoded parts; every field, key order and escape must match orjson's own output."""
    a = Tags("host-1", "agent", "cloud.livekit.io")
    b = Tags('h"ost\\2', "ägent\u2028", "svc\t")  # escapes in the tag fields
    second = 1_795_275_141 * 10**9
    records = [
        Record(second, "first", "stdout", a),
        Record(second + 999_999_999, 'quote " back\\slash \x01 \u00e9 \U0001f600', "stdout", a, Level.INFO),
        Record(second + 10**9, "next second", "stderr", a, Level.WARNING, {"k": 1, "nested": {"x": [1, 2.5, None]}}),
        Record(second + 10**9 + 1, "other tags", "stderr", b, Level.ERROR, {}, 42),
        Record(second + 10**9 + 2, "back to the first tags", "stdout", a, Level.CRITICAL, {"t": True}, -5),
        Record(second - 1, "an earlier second", "stdout", a, Level.DEBUG, {"level_original": "dbg"}, None),
        Record(0, "", "stdout", b, None, None, 0),
    ]
    expected = [orjson.dumps(r.to_dict(), option=orjson.OPT_APPEND_NEWLINE) for r in records]
    assert encode_records(records) == expected
    assert encode_records(records[3:]) == expected[3:]  # each call starts from no cached second or tags


def test_file_sink_batches_stay_within_max_batch_bytes_in_order() -> None:
    from forwarder.sinks.file import MAX_BATCH_BYTES, FileSink

    tags = Tags("h", "s", "svc")
    big = "x" * (MAX_BATCH_BYTES // 3)
    records = [Record(10**18 + i, f"{i} {big}", "stdout", tags) for i in range(7)]
    records.append(Record(10**18 + 7, "y" * (MAX_BATCH_BYTES + 10), "stdout", tags))  # over the limit alone
    records.append(Record(10**18 + 8, "small", "stdout", tags))
    sink = FileSink(Path("unused"))
    batches = sink.encode(records).batches
    lines = encode_records(records)
    assert b"".join(bytes(b.payload) for b in batches) == b"".join(lines)
    assert [r for b in batches for r in b.records] == records
    assert [len(b.records) for b in batches] == [2, 2, 2, 1, 1, 1]
    for batch in batches:
        assert batch.size == len(batch.payload)
        assert batch.size <= MAX_BATCH_BYTES or len(batch.records) == 1
    small = records[:2]
    (one,) = sink.encode(small).batches
    assert (bytes(one.payload), list(one.records)) == (b"".join(encode_records(small)), small)
    assert sink.encode([]).batches == []
