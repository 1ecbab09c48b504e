"""The one retry loop and the per-destination runner, driven by a scripted in-process sink.

The scripted sink is a test double of a *destination* (not of our own code): the runner, the retry loop and the
buffer under test are the real ones.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import pytest
import trio

from forwarder.delivery.buffer import MemoryBuffer, records_size
from forwarder.delivery.destination import DestinationRunner, DestinationStats
from forwarder.delivery.retry import RetryPolicy, deliver
from forwarder.record import STDOUT, Record, Tags
from forwarder.sinks._protocol import OK, Batch, Encoded, Verdict, drop, ok, retry, split

TAGS = Tags("h", "s", "svc")


def records(n: int, start: int = 0) -> list[Record]:
    return [Record(1, f"line {i}", STDOUT, TAGS) for i in range(start, start + n)]


class ScriptedSink:
    """Answers each send with the next scripted verdict (then OK), recording what it received."""

    name = "scripted"
    ordered = False

    def __init__(self, script: Sequence[Verdict] = (), max_per_batch: int = 1000, too_large: int | None = None):
        self.script = list(script)
        self.max_per_batch = max_per_batch
        self.too_large = too_large
        self.received: list[list[str]] = []
        self.attempts = 0

    def encode(self, recs: Sequence[Record]) -> Encoded:
        size = self.max_per_batch
        return Encoded([Batch(recs[i : i + size], None, 10) for i in range(0, len(recs), size)])

    async def send(self, batch: Batch) -> Verdict:
        self.attempts += 1
        if self.too_large is not None and len(batch.records) > self.too_large:
            return split()
        if any(r.message == "poison" for r in batch.records):
            return split()
        verdict = self.script.pop(0) if self.script else OK
        if verdict.outcome.value == "ok":
            self.received.append([r.message for r in batch.records])
        return verdict

    async def aclose(self) -> None:
        pass


async def test_deliver_honours_retry_after_and_backoff_cap() -> None:
    verdicts = [retry("http_429", after=7.0), retry("http_500"), retry("http_503"), OK]
    sleeps: list[float] = []

    async def attempt() -> Verdict:
        return verdicts.pop(0)

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    result = await deliver(attempt, RetryPolicy(initial_s=0.5, max_s=2.0), sleep=fake_sleep)
    assert result is OK
    assert len(sleeps) == 3
    assert sleeps[0] >= 7.0
    assert all(0 <= s <= 2.0 for s in sleeps[1:])


async def test_deliver_returns_first_non_retry_verdict() -> None:
    calls = 0

    async def attempt() -> Verdict:
        nonlocal calls
        calls += 1
        return drop("http_400")

    result = await deliver(attempt, RetryPolicy())
    assert result.reason == "http_400" and calls == 1


@pytest.mark.parametrize("first", [OK, drop("http_400")])
async def test_deliver_leaves_no_reference_cycle_when_the_first_attempt_settles(first: Verdict) -> None:
    """No retry machinery is built when the first attempt settles: tenacity's retryer and call state refer to each
    other, so each delivery would leave a cycle for the garbage collector instead of being freed at once."""

    async def attempt() -> Verdict:
        return first

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            assert await deliver(attempt, RetryPolicy()) is first
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("tenacity")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


async def test_deliver_is_cancelled_during_backoff(autojump_clock: trio.testing.MockClock) -> None:
    async def attempt() -> Verdict:
        return retry("network")

    with trio.move_on_after(100) as scope:
        await deliver(attempt, RetryPolicy(max_s=30))
    assert scope.cancelled_caught


async def test_runner_counts_delivered_dropped_and_split(autojump_clock: trio.testing.MockClock) -> None:
    sink = ScriptedSink([retry("http_503"), drop("http_400"), ok({"rejected": 2})], max_per_batch=10)
    buffer = MemoryBuffer(10**9)
    buffer.register([sink.name])
    stats = DestinationStats(sink.name)
    runner = DestinationRunner(sink, buffer, stats, RetryPolicy(max_s=1))
    await buffer.append(records(30))
    await buffer.close_input()
    await runner.run()
    assert stats.retries == 1
    assert stats.dropped == {"http_400": 10, "rejected": 2}
    assert stats.delivered == 30 - 10 - 2
    assert buffer.pending(sink.name) == 0


async def test_runner_splits_until_a_single_record_is_dropped() -> None:
    recs = records(7)
    recs[3].message = "poison"
    sink = ScriptedSink(max_per_batch=100)
    stats = DestinationStats(sink.name)
    runner = DestinationRunner(sink, MemoryBuffer(10**9), stats, RetryPolicy())
    await runner.deliver_records(recs)
    delivered = [m for batch in sink.received for m in batch]
    assert sorted(delivered) == sorted(r.message for r in recs if r.message != "poison")
    assert stats.dropped == {"too_large": 1}
    assert stats.delivered == 6


async def test_memory_buffer_drops_oldest_and_counts_per_destination() -> None:
    dropped: list[tuple[str, int, str]] = []
    buffer = MemoryBuffer(
        max_bytes=3 * records_size(records(10, start=40)), on_drop=lambda d, n, r: dropped.append((d, n, r))
    )
    buffer.register(["a", "b"])
    for i in range(5):
        await buffer.append(records(10, start=i * 10))
    chunk = await buffer.next_chunk("a")
    assert chunk is not None
    await buffer.ack("a", chunk.id)
    assert buffer.stored_chunks() <= 3
    assert sum(n for d, n, _ in dropped if d == "b") == 20
    assert all(r == "spool_full" for *_, r in dropped)
    assert buffer.pending("b") == 30


@pytest.mark.parametrize("destinations", [["a"], ["a", "b"]])
async def test_memory_buffer_releases_chunks_only_when_all_acked(destinations: list[str]) -> None:
    buffer = MemoryBuffer(10**9)
    buffer.register(destinations)
    await buffer.append(records(5))
    chunk = await buffer.next_chunk("a")
    assert chunk is not None
    await buffer.ack("a", chunk.id)
    assert buffer.stored_chunks() == (0 if destinations == ["a"] else 1)


class GatedSink(ScriptedSink):
    """Records the order of encode and send events; each send waits until the test opens its gate."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []
        self.gate = trio.Event()
        self.sending = trio.Event()

    def encode(self, recs: Sequence[Record]) -> Encoded:
        self.events.append(f"encode {recs[0].message}")
        return super().encode(recs)

    async def send(self, batch: Batch) -> Verdict:
        self.events.append(f"send {batch.records[0].message}")
        self.sending.set()
        await self.gate.wait()
        return await super().send(batch)


