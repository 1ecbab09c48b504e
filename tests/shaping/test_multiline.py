"""Multi-line grouping through the Shaper: tracebacks, chains, warnings, continuations, idle flush, EOF, size cap."""

from __future__ import annotations

import json

from forwarder.record import TRUNCATED, Level, Record, Tags
from forwarder.shaping.multiline import CAPPED, TRACEBACK, LineGrouper
from forwarder.shaping.shaper import MULTILINE_CAPPED, Shaper
from forwarder.sources._lines import LineFramer, LinePart

TAGS = Tags("host-1", "agent-1", "cloud.livekit.io")
MS = 1_000_000
TIMEOUT_NS = 200 * MS

TRACEBACK_LINES = [
    "Traceback (most recent call last):",
    '  File "/app/agent.py", line 12, in entrypoint',
    "    await session.start(room)",
    '  File "/app/.venv/lib/python3.11/site-packages/livekit/agents/session.py", line 99, in start',
    "    raise KeyError(name)",
    "KeyError: 'missing'",
]

CHAINED = [
    "Traceback (most recent call last):",
    '  File "/app/agent.py", line 40, in _join_room',
    '    return config["missing"]',
    "           ~~~~~~^^^^^^^^^^^",
    "KeyError: 'missing'",
    "",
    "The above exception was the direct cause of the following exception:",
    "",
    "Traceback (most recent call last):",
    '  File "/app/agent.py", line 52, in handle_job',
    "    _join_room({})",
    '  File "/app/agent.py", line 42, in _join_room',
    '    raise RuntimeError("job failed while handling the room") from exc',
    "RuntimeError: job failed while handling the room",
    "",
    "During handling of the above exception, another exception occurred:",
    "",
    "Traceback (most recent call last):",
    '  File "/app/agent.py", line 60, in main',
    "    cleanup()",
    "ValueError: cleanup failed",
]


def shape_all(shaper: Shaper, feeds: list[tuple[str, list[str]]], t0: int = 1000) -> list[Record]:
    """Feed each ``(stream, lines)`` 1 ms apart, then flush; every record in order of return."""
    out: list[Record] = []
    now = t0
    for stream, lines in feeds:
        out += shaper.feed(stream, lines, now)
        now += MS
    return out + shaper.flush()


def summary(records: list[Record]) -> list[tuple[str, str, Level | None]]:
    return [(r.stream, r.message, r.level) for r in records]


def test_traceback_with_intro_line_is_one_error_record() -> None:
    shaper = Shaper(TAGS)
    lines = ["ERROR:livekit.agents:unhandled exception in job", *TRACEBACK_LINES, "INFO:livekit.agents:next"]
    records = shape_all(shaper, [("stderr", lines)])
    assert summary(records) == [
        ("stderr", "\n".join(lines[:-1]), Level.ERROR),
        ("stderr", "INFO:livekit.agents:next", Level.INFO),
    ]
    assert records[0].attributes is None


def test_traceback_interleaved_with_the_other_stream() -> None:
    shaper = Shaper(TAGS)
    stdout = [json.dumps({"message": f"tick {i}", "level": "INFO"}) for i in range(len(TRACEBACK_LINES) + 1)]
    feeds: list[tuple[str, list[str]]] = []
    for i, line in enumerate(TRACEBACK_LINES):  # one stdout line between every two traceback lines
        feeds.append(("stdout", [stdout[i]]))
        feeds.append(("stderr", [line]))
    feeds.append(("stdout", [stdout[-1]]))
    feeds.append(("stderr", ["2026-11-21 13:52:21,767 - livekit.agents - WARNING - after"]))
    records = shape_all(shaper, feeds)
    stderr = [r for r in records if r.stream == "stderr"]
    assert summary(stderr) == [
        ("stderr", "\n".join(TRACEBACK_LINES), Level.ERROR),
        ("stderr", "2026-11-21 13:52:21,767 - livekit.agents - WARNING - after", Level.WARNING),
    ]
    assert [r.message for r in records if r.stream == "stdout"] == [f"tick {i}" for i in range(len(stdout))]
    # JSON lines are complete at once: each stdout record came back from the feed of its own line
    assert stderr[0].timestamp_ns == 1000 + MS  # capture time of the traceback's first line


def test_chained_tracebacks_stay_in_one_record() -> None:
    shaper = Shaper(TAGS)
    records = shape_all(shaper, [("stderr", [*CHAINED, "next line"])])
    assert summary(records) == [
        ("stderr", "\n".join(CHAINED), Level.ERROR),
        ("stderr", "next line", None),
    ]


