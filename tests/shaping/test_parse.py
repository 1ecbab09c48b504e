"""Table tests for single-line parsing: level detection (text and JSON), ANSI stripping, timestamps."""

from __future__ import annotations

import json
from typing import Any

import pytest

from forwarder.record import Level, Record, Tags
from forwarder.shaping.parse import (
    MAX_JSON_DEPTH,
    detect_level,
    json_record,
    normalize_level,
    parse_timestamp,
    strip_ansi,
)
from forwarder.shaping.shaper import Shaper

TAGS = Tags("host-1", "agent-1", "cloud.livekit.io")
ESC = "\x1b"
DBG, INF, WRN, ERR, CRT = Level.DEBUG, Level.INFO, Level.WARNING, Level.ERROR, Level.CRITICAL

# (line, expected level, expected level_original attribute or None)
TEXT_CASES: list[tuple[str, Level | None, str | None]] = [
    # Python logging defaults
    ("ERROR:root:something failed", ERR, None),
    ("WARNING:livekit.agents:slow response", WRN, None),
    ("DEBUG:asyncio:Using selector: EpollSelector", DBG, None),
    ("CRITICAL:my.module:out of memory", CRT, None),
    ("INFO:     Started server process [27153]", INF, None),  # uvicorn
    ("2026-11-21 13:52:21,767 - my.module - WARNING - disk almost full", WRN, None),
    ("2026-11-21 13:52:21,767 - my.module - ERROR - job failed", ERR, None),
    # livekit dev mode (after ANSI stripping) and its coloured original
    ("2026-11-21 13:52:21,767 - DEBUG asyncio - Using selector: EpollSelector ", DBG, None),
    (
        f"2026-11-21 13:52:21,795 - {ESC}[33mWARNING{ESC}[0m livekit.agents - failed to connect {ESC}[90m{{}}{ESC}[0m",
        WRN,
        None,
    ),
    (f"2026-11-21 13:52:21,769 - {ESC}[32mINFO{ESC}[0m livekit.agents - starting worker", INF, None),
    (f"{ESC}[31mERROR{ESC}[0m: connection refused", ERR, None),
    # bracketed and bare words at the start
    ("[warn] low disk space", WRN, "warn"),
    ("[ERROR] cannot open file", ERR, None),
    ("[ Info ] ready", INF, None),
    ("WARN something odd happened", WRN, "WARN"),
    ("ERROR something bad happened", ERR, None),
    ("error: could not compile `agent`", ERR, None),
    ("Warning: deprecated option --foo", WRN, None),
    ("FATAL: database is gone", CRT, "FATAL"),
    ("ERRO[0001] logrus style error", ERR, "ERRO"),
    # timestamps first
    ("2026-11-21T13:52:21.767Z INFO listening on :8081", INF, None),
    ("2026/11/21 13:52:21 [error] 12#0: *1 connect() failed", ERR, None),
    ("[2026-11-21 13:52:21,767] ERROR in app: Exception on /", ERR, None),
    ("[2026-11-21T13:52:21Z WARN  my_crate] retrying", WRN, "WARN"),
    ("13:52:21 DEBUG tick", DBG, None),
    ("3:04PM INF request served", INF, "INF"),
    # glog: single letters only in this exact, unambiguous shape
    ("E1121 13:52:21.767123   27153 main.go:42] dial failed", ERR, "E"),
    ("W1121 13:52:21.767123   27153 main.go:42] slow", WRN, "W"),
    ("I1121 13:52:21.767123   27153 main.go:42] ok", INF, "I"),
    # logfmt
    ('time="2026-11-21T13:52:21Z" level=warning msg="slow query"', WRN, None),
    ("level=error ts=2026-11-21T13:52:21Z msg=boom", ERR, None),
    ("level=warn ts=2026-11-21T13:52:21Z msg=slow", WRN, "warn"),
    ('ts=2026-11-21T13:52:21Z lvl=debug msg="tick"', DBG, None),
    # Python warnings
    (
        "/app/.venv/lib/python3.11/site-packages/jwt/api_jwt.py:149: InsecureKeyLengthWarning: The HMAC key is short",
        WRN,
        None,
    ),
    ("agent.py:12: DeprecationWarning: use the new API", WRN, None),
    # no level: level words in the middle of prose, or ambiguous starts
    ("the request failed with an error, retrying", None, None),
    ("Connection ERROR while reading: retrying", None, None),
    ("user said: WARNING, the bridge is out", None, None),
    ("Error handling is done by the supervisor", None, None),
    ("Information about the room follows", None, None),
    ("I/O error on /dev/sda", None, None),
    ("E: this is a dpkg-style line", None, None),
    ("2026-11-21 13:52:21 Error rate is low today", None, None),
    ("we set level=error in the config file", None, None),
    ("raw print() from job process stderr", None, None),
    ("Traceback (most recent call last):", ERR, None),  # a traceback, even cut short, is at least ERROR
    ("", None, None),
    ("12345 items processed", None, None),
]