async def test_runner_encodes_the_next_chunk_while_one_is_in_flight_and_acks_in_order() -> None:
    """Two-stage pipeline: while chunk 1 is being sent, chunk 2 is read and encoded (chunk 3 is not: at most two
    chunks in memory); chunks are sent and acknowledged in order and everything arrives once."""
    buffer = MemoryBuffer(10**9)
    sink = GatedSink()
    buffer.register([sink.name])
    for start in (0, 10, 20):
        await buffer.append(records(10, start))
    await buffer.close_input()
    runner = DestinationRunner(sink, buffer, DestinationStats(sink.name), RetryPolicy())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await sink.sending.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(sink.events) == ["encode line 0", "encode line 10", "send line 0"]
        assert buffer.pending(sink.name) == 30  # nothing acknowledged while chunk 1 is in flight
        sink.gate.set()
    assert [e for e in sink.events if e.startswith("send")] == ["send line 0", "send line 10", "send line 20"]
    assert [e for e in sink.events if e.startswith("encode")] == ["encode line 0", "encode line 10", "encode line 20"]
    assert [m for batch in sink.received for m in batch] == [f"line {i}" for i in range(30)]
    assert buffer.pending(sink.name) == 0


class OverlapSink(ScriptedSink):
    """Counts the sends in progress at once; each send waits for ``release`` (or passes when it is set)."""

    def __init__(self, script: Sequence[Verdict] = (), *, ordered: bool = False) -> None:
        super().__init__(script, max_per_batch=10)
        self.ordered = ordered
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = trio.Event()

    async def send(self, batch: Batch) -> Verdict:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.release.wait()
            return await super().send(batch)
        finally:
            self.in_flight -= 1


