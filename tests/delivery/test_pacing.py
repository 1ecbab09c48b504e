"""``Buffer.wait_for_readers``: sources that can wait (tailed files) follow the destinations that keep up, and a
stalled destination holds nobody back. Run against both buffers, with trio's MockClock (no wall-clock sleeps)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from forwarder.delivery.buffer import MAX_READ_LAG_CHUNKS, STALLED_AFTER_S, Buffer, MemoryBuffer
from forwarder.delivery.spool import Spool
from forwarder.record import Record, Tags

TAGS = Tags("h", "s", "svc")


def chunk_of(n: int) -> list[Record]:
    return [Record(n, f"line {n}", "stdout", TAGS)]


@pytest.fixture(params=["memory", "disk"])
async def make_buffer(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[[], Buffer]]:
    opened: list[Buffer] = []

    def make() -> Buffer:
        buffer: Buffer
        if request.param == "memory":
            buffer = MemoryBuffer(10**9)
        else:
            buffer = Spool.open(tmp_path / "spool", max_bytes=10**9)
        opened.append(buffer)
        return buffer

    yield make
    for buffer in opened:
        await buffer.aclose()


async def append_chunks(buffer: Buffer, count: int) -> None:
    """Append ``count`` chunks, each persisted at once (a spool flushes on its own only in ``run``)."""
    for n in range(count):
        await buffer.append(chunk_of(n))
        if isinstance(buffer, Spool):
            await buffer.flush()


async def test_waits_for_a_destination_that_keeps_up(
    make_buffer: Callable[[], Buffer], autojump_clock: trio.testing.MockClock
) -> None:
    buffer = make_buffer()
    buffer.register(["a"])
    await append_chunks(buffer, MAX_READ_LAG_CHUNKS)
    with trio.fail_after(0.01):  # at the limit: no wait
        await buffer.wait_for_readers()
    await append_chunks(buffer, 1)
    released_at: list[float] = []

    async def source() -> None:
        await buffer.wait_for_readers()
        released_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(source)
        await trio.sleep(STALLED_AFTER_S / 4)  # "a" took nothing yet, but it is not stalled: the source waits
        assert released_at == []
        chunk = await buffer.next_chunk("a")
        assert chunk is not None
        taken_at = trio.current_time()
    assert released_at == [taken_at]


async def test_a_stalled_destination_holds_nobody_back(
    make_buffer: Callable[[], Buffer], autojump_clock: trio.testing.MockClock
) -> None:
    buffer = make_buffer()
    buffer.register(["up", "down"])
    await append_chunks(buffer, MAX_READ_LAG_CHUNKS + 3)
    for _ in range(MAX_READ_LAG_CHUNKS + 3):
        assert await buffer.next_chunk("up") is not None
    started = trio.current_time()
    with trio.fail_after(STALLED_AFTER_S * 2):
        await buffer.wait_for_readers()
    # "down" never read: the source waited until it counted as stalled, and no longer than that (+ one re-check).
    assert STALLED_AFTER_S <= trio.current_time() - started <= STALLED_AFTER_S * 1.5
    await append_chunks(buffer, MAX_READ_LAG_CHUNKS + 3)
    for _ in range(MAX_READ_LAG_CHUNKS + 3):  # "up" catches up (from memory or disk)
        assert await buffer.next_chunk("up") is not None
    with trio.fail_after(0.01):  # "down" is still stalled and still ignored
        await buffer.wait_for_readers()


async def test_a_destination_waiting_for_a_chunk_is_never_stalled(
    make_buffer: Callable[[], Buffer], autojump_clock: trio.testing.MockClock
) -> None:
    buffer = make_buffer()
    buffer.register(["a"])
    got: list[Record] = []

    async def reader() -> None:
        chunk = await buffer.next_chunk("a")
        assert chunk is not None
        got.extend(chunk.records)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(STALLED_AFTER_S * 10)  # idle for long: waiting for data is not being stalled
        await append_chunks(buffer, 1)
    assert [r.message for r in got] == ["line 0"]
    with trio.fail_after(0.01):
        await buffer.wait_for_readers()


async def test_returns_at_once_after_close_input(
    make_buffer: Callable[[], Buffer], autojump_clock: trio.testing.MockClock
) -> None:
    buffer = make_buffer()
    buffer.register(["a"])
    await append_chunks(buffer, MAX_READ_LAG_CHUNKS + 2)
    await buffer.close_input()
    with trio.fail_after(0.01):
        await buffer.wait_for_readers()