@pytest.mark.parametrize(("line", "level", "original"), TEXT_CASES)
def test_text_levels(line: str, level: Level | None, original: str | None) -> None:
    shaper = Shaper(TAGS, min_level=Level.DEBUG)
    records = shaper.feed("stderr", [line], 1) + shaper.flush()
    assert len(records) == 1
    rec = records[0]
    assert rec.level == level, line
    assert (rec.attributes or {}).get("level_original") == original
    assert rec.message == strip_ansi(line)  # ANSI removed from the message by default, nothing else changed


def test_enough_level_cases() -> None:
    assert len(TEXT_CASES) + len(JSON_CASES) >= 25
    assert sum(1 for _, lvl, _ in TEXT_CASES if lvl is None) >= 8  # prose and ambiguous lines


# (line, expected level, expected level_original, expected message)
JSON_CASES: list[tuple[str, Level | None, Any, str]] = [
    ('{"message": "m", "level": "INFO"}', INF, None, "m"),
    ('{"message": "m", "level": "warn"}', WRN, "warn", "m"),
    ('{"message": "m", "level": "Warning"}', WRN, None, "m"),
    ('{"msg": "m", "levelname": "ERROR"}', ERR, None, "m"),
    ('{"event": "m", "level": "critical"}', CRT, None, "m"),  # structlog
    ('{"message": "m", "severity": "NOTICE"}', INF, "NOTICE", "m"),  # Google Cloud severity
    ('{"message": "m", "status": "error"}', ERR, None, "m"),  # Datadog status
    ('{"message": "m", "status": 500}', None, None, "m"),  # an HTTP status is not a level
    ('{"message": "m", "status": "ok"}', None, None, "m"),
    ('{"message": "m", "level": 40}', ERR, 40, "m"),  # Python logging number
    ('{"msg": "m", "level": 30, "time": 1795269178043}', INF, 30, "m"),  # pino: 30 is info
    ('{"msg": "m", "level": 60, "time": 1795269178043}', CRT, 60, "m"),
    ('{"message": "m", "level": "verbose"}', None, None, "m"),
    ('{"message": "m", "level": null, "severity": "warning"}', WRN, None, "m"),
    ('{"message": "no level here"}', None, None, "no level here"),
    (
        '{"message": "boom\\nTraceback (most recent call last):\\n  File \\"x\\"\\nKeyError: 1"}',
        ERR,
        None,
        'boom\nTraceback (most recent call last):\n  File "x"\nKeyError: 1',
    ),
    ('{"message": "\\u001b[31mred\\u001b[0m", "level": "ERROR"}', ERR, None, "red"),
    (
        '{"message": "ERROR: inside a JSON message is not a level"}',
        None,
        None,
        "ERROR: inside a JSON message is not a level",
    ),
]


