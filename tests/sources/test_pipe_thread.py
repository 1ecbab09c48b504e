"""The pipe reader thread (:mod:`forwarder.sources._pipe_thread`): a backlog past ``SPILL_ABOVE_BYTES`` goes to a
spill file, so a writer is never held back while shaping is stuck, and every line still arrives in order.

A real pipe, a real writer thread, a consumer whose ``wait_for_room`` blocks until the test releases it."""

from __future__ import annotations

import os
import shutil
import threading
from functools import partial
from pathlib import Path

import pytest
import trio

from forwarder.delivery.spool import DISK_MARGIN_FRACTION, DISK_MARGIN_MIN_BYTES
from forwarder.sources import _pipe_thread
from forwarder.sources._pipe_thread import PipeActivity, SpillBudget, pump_pipe

DEADLINE_S = 60.0
LINE_BYTES = 100


class BlockedConsumer:
    """Takes lines; ``wait_for_room`` blocks until :attr:`release` is set (shaping stuck, e.g. a busy CPU)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.release = trio.Event()

    def submit(self, stream: str, lines: list[str]) -> None:
        self.lines.extend(lines)

    async def wait_for_room(self) -> None:
        await self.release.wait()


def line(i: int) -> bytes:
    return f"line {i:09d} ".encode().ljust(LINE_BYTES - 1, b"x") + b"\n"


def write_all(fd: int, count: int, done: threading.Event) -> None:
    """Writer thread: ``count`` lines in 64 KiB writes (each blocks while the pipe is full), then close."""
    try:
        batch = 640
        for start in range(0, count, batch):
            data = memoryview(b"".join(line(i) for i in range(start, min(count, start + batch))))
            while data:
                data = data[os.write(fd, data) :]
    finally:
        os.close(fd)
        done.set()


@pytest.mark.parametrize("case", ["spill", "no_spill_dir", "disk_nearly_full"])
async def test_a_writer_finishes_while_shaping_is_stuck_when_the_backlog_spills(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """2 MiB in memory before spilling, 4 MiB at most, 16 MiB written while the consumer is stuck after its first
    slice. With a spill directory the writer finishes, memory stays under the threshold plus one read, and the
    spill file was used. Without one, or when the disk has only 3 MiB above the spool's margin (the spill file is
    capped there), the reader stops once memory is full and the writer waits on the full pipe (the fallback). In
    every case each line arrives once, in order, when the consumer is released, and the spill file never had a
    name."""
    monkeypatch.setattr(_pipe_thread, "SPILL_ABOVE_BYTES", 2 * 1024 * 1024)
    monkeypatch.setattr(_pipe_thread, "MAX_UNREAD_BYTES", 4 * 1024 * 1024)
    spill_cap = 3 * 1024 * 1024
    if case == "disk_nearly_full":
        real = shutil.disk_usage(tmp_path)
        margin = max(DISK_MARGIN_MIN_BYTES, int(real.total * DISK_MARGIN_FRACTION))
        fake = type(real)(real.total, real.total - margin - spill_cap, margin + spill_cap)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: fake)
    count = 16 * 1024 * 1024 // LINE_BYTES
    read_fd, write_fd = os.pipe()
    consumer = BlockedConsumer()
    activity = PipeActivity()
    done = threading.Event()
    most_in_memory = 0
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            # abandon_on_cancel: a writer stuck on a full pipe must not hang the test when the deadline fails it
            nursery.start_soon(
                partial(trio.to_thread.run_sync, write_all, write_fd, count, done, abandon_on_cancel=True)
            )
            nursery.start_soon(
                lambda: pump_pipe(
                    read_fd,
                    "stdout",
                    consumer,
                    max_line_bytes=1 << 16,
                    activity=activity,
                    spill_dir=None if case == "no_spill_dir" else tmp_path,
                )
            )
            if case == "spill":
                while not done.is_set():  # the writer is never held back by the stuck consumer
                    await trio.sleep(0.01)
                    most_in_memory = max(most_in_memory, activity.memory_bytes)
                assert activity.spilled_bytes > spill_cap
                assert most_in_memory <= 2 * 1024 * 1024 + _pipe_thread.READ_SIZE
                assert len(consumer.lines) < count  # nothing past the first slice was taken yet
            else:
                while not (activity.memory_bytes > 3 * 1024 * 1024 and not activity.reading):
                    await trio.sleep(0.01)  # the reader fills memory up to its bound, then stops reading
                assert not done.is_set()  # so the writer is stuck on the full pipe
                if case == "no_spill_dir":
                    assert activity.spilled_bytes == 0
                else:
                    assert 0 < activity.spilled_bytes <= spill_cap
            consumer.release.set()
    assert done.is_set()
    assert consumer.lines == [line(i).decode().rstrip("\n") for i in range(count)]
    assert os.listdir(tmp_path) == []  # the spill file never had a name


def test_spill_bound_is_a_quarter_of_the_spool_at_most_1_gib() -> None:
    assert _pipe_thread.spill_bound(1024**3) == 256 * 1024**2
    assert _pipe_thread.spill_bound(64 * 1024**3) == _pipe_thread.MAX_SPILL_BYTES == 1024**3


async def test_the_agents_two_pipes_share_one_spill_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stdout and stderr both burst 16 MiB while shaping is stuck; their spill files share a 6 MiB budget: together
    they never hold more, each reader then stops once its memory is full, and when shaping resumes every line of
    both pipes arrives in order and the budget is given back."""
    monkeypatch.setattr(_pipe_thread, "SPILL_ABOVE_BYTES", 2 * 1024 * 1024)
    monkeypatch.setattr(_pipe_thread, "MAX_UNREAD_BYTES", 4 * 1024 * 1024)
    budget = SpillBudget(6 * 1024 * 1024)
    count = 16 * 1024 * 1024 // LINE_BYTES
    pipes = [os.pipe() for _ in range(2)]
    consumers = [BlockedConsumer(), BlockedConsumer()]
    activities = [PipeActivity(), PipeActivity()]
    dones = [threading.Event(), threading.Event()]
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            for (read_fd, write_fd), consumer, activity, done, stream in zip(
                pipes, consumers, activities, dones, ("stdout", "stderr"), strict=True
            ):
                nursery.start_soon(
                    partial(trio.to_thread.run_sync, write_all, write_fd, count, done, abandon_on_cancel=True)
                )
                nursery.start_soon(
                    partial(
                        pump_pipe,
                        read_fd,
                        stream,
                        consumer,
                        max_line_bytes=1 << 16,
                        activity=activity,
                        spill_dir=tmp_path,
                        spill_budget=budget,
                    )
                )
            while not all(a.memory_bytes > 3 * 1024 * 1024 and not a.reading for a in activities):
                await trio.sleep(0.01)
                assert budget.used <= budget.max_bytes
            assert not any(d.is_set() for d in dones)  # both writers wait on their full pipes
            spilled = [a.spilled_bytes for a in activities]
            assert all(s > 0 for s in spilled)
            assert sum(spilled) <= budget.max_bytes == 6 * 1024 * 1024
            assert budget.used == sum(spilled)
            for consumer in consumers:
                consumer.release.set()
    assert all(d.is_set() for d in dones)
    expected = [line(i).decode().rstrip("\n") for i in range(count)]
    assert [c.lines for c in consumers] == [expected, expected]
    assert budget.used == 0
