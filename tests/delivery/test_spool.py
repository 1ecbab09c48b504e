"""The durable spool: order, cursors, deletion, restart, checkpoints, the byte bound, and crash consistency.

Every test uses a real SQLite database and real chunk files in ``tmp_path``; the crash test SIGKILLs a real process
writing to them.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
import structlog.testing
import trio
import trio.testing

from forwarder.delivery import spool as spool_module
from forwarder.delivery.buffer import (
    CHECKPOINT_REMOVED,
    RECORD_OVERHEAD_BYTES,
    SPOOL_FULL,
    Chunk,
    MemoryBuffer,
    records_size,
)
from forwarder.delivery.spool import (
    CACHE_CHUNKS,
    CHUNKS_DIR,
    DESTINATION_REMOVED,
    DISK_MARGIN_MIN_BYTES,
    SHARED_LOADS_CHUNKS,
    SPOOL_ERROR,
    SPOOL_FILE,
    STALLED_AFTER_S,
    Spool,
    SpoolLockedError,
    decode_chunk,
    effective_max_bytes,
    encode_chunk,
    read_stored_chunks,
)
from forwarder.record import Level, Record, Tags

REPO = Path(__file__).resolve().parents[2]
TAGS = Tags("host-1", "agent-1", "svc")
MiB = 1024 * 1024


def numbered(start: int, count: int, *, pad: int = 0, tags: Tags = TAGS) -> list[Record]:
    """Records whose message starts with their number (``"<n> "``), captured now (+ n ns), as a source does: the
    spool counts a stage's flush interval from the capture of its oldest record (``_waited_s``)."""
    now_ns = time.time_ns()
    return [Record(now_ns + n, f"{n} " + "x" * pad, "stdout", tags) for n in range(start, start + count)]


def assert_between(value: float, low: float, high: float) -> None:
    """``low <= value <= high``, give or take float rounding of the trio clock (1 ns)."""
    assert low - 1e-9 <= value <= high + 1e-9, (low, value, high)


def numbers(records: list[Record]) -> list[int]:
    return [int(r.message.split(" ", 1)[0]) for r in records]


class Drops:
    """A DropCallback that remembers every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []

    def __call__(self, destination: str, count: int, reason: str) -> None:
        self.calls.append((destination, count, reason))

    def total(self, destination: str, reason: str | None = None) -> int:
        return sum(n for d, n, r in self.calls if d == destination and (reason is None or r == reason))


def db_rows(directory: Path, sql: str) -> list[tuple[object, ...]]:
    """Query the spool's database with a separate connection (what another process would see)."""
    conn = sqlite3.connect(directory / SPOOL_FILE)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def chunk_files(directory: Path) -> list[int]:
    """Ids of the chunk files in the spool ``directory``, sorted."""
    return sorted(int(p.name.split(".")[0]) for p in (directory / CHUNKS_DIR).iterdir())


def disk_bytes(directory: Path) -> int:
    """Bytes of the spool ``directory`` on disk: database, WAL and chunk files."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
async def spool(spool_dir: Path) -> AsyncIterator[Spool]:
    s = Spool.open(spool_dir, max_bytes=64 * MiB)
    try:
        yield s
    finally:
        await s.aclose()


async def read_all(spool: Spool, dest: str, *, ack: bool = True) -> list[Chunk]:
    """Every chunk up to the end (after close_input), acknowledging each."""
    out = []
    while (chunk := await spool.next_chunk(dest)) is not None:
        out.append(chunk)
        if ack:
            await spool.ack(dest, chunk.id)
    return out


# --- serialisation ---------------------------------------------------------------------------------------------

OTHER_TAGS = Tags("host-2", "agent-2", "svc")
CODEC_CASES: list[Record] = [
    Record(1, "plain", "stdout", TAGS),
    Record(2, "with level", "stderr", TAGS, Level.ERROR),
    Record(3, "attrs", "stdout", OTHER_TAGS, Level.INFO, {"a": 1, "nested": {"b": [1, 2.5, None, True]}}, 2),
    Record(4, "unicode ✓ é \x00 \n", "stdout", TAGS, None, {"truncated": True, "part": 1}, None),
    Record(5, "", "stdout", TAGS, Level.CRITICAL, {}, 0),
]


@pytest.mark.parametrize("level", [0, 1, 3, 6])
def test_encode_decode_roundtrip(level: int) -> None:
    decoded = decode_chunk(encode_chunk(CODEC_CASES, level))
    assert decoded == CODEC_CASES
    assert all(type(r.level) is Level for r in decoded if r.level is not None)
    # tags are stored once per chunk: records sharing tags share one object again after decoding
    assert decoded[0].tags is decoded[1].tags
    assert decoded[2].tags == OTHER_TAGS


def test_encode_decode_empty_and_single_tags() -> None:
    assert decode_chunk(encode_chunk([])) == []
    records = numbered(0, 3)
    decoded = decode_chunk(encode_chunk(records))
    assert decoded == records and decoded[0].tags is decoded[2].tags


@pytest.mark.parametrize(
    "record",
    [
        Record(1, "big int", "stdout", TAGS, None, {"n": 2**80}),
        Record(2, "lone surrogate \udcff", "stdout", TAGS),
        Record(3, "int key", "stdout", TAGS, None, {1: "one"}),  # type: ignore[dict-item]
    ],
    ids=["bigint", "surrogate", "int-key"],
)
def test_encode_falls_back_to_stdlib_json(record: Record) -> None:
    """What orjson refuses is still stored (stdlib JSON), not lost."""
    (decoded,) = decode_chunk(encode_chunk([record]))
    assert decoded.message == record.message
    if record.attributes is not None:
        assert decoded.attributes == {str(k): v for k, v in record.attributes.items()}


def test_compression_shrinks_typical_logs() -> None:
    records = numbered(0, 2000, pad=120)
    raw, packed = encode_chunk(records, 0), encode_chunk(records, 1)
    assert len(packed) * 4 < len(raw)


def test_chunks_compressed_by_stdlib_zlib_still_decode() -> None:
    """Spools written before ISA-L compressed with the stdlib's zlib: same format, still read."""
    raw = encode_chunk(CODEC_CASES, 0)
    legacy = bytes((raw[0] | 0x01,)) + zlib.compress(raw[1:], 1)
    assert decode_chunk(legacy) == CODEC_CASES