@pytest.mark.parametrize(("line", "level", "original", "message"), JSON_CASES)
def test_json_levels(line: str, level: Level | None, original: Any, message: str) -> None:
    rec = json_record(line, 7, "stdout", TAGS)
    assert rec is not None
    assert rec.level == level
    assert (rec.attributes or {}).get("level_original") == original
    assert rec.message == message
    assert rec.timestamp_ns == 7


def test_json_fields_lifted_with_their_types() -> None:
    line = (
        '{"message": "hello", "level": "INFO", "name": "livekit.agents", "pid": 27153, "elapsed_time": 0.01, '
        '"packages": ["a", "b"], "extra": {"k": null}, "ok": true, "code.line.number": 739, '
        '"timestamp": "2026-11-21T13:52:58.043707+00:00"}'
    )
    rec = json_record(line, 5, "stdout", TAGS)
    assert rec == Record(
        timestamp_ns=5,
        message="hello",
        stream="stdout",
        tags=TAGS,
        level=Level.INFO,
        attributes={
            "name": "livekit.agents",
            "pid": 27153,
            "elapsed_time": 0.01,
            "packages": ["a", "b"],
            "extra": {"k": None},
            "ok": True,
            "code.line.number": 739,
            "timestamp": "2026-11-21T13:52:58.043707+00:00",
        },
        event_time_ns=1_795_269_178_043_707_000,
    )


@pytest.mark.parametrize(
    "line",
    [
        "[1, 2, 3]",
        '"just a string"',
        "42",
        '{"message": "broken',
        "{not json at all}",
        "{}garbage",
    ],
)
def test_not_a_json_object_stays_text(line: str) -> None:
    assert json_record(line, 1, "stdout", TAGS) is None
    shaper = Shaper(TAGS)
    records = shaper.feed("stdout", [line], 1) + shaper.flush()
    assert [(r.message, r.level, r.attributes) for r in records] == [(line, None, None)]


def test_json_unknown_or_null_level_stays_an_attribute() -> None:
    for value in ('"verbose"', "null", "true", "[1]", "25"):
        rec = json_record(f'{{"message": "m", "level": {value}}}', 1, "stdout", TAGS)
        assert rec is not None
        assert rec.level is None
        assert rec.attributes == {"level": json.loads(value)}


def test_json_without_message_keeps_the_line() -> None:
    line = '{"a": 1, "level": "info"}'
    rec = json_record(line, 1, "stdout", TAGS)
    assert rec is not None
    assert (rec.message, rec.level, rec.attributes) == (line, Level.INFO, {"a": 1})


def test_json_non_string_message_is_encoded() -> None:
    rec = json_record('{"message": {"k": [1, 2]}}', 1, "stdout", TAGS)
    assert rec is not None
    assert rec.message == '{"k":[1,2]}'


def _nested(depth: int) -> str:
    """A JSON object line whose ``a`` field takes it to ``depth`` levels of arrays and objects in all."""
    inner = "[" * (depth - 2) + "]" * (depth - 2)
    return '{"message": "deep", "a": {"b": ' + inner + "}}"


def test_json_nested_deeper_than_any_encoder_writes_is_text() -> None:
    """orjson reads 1,024 levels but writes 254, and the destinations add levels of their own: a line deeper than
    MAX_JSON_DEPTH stays text (the whole line is the message), one at the limit stays JSON."""
    at_limit = json_record(_nested(MAX_JSON_DEPTH), 1, "stdout", TAGS)
    assert at_limit is not None and at_limit.message == "deep" and at_limit.attributes is not None
    assert json_record(_nested(MAX_JSON_DEPTH + 1), 1, "stdout", TAGS) is None
    line = _nested(1000)
    records = Shaper(TAGS).feed("stdout", [line], 1)
    assert [(r.message, r.attributes) for r in records] == [(line, None)]
    # Many brackets but shallow: the depth is what counts, not the bracket count.
    wide = '{"message": "wide", "a": [' + ",".join(["[]"] * (2 * MAX_JSON_DEPTH)) + "]}"
    rec = json_record(wide, 1, "stdout", TAGS)
    assert rec is not None and rec.message == "wide" and rec.attributes == {"a": [[]] * (2 * MAX_JSON_DEPTH)}


