"""The ingest path's flow control: readers wait for room together, and paced sources wait for delivery."""

from __future__ import annotations

import trio
import trio.testing

from forwarder.delivery.buffer import MAX_READ_LAG_CHUNKS, MemoryBuffer
from forwarder.pipeline import MAX_PENDING_BYTES, PACED_PENDING_BYTES, Ingest
from forwarder.record import Tags
from forwarder.shaping.redact import Redactor
from forwarder.shaping.shaper import Shaper

TAGS = Tags("h", "s", "svc")


def make_ingest(buffer: MemoryBuffer) -> Ingest:
    return Ingest(Shaper(TAGS), buffer, Redactor())


async def test_every_reader_waiting_for_room_is_released(autojump_clock: trio.testing.MockClock) -> None:
    buffer = MemoryBuffer(10**9)
    buffer.register(["a"])
    ingest = make_ingest(buffer)
    line = "x" * 1000
    ingest.submit("stdout", [line] * (MAX_PENDING_BYTES // 1000 + 10))
    released: list[str] = []

    async def reader(name: str) -> None:
        await ingest.wait_for_room()
        released.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, "stdout")
        nursery.start_soon(reader, "stderr")  # a second waiter must not strand the first one
        await trio.testing.wait_all_tasks_blocked()
        assert released == []
        nursery.start_soon(ingest.run)
        with trio.fail_after(5):
            while len(released) < 2:
                await trio.sleep(0.01)
        ingest.close()
    assert sorted(released) == ["stderr", "stdout"]


async def test_wait_for_delivery_follows_the_destination(autojump_clock: trio.testing.MockClock) -> None:
    buffer = MemoryBuffer(10**9)
    buffer.register(["a"])
    ingest = make_ingest(buffer)
    done = trio.Event()

    lines_per_read = PACED_PENDING_BYTES // 2 // 1000 + 1  # two reads are more than PACED_PENDING_BYTES

    async def paced_source() -> None:
        for n in range(4 * (MAX_READ_LAG_CHUNKS + 3)):
            ingest.submit("stdout", [f"{n} " + "x" * 998] * lines_per_read)
            await ingest.wait_for_delivery()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ingest.run)
        nursery.start_soon(paced_source)
        await trio.sleep(0.5)  # shorter than STALLED_AFTER_S: "a" keeps up but has taken nothing yet
        assert not done.is_set()
        assert buffer.stored_chunks() == MAX_READ_LAG_CHUNKS + 1  # one chunk past the limit, then it waited
        while not done.is_set():
            chunk = await buffer.next_chunk("a")
            assert chunk is not None
            await buffer.ack("a", chunk.id)
        ingest.close()
    assert PACED_PENDING_BYTES <= MAX_PENDING_BYTES