@pytest.mark.parametrize(
    "blob",
    [
        b"\x00" + b'[1, [["h", "s", "v"]], 0, [1], ["m"], ["stdout"], [99], [null], [null]]',  # unknown level
        b"\x00" + b'[1, [["h", "s", "v"]], [0, 0], [1], ["m"], ["stdout"], [null], [null], [null]]',  # tag index
        b"\x00" + b'[1, [["h", "s", "v"]], 0, [1, 2], ["m"], ["stdout"], [null], [null], [null]]',  # a column
        b"\x00" + b'[1, [["h", "s", "v"]], [3], [1], ["m"], ["stdout"], [null], [null], [null]]',  # no such tags
        b"\x00" + b'[2, [["h", "s", "v"]], 0, [1], ["m"], ["stdout"], [null], [null], [null]]',  # version
        b"\x01" + b"deadbeef",  # not compressed data
    ],
    ids=["level", "tag-index-length", "column-length", "tag-index-range", "version", "codec"],
)
def test_decode_refuses_malformed_chunks(blob: bytes) -> None:
    with pytest.raises(spool_module._DECODE_ERRORS):
        decode_chunk(blob)


@pytest.mark.parametrize(
    ("requested", "stored", "free", "total", "expected"),
    [
        (1 << 30, 0, 100 << 30, 200 << 30, 1 << 30),  # plenty of disk: as requested
        (1 << 30, 0, 600 * MiB, 1 << 30, 600 * MiB - DISK_MARGIN_MIN_BYTES),  # clamped to free - 100 MiB
        (1 << 30, 300 * MiB, 600 * MiB, 1 << 30, 900 * MiB - DISK_MARGIN_MIN_BYTES),  # own data counts as room
        (1 << 30, 0, 900 << 30, 1000 << 30, 1 << 30),  # 5% of 1000 GiB margin still leaves room
        (100 << 30, 0, 100 << 30, 1000 << 30, 50 << 30),  # margin is 5% of the disk when above 100 MiB
        (1 << 30, 0, 10 * MiB, 1 << 30, 4 * MiB),  # nearly full disk: the floor (a few chunks)
        (2 * MiB, 0, 10 * MiB, 1 << 30, 2 * MiB),  # never above what was requested
    ],
)
def test_effective_max_bytes(requested: int, stored: int, free: int, total: int, expected: int) -> None:
    got = effective_max_bytes(requested, stored=stored, free=free, total=total, floor=4 * MiB)
    assert got == expected


# --- append, read, ack -----------------------------------------------------------------------------------------


async def test_append_read_ack_in_order(spool: Spool, spool_dir: Path) -> None:
    spool.register(["a"])
    await spool.append(numbered(0, 3))
    await spool.flush()
    await spool.append(numbered(3, 2))
    await spool.append(numbered(5, 4))
    await spool.flush()
    assert spool.pending("a") == 9
    assert spool.stored_chunks() == 2
    assert db_rows(spool_dir, "SELECT id, n_records FROM chunks ORDER BY id") == [(1, 3), (2, 6)]
    assert chunk_files(spool_dir) == [1, 2]  # the data is in one file per chunk; the row is the index

    first = await spool.next_chunk("a")
    assert first is not None and numbers(first.records) == [0, 1, 2]
    second = await spool.next_chunk("a")
    assert second is not None and numbers(second.records) == [3, 4, 5, 6, 7, 8]
    assert second.id > first.id
    assert spool.pending("a") == 9  # handed out is not acknowledged

    await spool.ack("a", first.id)
    assert spool.pending("a") == 6
    assert db_rows(spool_dir, "SELECT id FROM chunks") == [(2,)]
    assert db_rows(spool_dir, "SELECT destination, acked_id FROM cursors") == [("a", 1)]
    assert chunk_files(spool_dir) == [2]
    await spool.ack("a", second.id)
    assert spool.pending("a") == 0
    assert spool.stored_chunks() == 0 and spool.stored_bytes() == 0
    assert chunk_files(spool_dir) == []

    await spool.close_input()
    assert await spool.next_chunk("a") is None
    with pytest.raises(RuntimeError):
        await spool.append(numbered(9, 1))


async def test_large_append_is_cut_into_chunks(spool_dir: Path) -> None:
    spool = Spool.open(spool_dir, max_bytes=64 * MiB, chunk_max_bytes=10_000)
    try:
        spool.register(["a"])
        await spool.append(numbered(0, 1000, pad=50))  # ~120 kB of record bytes: flushed at once, cut in ~12
        assert spool.stored_chunks() >= 10
        await spool.close_input()
        chunks = await read_all(spool, "a")
        assert all(c.size < 2 * 10_000 + 200 for c in chunks)  # a short tail joins its chunk (SPLIT_TAIL_FRACTION)
        assert [n for c in chunks for n in numbers(c.records)] == list(range(1000))
    finally:
        await spool.aclose()


