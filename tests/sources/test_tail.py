"""The file follower in-process, on real files, under trio's MockClock (virtual time: intervals are exact).

The consumer is a recorder of what the source submits (the narrow interface ``Ingest`` offers a source): lines per
stream, event times, and the checkpoints in the order they were submitted, so the tests can check the central
checkpoint invariant: a file's checkpoint offset always equals the bytes of the complete lines submitted from it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest
import trio

from forwarder.config import ConfigError, load
from forwarder.delivery.buffer import CHECKPOINT_REMOVED, MemoryBuffer
from forwarder.pipeline import Ingest
from forwarder.record import Level, Record, Tags
from forwarder.shaping.redact import Redactor
from forwarder.shaping.shaper import Shaper
from forwarder.sources._follow import (
    FINGERPRINT_BYTES,
    POLL_INTERVAL_S,
    ROTATE_WAIT_S,
    SCAN_INTERVAL_S,
    FileSpec,
    Position,
    Tailer,
    checkpoint_key,
    fingerprint,
)
from forwarder.sources.tail import make_tail_source, parse_path_spec

DEADLINE_S = 60.0
"""Virtual seconds a condition may take before a test fails."""


class _Store:
    def __init__(self, checkpoints: Mapping[str, str]) -> None:
        self._checkpoints = dict(checkpoints)

    def load_checkpoints(self) -> dict[str, str]:
        return dict(self._checkpoints)


class Recorder:
    """Records submitted lines and checkpoints."""

    def __init__(self, checkpoints: Mapping[str, str] | None = None) -> None:
        self.buffer = _Store(checkpoints or {})
        self.lines: list[tuple[str, str, int | None]] = []
        self.origins: list[str] = []
        """The ``origin`` each line was submitted with."""
        self.checkpoints: dict[str, str] = {}
        self.history: list[tuple[int, dict[str, str]]] = []
        """(number of lines submitted so far, checkpoints) per submit that carried checkpoints."""

    def submit(
        self,
        stream: str,
        lines: list[str],
        checkpoints: Mapping[str, str] | None = None,
        event_times_ns: list[int] | None = None,
        origin: str = "",
    ) -> None:
        times: list[int | None] = list(event_times_ns) if event_times_ns is not None else [None] * len(lines)
        assert len(times) == len(lines)
        self.lines.extend((stream, line, t) for line, t in zip(lines, times, strict=True))
        self.origins.extend(origin for _ in lines)
        if checkpoints:
            self.checkpoints.update(checkpoints)
            self.history.append((len(self.lines), dict(checkpoints)))

    async def wait_for_room(self) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_for_delivery(self) -> None:
        await trio.lowlevel.checkpoint()

    def messages(self) -> list[str]:
        return [m for _s, m, _t in self.lines]

    def position(self, path: Path) -> Position:
        st = path.stat()
        pos = Position.loads(self.checkpoints[checkpoint_key((st.st_dev, st.st_ino))])
        assert pos is not None
        return pos


async def wait_until(cond: Callable[[], bool], what: str = "condition") -> None:
    """Poll ``cond`` every 10 ms of virtual time, failing after :data:`DEADLINE_S`."""
    with trio.move_on_after(DEADLINE_S):
        while not cond():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


@asynccontextmanager
async def tailing(
    specs: list[FileSpec], recorder: Recorder, *, fmt: str = "raw", read_from: str = "head", max_line: int = 1 << 16
) -> AsyncIterator[Tailer]:
    tailer = Tailer(specs, fmt=fmt, read_from=read_from, max_line_bytes=max_line)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tailer.run, recorder)
        yield tailer
        nursery.cancel_scope.cancel()


def spec(path: Path | str, stream: str = "stdout") -> FileSpec:
    return FileSpec(str(path), stream)


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(data)


# -- arguments ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("/var/log/app.log", FileSpec("/var/log/app.log", "stdout")),
        ("/var/log/app.log=stderr", FileSpec("/var/log/app.log", "stderr")),
        ("/var/log/app.log=stdout", FileSpec("/var/log/app.log", "stdout")),
        ("/var/log/*.log=stderr", FileSpec("/var/log/*.log", "stderr")),
        ("/data/a=b.log", FileSpec("/data/a=b.log", "stdout")),
        ("odd=stdout=stdout", FileSpec("odd=stdout", "stdout")),
        ("-", FileSpec("-", "stdout")),
        ("-=stderr", FileSpec("-", "stderr")),
    ],
)
def test_parse_path_spec(arg: str, expected: FileSpec) -> None:
    assert parse_path_spec(arg) == expected


def test_empty_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_path_spec("=stderr")
    assert info.value.variable == "PATH"


@pytest.mark.parametrize(
    ("paths", "kwargs", "variable"),
    [
        (["a.log"], {"fmt": "syslog"}, "--format"),
        (["a.log"], {"read_from": "middle"}, "--read-from"),
        (["-", "-=stderr"], {}, "PATH"),
    ],
)
def test_make_tail_source_rejects_bad_arguments(paths: list[str], kwargs: dict[str, str], variable: str) -> None:
    config = load({"FORWARDER_STATE_DIR": "/tmp/unused"}, command=(), cwd=Path("/"))
    with pytest.raises(ConfigError) as info:
        make_tail_source(config, paths, **kwargs)
    assert info.value.variable == variable


# -- following ---------------------------------------------------------------------------------------------------


async def test_follows_appends_and_holds_the_unterminated_line(tmp_path: Path, autojump_clock: object) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"one\ntwo\npart")
    rec = Recorder()
    async with tailing([spec(log)], rec):
        await wait_until(lambda: rec.messages() == ["one", "two"])
        assert rec.position(log).offset == len(b"one\ntwo\n")  # the partial line is not covered
        append(log, b"ial\nthree\n")
        await wait_until(lambda: rec.messages() == ["one", "two", "partial", "three"])
        assert rec.position(log).offset == log.stat().st_size
        assert rec.position(log).fp == fingerprint(log.read_bytes()[:FINGERPRINT_BYTES])


async def test_checkpoint_always_equals_the_bytes_of_submitted_lines(tmp_path: Path, autojump_clock: object) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    rec = Recorder()
    expected = [f"line {i} " + "x" * (i % 37) for i in range(3000)]
    data = "".join(f"{m}\n" for m in expected).encode()
    async with tailing([spec(log)], rec):
        pos = 0
        step = 1
        while pos < len(data):  # odd-sized appends that cut lines anywhere
            append(log, data[pos : pos + step])
            pos += step
            step = step * 7 % 5003 + 1
            await trio.sleep(POLL_INTERVAL_S / 3)
        await wait_until(lambda: len(rec.lines) == len(expected))
    assert rec.messages() == expected
    assert rec.history
    for count, checkpoints in rec.history:
        (value,) = checkpoints.values()
        pos_ = Position.loads(value)
        assert pos_ is not None
        assert pos_.offset == sum(len(m) + 1 for m in expected[:count])


async def test_stream_suffix_and_glob(tmp_path: Path, autojump_clock: object) -> None:
    (tmp_path / "a.log").write_text("from a\n")
    (tmp_path / "b.log").write_text("from b\n")
    (tmp_path / "c.txt").write_text("not matched\n")
    rec = Recorder()
    async with tailing([spec(tmp_path / "*.log", "stderr")], rec):
        await wait_until(lambda: len(rec.lines) == 2)
        await trio.sleep(SCAN_INTERVAL_S * 2)
    assert sorted(rec.lines) == [("stderr", "from a", None), ("stderr", "from b", None)]


async def test_lines_carry_the_path_of_their_file_as_origin(tmp_path: Path, autojump_clock: object) -> None:
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text("from a\n")
    b.write_text("from b\n")
    rec = Recorder()
    async with tailing([spec(tmp_path / "*.log")], rec):
        await wait_until(lambda: len(rec.lines) == 2)
    assert sorted(zip(rec.messages(), rec.origins, strict=True)) == [("from a", str(a)), ("from b", str(b))]


async def test_a_traceback_stays_whole_when_another_file_writes_in_between(
    tmp_path: Path, autojump_clock: object
) -> None:
    """Two followed files, one shaper: the real Tailer feeding the real Ingest. File A's traceback is read in two
    parts with a line of file B read in between; A's traceback is still one record and B's line its own."""
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text("")
    b.write_text("")
    buffer = MemoryBuffer(10**9)
    buffer.register(["d"])
    records: list[Record] = []
    shaper = Shaper(Tags("h", "s", "svc"), multiline_timeout_s=30)
    ingest = Ingest(shaper, buffer, Redactor(), observers=[records.extend])
    tailer = Tailer([spec(tmp_path / "*.log")], fmt="raw", read_from="head", max_line_bytes=1 << 16)
    traceback = [
        "Traceback (most recent call last):",
        '  File "/app/agent.py", line 12, in entrypoint',
        "    raise KeyError(name)",
        "KeyError: 'missing'",
    ]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ingest.run)
        nursery.start_soon(tailer.run, ingest)
        for path, lines, total in ((a, traceback[:2], 2), (b, ["room connected"], 3), (a, traceback[2:], 5)):
            append(path, "".join(f"{line}\n" for line in lines).encode())

            def read_all(total: int = total) -> bool:
                return ingest.stats.lines["stdout"] == total

            await wait_until(read_all, f"{total} lines read")
        assert records == []  # every group is still open: 30 s of multi-line timeout
        ingest.close()
        await wait_until(lambda: len(records) == 2, "both records")
        nursery.cancel_scope.cancel()
    assert sorted((r.message, r.level) for r in records) == [
        ("\n".join(traceback), Level.ERROR),
        ("room connected", None),
    ]


async def test_new_file_is_picked_up_within_the_scan_interval(tmp_path: Path, autojump_clock: object) -> None:
    rec = Recorder()
    async with tailing([spec(tmp_path / "*.log")], rec):
        await trio.sleep(SCAN_INTERVAL_S * 0.3)  # somewhere between two scans
        created = trio.current_time()
        (tmp_path / "late.log").write_text("hello\n")
        await wait_until(lambda: rec.messages() == ["hello"])
        assert trio.current_time() - created <= SCAN_INTERVAL_S
    # A literal path that does not exist yet is waited for the same way.
    missing = tmp_path / "later" / "x.log"
    rec = Recorder()
    async with tailing([spec(missing)], rec):
        await trio.sleep(SCAN_INTERVAL_S * 2.5)
        missing.parent.mkdir()
        created = trio.current_time()
        missing.write_text("finally\n")
        await wait_until(lambda: rec.messages() == ["finally"])
        assert trio.current_time() - created <= SCAN_INTERVAL_S


async def test_rename_and_create_reads_old_to_end_then_new_from_start(tmp_path: Path, autojump_clock: object) -> None:
    log = tmp_path / "app.log"
    log.write_text("old 1\n")
    rec = Recorder()
    async with tailing([spec(log)], rec) as tailer:
        await wait_until(lambda: rec.messages() == ["old 1"])
        with log.open("a") as writer:  # a writer that has not reopened yet
            log.rename(tmp_path / "app.log.1")
            log.write_text("new 1\n")
            writer.write("old 2\nold unterminated")
            writer.flush()
            await wait_until(lambda: {"old 2", "new 1"} <= set(rec.messages()), "both files")
            assert len(tailer.followers) == 2
            rotated_at = trio.current_time()
            writer.write(" still old\n")  # grows again: the grace period restarts
        append(log, b"new 2\n")
        await wait_until(lambda: len(tailer.followers) == 1, "old file closed")
        closed_after = trio.current_time() - rotated_at
        assert ROTATE_WAIT_S <= closed_after <= ROTATE_WAIT_S + 2 * POLL_INTERVAL_S
        await wait_until(lambda: "new 2" in rec.messages())
    old = [m for m in rec.messages() if m.startswith("old")]
    new = [m for m in rec.messages() if m.startswith("new")]
    assert old == ["old 1", "old 2", "old unterminated still old"]
    assert new == ["new 1", "new 2"]


async def test_unterminated_last_line_is_forwarded_when_the_rotated_file_closes(
    tmp_path: Path, autojump_clock: object
) -> None:
    log = tmp_path / "app.log"
    log.write_text("a\nno newline")
    st = log.stat()
    key = checkpoint_key((st.st_dev, st.st_ino))
    rec = Recorder()
    async with tailing([spec(log)], rec) as tailer:
        await wait_until(lambda: rec.messages() == ["a"])
        assert rec.position(log).offset == len(b"a\n")
        log.rename(tmp_path / "rotated")
        await wait_until(lambda: not tailer.followers, "closed")
        assert rec.messages() == ["a", "no newline"]
        # Closed for good (no pattern matches "rotated"): its checkpoint is removed with its last line, so
        # checkpoints do not pile up one per rotation.
        assert rec.history[-1] == (2, {key: CHECKPOINT_REMOVED})
        assert key not in tailer.positions


async def test_renamed_to_a_matching_name_stays_followed(tmp_path: Path, autojump_clock: object) -> None:
    log = tmp_path / "app.log"
    log.write_text("1\n")
    rec = Recorder()
    async with tailing([spec(tmp_path / "app.log*")], rec) as tailer:
        await wait_until(lambda: rec.messages() == ["1"])
        moved = tmp_path / "app.log.1"
        log.rename(moved)
        await trio.sleep(ROTATE_WAIT_S * 2)
        assert len(tailer.followers) == 1
        append(moved, b"2\n")
        await wait_until(lambda: rec.messages() == ["1", "2"])
        assert rec.position(moved).path == str(moved)


@pytest.mark.parametrize("regrow", [False, True])
async def test_truncation_restarts_at_zero(tmp_path: Path, autojump_clock: object, regrow: bool) -> None:
    log = tmp_path / "app.log"
    first = [f"before {i:04d}" for i in range(50)]
    log.write_text("".join(f"{m}\n" for m in first))
    rec = Recorder()
    async with tailing([spec(log)], rec):
        await wait_until(lambda: len(rec.lines) == 50)
        # Truncate and write again before the next poll: with regrow the file is longer than our offset by then,
        # so only the fingerprint shows that it was rewritten.
        after = [f"after {i:04d}" for i in range(200 if regrow else 3)]
        with log.open("r+b") as fh:
            fh.truncate(0)
            fh.write("".join(f"{m}\n" for m in after).encode())
        assert (log.stat().st_size > len("".join(f"{m}\n" for m in first))) == regrow
        await wait_until(lambda: len(rec.lines) == 50 + len(after))
        await trio.sleep(POLL_INTERVAL_S * 4)
    assert rec.messages() == first + after
    assert rec.position(log).offset == log.stat().st_size


async def test_truncation_flushes_the_held_partial_line(tmp_path: Path, autojump_clock: object) -> None:
    log = tmp_path / "app.log"
    log.write_text("a\nhalf")
    rec = Recorder()
    async with tailing([spec(log)], rec):
        await wait_until(lambda: rec.messages() == ["a"])
        os.truncate(log, 0)
        await wait_until(lambda: rec.messages() == ["a", "half"])
        append(log, b"b\n")
        await wait_until(lambda: rec.messages() == ["a", "half", "b"])


async def test_deleted_file_is_drained_closed_and_forgotten(tmp_path: Path, autojump_clock: object) -> None:
    log = tmp_path / "app.log"
    log.write_text("1\n")
    st = log.stat()
    key = checkpoint_key((st.st_dev, st.st_ino))
    rec = Recorder()
    async with tailing([spec(log)], rec) as tailer:
        await wait_until(lambda: rec.messages() == ["1"])
        with log.open("a") as writer:
            log.unlink()
            writer.write("2\n")  # written after the unlink, before the writer noticed
            writer.flush()
            await wait_until(lambda: rec.messages() == ["1", "2"])
        await wait_until(lambda: not tailer.followers, "closed")
        log.write_text("3\n")  # delete + create
        await wait_until(lambda: rec.messages() == ["1", "2", "3"])
    # The closed file's checkpoint was removed after its last line (checkpoints do not pile up for every file ever
    # followed); the new file, which may reuse its inode, was read from its start rather than resumed at offset 4.
    written = [(n, v) for n, cps in rec.history for k, v in cps.items() if k == key]
    removed = written.index((2, CHECKPOINT_REMOVED))
    assert all(Position.loads(v) is not None for _n, v in written[:removed])
    assert all(n == 3 for n, _v in written[removed + 1 :])  # only the new file's, if it reuses the inode
    assert key not in tailer.positions or tailer.positions[key].offset == len("3\n")


async def test_an_earlier_versions_deleted_mark_is_removed_at_start(tmp_path: Path, autojump_clock: object) -> None:
    log = tmp_path / "app.log"
    log.write_text("new file on a reused inode\n")
    st = log.stat()
    key = checkpoint_key((st.st_dev, st.st_ino))
    head = log.read_bytes()
    mark = orjson.dumps(  # as an earlier version wrote it
        {"offset": len(head), "fp": fingerprint(head), "fp_len": len(head), "path": str(log), "deleted": True}
    ).decode()
    rec = Recorder({key: mark, "other:1": "kept"})
    async with tailing([spec(log)], rec):  # not resumed at the mark's offset (its end), though the prefix matches
        await wait_until(lambda: rec.messages() == ["new file on a reused inode"])
    assert rec.history[0] == (0, {key: CHECKPOINT_REMOVED})
    assert "other:1" not in rec.checkpoints  # only this source's own deleted marks


async def test_checkpoints_of_files_no_pattern_matches_are_removed_at_start(
    tmp_path: Path, autojump_clock: object
) -> None:
    log = tmp_path / "app.log"
    log.write_text("done\nnew\n")
    kept = _checkpoint_for(log, len("done\n"))
    gone = tmp_path / "gone.log"  # deleted, or rotated away, while the forwarder was not running
    gone.write_text("old\n")
    gone_key, gone_value = next(iter(_checkpoint_for(gone, 4).items()))
    elsewhere = tmp_path / "elsewhere.txt"  # exists, but no pattern matches it
    elsewhere.write_text("x\n")
    elsewhere_key, elsewhere_value = next(iter(_checkpoint_for(elsewhere, 2).items()))
    gone.unlink()
    rec = Recorder({**kept, gone_key: gone_value, elsewhere_key: elsewhere_value, "other:1": "kept"})
    async with tailing([spec(tmp_path / "*.log")], rec) as tailer:
        await wait_until(lambda: rec.messages() == ["new"])  # the matched file resumed at its checkpoint
        assert set(tailer.positions) == set(kept)
    assert rec.history[0] == (0, {gone_key: CHECKPOINT_REMOVED, elsewhere_key: CHECKPOINT_REMOVED})
    assert all(k in kept for _n, cps in rec.history[1:] for k in cps)
    assert "other:1" not in rec.checkpoints  # only this source's own checkpoints


def _checkpoint_for(path: Path, offset: int, prefix: bytes | None = None) -> dict[str, str]:
    st = path.stat()
    head = path.read_bytes()[:FINGERPRINT_BYTES] if prefix is None else prefix
    return {checkpoint_key((st.st_dev, st.st_ino)): Position(offset, fingerprint(head), len(head)).dumps()}


async def test_resumes_at_a_matching_checkpoint(tmp_path: Path, autojump_clock: object) -> None:
    log = tmp_path / "app.log"
    log.write_text("done 1\ndone 2\nnew 3\n")
    rec = Recorder(_checkpoint_for(log, len("done 1\ndone 2\n"), prefix=b"done 1\n"))
    async with tailing([spec(log)], rec, read_from="tail"):
        await wait_until(lambda: rec.messages() == ["new 3"])
        await trio.sleep(1)
    assert rec.messages() == ["new 3"]
    assert rec.position(log).fp_len == len(log.read_bytes())  # fingerprint widened to what the file has now


async def test_inode_reuse_is_not_mistaken_for_the_same_file(tmp_path: Path, autojump_clock: object) -> None:
    log = tmp_path / "app.log"
    log.write_text("another file entirely\nsecond\n")
    rec = Recorder(_checkpoint_for(log, 10, prefix=b"the file we knew\n"))
    async with tailing([spec(log)], rec):
        await wait_until(lambda: rec.messages() == ["another file entirely", "second"])


async def test_checkpoint_past_the_end_means_truncated_while_down(tmp_path: Path, autojump_clock: object) -> None:
    log = tmp_path / "app.log"
    log.write_text("short\n")
    rec = Recorder(_checkpoint_for(log, 1000, prefix=b"short\n"))
    async with tailing([spec(log)], rec):
        await wait_until(lambda: rec.messages() == ["short"])


async def test_read_from_tail_applies_only_to_files_present_at_start(tmp_path: Path, autojump_clock: object) -> None:
    present = tmp_path / "present.log"
    present.write_text("old 1\nold 2\nbeing writ")
    rec = Recorder()
    async with tailing([spec(tmp_path / "*.log")], rec, read_from="tail"):
        await trio.sleep(SCAN_INTERVAL_S)
        assert rec.lines == []
        append(present, b"ten\n")
        (tmp_path / "later.log").write_text("later 1\n")
        await wait_until(lambda: sorted(rec.messages()) == ["being written", "later 1"])


async def test_cri_file_with_partial_lines_and_checkpoint_before_the_open_message(
    tmp_path: Path, autojump_clock: object
) -> None:
    ts = "2024-01-02T03:04:05.000000001Z"
    log = tmp_path / "0.log"
    complete = f"{ts} stdout F one\n{ts} stderr F two\n"
    log.write_text(complete + f"{ts} stdout P thr")
    rec = Recorder()
    async with tailing([spec(log)], rec, fmt="cri"):
        await wait_until(lambda: len(rec.lines) == 2)
        assert rec.position(log).offset == len(complete)
        append(log, f"ee-a \n{ts} stdout F three-b\n".encode())
        await wait_until(lambda: len(rec.lines) == 3)
        assert rec.position(log).offset == log.stat().st_size
    t = 1704164645_000000001
    assert rec.lines == [("stdout", "one", t), ("stderr", "two", t), ("stdout", "three-a three-b", t)]


async def test_docker_file(tmp_path: Path, autojump_clock: object) -> None:
    log = tmp_path / "c-json.log"
    lines = [
        '{"log":"hello\\n","stream":"stdout","time":"2024-01-02T03:04:05.5Z"}',
        '{"log":"split ","stream":"stderr","time":"2024-01-02T03:04:05.6Z"}',
        '{"log":"line\\n","stream":"stderr","time":"2024-01-02T03:04:05.7Z"}',
        "not json",
    ]
    log.write_text("\n".join(lines) + "\n")
    rec = Recorder()
    async with tailing([spec(log, "stderr")], rec, fmt="docker"):
        await wait_until(lambda: len(rec.lines) == 3)
    base = 1704164645_000000000
    assert rec.lines == [
        ("stdout", "hello", base + 500_000_000),
        ("stderr", "split line", base + 600_000_000),
        ("stderr", "not json", None),
    ]


async def test_unreadable_file_is_reported_and_skipped(tmp_path: Path, autojump_clock: object) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    secret = tmp_path / "secret.log"
    secret.write_text("hidden\n")
    secret.chmod(0)
    (tmp_path / "ok.log").write_text("visible\n")
    rec = Recorder()
    async with tailing([spec(tmp_path / "*.log")], rec):
        await wait_until(lambda: rec.messages() == ["visible"])
        await trio.sleep(SCAN_INTERVAL_S * 3)
    assert rec.messages() == ["visible"]


async def test_many_files_followed_concurrently(tmp_path: Path, autojump_clock: object) -> None:
    paths = [tmp_path / f"f{i:03d}.log" for i in range(100)]
    for p in paths:
        p.write_text("")
    rec = Recorder()
    async with tailing([spec(tmp_path / "*.log")], rec) as tailer:
        await wait_until(lambda: len(tailer.followers) == 100)
        for round_ in range(5):
            for i, p in enumerate(paths):
                append(p, f"{i} {round_}\n".encode())
            await trio.sleep(POLL_INTERVAL_S / 2)
        await wait_until(lambda: len(rec.lines) == 500)
    assert sorted(rec.messages()) == sorted(f"{i} {r}" for i in range(100) for r in range(5))


async def test_non_regular_matches_are_skipped(tmp_path: Path, autojump_clock: object) -> None:
    (tmp_path / "dir.log").mkdir()
    os.mkfifo(tmp_path / "fifo.log")  # opening a FIFO with no writer would block: never opened
    (tmp_path / "dangling.log").symlink_to(tmp_path / "nowhere")
    (tmp_path / "link.log").symlink_to(tmp_path / "target.txt")
    (tmp_path / "target.txt").write_text("via symlink\n")
    rec = Recorder()
    async with tailing([spec(tmp_path / "*.log")], rec) as tailer:
        await wait_until(lambda: rec.messages() == ["via symlink"])
        await trio.sleep(SCAN_INTERVAL_S * 2)
        assert len(tailer.followers) == 1


def _offsets(rec: Recorder) -> list[tuple[int, int]]:
    out = []
    for count, checkpoints in rec.history:
        for value in checkpoints.values():
            pos = Position.loads(value)
            assert pos is not None
            out.append((count, pos.offset))
    return out


@pytest.mark.parametrize("fmt", ["raw", "cri"])
async def test_last_line_of_a_block_has_a_checkpoint_of_its_own(
    tmp_path: Path, autojump_clock: object, fmt: str
) -> None:
    # The shaper may hold the last text line of a batch; a checkpoint before it lets the rest become durable.
    ts = "2024-01-02T03:04:05Z"
    lines = ["a", "bb", "ccc"] if fmt == "raw" else [f"{ts} stdout F a", f"{ts} stderr F bb", f"{ts} stdout F ccc"]
    log = tmp_path / "app.log"
    log.write_text("".join(f"{line}\n" for line in lines))
    rec = Recorder()
    async with tailing([spec(log)], rec, fmt=fmt):
        await wait_until(lambda: len(rec.lines) == 3)
    before_last = len(lines[0]) + len(lines[1]) + 2
    assert _offsets(rec) == [(2, before_last), (3, log.stat().st_size)]
    assert [m for _s, m, _t in rec.lines] == ["a", "bb", "ccc"]


# -- checkpoint lag (forwarder_checkpoint_lag_bytes) ---------------------------------------------------------------


async def test_checkpoint_lag_is_the_size_past_the_persisted_offset(tmp_path: Path, autojump_clock: object) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"one\ntwo\npart")
    rec = Recorder()
    async with tailing([spec(log)], rec) as tailer:
        await wait_until(lambda: rec.messages() == ["one", "two"])
        # Nothing persisted yet: the whole file is owed (reading started at 0).
        assert tailer.checkpoint_lag({}) == {str(log): len(b"one\ntwo\npart")}
        # Persisted up to the submitted checkpoint: only the unterminated line is owed.
        assert tailer.checkpoint_lag(rec.checkpoints) == {str(log): len(b"part")}
        persisted = dict(rec.checkpoints)
        append(log, b"ial\nthree\n")
        await wait_until(lambda: rec.messages() == ["one", "two", "partial", "three"])
        assert tailer.checkpoint_lag(persisted) == {str(log): len(b"partial\nthree\n")}
        assert tailer.checkpoint_lag(rec.checkpoints) == {str(log): 0}


async def test_checkpoint_lag_starts_where_reading_started(tmp_path: Path, autojump_clock: object) -> None:
    done, new = b"done 1\ndone 2\n", b"new 3\n"
    log = tmp_path / "app.log"
    log.write_bytes(done + new)
    resumed = _checkpoint_for(log, len(done), prefix=b"done 1\n")
    rec = Recorder(resumed)
    async with tailing([spec(log)], rec) as tailer:
        await wait_until(lambda: rec.messages() == ["new 3"])
        assert tailer.checkpoint_lag(resumed) == {str(log): len(new)}
        # A persisted offset past the end (truncated since): owed from where reading started.
        assert tailer.checkpoint_lag(_checkpoint_for(log, 10_000)) == {str(log): len(new)}


async def test_checkpoint_lag_of_a_deleted_file_being_drained_counts_from_its_last_checkpoint(
    tmp_path: Path, autojump_clock: object
) -> None:
    """A deleted file's checkpoints are removals (its inode may be reused), so none is persisted while it is
    drained: what is owed is counted from the last offset handed on, not from where reading started."""
    log = tmp_path / "app.log"
    log.write_bytes(b"one\ntwo\n")
    rec = Recorder()
    async with tailing([spec(log)], rec) as tailer:
        await wait_until(lambda: rec.messages() == ["one", "two"])
        with log.open("ab") as writer:  # the agent still holds its deleted log open and writes on
            log.unlink()
            [follower] = tailer.followers.values()
            await wait_until(lambda: follower.deleted, "the deletion to be seen")
            writer.write(b"three\n")
            writer.flush()
            await wait_until(lambda: rec.messages() == ["one", "two", "three"])
            assert Position.loads(rec.checkpoints[follower.key]) is None  # removed, not moved on
            assert tailer.checkpoint_lag(rec.checkpoints) == {str(log): 0}
            writer.write(b"par")
            writer.flush()
            await wait_until(lambda: follower.offset == len(b"one\ntwo\nthree\npar"), "the partial line to be read")
            assert tailer.checkpoint_lag(rec.checkpoints) == {str(log): len(b"par")}


async def test_checkpoint_lag_covers_every_followed_file_and_drops_closed_ones(
    tmp_path: Path, autojump_clock: object
) -> None:
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_bytes(b"a\n" * 10)
    b.write_bytes(b"bb\n" * 5)
    rec = Recorder()
    async with tailing([spec(tmp_path / "*.log")], rec) as tailer:
        await wait_until(lambda: len(rec.lines) == 15)
        assert tailer.checkpoint_lag({}) == {str(a): 20, str(b): 15}
        b.unlink()
        await wait_until(lambda: str(b) not in tailer.checkpoint_lag({}), "the deleted file to be closed")
        assert tailer.checkpoint_lag(rec.checkpoints) == {str(a): 0}
