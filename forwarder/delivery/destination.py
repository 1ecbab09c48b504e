"""The per-destination runner: read chunks from the buffer at this destination's cursor, encode, send through the
retry loop, count every outcome, and acknowledge each chunk once all its records are delivered or dropped.

One runner per destination, each in its own task: a dead or hanging destination holds back only its own cursor.
The next chunk is read and encoded while the batches of the previous one are in flight (a two-stage pipeline, so
the network wait and the encoding overlap). Chunks are acknowledged strictly in order.

Encoding runs on the event loop, not in a worker thread: the encoders are Python code holding the GIL, and a thread
only added GIL hand-offs between it and the loop's own work. Measured with ``bench/run_all.py`` against encoding
chunks of 256 records or more in a thread: (a) ~5% less CPU, (b) ~10% less CPU and ~8% more lines/s, (c) the same
within its noise; compressing alone in a thread (gzip releases the GIL) was worse than either (+13% CPU, +7 MiB RSS
in (a)). A chunk's encode holds the loop for a few milliseconds (Datadog: ~1 us a
record, ~5,000 records a chunk); the agent's pipes are drained by their own threads meanwhile.

Up to ``concurrency`` batches of a chunk are in flight at once (``FORWARDER_REQUEST_CONCURRENCY``, like Fluent
Bit's ``workers`` and Vector's ``request.concurrency``): over a real network a request waits tens of milliseconds
for its answer, and one at a time would cap a destination at one batch per round trip. Each batch has its own retry
loop; the chunk is acknowledged once every one of its batches is delivered or dropped, and the next chunk's batches
start only then, so a crash sends again at most the one chunk in flight (the window does not span chunks: New Relic
and CloudWatch batches are about a chunk each, and gain little from it). A sink that must receive batches in order
(:attr:`Sink.ordered <forwarder.sinks._protocol.Sink.ordered>`, the file) gets one at a time.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog
import trio

from forwarder.delivery.buffer import Buffer, Chunk
from forwarder.delivery.retry import RetryPolicy, deliver
from forwarder.record import Record
from forwarder.sinks._protocol import Batch, Encoded, Outcome, Sink, Verdict, retry

_log = structlog.get_logger("forwarder")

TOO_LARGE = "too_large"


@dataclass
class DestinationStats:
    """What one destination did, for the exit summary, ``/metrics`` and ``/healthz``.

    Counts are records unless named otherwise; times are ``time.time()`` seconds.
    """

    name: str
    delivered: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    batches: int = 0
    bytes_sent: int = 0
    last_success: float | None = None
    last_error: str | None = None
    last_error_time: float | None = None
    failing_since: float | None = None
    latencies: list[float] = field(default_factory=list)
    """Request latencies (seconds) not yet collected by telemetry; bounded (see :meth:`observe`)."""

    def observe(self, seconds: float) -> None:
        """Record one request's latency (kept until telemetry drains it, at most 10,000)."""
        if len(self.latencies) < 10_000:
            self.latencies.append(seconds)

    def summary(self, pending: int) -> dict[str, object]:
        """The exit-summary fields: delivered, dropped by reason, pending."""
        return {
            "destination": self.name,
            "delivered": self.delivered,
            "dropped": dict(self.dropped),
            "pending": pending,
        }