async def test_run_persists_staged_records_after_the_interval(
    spool_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    spool = Spool.open(spool_dir, max_bytes=64 * MiB, flush_interval_s=0.25)
    try:
        spool.register(["a"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spool.run)
            start = trio.current_time()
            wall = time.time_ns()
            await spool.append(records := numbered(0, 5))
            gap_s = (time.time_ns() - wall) / 1e9  # wall time from capture to append (counted as waited)
            assert db_rows(spool_dir, "SELECT count(*) FROM chunks") == [(0,)]  # staged, not yet persisted
            chunk = await spool.next_chunk("a")  # sealed and handed out at the interval, counted from capture
            assert_between(trio.current_time() - start, 0.25 - gap_s, 0.25)
            assert chunk is not None and chunk.records == records
            await trio.testing.wait_all_tasks_blocked()  # run() is writing it (in a worker thread, under the lock)
            async with spool._flush_lock:
                pass
            # not acknowledged by its deadline (the same moment, at 0.25 s): written
            assert db_rows(spool_dir, "SELECT id, n_records FROM chunks") == [(chunk.id, 5)]
            await spool.close_input()  # run() returns
    finally:
        await spool.aclose()


async def test_the_flush_interval_counts_from_the_capture_of_a_record_the_shaper_held(
    spool_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A record appended late (the shaper held the last text line of a burst for the multi-line timeout) is sealed
    ``flush_interval_s`` after its capture, not after its append: the two waits do not add up. Whether it starts the
    stage or joins one, and never earlier than at once; a capture time ahead of the clock (a clock step) counts from
    the append, as before."""
    interval = 0.25
    spool = Spool.open(spool_dir, max_bytes=64 * MiB, flush_interval_s=interval)
    try:
        spool.register(["a"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spool.run)

            def held(n: int, waited_s: float) -> Record:
                return Record(time.time_ns() - int(waited_s * 1e9), f"{n} held", "stdout", TAGS)

            # alone in the stage, held 0.15 s: sealed 0.1 s after the append
            start = trio.current_time()
            wall = time.time_ns()
            await spool.append([held(0, 0.15)])
            gap_s = (time.time_ns() - wall) / 1e9  # wall time from capture to append (counted as waited)
            chunk = await spool.next_chunk("a")
            assert chunk is not None and numbers(chunk.records) == [0]
            assert_between(trio.current_time() - start, interval - 0.15 - gap_s, interval - 0.15)

            # held longer than the interval: sealed at once
            start = trio.current_time()
            await spool.append([held(1, 30.0)])
            chunk = await spool.next_chunk("a")
            assert chunk is not None and numbers(chunk.records) == [1]
            assert trio.current_time() - start == 0

            # joining a stage begun by a fresh record: the stage's deadline moves to the held record's
            start = trio.current_time()
            await spool.append(numbered(2, 2))
            await trio.sleep(0.05)
            wall = time.time_ns()
            await spool.append([held(4, 0.2)])  # captured 0.15 s before the stage began
            gap_s = (time.time_ns() - wall) / 1e9
            chunk = await spool.next_chunk("a")
            assert chunk is not None and numbers(chunk.records) == [2, 3, 4]
            assert_between(trio.current_time() - start, interval - 0.15 - gap_s, interval - 0.15)

            # captured "in the future" (the wall clock stepped back): counted from the append
            start = trio.current_time()
            await spool.append([held(5, -60.0)])
            chunk = await spool.next_chunk("a")
            assert chunk is not None and numbers(chunk.records) == [5]
            assert trio.current_time() - start == pytest.approx(interval)
            await spool.close_input()
    finally:
        await spool.aclose()


async def test_a_chunk_every_destination_acknowledges_before_its_deadline_is_never_written(
    spool_dir: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Write-behind: a full chunk is handed out at once; when the last destination acknowledges it before its
    deadline, its checkpoint is committed with that acknowledgement and the chunk is never written. A chunk one
    destination has not acknowledged by its deadline is written then. Ids of chunks never written are not reused
    after a restart."""
    spool = Spool.open(spool_dir, max_bytes=64 * MiB, chunk_max_bytes=4096, flush_interval_s=0.25)
    try:
        spool.register(["a", "b"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spool.run)
            await trio.testing.wait_all_tasks_blocked()  # run() is running: appends leave the writing to it
            first = numbered(0, 40, pad=100)  # ~6.5 kB: a full chunk, sealed by the append itself
            await spool.append(first, {"k": "40"})
            got_a, got_b = await spool.next_chunk("a"), await spool.next_chunk("b")
            assert trio.current_time() == 0  # at once, not after the interval (the clock only moves when told)
            assert got_a is got_b and got_a is not None and got_a.records == first
            await spool.ack("a", got_a.id)
            assert db_rows(spool_dir, "SELECT count(*) FROM checkpoints") == [(0,)]  # b has not delivered it
            await spool.ack("b", got_a.id)
            # committed by b's acknowledgement itself: checkpoint and cursors, no row, no file, ever
            assert db_rows(spool_dir, "SELECT key, value FROM checkpoints") == [("k", "40")]
            assert db_rows(spool_dir, "SELECT destination, acked_id FROM cursors ORDER BY 1") == [
                ("a", got_a.id),
                ("b", got_a.id),
            ]
            assert spool.load_checkpoints() == {"k": "40"}
            mock_clock.jump(1)  # long past its deadline
            await trio.testing.wait_all_tasks_blocked()
            assert db_rows(spool_dir, "SELECT count(*) FROM chunks") == [(0,)] and chunk_files(spool_dir) == []
            assert spool.elided_chunks == 1

            second = numbered(40, 40, pad=100)
            await spool.append(second, {"k": "80"})
            got = await spool.next_chunk("a")
            assert got is not None and got.records == second
            await spool.ack("a", got.id)  # b never acknowledges it
            mock_clock.jump(0.3)  # its deadline passes: written with its checkpoint
            await trio.testing.wait_all_tasks_blocked()
            async with spool._flush_lock:
                pass
            assert db_rows(spool_dir, "SELECT id, n_records FROM chunks") == [(got.id, 40)]
            assert chunk_files(spool_dir) == [got.id]
            assert db_rows(spool_dir, "SELECT value FROM checkpoints") == [("80",)]
            assert spool.elided_chunks == 1
            await spool.close_input()
    finally:
        await spool.aclose()

    reopened = Spool.open(spool_dir, max_bytes=64 * MiB, chunk_max_bytes=4096)
    try:
        reopened.register(["a", "b"])
        assert reopened.pending("a") == 0 and reopened.pending("b") == 40
        await reopened.append(numbered(80, 1))
        await reopened.close_input()
        b_chunks = await read_all(reopened, "b")
        assert [numbers(c.records)[0] for c in b_chunks] == [40, 80]
        assert b_chunks[-1].id > got.id > got_a.id  # ids of chunks never written are not reused
    finally:
        await reopened.aclose()


async def test_an_acknowledgement_the_disk_cannot_take_is_logged_not_raised_and_the_next_one_catches_up(
    spool_dir: Path, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (or an I/O error) when an acknowledgement commits must not stop the forwarder: it is logged once,
    the in-memory cursor stands, and the next acknowledgement that commits moves the stored cursor and deletes every
    chunk up to it. Chunks every destination acknowledged before their deadline stay unwritten when the commit of
    their checkpoints fails, and run() commits them (still without writing them) at once."""
    fail = {"next": 0}

    spool = Spool.open(spool_dir, max_bytes=64 * MiB, chunk_max_bytes=4096, flush_interval_s=0.25)
    store_ack = spool._store.ack

    def flaky_ack(*args: object, **kwargs: object) -> None:
        if fail["next"]:
            fail["next"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        store_ack(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(spool._store, "ack", flaky_ack)
    try:
        spool.register(["a", "b"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spool.run)
            await trio.testing.wait_all_tasks_blocked()
            # Written chunks (b lags past their deadline), then acknowledged by both: the first commit fails.
            await spool.append(numbered(0, 40, pad=100), {"k": "40"})
            await spool.append(numbered(40, 40, pad=100), {"k": "80"})
            one, two = await spool.next_chunk("a"), await spool.next_chunk("a")
            assert one is not None and two is not None
            mock_clock.jump(1)
            await trio.testing.wait_all_tasks_blocked()
            async with spool._flush_lock:  # the write runs in a worker thread
                pass
            assert chunk_files(spool_dir) == [one.id, two.id]
            for dest in ("a", "b"):
                if dest == "b":
                    assert await spool.next_chunk("b") is one and await spool.next_chunk("b") is two
                    fail["next"] = 1
                with structlog.testing.capture_logs() as logs:
                    await spool.ack(dest, one.id)  # b's fails: not raised
                if dest == "b":
                    assert [e["event"] for e in logs] == ["spool_ack_failed"]
                    assert logs[0]["destination"] == "b" and "disk is full" in logs[0]["error"]
            assert db_rows(spool_dir, "SELECT destination, acked_id FROM cursors ORDER BY 1") == [
                ("a", one.id),
                ("b", 0),
            ]
            assert spool.pending("b") == 40  # the in-memory cursor stands
            with structlog.testing.capture_logs() as logs:
                await spool.ack("a", two.id)  # the store takes acknowledgements again
                await spool.ack("b", two.id)
            assert [e["event"] for e in logs] == ["spool_ack_recovered"]
            assert db_rows(spool_dir, "SELECT destination, acked_id FROM cursors ORDER BY 1") == [
                ("a", two.id),
                ("b", two.id),
            ]
            assert db_rows(spool_dir, "SELECT count(*) FROM chunks") == [(0,)] and chunk_files(spool_dir) == []

            # Acknowledged by both before its deadline: the commit of its checkpoint fails, run() commits it.
            await spool.append(numbered(80, 40, pad=100), {"k": "120"})
            three = await spool.next_chunk("a")
            assert three is not None and await spool.next_chunk("b") is three
            await spool.ack("a", three.id)
            fail["next"] = 1
            with structlog.testing.capture_logs() as logs:
                await spool.ack("b", three.id)
                await trio.testing.wait_all_tasks_blocked()
                async with spool._flush_lock:
                    pass
            assert [e["event"] for e in logs] == ["spool_ack_failed"]
            assert trio.current_time() == 1  # before its deadline: the clock did not move
            assert db_rows(spool_dir, "SELECT value FROM checkpoints") == [("120",)]
            assert db_rows(spool_dir, "SELECT count(*) FROM chunks") == [(0,)] and chunk_files(spool_dir) == []
            assert spool.elided_chunks == 1
            await spool.close_input()
    finally:
        await spool.aclose()


async def test_acknowledging_the_first_chunks_of_a_seal_writes_the_rest_with_its_checkpoint(
    spool_dir: Path, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append larger than a chunk is sealed into several chunks, and its checkpoint rides on the last. When every
    destination has acknowledged the first ones, the rest of the seal is written with that checkpoint and the
    cursor in one transaction (the first ones never are): the records delivered are then covered by a durable
    checkpoint, and the others are on disk, so a crash now reads nothing again from the source. (The store's own
    ack, which follows to delete what every destination acknowledged, is made to fail as a crash would.)"""

    class KilledError(Exception):
        pass

    def killed(*args: object) -> None:
        raise KilledError

    spool = Spool.open(spool_dir, max_bytes=64 * MiB, chunk_max_bytes=4096, flush_interval_s=0.25)
    try:
        spool.register(["a", "b"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spool.run)
            await trio.testing.wait_all_tasks_blocked()
            records = numbered(0, 100, pad=100)  # ~17 kB: three chunks or more
            await spool.append(records, {"k": "100"})
            first, second = await spool.next_chunk("a"), await spool.next_chunk("a")
            assert first is not None and second is not None and len(first.records) + len(second.records) < 100
            await spool.ack("a", first.id)
            assert await spool.next_chunk("b") is first and await spool.next_chunk("b") is second
            monkeypatch.setattr(spool._store, "ack", killed)
            with pytest.raises(KilledError):
                await spool.ack("b", second.id)  # every destination has the first chunk now
            monkeypatch.undo()
            rows = db_rows(spool_dir, "SELECT id, n_records FROM chunks ORDER BY id")
            assert [cid for cid, _ in rows] == list(range(second.id, spool.last_chunk_id + 1))
            assert sum(int(str(n)) for _, n in rows) == 100 - len(first.records)
            assert chunk_files(spool_dir) == [cid for cid, _ in rows]
            assert db_rows(spool_dir, "SELECT key, value FROM checkpoints") == [("k", "100")]
            assert db_rows(spool_dir, "SELECT destination, acked_id FROM cursors ORDER BY 1") == [
                ("a", first.id),
                ("b", second.id),
            ]
            assert spool.elided_chunks == 1
            await spool.close_input()
    finally:
        await spool.aclose()

    reopened = Spool.open(spool_dir, max_bytes=64 * MiB, chunk_max_bytes=4096)
    try:
        reopened.register(["a", "b"])
        await reopened.close_input()
        rest = [r for c in await read_all(reopened, "a") for r in c.records]
        assert numbers(rest) == list(range(len(first.records), 100))
        rest = [r for c in await read_all(reopened, "b") for r in c.records]
        assert numbers(rest) == list(range(len(first.records) + len(second.records), 100))
    finally:
        await reopened.aclose()


async def test_destinations_have_independent_cursors_and_chunks_go_when_all_acked(
    spool: Spool, spool_dir: Path
) -> None:
    spool.register(["a", "b"])
    for start in (0, 10, 20):
        await spool.append(numbered(start, 10))
        await spool.flush()
    await spool.close_input()

    a_chunks = await read_all(spool, "a")
    assert [numbers(c.records)[0] for c in a_chunks] == [0, 10, 20]
    assert spool.pending("a") == 0 and spool.pending("b") == 30
    assert spool.stored_chunks() == 3  # b has acknowledged nothing

    b_first = await spool.next_chunk("b")
    assert b_first is not None and numbers(b_first.records)[0] == 0
    await spool.ack("b", b_first.id)
    assert spool.stored_chunks() == 2
    assert db_rows(spool_dir, "SELECT id FROM chunks ORDER BY id") == [(2,), (3,)]
    rest = await read_all(spool, "b")
    assert [numbers(c.records)[0] for c in rest] == [10, 20]
    assert spool.stored_chunks() == 0


async def test_ack_is_cumulative_and_clamped_to_what_was_handed_out(spool: Spool) -> None:
    spool.register(["a"])
    for start in (0, 10, 20):
        await spool.append(numbered(start, 10))
        await spool.flush()
    first = await spool.next_chunk("a")
    second = await spool.next_chunk("a")
    assert first is not None and second is not None
    await spool.ack("a", 99)  # only chunks 1 and 2 were handed out
    assert spool.pending("a") == 10
    third = await spool.next_chunk("a")
    assert third is not None and numbers(third.records)[0] == 20


# --- restart ---------------------------------------------------------------------------------------------------


async def test_restart_resumes_every_destination_from_its_cursor(spool_dir: Path) -> None:
    first = Spool.open(spool_dir, max_bytes=64 * MiB)
    first.register(["a", "b"])
    for start in (0, 10, 20):
        await first.append(numbered(start, 10))
        await first.flush()
    a1 = await first.next_chunk("a")
    assert a1 is not None
    await first.ack("a", a1.id)
    a2 = await first.next_chunk("a")  # handed out, never acknowledged: delivered again after the restart
    assert a2 is not None
    await first.append(numbered(30, 5))  # staged only: aclose persists it
    await first.aclose()

    second = Spool.open(spool_dir, max_bytes=64 * MiB)
    try:
        second.register(["a", "b"])
        assert second.pending("a") == 25 and second.pending("b") == 35
        await second.append(numbered(35, 5))
        await second.close_input()
        a = await read_all(second, "a")
        b = await read_all(second, "b")
        assert [n for c in a for n in numbers(c.records)] == list(range(10, 40))
        assert [n for c in b for n in numbers(c.records)] == list(range(40))
        assert a[0].id == a2.id  # the chunk in flight at the stop, again
        ids = [c.id for c in b]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert second.stored_chunks() == 0
    finally:
        await second.aclose()


async def test_chunk_ids_keep_increasing_after_the_spool_was_emptied(spool_dir: Path) -> None:
    first = Spool.open(spool_dir, max_bytes=64 * MiB)
    first.register(["a"])
    await first.append(numbered(0, 3))
    await first.close_input()
    (chunk,) = await read_all(first, "a")
    await first.aclose()
    assert db_rows(spool_dir, "SELECT count(*) FROM chunks") == [(0,)]

    second = Spool.open(spool_dir, max_bytes=64 * MiB)
    try:
        second.register(["a"])
        await second.append(numbered(3, 3))
        await second.close_input()
        (again,) = await read_all(second, "a")
        assert again.id > chunk.id  # an id is never reused, so an old cursor can never skip new data
        assert numbers(again.records) == [3, 4, 5]
    finally:
        await second.aclose()


async def test_removed_destination_releases_its_cursor(spool_dir: Path) -> None:
    first = Spool.open(spool_dir, max_bytes=64 * MiB)
    first.register(["a", "b"])
    await first.append(numbered(0, 7))
    await first.close_input()
    await read_all(first, "a")
    assert first.stored_chunks() == 1  # held for b
    await first.aclose()

    drops = Drops()
    second = Spool.open(spool_dir, max_bytes=64 * MiB, on_drop=drops)
    try:
        second.register(["a"])
        assert drops.calls == [("b", 7, DESTINATION_REMOVED)]
        assert second.stored_chunks() == 0 and second.stored_bytes() == 0
        assert db_rows(spool_dir, "SELECT destination FROM cursors") == [("a",)]
        assert db_rows(spool_dir, "SELECT count(*) FROM chunks") == [(0,)]
    finally:
        await second.aclose()


async def test_new_destination_starts_at_the_current_end(spool_dir: Path) -> None:
    first = Spool.open(spool_dir, max_bytes=64 * MiB)
    first.register(["a"])
    await first.append(numbered(0, 10))
    await first.aclose()  # a has not read anything: the backlog stays

    second = Spool.open(spool_dir, max_bytes=64 * MiB)
    try:
        second.register(["a", "new"])
        assert second.pending("a") == 10 and second.pending("new") == 0
        await second.append(numbered(10, 5))
        await second.close_input()
        assert [n for c in await read_all(second, "new") for n in numbers(c.records)] == list(range(10, 15))
        assert [n for c in await read_all(second, "a") for n in numbers(c.records)] == list(range(15))
    finally:
        await second.aclose()


async def test_second_process_is_refused(spool: Spool, spool_dir: Path) -> None:
    with pytest.raises(SpoolLockedError):
        Spool.open(spool_dir, max_bytes=MiB)


# --- checkpoints -------------------------------------------------------------------------------------------------


async def test_checkpoints_are_persisted_with_their_records_never_before(spool_dir: Path) -> None:
    spool = Spool.open(spool_dir, max_bytes=64 * MiB)
    spool.register(["a"])
    await spool.append(numbered(0, 3), {"/var/log/x.log": "300"})
    assert db_rows(spool_dir, "SELECT count(*) FROM checkpoints") == [(0,)]
    assert spool.load_checkpoints() == {}
    await spool.flush()
    assert db_rows(spool_dir, "SELECT key, value FROM checkpoints") == [("/var/log/x.log", "300")]
    assert db_rows(spool_dir, "SELECT n_records FROM chunks") == [(3,)]
    assert spool.load_checkpoints() == {"/var/log/x.log": "300"}

    await spool.append(numbered(3, 2), {"/var/log/x.log": "500"})
    await spool.append([], {"/var/log/y.log": "7"})  # a position with no new record
    await spool.aclose()  # a clean stop persists both

    reopened = Spool.open(spool_dir, max_bytes=64 * MiB)
    try:
        assert reopened.load_checkpoints() == {"/var/log/x.log": "500", "/var/log/y.log": "7"}
        reopened.register(["a"])
        assert reopened.pending("a") == 5
    finally:
        await reopened.aclose()


async def test_a_removed_checkpoint_is_deleted_with_its_records(spool_dir: Path) -> None:
    spool = Spool.open(spool_dir, max_bytes=64 * MiB)
    spool.register(["a"])
    await spool.append(numbered(0, 1), {"tail:1": "10", "tail:2": "20"})
    await spool.flush()
    await spool.append(numbered(1, 1), {"tail:1": CHECKPOINT_REMOVED})  # file 1 was deleted
    assert spool.load_checkpoints() == {"tail:1": "10", "tail:2": "20"}  # not before its records
    await spool.flush()
    assert spool.load_checkpoints() == {"tail:2": "20"}
    assert db_rows(spool_dir, "SELECT key, value FROM checkpoints") == [("tail:2", "20")]
    await spool.append([], {"tail:1": "5"})  # the inode reused by a new file
    await spool.aclose()

    reopened = Spool.open(spool_dir, max_bytes=64 * MiB)
    try:
        assert reopened.load_checkpoints() == {"tail:1": "5", "tail:2": "20"}
    finally:
        await reopened.aclose()

    memory = MemoryBuffer(MiB)
    await memory.append([], {"tail:1": "10"})
    await memory.append([], {"tail:1": CHECKPOINT_REMOVED})
    assert memory.load_checkpoints() == {}


# --- bounds --------------------------------------------------------------------------------------------------------


async def test_full_spool_drops_oldest_and_counts_per_destination(spool_dir: Path) -> None:
    """2 MB bound, ~6 MB appended while "down" reads nothing: the oldest chunks go, counted for each destination that
    had not been handed them; a chunk in flight is counted once, only if it is never acknowledged."""
    max_bytes = 2_000_000
    drops = Drops()
    spool = Spool.open(spool_dir, max_bytes=max_bytes, on_drop=drops, chunk_max_bytes=64 * 1024)
    rng = random.Random(7)
    try:
        spool.register(["live", "down", "holder", "acker"])
        await spool.append(numbered(0, 100, pad=300))
        await spool.flush()
        held = await spool.next_chunk("holder")  # holder keeps chunk 1 in flight until the end
        in_flight = await spool.next_chunk("acker")  # acker delivers chunk 1 after it was discarded
        assert held is not None and in_flight is not None and held.id == in_flight.id == 1

        live: list[int] = []
        appended = 100
        max_disk = 0
        while appended < 20_000:
            batch = [
                Record(n, f"{n} {rng.randbytes(150).hex()}", "stdout", TAGS) for n in range(appended, appended + 500)
            ]
            appended += len(batch)
            await spool.append(batch)
            await spool.flush()
            assert spool.stored_bytes() <= max_bytes
            max_disk = max(max_disk, disk_bytes(spool_dir))
            while spool.pending("live") and (chunk := await spool.next_chunk("live")) is not None:
                live.extend(numbers(chunk.records))
                await spool.ack("live", chunk.id)
                if not spool.pending("live"):
                    break
        assert live == list(range(appended))  # the healthy destination got everything, in order
        assert drops.total("live") == 0

        await spool.ack("acker", in_flight.id)  # delivered after all: never counted as dropped
        await spool.close_input()
        down_left = [n for c in await read_all(spool, "down") for n in numbers(c.records)]
        acker_left = [n for c in await read_all(spool, "acker") for n in numbers(c.records)]
        assert down_left == acker_left == list(range(appended - len(down_left), appended))  # newest kept, in order
        assert drops.total("down", SPOOL_FULL) + len(down_left) == appended
        assert drops.total("acker", SPOOL_FULL) + len(acker_left) + len(in_flight.records) == appended
        assert {r for _, _, r in drops.calls} == {SPOOL_FULL}
        holder_before_close = drops.total("holder")
    finally:
        await spool.aclose()
    # holder never acknowledged chunk 1, which was discarded while in flight: counted at close, exactly once
    assert drops.total("holder") == holder_before_close + len(held.records)
    assert drops.total("holder") + spool.pending("holder") == appended
    assert max_disk <= max_bytes + MiB  # the files on disk follow the bound (discarded chunks' files are deleted)


async def test_one_flush_larger_than_the_bound_keeps_the_newest_chunks(spool_dir: Path) -> None:
    drops = Drops()
    spool = Spool.open(spool_dir, max_bytes=100_000, on_drop=drops, chunk_max_bytes=20_000, compress_level=0)
    try:
        spool.register(["down"])
        await spool.append(numbered(0, 2000, pad=200))  # ~530 kB in one flush: ~27 chunks, ~4 fit
        assert spool.stored_bytes() <= 100_000
        assert 1 < spool.stored_chunks() < 10
        await spool.close_input()
        left = [n for c in await read_all(spool, "down") for n in numbers(c.records)]
        assert left == list(range(2000 - len(left), 2000))
        assert drops.total("down", SPOOL_FULL) == 2000 - len(left)
    finally:
        await spool.aclose()


async def test_aclose_persists_staged_records_even_when_cancelled(spool_dir: Path) -> None:
    spool = Spool.open(spool_dir, max_bytes=64 * MiB)
    spool.register(["a"])
    await spool.append(numbered(0, 4), {"k": "4"})
    with trio.CancelScope() as scope:
        scope.cancel()  # e.g. the shutdown deadline passed
        await spool.aclose()
    assert db_rows(spool_dir, "SELECT n_records FROM chunks") == [(4,)]
    assert db_rows(spool_dir, "SELECT value FROM checkpoints") == [("4",)]
    assert spool.pending("a") == 4  # still answers for the exit summary


async def test_memory_stays_flat_while_a_destination_is_down(
    spool_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """One destination delivers, the other never reads (down): once it is stalled (STALLED_AFTER_S) the down one
    pins nothing in memory, so what the spool holds stays at most a chunk however long it is down; the chunks wait
    on disk. (Without that rule the cache would fill to CACHE_CHUNKS chunks: 12 x 16 KiB here.)"""
    spool = Spool.open(spool_dir, max_bytes=64 * MiB, chunk_max_bytes=16 * 1024, compress_level=0)
    try:
        spool.register(["live", "down"])
        progress = trio.Event()

        async def live() -> None:
            nonlocal progress
            while (chunk := await spool.next_chunk("live")) is not None:
                await spool.ack("live", chunk.id)
                progress.set()
                progress = trio.Event()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(live)
            held = []
            chunk_bytes = 0
            for i in range(200):
                batch = numbered(i * 50, 50, pad=100)
                chunk_bytes = max(chunk_bytes, records_size(batch))
                await spool.append(batch)
                await spool.flush()  # what run() does after flush_interval_s
                while spool.pending("live"):  # live delivers it
                    await progress.wait()
                await trio.sleep(0.5)  # time passes: "down" has been busy with nothing for longer and longer
                if trio.current_time() > STALLED_AFTER_S:
                    held.append(spool.held_bytes())
            await spool.close_input()
        assert len(held) > 190
        assert max(held) <= chunk_bytes
        assert spool.pending("live") == 0
        assert spool.pending("down") == 200 * 50
        assert spool.stored_chunks() == 200
    finally:
        await spool.aclose()


async def test_disk_full_is_counted_not_raised(spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file system fills before the bound does (played by chunk files failing with ENOSPC past 1.2 MB, after
    writing part of their data): appending goes on, the bound shrinks, the oldest chunks make room, and every
    record is delivered, dropped with a reason, or pending; no partial file is left behind."""
    drops = Drops()
    spool = Spool.open(spool_dir, max_bytes=64 * MiB, on_drop=drops, chunk_max_bytes=32 * 1024, compress_level=0)
    write_file = spool_module._write_file

    def small_disk(path: Path, head: bytes, data: bytes) -> None:
        used = sum(p.stat().st_size for p in path.parent.iterdir() if p != path)
        if used + len(head) + len(data) > 1_200_000:
            path.write_bytes(head + data[:100])
            raise OSError(errno.ENOSPC, "No space left on device")
        write_file(path, head, data)

    monkeypatch.setattr(spool_module, "_write_file", small_disk)
    try:
        spool.register(["down"])
        appended = 0
        for _ in range(60):
            await spool.append(numbered(appended, 100, pad=200))
            appended += 100
            await spool.flush()
        assert spool.max_bytes < 2 * MiB
        assert drops.total("down") > 0
        assert {r for _, _, r in drops.calls} == {SPOOL_FULL}
        assert drops.total("down") + spool.pending("down") == appended
        await spool.close_input()
        assert chunk_files(spool_dir) == [cid for cid, _, _ in read_stored_chunks(spool_dir)]  # no partial file
        left = [n for c in await read_all(spool, "down") for n in numbers(c.records)]
        assert left == sorted(left) and left[-1] == appended - 1
    finally:
        await spool.aclose()


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
async def test_unreadable_chunk_is_skipped_and_counted(spool_dir: Path, damage: str) -> None:
    """A chunk file that does not decode, or that is missing (a power loss before the kernel wrote it back): its
    records are counted as dropped (spool_error), the others are delivered."""
    first = Spool.open(spool_dir, max_bytes=64 * MiB)
    first.register(["a"])
    for start in (0, 10, 20):
        await first.append(numbered(start, 10))
        await first.flush()
    await first.aclose()
    path = spool_dir / CHUNKS_DIR / "2.chunk"
    if damage == "corrupt":
        path.write_bytes(b"\x01deadbeef")
    else:
        path.unlink()

    drops = Drops()
    second = Spool.open(spool_dir, max_bytes=64 * MiB, on_drop=drops)
    try:
        second.register(["a"])
        await second.close_input()
        got = [n for c in await read_all(second, "a") for n in numbers(c.records)]
        assert got == list(range(10)) + list(range(20, 30))
        assert drops.calls == [("a", 10, SPOOL_ERROR)]
        assert second.pending("a") == 0
    finally:
        await second.aclose()


async def test_spool_of_an_earlier_version_is_read_and_emptied(spool_dir: Path) -> None:
    """A spool written before chunk files keeps each chunk's data in its row: it is read back as it is (next to new
    chunks in files), and deleted once acknowledged."""
    first = Spool.open(spool_dir, max_bytes=64 * MiB)
    first.register(["a"])
    await first.aclose()
    old = [numbered(0, 5), numbered(5, 5)]
    conn = sqlite3.connect(spool_dir / SPOOL_FILE)
    with conn:
        conn.executemany(
            "INSERT INTO chunks (id, created, n_records, bytes, data) VALUES (?, 0, ?, ?, ?)",
            [(i + 1, len(r), len(encode_chunk(r, 1)), encode_chunk(r, 1)) for i, r in enumerate(old)],
        )
    conn.close()

    second = Spool.open(spool_dir, max_bytes=64 * MiB)
    try:
        second.register(["a"])
        assert second.pending("a") == 10 and second.stored_chunks() == 2
        await second.append(numbered(10, 5))
        await second.close_input()
        assert chunk_files(spool_dir) == [3]
        got = await read_all(second, "a")
        assert [c.id for c in got] == [1, 2, 3]
        assert numbers([r for c in got for r in c.records]) == list(range(15))
        assert second.stored_chunks() == 0 and second.stored_bytes() == 0
        assert db_rows(spool_dir, "SELECT count(*) FROM chunks") == [(0,)] and chunk_files(spool_dir) == []
    finally:
        await second.aclose()


async def test_orphan_chunk_files_are_removed_at_open(spool_dir: Path) -> None:
    """Files no row refers to (a crash after a file was written but before its row committed, or after a row was
    deleted but before its file was) are deleted at the next open; the chunks with rows are kept and read."""
    first = Spool.open(spool_dir, max_bytes=64 * MiB)
    first.register(["a"])
    await first.append(numbered(0, 5))
    await first.flush()
    await first.aclose()
    chunks = spool_dir / CHUNKS_DIR
    (chunks / "7.chunk").write_bytes(b"\x00[1")  # cut short, its row never committed
    (chunks / "notes.txt").write_text("not ours")

    second = Spool.open(spool_dir, max_bytes=64 * MiB)
    try:
        assert sorted(p.name for p in chunks.iterdir()) == ["1.chunk", "notes.txt"]
        second.register(["a"])
        await second.close_input()
        assert numbers([r for c in await read_all(second, "a") for r in c.records]) == list(range(5))
    finally:
        await second.aclose()


async def test_a_chunk_discarded_while_a_reader_loads_is_counted_not_skipped(spool_dir: Path) -> None:
    """A write discards the oldest chunks (spool full) while a lagging destination reads from disk: the reader,
    finding them gone before the write's result is applied, waits for it, so that they are counted as dropped
    for it (not silently skipped), and then goes on with the oldest chunk left."""
    drops = Drops()
    chunk_max = 8 * 1024
    spool = Spool.open(spool_dir, max_bytes=64 * MiB, on_drop=drops, chunk_max_bytes=chunk_max, compress_level=0)
    store = spool._store
    evict = store._evict
    committed, release = threading.Event(), threading.Event()

    def slow_evict(oldest: list[tuple[int, int]]) -> None:
        evict(oldest)  # committed, files deleted
        committed.set()
        assert release.wait(10)

    count = CACHE_CHUNKS + 8  # chunks of ~7 KiB, none read yet: the oldest are not cached
    try:
        spool.register(["a"])
        for start in range(0, count * 100, 100):
            await spool.append(numbered(start, 100))
            await spool.flush()
        assert spool.last_chunk_id == count
        spool.max_bytes = spool.stored_bytes() + 2000  # the next write must discard the oldest chunk (only)
        store._evict = slow_evict  # type: ignore[method-assign]
        got: list[Chunk] = []

        async def reader() -> None:
            chunk = await spool.next_chunk("a")
            assert chunk is not None
            got.append(chunk)

        async with trio.open_nursery() as nursery:
            await spool.append(numbered(count * 100, 100))
            nursery.start_soon(spool.flush)
            await trio.to_thread.run_sync(committed.wait)
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.2)  # the reader's disk read found chunk 1 gone; it must wait for the write
            assert got == []
            release.set()
        assert drops.calls == [("a", 100, SPOOL_FULL)]
        assert got[0].id == 2 and numbers(got[0].records) == list(range(100, 200))
        assert spool.pending("a") == count * 100
    finally:
        release.set()
        await spool.aclose()


# --- crash consistency -------------------------------------------------------------------------------------------

CHILD = """
import sys, structlog, trio
from pathlib import Path
from forwarder.delivery.spool import Spool
from forwarder.record import Record, Tags

async def main() -> None:
    # The spool's own diagnostics (e.g. orphan chunk files removed after the previous kill) go to stderr: stdout
    # carries only the numbers persisted.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    spool = Spool.open(Path(sys.argv[1]), max_bytes=1 << 30, chunk_max_bytes=16384)
    spool.register(["a", "b", "keep"])  # keep never reads: the whole stream stays for the check
    n = int(spool.load_checkpoints().get("n", "-1")) + 1
    tags = Tags("h", "s", "svc")

    async def consume(dest: str, every: int) -> None:
        while (chunk := await spool.next_chunk(dest)) is not None:
            if chunk.id % every == 0:
                await spool.ack(dest, chunk.id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume, "a", 1)
        nursery.start_soon(consume, "b", 5)
        while True:
            batch = [Record(i, f"{i} " + "x" * 100, "stdout", tags) for i in range(n, n + 50)]
            n += 50
            await spool.append(batch, {"n": str(n - 1)})
            await spool.flush()
            print(n - 1, flush=True)

trio.run(main)
"""


def _run_until_killed(directory: Path, at_least: int) -> int:
    """Run the writer until it reports ``at_least`` persisted, SIGKILL it; return the last number it reported."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    last = -1
    try:
        while last < at_least:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"writer exited early: {proc.wait()} {proc.stderr.read() if proc.stderr else b''!r}")
            last = int(line)
        proc.send_signal(signal.SIGKILL)
        for line in proc.stdout:  # whatever it reported before the signal landed
            last = int(line)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return last


async def _drain_numbers(spool: Spool, dest: str) -> list[int]:
    return [n for c in await read_all(spool, dest, ack=False) for n in numbers(c.records)]


async def test_sigkill_leaves_a_consistent_spool(spool_dir: Path) -> None:
    """A writer (with two readers acknowledging, and a third destination that never reads) is SIGKILLed three
    times mid-stream and restarted on the same directory (continuing from its checkpoint); afterwards the database
    passes SQLite's integrity check, every number reported persisted is there, in order, with no gap or duplicate,
    each destination resumes at a chunk boundary, and the checkpoint matches the last persisted record."""
    reported = -1
    for target in (1500, 4000, 7000):
        reported = await trio.to_thread.run_sync(_run_until_killed, spool_dir, target)

    integrity = db_rows(spool_dir, "PRAGMA integrity_check")
    assert integrity == [("ok",)]
    spool = Spool.open(spool_dir, max_bytes=1 << 30)
    try:
        # every row has its file, and no file is left without a row (orphans of the kill are gone)
        assert chunk_files(spool_dir) == [cid for cid, _, _ in read_stored_chunks(spool_dir)]
        spool.register(["a", "b", "keep"])
        checkpoint = int(spool.load_checkpoints()["n"])
        await spool.close_input()
        a = await _drain_numbers(spool, "a")
        b = await _drain_numbers(spool, "b")
        everything = await _drain_numbers(spool, "keep")
    finally:
        await spool.aclose()
    # every record persisted across the three runs, once each, in order, and at least all that was reported
    assert everything == list(range(len(everything)))
    assert everything[-1] >= reported
    assert checkpoint == everything[-1]  # the checkpoint is exactly as far as the data
    # a and b resume at their cursors: a suffix of the stream starting on a chunk boundary (chunks of 50 records;
    # b acknowledges every fifth chunk only), empty if they had caught up
    for got, boundary in ((a, 50), (b, 250)):
        assert got == everything[len(everything) - len(got) :]
        assert not got or got[0] % boundary == 0


async def test_chunk_read_back_from_disk_is_decoded_once_for_all_destinations(spool_dir: Path) -> None:
    """Two destinations behind the cache: each chunk read back from disk is shared (the very same decoded
    records), whether they read it one after the other or at the same time; memory stays within the bounds."""
    chunk_max = 4096
    # the cache with the unwritten chunks, the shared loads, and up to a chunk (of up to 2 x chunk_max) over each
    held_max = (CACHE_CHUNKS + SHARED_LOADS_CHUNKS + 2) * chunk_max
    s = Spool.open(spool_dir, max_bytes=64 * MiB, chunk_max_bytes=chunk_max)
    try:
        s.register(["a", "b"])
        for start in range(0, 2000, 100):
            await s.append(numbered(start, 100, pad=100))
        await s.close_input()
        assert s.last_chunk_id > 2 * CACHE_CHUNKS  # far more chunks than the cache holds: the oldest come from disk

        # One after the other: b gets the chunk a just read back.
        for _ in range(3):
            ca = await s.next_chunk("a")
            cb = await s.next_chunk("b")
            assert ca is not None and cb is not None and ca.id == cb.id
            assert ca.records is cb.records

            await s.ack("a", ca.id)
            await s.ack("b", cb.id)
            assert s.held_bytes() <= held_max
        # At the same time: one disk read, both get it.
        got: dict[str, Chunk | None] = {}

        async def read(dest: str) -> None:
            got[dest] = await s.next_chunk(dest)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "a")
            nursery.start_soon(read, "b")
        ga, gb = got["a"], got["b"]
        assert ga is not None and gb is not None and ga.id == gb.id and ga.records is gb.records
        # The rest still arrives complete and in order for both.
        rest_a = [ga, *await read_all(s, "a")]
        rest_b = [gb, *await read_all(s, "b")]
        for rest in (rest_a, rest_b):
            assert numbers([r for c in rest for r in c.records]) == list(range(numbers(rest[0].records)[0], 2000))
        assert s.held_bytes() <= held_max
    finally:
        await s.aclose()


def _compressed(directory: Path) -> list[bool]:
    """Per stored chunk (in id order): was it written compressed (the codec byte's bit 0)."""
    return [bool(blob[0] & 0x01) for _, _, blob in read_stored_chunks(directory)]


async def test_chunks_are_compressed_only_when_it_pays(spool_dir: Path, autojump_clock: trio.testing.MockClock) -> None:
    """While destinations keep up and the spool is small, chunks are stored as they are (short-lived: no zlib
    CPU); once a destination is stalled (down, retrying) or the spool holds over a quarter of its bound, they
    are compressed. Either way they read back the same."""
    chunk_max = 16 * 1024
    s = Spool.open(spool_dir, max_bytes=64 * MiB, chunk_max_bytes=chunk_max)
    try:
        s.register(["a"])
        await s.append(numbered(0, 50, pad=100))
        await s.flush()  # "a" has just been registered: not stalled, spool nearly empty
        await trio.sleep(STALLED_AFTER_S + 1)  # "a" is not reading: it is stalled from now on
        await s.append(numbered(50, 50, pad=100))
        await s.flush()
        assert _compressed(spool_dir) == [False, True]
        await s.close_input()
        assert numbers([r for c in await read_all(s, "a", ack=False) for r in c.records]) == list(range(100))
    finally:
        await s.aclose()

    small = spool_dir.parent / "small"
    s = Spool.open(small, max_bytes=64 * MiB, chunk_max_bytes=chunk_max)
    s.max_bytes = 40 * chunk_max  # a quarter of it is 10 chunks
    try:
        s.register(["a"])

        async def reader() -> None:  # "a" keeps reading (never stalled) but acknowledges nothing
            while await s.next_chunk("a") is not None:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for i in range(24):
                await s.append(numbered(i * 80, 80, pad=100))  # ~13.5 KiB: one chunk each
                await s.flush()
            await s.close_input()
        flags = _compressed(small)
        assert len(flags) == 24 and not flags[0] and flags[-1]
        first = flags.index(True)
        assert all(flags[first:]) and 5 <= first <= 15, flags
    finally:
        await s.aclose()


def _split_reference(records: list[Record], limit: int) -> list[tuple[list[Record], int]]:
    """The record-by-record cut the spool makes: a run ends at the first record that brings it to ``limit``, unless
    what is left after it is shorter than ``limit`` (SPLIT_TAIL_FRACTION = 1): then the rest joins it."""
    sizes = [len(r.message) + RECORD_OVERHEAD_BYTES for r in records]
    groups: list[tuple[list[Record], int]] = []
    start = size = 0
    for i, n in enumerate(sizes):
        size += n
        if size >= limit and sum(sizes[i + 1 :]) >= limit:
            groups.append((records[start : i + 1], size))
            start, size = i + 1, 0
    if start < len(records):
        groups.append((records[start:], size))
    return groups


async def test_staged_records_are_cut_into_chunks_like_record_by_record(spool_dir: Path) -> None:
    rng = random.Random(7)
    spool = Spool.open(spool_dir, max_bytes=1 << 30, chunk_max_bytes=4096)
    try:
        for _ in range(200):
            records = [Record(i, "x" * rng.choice([0, 1, 50, 500, 4000, 9000]), "stdout", TAGS) for i in range(40)]
            total = records_size(records)
            assert spool._split(records, total) == _split_reference(records, 4096)
    finally:
        await spool.aclose()