@pytest.mark.parametrize(("ordered", "expected"), [(False, 3), (True, 1)])
async def test_runner_keeps_up_to_concurrency_batches_of_a_chunk_in_flight(ordered: bool, expected: int) -> None:
    """Five batches in one chunk, concurrency 3: three are sent at once (one at a time for an ordered sink, the
    file); the chunk is acknowledged only once all five are delivered."""
    buffer = MemoryBuffer(10**9)
    sink = OverlapSink(ordered=ordered)
    buffer.register([sink.name])
    await buffer.append(records(50))
    await buffer.close_input()
    stats = DestinationStats(sink.name)
    runner = DestinationRunner(sink, buffer, stats, RetryPolicy(), concurrency=3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.testing.wait_all_tasks_blocked()
        assert sink.in_flight == expected
        assert buffer.pending(sink.name) == 50  # nothing acknowledged while batches are in flight
        sink.release.set()
    assert sink.max_in_flight == expected
    assert sorted(m for batch in sink.received for m in batch) == sorted(f"line {i}" for i in range(50))
    assert stats.delivered == 50 and stats.batches == 5
    assert buffer.pending(sink.name) == 0


async def test_a_retrying_batch_holds_its_slot_while_the_others_are_delivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The first batch is answered 503 and backs off; meanwhile the other batches of the chunk go out through the
    remaining slot. The chunk is acknowledged after the retried batch is delivered, and nothing arrives twice."""
    buffer = MemoryBuffer(10**9)
    sink = OverlapSink([retry("http_503")])
    sink.release.set()
    buffer.register([sink.name])
    await buffer.append(records(40))
    await buffer.close_input()
    stats = DestinationStats(sink.name)
    await DestinationRunner(sink, buffer, stats, RetryPolicy(initial_s=5, max_s=5), concurrency=2).run()
    firsts = [batch[0] for batch in sink.received]
    assert firsts == ["line 10", "line 20", "line 30", "line 0"]
    assert stats.retries == 1 and stats.delivered == 40
    assert sorted(m for batch in sink.received for m in batch) == sorted(f"line {i}" for i in range(40))
    assert buffer.pending(sink.name) == 0


class KeyedGateSink(ScriptedSink):
    """Each batch waits for the gate of its first record's message (so the test picks the order of answers)."""

    def __init__(self) -> None:
        super().__init__(max_per_batch=10)
        self.gates: dict[str, trio.Event] = {}
        self.in_flight: set[str] = set()

    async def send(self, batch: Batch) -> Verdict:
        key = batch.records[0].message
        self.in_flight.add(key)
        try:
            await self.gates.setdefault(key, trio.Event()).wait()
            return await super().send(batch)
        finally:
            self.in_flight.discard(key)


async def test_the_window_stays_inside_one_chunk() -> None:
    """Chunks of one batch each, concurrency 4: the next chunk's batch starts only once the previous chunk is
    acknowledged, so a crash can send again at most the one chunk in flight."""
    buffer = MemoryBuffer(10**9)
    sink = KeyedGateSink()
    buffer.register([sink.name])
    for start in (0, 10, 20):
        await buffer.append(records(10, start))
    await buffer.close_input()
    runner = DestinationRunner(sink, buffer, DestinationStats(sink.name), RetryPolicy(), concurrency=4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.testing.wait_all_tasks_blocked()
        assert sink.in_flight == {"line 0"}
        sink.gates["line 0"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert buffer.pending(sink.name) == 20
        assert sink.in_flight == {"line 10"}
        sink.gates["line 10"].set()
        sink.gates["line 20"] = trio.Event()
        await trio.testing.wait_all_tasks_blocked()
        assert sink.in_flight == {"line 20"}
        sink.gates["line 20"].set()
    assert [batch[0] for batch in sink.received] == ["line 0", "line 10", "line 20"]
    assert buffer.pending(sink.name) == 0


async def test_the_halves_of_split_batches_stay_within_the_window() -> None:
    """Concurrency 2, every batch of 10 answered SPLIT (too large above 5 records), and the halves encoded into
    several batches each (the sink cuts smaller by then): they go out one after the other in the slot the split
    batch holds, so no more than 2 requests are ever in flight (the connection pool is sized to the concurrency),
    and every record arrives once."""
    buffer = MemoryBuffer(10**9)
    sink = OverlapSink()
    sink.too_large = 5
    buffer.register([sink.name])
    await buffer.append(records(40))
    await buffer.close_input()
    stats = DestinationStats(sink.name)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(DestinationRunner(sink, buffer, stats, RetryPolicy(), concurrency=2).run)
        await trio.testing.wait_all_tasks_blocked()
        sink.max_per_batch = 2  # the halves (5 records) become 3 batches each
        sink.release.set()  # sends still yield (a checkpoint), so the ones in the window overlap
    assert sink.max_in_flight == 2
    assert stats.delivered == 40 and stats.batches == 4 * 2 * 3
    assert sorted(m for batch in sink.received for m in batch) == sorted(f"line {i}" for i in range(40))