class DestinationRunner:
    """Drives one :class:`~forwarder.sinks._protocol.Sink` from a :class:`~forwarder.delivery.buffer.Buffer`.

    Args:
        sink: the destination.
        buffer: where records come from.
        stats: counters this runner updates.
        policy: retry backoff bounds.
        concurrency: batches of a chunk in flight at once when running from the buffer (:meth:`run`), at least 1;
            1 for an ordered sink whatever is asked.
    """

    def __init__(
        self, sink: Sink, buffer: Buffer, stats: DestinationStats, policy: RetryPolicy, *, concurrency: int = 1
    ) -> None:
        self.sink = sink
        self.buffer = buffer
        self.stats = stats
        self.policy = policy
        self.concurrency = 1 if sink.ordered else max(1, concurrency)
        self._log = _log.bind(destination=sink.name)

    async def run(self) -> None:
        """Deliver chunks until the buffer's input is closed and drained. Cancel to stop (what is not
        acknowledged stays in the buffer)."""
        name = self.sink.name
        # Unbuffered: the preparing task holds at most one encoded chunk while earlier ones are being sent.
        send, receive = trio.open_memory_channel[tuple[Chunk, Encoded]](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._prepare, send)
            async with receive:
                async for chunk, encoded in receive:
                    await self._deliver_encoded(encoded, self.concurrency)
                    await self.buffer.ack(name, chunk.id)

    async def _prepare(self, send: trio.MemorySendChannel[tuple[Chunk, Encoded]]) -> None:
        """Read and encode chunks in order, handing each to :meth:`run` once it has sent the previous one."""
        async with send:
            while True:
                chunk = await self.buffer.next_chunk(self.sink.name)
                if chunk is None:
                    return
                await send.send((chunk, self.sink.encode(chunk.records)))

    async def deliver_records(self, records: Sequence[Record]) -> None:
        """Encode ``records`` and deliver every batch, one at a time (retrying, splitting), until each record is
        delivered or counted as dropped."""
        await self._deliver_encoded(self.sink.encode(records), 1)

    async def _deliver_encoded(self, encoded: Encoded, window: int) -> None:
        """Deliver ``encoded``'s batches, up to ``window`` at once (the next starts as soon as one settles)."""
        for reason, count in encoded.dropped.items():
            self._count_drop(reason, count)
        batches = encoded.batches
        if window == 1 or len(batches) == 1:
            for batch in batches:
                await self._deliver_batch(batch)
            return
        slots = trio.Semaphore(window)
        async with trio.open_nursery() as nursery:
            for batch in batches:
                await slots.acquire()
                nursery.start_soon(self._deliver_in_slot, batch, slots)

    async def _deliver_in_slot(self, batch: Batch, slots: trio.Semaphore) -> None:
        try:
            await self._deliver_batch(batch)
        finally:
            slots.release()

    async def _deliver_batch(self, batch: Batch) -> None:
        verdict = await deliver(lambda: self._attempt(batch), self.policy, on_retry=self._on_retry)
        count = len(batch.records)
        if verdict.outcome is Outcome.OK:
            rejected = sum(verdict.dropped.values())
            self.stats.delivered += count - rejected
            for reason, n in verdict.dropped.items():
                self._count_drop(reason, n)
            self.stats.batches += 1
            self.stats.bytes_sent += batch.size
            self.stats.last_success = time.time()
            self.stats.failing_since = None
        elif verdict.outcome is Outcome.DROP:
            self._count_drop(verdict.reason or "rejected", count, verdict.detail)
        elif verdict.outcome is Outcome.SPLIT:
            if count <= 1:
                self._count_drop(TOO_LARGE, count, verdict.detail)
                return
            half = count // 2
            # One after the other, in the slot this batch holds: requests in flight stay within the concurrency
            # (and the connection pool sized to it).
            await self.deliver_records(batch.records[:half])
            await self.deliver_records(batch.records[half:])

    async def _attempt(self, batch: Batch) -> Verdict:
        started = time.monotonic()
        try:
            verdict = await self.sink.send(batch)
        except Exception as exc:  # noqa: BLE001 - a sink bug must not lose data: hold and retry
            self._log.exception("sink_error", error=type(exc).__name__)
            verdict = retry("internal_error", detail=type(exc).__name__)
        self.stats.observe(time.monotonic() - started)
        return verdict

    def _on_retry(self, verdict: Verdict, wait_s: float) -> None:
        self.stats.retries += 1
        now = time.time()
        self.stats.last_error = verdict.reason + (f": {verdict.detail}" if verdict.detail else "")
        self.stats.last_error_time = now
        if self.stats.failing_since is None:
            self.stats.failing_since = now
        log = self._log.error if verdict.loud else self._log.warning
        log("send_retry", reason=verdict.reason, detail=verdict.detail[:300], wait_s=round(wait_s, 3))

    def _count_drop(self, reason: str, count: int, detail: str = "") -> None:
        if count <= 0:
            return
        self.stats.dropped[reason] += count
        self._log.error("records_dropped", reason=reason, records=count, detail=detail[:300])


def on_buffer_drop(stats: dict[str, DestinationStats]) -> Callable[[str, int, str], None]:
    """A :data:`~forwarder.delivery.buffer.DropCallback` that counts discarded records in ``stats`` and logs them."""

    def callback(destination: str, count: int, reason: str) -> None:
        target = stats.get(destination)
        if target is not None:
            target.dropped[reason] += count
        _log.error("records_dropped", destination=destination, reason=reason, records=count)

    return callback
