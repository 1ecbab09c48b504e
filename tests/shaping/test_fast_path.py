"""``Shaper.feed`` has two paths: one pass over the lines (no event times, the common case) and the grouper's items
then records (with event times). Whatever the input and its batching, both give the same records."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from forwarder.record import Level, Record, Tags
from forwarder.shaping.shaper import Shaper
from forwarder.sources._lines import LinePart

TAGS = Tags("host-1", "agent-1", "cloud.livekit.io")
GOLDEN = Path(__file__).parent / "golden"
ESC = "\x1b"
PIECES = [
    '{"message": "m", "level": "INFO", "timestamp": "2026-11-21T13:52:58.043707+00:00"}',
    '{"message": "d", "level": "debug"}',
    '{"msg": "w", "level": "warn", "time": 1795269178043}',
    '{"message": "\\u001b[31mred\\u001b[0m", "level": "ERROR"}',
    f'{{"message": "x", "level": "INFO"}}{ESC}[0m',
    f"{ESC}[32m{{}}",
    "{broken json",
    "[1, 2]",
    "ERROR:root:failed",
    "INFO:x:hello",
    "DEBUG:x:hidden below INFO",
    "plain text",
    "The end",
    "  indented",
    "\tindented with a tab",
    "",
    f"{ESC}[0m",
    "Traceback (most recent call last):",
    '  File "a.py", line 1, in <module>',
    "ValueError: bad",
    "_Private: exc",
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
    "/a.py:1: UserWarning: careful",
    "2026-11-21 13:52:21,767 - DEBUG x - dev",
    f"2026-11-21 13:52:21,767 - {ESC}[33mWARNING{ESC}[0m x - coloured",
    f"  {ESC}[2mindented and coloured{ESC}[0m",
    "2026-11-21 13:52:21,767 - my.module - ERROR - asctime",
    "[debug] bracketed",
    "level=warn msg=logfmt",
    "12345",
]


def _lines(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    for _ in range(n):
        if rng.random() < 0.03:  # a piece of a long line
            part = rng.randint(1, 3)
            out.append(LinePart(rng.choice(['{"level": "ERROR", ', "WARN cut", "x" * 20]), part, rng.random() < 0.5))
        else:
            out.append(rng.choice(PIECES))
    return out


def _key(rec: Record, one_pass: bool) -> tuple[object, ...]:
    # The items path was given event time 0 for every line: a record without a time of its own has 0 there.
    event = rec.event_time_ns if rec.event_time_ns is not None or not one_pass else 0
    return (rec.timestamp_ns, rec.message, rec.stream, rec.level, rec.attributes, event)


def _both(
    batches: list[tuple[str, list[str]]], min_level: Level, strip: bool, max_group_bytes: int
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], Shaper, Shaper]:
    fast = Shaper(TAGS, min_level=min_level, strip_ansi=strip, max_group_bytes=max_group_bytes)
    items = Shaper(TAGS, min_level=min_level, strip_ansi=strip, max_group_bytes=max_group_bytes)
    got_fast: list[Record] = []
    got_items: list[Record] = []
    for i, (stream, lines) in enumerate(batches):
        now = 1_000 + i * 50_000_000
        got_fast += fast.feed(stream, lines, now)
        got_items += items.feed(stream, lines, now, [0] * len(lines))
        assert fast.held(stream) == items.held(stream)
        assert fast.next_deadline_ns() == items.next_deadline_ns()
        if i % 3 == 2:
            got_fast += fast.flush_idle(now)
            got_items += items.flush_idle(now)
    got_fast += fast.flush()
    got_items += items.flush()
    return [_key(r, True) for r in got_fast], [_key(r, False) for r in got_items], fast, items


@pytest.mark.parametrize("seed", range(12))
def test_one_pass_gives_what_the_items_path_gives(seed: int) -> None:
    rng = random.Random(seed)
    batches = [(rng.choice(["stdout", "stderr"]), _lines(rng, rng.randint(0, 40))) for _ in range(60)]
    min_level = rng.choice([Level.DEBUG, Level.INFO, Level.ERROR])
    one_pass, items, fast, slow = _both(batches, min_level, rng.random() < 0.7, rng.choice([60, 256 * 1024]))
    assert one_pass == items
    assert fast.filtered == slow.filtered
    assert len(one_pass) > 100  # the input was not all withheld


@pytest.mark.parametrize(
    "name", ["agent.stderr.txt", "livekit-agent-dev.stdout.txt", "livekit-agent-start.stdout.jsonl"]
)
def test_one_pass_on_real_output(name: str) -> None:
    lines = (GOLDEN / name).read_text().splitlines()
    for size in (1, 7, 1000):
        batches = [("stderr", lines[i : i + size]) for i in range(0, len(lines), size)]
        one_pass, items, _, _ = _both(batches, Level.DEBUG, True, 256 * 1024)
        assert one_pass == items
        assert len(one_pass) >= len(lines) // 20


def test_a_json_line_closes_a_one_line_group_first() -> None:
    shaper = Shaper(TAGS, min_level=Level.DEBUG)
    line = json.dumps({"message": "j", "level": "INFO"})
    recs = shaper.feed("stdout", ["WARN first", line, "second"], 5)
    assert [(r.message, r.level) for r in recs] == [("WARN first", Level.WARNING), ("j", Level.INFO)]
    assert shaper.held("stdout") == 1
    assert [r.message for r in shaper.flush()] == ["second"]