def test_chained_traceback_split_over_many_batches() -> None:
    shaper = Shaper(TAGS)
    records = shape_all(shaper, [("stderr", [line]) for line in CHAINED])
    assert summary(records) == [("stderr", "\n".join(CHAINED), Level.ERROR)]


def test_two_tracebacks_back_to_back_are_two_records() -> None:
    shaper = Shaper(TAGS)
    records = shape_all(shaper, [("stderr", TRACEBACK_LINES + TRACEBACK_LINES)])
    assert summary(records) == [("stderr", "\n".join(TRACEBACK_LINES), Level.ERROR)] * 2


def test_traceback_at_eof_without_newline() -> None:
    data = ('{"message": "starting"}\n' + "\n".join(TRACEBACK_LINES)).encode()  # no newline at the end
    framer = LineFramer()
    shaper = Shaper(TAGS)
    records = shaper.feed("stderr", framer.feed(data), 1000)
    assert summary(records) == [("stderr", "starting", None)]
    last = framer.finish()
    assert last == [TRACEBACK_LINES[-1]]
    records += shaper.feed("stderr", last, 2000)
    assert len(records) == 1  # still open: a chain could follow
    records += shaper.flush()
    assert summary(records) == [
        ("stderr", "starting", None),
        ("stderr", "\n".join(TRACEBACK_LINES), Level.ERROR),
    ]


def test_traceback_followed_by_silence_is_closed_by_the_idle_timeout() -> None:
    shaper = Shaper(TAGS, multiline_timeout_s=0.2)
    t0 = 5_000 * MS
    assert shaper.next_deadline_ns() is None
    assert shaper.feed("stderr", TRACEBACK_LINES[:3], t0) == []
    assert shaper.feed("stderr", TRACEBACK_LINES[3:], t0 + 50 * MS) == []
    deadline = shaper.next_deadline_ns()
    assert deadline == t0 + 50 * MS + TIMEOUT_NS  # idle counts from the group's latest line
    assert shaper.flush_idle(deadline - 1) == []
    records = shaper.flush_idle(deadline)
    assert summary(records) == [("stderr", "\n".join(TRACEBACK_LINES), Level.ERROR)]
    assert records[0].timestamp_ns == t0
    assert shaper.next_deadline_ns() is None
    assert shaper.flush() == []


def test_last_plain_line_is_released_by_the_idle_timeout() -> None:
    shaper = Shaper(TAGS)
    assert shaper.feed("stdout", ["raw print() from job process stdout"], 10) == []
    assert shaper.next_deadline_ns() == 10 + TIMEOUT_NS
    assert summary(shaper.flush_idle(10 + TIMEOUT_NS)) == [("stdout", "raw print() from job process stdout", None)]


def test_next_deadline_is_the_earliest_stream() -> None:
    shaper = Shaper(TAGS)
    shaper.feed("stderr", ["b"], 20)
    shaper.feed("stdout", ["a"], 10)
    assert shaper.next_deadline_ns() == 10 + TIMEOUT_NS
    assert summary(shaper.flush_idle(10 + TIMEOUT_NS)) == [("stdout", "a", None)]
    assert shaper.next_deadline_ns() == 20 + TIMEOUT_NS
    assert summary(shaper.flush_idle(20 + TIMEOUT_NS)) == [("stderr", "b", None)]


def test_flush_returns_both_streams_in_capture_order() -> None:
    shaper = Shaper(TAGS)
    shaper.feed("stdout", ["late"], 30)
    shaper.feed("stderr", ["early"], 10)
    assert [r.message for r in shaper.flush()] == ["early", "late"]


def test_python_warning_and_its_source_line_are_one_record() -> None:
    shaper = Shaper(TAGS)
    lines = [
        "raw print() from job process stderr",
        "/app/.venv/lib/python3.11/site-packages/jwt/api_jwt.py:149: InsecureKeyLengthWarning: The HMAC key is 1 "
        "bytes long",
        "  return self._jws.encode(",
        "/app/agent.py:53: DeprecationWarning: this API is deprecated, use the new one",
        '  warnings.warn("this API is deprecated, use the new one", DeprecationWarning, stacklevel=1)',
    ]
    records = shape_all(shaper, [("stderr", lines)])
    assert summary(records) == [
        ("stderr", lines[0], None),
        ("stderr", "\n".join(lines[1:3]), Level.WARNING),
        ("stderr", "\n".join(lines[3:5]), Level.WARNING),
    ]