def test_broken_json_with_raw_ansi_codes_is_stripped_text() -> None:
    line = '{"message": "\x1b[31mred\x1b[0m", "level": "ERROR"}'  # raw ESC: not valid JSON
    shaper = Shaper(TAGS)
    records = shaper.feed("stdout", [line], 1)
    assert [(r.message, r.level) for r in records] == [('{"message": "red", "level": "ERROR"}', None)]


def test_json_ansi_kept_when_not_stripping() -> None:
    rec = json_record('{"message": "\\u001b[31mred\\u001b[0m"}', 1, "stdout", TAGS, strip=False)
    assert rec is not None
    assert rec.message == "\x1b[31mred\x1b[0m"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-21T13:52:58.043707+00:00", 1_795_269_178_043_707_000),
        ("2026-11-21T13:52:58.043707Z", 1_795_269_178_043_707_000),
        ("2026-11-21T14:52:58.043707+01:00", 1_795_269_178_043_707_000),
        ("2026-11-21T13:52:58.043707+0000", 1_795_269_178_043_707_000),
        ("2026-11-21 13:52:58.043707", 1_795_269_178_043_707_000),  # no zone: UTC
        ("2026-11-21T13:52:58.043707123Z", 1_795_269_178_043_707_123),  # ns kept
        ("2026-11-21T13:52:58.0437071Z", 1_795_269_178_043_707_100),
        ("2026-11-21T13:52:58Z", 1_795_269_178_000_000_000),
        ("2026-11-21T13:52:58.5+00:00", 1_795_269_178_500_000_000),
        (1_795_269_178, 1_795_269_178_000_000_000),  # epoch seconds
        (1_795_269_178.5, 1_795_269_178_500_000_000),
        (1_795_269_178_043, 1_795_269_178_043_000_000),  # epoch ms
        (1_795_269_178_043_707, 1_795_269_178_043_707_000),  # epoch us
        (1_795_269_178_043_707_123, 1_795_269_178_043_707_123),  # epoch ns
        ("1795269178", 1_795_269_178_000_000_000),
        ("yesterday", None),
        ("", None),
        (None, None),
        (True, None),
        ([1], None),
        (float("nan"), None),
    ],
)
def test_parse_timestamp(value: object, expected: int | None) -> None:
    assert parse_timestamp(value) == expected


@pytest.mark.parametrize(
    ("timestamp", "event_ns"),
    [
        ('"2026-11-21T13:52:58.043707+00:00"', 1_795_269_178_043_707_000),
        ('"2026-11-21T13:52:58.043707123Z"', 1_795_269_178_043_707_123),
        ('"2026-11-21 13:52:58"', 1_795_269_178_000_000_000),
        ("1795269178.25", 1_795_269_178_250_000_000),
        ('"not a time"', None),
    ],
)
def test_json_timestamp_kept_and_parsed(timestamp: str, event_ns: int | None) -> None:
    rec = json_record(f'{{"message": "m", "timestamp": {timestamp}}}', 1, "stdout", TAGS)
    assert rec is not None
    assert rec.event_time_ns == event_ns
    assert rec.attributes is not None and "timestamp" in rec.attributes  # the line's own field is kept


