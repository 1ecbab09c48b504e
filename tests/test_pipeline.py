"""The ingest path: readers wait for room together, paced sources wait for delivery, and a checkpoint becomes
durable only once every line before it is in a record, with per-file bookkeeping that does not grow with every file
ever followed."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import pytest
import trio
import trio.testing

from forwarder import pipeline
from forwarder.delivery.buffer import MAX_READ_LAG_CHUNKS, MemoryBuffer
from forwarder.pipeline import MAX_PENDING_BYTES, PACED_PENDING_BYTES, Ingest
from forwarder.record import Record, Tags
from forwarder.shaping.redact import Redactor
from forwarder.shaping.shaper import Shaper

TAGS = Tags("h", "s", "svc")


def make_ingest(buffer: MemoryBuffer) -> Ingest:
    return Ingest(Shaper(TAGS), buffer, Redactor())


def tracked_lanes(ingest: Ingest) -> int:
    """Lanes the ingest path keeps counters or checkpoint marks for (its private bookkeeping, checked directly)."""
    marks = {lane for m, _ in ingest._checkpoints for lane in m}
    return len(set(ingest._submitted) | set(ingest._shaped) | set(ingest._unsettled) | marks)


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


async def test_lanes_of_files_done_with_are_forgotten() -> None:
    # A node's pod logs: every container instance is a new path. Once all of a file's lines are in records, the
    # ingest path keeps nothing for it, so a checkpoint costs the same after 1,000 files as after one.
    buffer = MemoryBuffer(10**9)
    buffer.register(["a"])
    ingest = Ingest(Shaper(TAGS, multiline_timeout_s=3600), buffer, Redactor())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ingest.run)
        for i in range(1000):
            line = f'{{"message": "m{i}", "level": "info"}}'  # a JSON line is never held for a continuation
            ingest.submit("stdout", [line], {f"tail:{i}": str(i)}, origin=f"/var/log/pods/{i}.log")
            if i % 100 == 99:
                await trio.testing.wait_all_tasks_blocked()
                assert len(buffer.load_checkpoints()) == i + 1
                assert tracked_lanes(ingest) == 0
        ingest.close()
    assert buffer.stored_chunks() > 0


async def test_a_forgotten_lane_that_comes_back_still_holds_back_its_checkpoint() -> None:
    buffer = MemoryBuffer(10**9)
    buffer.register(["a"])
    ingest = Ingest(Shaper(TAGS, multiline_timeout_s=3600), buffer, Redactor())
    messages: list[str] = []
    ingest.observers.append(lambda records: messages.extend(r.message for r in records))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ingest.run)
        ingest.submit("stdout", ['{"message": "a1"}'], {"a": "1"}, origin="/logs/a.log")
        await trio.testing.wait_all_tasks_blocked()
        assert buffer.load_checkpoints() == {"a": "1"} and tracked_lanes(ingest) == 0

        # The same file again (counts start over): its last text line is held for a possible continuation, and the
        # checkpoint past it must wait for it; so must a later checkpoint of another file (they stay in order).
        ingest.submit("stdout", ["a2 plain text"], {"a": "2"}, origin="/logs/a.log")
        ingest.submit("stdout", ['{"message": "b1"}'], {"b": "1"}, origin="/logs/b.log")
        await trio.testing.wait_all_tasks_blocked()
        assert messages == ["a1", "b1"]
        assert buffer.load_checkpoints() == {"a": "1"}
        assert tracked_lanes(ingest) == 1  # b's lane is forgotten; a's is held

        ingest.close()
    assert messages == ["a1", "b1", "a2 plain text"]
    assert buffer.load_checkpoints() == {"a": "2", "b": "1"}
    assert tracked_lanes(ingest) == 0


class _AppendLog(MemoryBuffer):
    """A memory buffer that notes, after each append, how many records it holds and its newest checkpoint."""

    def __init__(self) -> None:
        super().__init__(10**9)
        self.records = 0
        self.after_append: list[tuple[int, int]] = []
        """(records so far, lines covered by the newest checkpoint) after each append."""

    async def append(self, records: list[Record], checkpoints: Mapping[str, str] | None = None) -> None:
        await super().append(records, checkpoints)
        self.records += len(records)
        self.after_append.append((self.records, int(self.load_checkpoints().get("f", "0"))))


@pytest.mark.parametrize("slice_bytes", [1000, 300])
async def test_a_slice_does_not_end_between_a_block_and_its_last_line(
    monkeypatch: pytest.MonkeyPatch, slice_bytes: int
) -> None:
    # A tailed file submits each block but its last line (checkpoint: the lines so far), then that line (checkpoint:
    # past it). The shaper holds the last text line it was fed, so the block's checkpoint is ready only once the
    # line after it is shaped: a slice that ended between the two would append the block's records without their
    # checkpoint, and a crash before the next append was durable would read the whole block again. With 300, every
    # block is larger than a slice (and than two).
    monkeypatch.setattr(pipeline, "SHAPE_SLICE_BYTES", slice_bytes)
    buffer = _AppendLog()
    buffer.register(["a"])
    ingest = make_ingest(buffer)
    lines = [f"plain line {i:08d}" for i in range(200)]  # 20 characters each
    cuts = [0, 45, 46, 76, 77, 140, 141, 199, 200]  # blocks of 45, 30, 63 and 58 lines, each with its last line
    async with trio.open_nursery() as nursery:
        for start, end in itertools.pairwise(cuts):
            ingest.submit("stdout", lines[start:end], {"f": str(end)}, origin="/logs/f.log")
        nursery.start_soon(ingest.run)
        await trio.testing.wait_all_tasks_blocked()
        ingest.close()
    assert len(buffer.after_append) > 1  # several slices
    # Every record appended is covered by the checkpoint made durable with it (the held last line is not a record).
    assert all(records <= covered for records, covered in buffer.after_append), buffer.after_append
    assert buffer.after_append[-1] == (200, 200)