def test_indented_continuation_lines_join_the_line_above() -> None:
    shaper = Shaper(TAGS)
    lines = ["WARNING:cfg:unknown keys:", "  - foo", "\t- bar", "ready", "", "  indented first"]
    records = shape_all(shaper, [("stdout", lines)])
    assert summary(records) == [
        ("stdout", "WARNING:cfg:unknown keys:\n  - foo\n\t- bar", Level.WARNING),
        ("stdout", "ready", None),
        ("stdout", "", None),
        ("stdout", "  indented first", None),
    ]


def test_a_line_followed_by_a_traceback_introduces_it() -> None:
    shaper = Shaper(TAGS)
    lines = ["2026-11-21 13:52:21,767 - ERROR livekit.agents - unhandled exception", *TRACEBACK_LINES]
    records = shape_all(shaper, [("stderr", lines[:1]), ("stderr", lines[1:])])
    assert summary(records) == [("stderr", "\n".join(lines), Level.ERROR)]


def test_a_group_of_several_lines_does_not_take_a_following_traceback() -> None:
    shaper = Shaper(TAGS)
    warning = ["/app/agent.py:53: DeprecationWarning: deprecated", '  warnings.warn("deprecated")']
    records = shape_all(shaper, [("stderr", [*warning, *TRACEBACK_LINES])])
    assert summary(records) == [
        ("stderr", "\n".join(warning), Level.WARNING),
        ("stderr", "\n".join(TRACEBACK_LINES), Level.ERROR),
    ]


def test_warning_intro_line_and_traceback_make_an_error_keeping_the_original_level() -> None:
    shaper = Shaper(TAGS)
    records = shape_all(shaper, [("stderr", ["WARNING:root:retrying after:", *TRACEBACK_LINES])])
    assert len(records) == 1
    assert records[0].level == Level.ERROR
    assert records[0].attributes == {"level_original": "WARNING"}


def test_coloured_traceback_groups_and_is_uncoloured() -> None:
    shaper = Shaper(TAGS)
    red = [f"\x1b[31m{line}\x1b[0m" for line in TRACEBACK_LINES]
    records = shape_all(shaper, [("stderr", ["2026-11-21 13:52:21,767 - \x1b[31mERROR\x1b[0m x - failed", *red])])
    assert summary(records) == [
        ("stderr", "\n".join(["2026-11-21 13:52:21,767 - ERROR x - failed", *TRACEBACK_LINES]), Level.ERROR)
    ]


def test_blank_line_after_a_traceback_is_not_lost() -> None:
    shaper = Shaper(TAGS)
    records = shape_all(shaper, [("stderr", [*TRACEBACK_LINES, "", "", "next"])])
    assert summary(records) == [
        ("stderr", "\n".join(TRACEBACK_LINES), Level.ERROR),
        ("stderr", "", None),
        ("stderr", "", None),
        ("stderr", "next", None),
    ]


def test_blank_line_after_a_traceback_then_silence() -> None:
    shaper = Shaper(TAGS)
    assert shaper.feed("stderr", [*TRACEBACK_LINES, ""], 0) == []
    records = shaper.flush_idle(TIMEOUT_NS)
    assert summary(records) == [("stderr", "\n".join(TRACEBACK_LINES), Level.ERROR), ("stderr", "", None)]


def test_blank_lines_elsewhere_are_records_of_their_own() -> None:
    shaper = Shaper(TAGS)
    records = shape_all(shaper, [("stdout", ["a", "", "  b"])])
    assert summary(records) == [("stdout", "a", None), ("stdout", "", None), ("stdout", "  b", None)]


def test_traceback_cut_short_by_a_json_line() -> None:
    shaper = Shaper(TAGS)
    line = '{"message": "hello", "level": "INFO"}'
    records = shape_all(shaper, [("stdout", [*TRACEBACK_LINES[:3], line])])
    assert summary(records) == [
        ("stdout", "\n".join(TRACEBACK_LINES[:3]), Level.ERROR),
        ("stdout", "hello", Level.INFO),
    ]


def test_json_line_is_never_held() -> None:
    shaper = Shaper(TAGS)
    records = shaper.feed("stdout", ["text", '{"message": "j"}'], 1)
    assert [r.message for r in records] == ["text", "j"]
    assert shaper.next_deadline_ns() is None


def test_exception_group_traceback() -> None:
    lines = [
        "  + Exception Group Traceback (most recent call last):",
        '  |   File "/app/agent.py", line 3, in <module>',
        "  | ExceptionGroup: tasks failed (2 sub-exceptions)",
        "  +-+---------------- 1 ----------------",
        "    | ValueError: 1",
        "    +------------------------------------",
    ]
    shaper = Shaper(TAGS)
    records = shape_all(shaper, [("stderr", ["ERROR:root:tasks failed", *lines, "done"])])
    assert summary(records) == [
        ("stderr", "\n".join(["ERROR:root:tasks failed", *lines]), Level.ERROR),
        ("stderr", "done", None),
    ]