def test_json_other_time_fields() -> None:
    rec = json_record('{"msg": "m", "time": 1795269178043, "level": 30}', 1, "stdout", TAGS)
    assert rec is not None and rec.event_time_ns == 1_795_269_178_043_000_000
    rec = json_record('{"message": "m", "ts": "2026-11-21T13:52:58Z"}', 1, "stdout", TAGS)
    assert rec is not None and rec.event_time_ns == 1_795_269_178_000_000_000


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("INFO", (INF, False)),
        ("info", (INF, False)),
        (" Warn ", (WRN, True)),
        ("fatal", (CRT, True)),
        ("E", None),
        (20, (INF, True)),
        (25, None),
        (None, None),
        (True, None),
    ],
)
def test_normalize_level(value: object, expected: tuple[Level, bool] | None) -> None:
    assert normalize_level(value) == expected


def test_detect_level_returns_original_only_when_it_differs() -> None:
    assert detect_level("WARN x") == (WRN, "WARN")
    assert detect_level("WARNING:x:y") == (WRN, None)
    assert detect_level("[error] x") == (ERR, None)


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ("\x1b[36mDEBUG\x1b[0m", "DEBUG"),
        ("\x1b[1;31mbold red\x1b[0m", "bold red"),
        ("\x1b]8;;https://example.com\x1b\\link\x1b]8;;\x1b\\", "link"),
        ("no codes", "no codes"),
        ("\x1b[2K\x1b[1Gprogress", "progress"),
    ],
)
def test_strip_ansi(text: str, plain: str) -> None:
    assert strip_ansi(text) == plain


def test_ansi_kept_in_message_when_disabled_but_level_still_found() -> None:
    line = f"2026-11-21 13:52:21,795 - {ESC}[33mWARNING{ESC}[0m livekit.agents - failed"
    shaper = Shaper(TAGS, strip_ansi=False)
    records = shaper.feed("stdout", [line], 1) + shaper.flush()
    assert [(r.message, r.level) for r in records] == [(line, WRN)]


# Fractions of 1 to 9 digits, zones after them, and the day boundary; the same through parse_timestamp and through a
# JSON line's "timestamp" (which has its own inlined fast path).
S = 1_795_269_178_000_000_000  # 2026-11-21T13:52:58Z
FRACTION_CASES: list[tuple[str, int]] = [
    ("2026-11-21T13:52:58.1Z", S + 100_000_000),
    ("2026-11-21T13:52:58.043Z", S + 43_000_000),
    ("2026-11-21T13:52:58.0437+00:00", S + 43_700_000),
    ("2026-11-21T14:52:58.0437+01:00", S + 43_700_000),  # 4 digits, then a zone: its digits are not nanoseconds
    ("2026-11-21T14:52:58.04370+01:00", S + 43_700_000),
    ("2026-11-21T13:52:58.0437+0000", S + 43_700_000),
    ("2026-11-21T13:52:58.043707+00:00", S + 43_707_000),
    ("2026-11-21T06:52:58.0437071-07:00", S + 43_707_100),
    ("2026-11-21T06:52:58.04370712-07:00", S + 43_707_120),
    ("2026-11-21T19:22:58.043707123+05:30", S + 43_707_123),
    ("2026-11-21 13:52:58,043707123", S + 43_707_123),  # comma, no zone (UTC)
    ("2026-11-21T13:52:58.0437071239Z", S + 43_707_123),  # past the 9th digit: dropped
    ("2026-11-21T23:59:59.999999999Z", 1_795_305_599_999_999_999),
    ("2026-11-22T00:00:00Z", 1_795_305_600_000_000_000),
    ("2026-11-22T00:00:00.000000001+00:00", 1_795_305_600_000_000_001),
    ("2026-11-22T01:00:00.5+01:00", 1_795_305_600_500_000_000),
]


@pytest.mark.parametrize(("value", "expected"), FRACTION_CASES)
def test_timestamp_fractions_zones_and_day_boundary(value: str, expected: int) -> None:
    assert parse_timestamp(value) == expected
    rec = json_record(json.dumps({"message": "m", "timestamp": value}), 1, "stdout", TAGS)
    assert rec is not None
    assert rec.event_time_ns == expected