def test_size_cap_splits_a_group_and_keeps_its_level() -> None:
    frames = [f'  File "/app/mod{i}.py", line {i}, in f{i}' for i in range(40)]
    lines = ["Traceback (most recent call last):", *frames, "RecursionError: too deep"]
    shaper = Shaper(TAGS, max_group_bytes=400)
    records = shape_all(shaper, [("stderr", [*lines, "after"])])
    groups, after = records[:-1], records[-1]
    assert after.message == "after"
    assert len(groups) > 2
    assert "\n".join(r.message for r in groups) == "\n".join(lines)  # nothing lost, order kept
    for rec in groups:
        assert len(rec.message.encode()) <= 400
        assert rec.level == Level.ERROR
    assert [(r.attributes or {}).get(MULTILINE_CAPPED) for r in groups] == [True] * (len(groups) - 1) + [None]


def test_size_cap_counts_utf8_bytes() -> None:
    shaper = Shaper(TAGS, max_group_bytes=20)
    records = shape_all(shaper, [("stdout", ["é" * 6, "  " + "é" * 4])])  # 12 + 1 + 10 bytes > 20
    assert [r.message for r in records] == ["é" * 6, "  " + "é" * 4]


def test_size_cap_continuation_of_a_plain_group_keeps_the_first_lines_level() -> None:
    shaper = Shaper(TAGS, min_level=Level.WARNING, max_group_bytes=30)
    lines = ["INFO:x:list follows", "  item one is here", "  item two is here", "WARNING:x:w"]
    records = shape_all(shaper, [("stdout", lines)])
    assert summary(records) == [("stdout", "WARNING:x:w", Level.WARNING)]
    assert shaper.filtered == 3  # the INFO group and both of its continuations


def test_line_parts_stay_separate_and_share_the_first_parts_level() -> None:
    shaper = Shaper(TAGS, min_level=Level.DEBUG)
    parts: list[str] = [
        LinePart("ERROR:x:" + "a" * 10, 1, False),
        LinePart("b" * 10, 2, False),
        LinePart("  c", 3, True),
    ]
    records = shape_all(shaper, [("stderr", ["before", *parts, "  after"])])
    assert [(r.message, r.level, r.attributes) for r in records] == [
        ("before", None, None),
        ("ERROR:x:" + "a" * 10, Level.ERROR, {TRUNCATED: True, "part": 1, "last_part": False}),
        ("b" * 10, Level.ERROR, {TRUNCATED: True, "part": 2, "last_part": False}),
        ("  c", Level.ERROR, {TRUNCATED: True, "part": 3, "last_part": True}),
        ("  after", None, None),
    ]
    assert all(type(r.message) is str for r in records)


def test_parts_of_a_long_json_line_take_its_level_field() -> None:
    shaper = Shaper(TAGS, min_level=Level.WARNING)
    line = json.dumps({"message": "x" * 50, "level": "info"})
    parts: list[str] = [LinePart(line[:30], 1, False), LinePart(line[30:], 2, True)]
    assert '"level"' not in parts[0]
    shaper2 = Shaper(TAGS, min_level=Level.WARNING)
    line2 = json.dumps({"level": "info", "message": "x" * 50})
    parts2: list[str] = [LinePart(line2[:30], 1, False), LinePart(line2[30:], 2, True)]
    assert len(shape_all(shaper, [("stdout", parts)])) == 2  # level not in the first part: forwarded
    assert shape_all(shaper2, [("stdout", parts2)]) == []  # level info in the first part: both filtered
    assert shaper2.filtered == 2


def test_streams_have_independent_groups() -> None:
    shaper = Shaper(TAGS)
    records = shape_all(
        shaper,
        [
            ("stderr", ["ERROR:a:x", TRACEBACK_LINES[0]]),
            ("stdout", ["  not a continuation of stderr"]),
            ("stderr", TRACEBACK_LINES[1:]),
        ],
    )
    assert summary(records) == [
        ("stderr", "\n".join(["ERROR:a:x", *TRACEBACK_LINES]), Level.ERROR),
        ("stdout", "  not a continuation of stderr", None),
    ]


def test_event_times_given_per_line_become_event_time() -> None:
    shaper = Shaper(TAGS)
    lines = [
        "plain",
        "  more",
        '{"message": "own", "timestamp": "2026-11-21T13:52:58Z"}',
        *TRACEBACK_LINES,
        '{"message": "none"}',
        "last",
    ]
    times = list(range(100, 100 + len(lines)))
    records = shaper.feed("stdout", lines[:5], 1, times[:5])
    records += shaper.feed("stdout", lines[5:], 2, times[5:]) + shaper.flush()
    assert [(r.message.split("\n")[0], r.event_time_ns) for r in records] == [
        ("plain", 100),
        ("own", 1_795_269_178_000_000_000),  # the line's own timestamp wins
        ("Traceback (most recent call last):", 103),  # the group's first line
        ("none", 109),
        ("last", 110),
    ]


def test_grouper_items() -> None:
    grouper = LineGrouper(max_group_bytes=10_000)
    items = grouper.feed(['{"a": 1}', "x", "  y", *TRACEBACK_LINES, "z"], 5)
    assert items == [
        '{"a": 1}',
        ("x\n  y", "x", 5, 0),
        ("\n".join(TRACEBACK_LINES), TRACEBACK_LINES[0], 5, TRACEBACK),
    ]
    assert grouper.open
    out: list[object] = []
    grouper.flush_due(4, out)  # type: ignore[arg-type]
    assert out == []
    grouper.flush_due(5, out)  # type: ignore[arg-type]
    assert out == [("z", "z", 5, 0)]
    assert not grouper.open
    assert CAPPED not in (TRACEBACK, 0)


# -- lanes: the lines of different tailed files never join one record ------------------------------------------------


def test_files_sharing_a_stream_are_grouped_apart() -> None:
    """A traceback from file A, with a line of file B read in between its lines, is still one record; B's line is
    its own record (with one grouper per stream, B's line would have been taken as A's exception line)."""
    shaper = Shaper(TAGS)
    out: list[Record] = []
    out += shaper.feed("stdout", TRACEBACK_LINES[:3], 1 * MS, origin="/var/log/a.log")
    out += shaper.feed("stdout", ["B: room connected"], 2 * MS, origin="/var/log/b.log")
    out += shaper.feed("stdout", TRACEBACK_LINES[3:], 3 * MS, origin="/var/log/a.log")
    assert out == []
    assert shaper.held("stdout", "/var/log/a.log") == len(TRACEBACK_LINES)  # open until a next line or the timeout
    assert shaper.held("stdout", "/var/log/b.log") == 1
    assert shaper.held("stdout") == 0
    out += shaper.flush_idle(3 * MS + TIMEOUT_NS)
    assert [(r.message, r.level) for r in out] == [
        ("\n".join(TRACEBACK_LINES), Level.ERROR),
        ("B: room connected", None),
    ]
    assert all(r.stream == "stdout" for r in out)


def test_a_files_lane_is_forgotten_once_it_holds_nothing() -> None:
    """Files come and go (rotation, dated names): a file's lane is dropped when idle and empty, a stream's is kept."""
    shaper = Shaper(TAGS)
    shaper.feed("stdout", ["plain"], 1 * MS)
    for n in range(3):
        shaper.feed("stdout", [f"from file {n}"], 1 * MS, origin=f"/var/log/app-{n}.log")
    assert shaper.lanes == 4
    records = shaper.flush_idle(1 * MS + TIMEOUT_NS)
    assert sorted(r.message for r in records) == ["from file 0", "from file 1", "from file 2", "plain"]
    assert shaper.lanes == 1
    # A forgotten lane starts afresh when its file has lines again.
    shaper.feed("stdout", TRACEBACK_LINES, 2 * MS, origin="/var/log/app-0.log")
    assert [r.message for r in shaper.flush()] == ["\n".join(TRACEBACK_LINES)]


def test_a_cut_line_keeps_its_level_per_file() -> None:
    """The pieces of a cut line take the first piece's level; a piece of another file's cut line in between does
    not change it."""
    shaper = Shaper(TAGS, min_level=Level.DEBUG)
    framer_a, framer_b = LineFramer(64), LineFramer(64)
    a = framer_a.feed(b"ERROR " + b"a" * 100 + b"\n")
    b = framer_b.feed(b"DEBUG " + b"b" * 100 + b"\n")
    out: list[Record] = []
    out += shaper.feed("stdout", a[:1], 1 * MS, origin="a")
    out += shaper.feed("stdout", b[:1], 1 * MS, origin="b")
    out += shaper.feed("stdout", a[1:], 1 * MS, origin="a")
    out += shaper.feed("stdout", b[1:], 1 * MS, origin="b")
    out += shaper.flush()
    levels = {(r.message[:1], r.attributes["part"] if r.attributes else 0): r.level for r in out}
    assert levels[("a", 2)] == Level.ERROR
    assert levels[("b", 2)] == Level.DEBUG
