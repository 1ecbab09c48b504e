"""The buffer between shaping and the destinations: the :class:`Buffer` protocol and the in-memory implementation.

A buffer is an append-only log of chunks with one cursor per destination. ``append`` never waits on a
destination; each destination reads chunks in order with ``next_chunk`` and moves its cursor with ``ack``; a chunk
is released once every destination has acknowledged it. When the buffer is over its byte bound the oldest chunks
go first, and every destination that had not acknowledged them counts them as dropped (``spool_full``).

:class:`MemoryBuffer` is ``FORWARDER_BUFFER=memory``: fast, bounded, but lost on a crash or restart. The durable
spool (:mod:`forwarder.delivery.spool`) implements the same protocol on disk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Final, Protocol

import trio

from forwarder.record import Record

SPOOL_FULL: Final = "spool_full"
CHECKPOINT_REMOVED: Final = ""
"""A checkpoint value that removes its key instead of storing it: for a source that will never be resumed (a tailed
file that was deleted), so that checkpoints do not pile up for every file ever followed."""
RECORD_OVERHEAD_BYTES: Final = 64
"""Approximate per-record cost beyond its message, used for byte accounting of in-memory chunks."""
STALLED_AFTER_S: Final = 2.0
"""A destination that has not taken a chunk for this long (seconds) while not waiting for one (e.g. down and
retrying, or hanging) is *stalled*: it no longer paces sources that can wait (:meth:`Buffer.wait_for_readers`)
and keeps nothing cached in memory for itself."""
MAX_READ_LAG_CHUNKS: Final = 2
""":meth:`Buffer.wait_for_readers` returns once every destination that is not stalled is at most this many chunks
behind the newest one (chunks appended but not yet handed to it)."""


@dataclass(slots=True)
class Chunk:
    """A run of consecutive records, the unit of persistence and acknowledgement.

    Attributes:
        id: strictly increasing within a buffer (and across restarts for the spool).
        records: the records, in the order they were appended.
        size: approximate size in bytes (message bytes plus a fixed per-record overhead).
    """

    id: int
    records: list[Record]
    size: int


DropCallback = Callable[[str, int, str], None]
"""``(destination, records, reason)``: called when records a destination had not delivered are discarded."""


class Buffer(Protocol):
    """What the pipeline appends to and each destination runner reads from."""

    def register(self, destinations: Sequence[str]) -> None:
        """Declare the enabled destinations (before the first append/read). Cursors of destinations no longer
        listed are released; a new destination starts at the current end."""
        ...

    async def append(self, records: list[Record], checkpoints: Mapping[str, str] | None = None) -> None:
        """Add records (in order). Never waits on a destination; may discard the oldest chunks when full.

        ``checkpoints`` (source position per key, e.g. a tailed file's identity -> offset) become durable together
        with these records, never before them; a key mapped to :data:`CHECKPOINT_REMOVED` is removed with them.
        """
        ...

    def load_checkpoints(self) -> dict[str, str]:
        """The checkpoints stored with the records persisted so far (empty for a new or memory buffer)."""
        ...

    async def run(self) -> None:
        """Background upkeep (periodic persistence of staged records); returns after :meth:`close_input`."""
        ...

    async def next_chunk(self, destination: str) -> Chunk | None:
        """The next chunk after the last one returned to ``destination``; waits for one. ``None`` once the input is
        closed and everything was returned."""
        ...

    async def ack(self, destination: str, chunk_id: int) -> None:
        """``destination`` is done with every chunk up to ``chunk_id`` (delivered or deliberately dropped)."""
        ...

    def pending(self, destination: str) -> int:
        """Records appended but not yet acknowledged by ``destination``."""
        ...

    async def wait_for_readers(self) -> None:
        """Wait while a destination that is not stalled (see :data:`STALLED_AFTER_S`) lags more than
        :data:`MAX_READ_LAG_CHUNKS` chunks behind the newest chunk. For sources that can wait without losing
        anything (tailed files): they then read no faster than the destinations deliver, chunks are handed out
        from memory, and memory stays small; a stalled destination holds nobody back (its backlog goes to the
        buffer). Returns at once after :meth:`close_input`."""
        ...

    def stored_bytes(self) -> int:
        """Bytes held (approximate for memory, on-disk chunk bytes for the spool)."""
        ...

    def stored_chunks(self) -> int:
        """Chunks held."""
        ...

    async def close_input(self) -> None:
        """No more appends: persist what is staged; readers get ``None`` after the last chunk."""
        ...

    async def aclose(self) -> None:
        """Release resources. What was not acknowledged stays for the next start (durable buffers)."""
        ...


class ReadPacer:
    """Tracks when each destination last took a chunk, to tell the destinations that keep up from the stalled
    ones (:data:`STALLED_AFTER_S`), and lets sources that can wait follow the ones that keep up.

    A buffer calls :meth:`taking` when a destination enters ``next_chunk`` and :meth:`took` when it leaves it.
    """

    def __init__(self) -> None:
        self.reading: set[str] = set()
        """Destinations inside ``next_chunk`` (waiting for or loading a chunk): never stalled."""
        self.returned_at: dict[str, float] = {}
        """When each destination last left ``next_chunk`` (trio clock, seconds)."""
        self._taken = trio.Event()

    def register(self, destinations: Sequence[str]) -> None:
        """Start the clock of new destinations now (a destination that never reads is stalled after a while)."""
        now = trio.current_time() if _in_trio() else 0.0
        for dest in destinations:
            self.returned_at.setdefault(dest, now)

    def taking(self, destination: str) -> None:
        """``destination`` entered ``next_chunk``."""
        self.reading.add(destination)

    def took(self, destination: str) -> None:
        """``destination`` left ``next_chunk`` (with a chunk, or cancelled)."""
        self.reading.discard(destination)
        self.returned_at[destination] = trio.current_time()
        self._taken.set()
        self._taken = trio.Event()

    def active(self, destinations: Sequence[str]) -> list[str]:
        """The destinations of ``destinations`` that are not stalled."""
        now = trio.current_time()
        returned = self.returned_at
        return [d for d in destinations if d in self.reading or now - returned.get(d, now) < STALLED_AFTER_S]

    async def wait_while(self, lagging: Callable[[], bool]) -> None:
        """Wait until ``lagging()`` is false, checking again whenever a destination takes a chunk and at least every
        half :data:`STALLED_AFTER_S` (a destination may become stalled meanwhile)."""
        while lagging():
            with trio.move_on_after(STALLED_AFTER_S / 2):
                await self._taken.wait()


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True


def apply_checkpoints(stored: dict[str, str], checkpoints: Mapping[str, str]) -> None:
    """Update ``stored`` with ``checkpoints``: set each key, or remove it when its value is
    :data:`CHECKPOINT_REMOVED`."""
    for key, value in checkpoints.items():
        if value == CHECKPOINT_REMOVED:
            stored.pop(key, None)
        else:
            stored[key] = value


def records_size(records: Sequence[Record]) -> int:
    """Approximate bytes of ``records``: message lengths plus :data:`RECORD_OVERHEAD_BYTES` each."""
    return sum(map(len, map(_message, records))) + RECORD_OVERHEAD_BYTES * len(records)


_message: Final = attrgetter("message")


class MemoryBuffer:
    """A bounded in-memory :class:`Buffer` (``FORWARDER_BUFFER=memory``); one chunk per ``append``.

    Args:
        max_bytes: bound on :meth:`stored_bytes`; past it the oldest chunks are discarded.
        on_drop: told about records discarded before a destination acknowledged them.
    """

    def __init__(self, max_bytes: int, on_drop: DropCallback | None = None) -> None:
        self._max_bytes = max_bytes
        self._on_drop = on_drop
        self._chunks: deque[Chunk] = deque()
        self._bytes = 0
        self._next_id = 1
        self._read: dict[str, int] = {}
        self._acked: dict[str, int] = {}
        self._closed = False
        self._changed = trio.Event()
        self._checkpoints: dict[str, str] = {}
        self._pacer = ReadPacer()

    def load_checkpoints(self) -> dict[str, str]:
        return dict(self._checkpoints)

    async def run(self) -> None:
        """Nothing to persist in memory."""

    def register(self, destinations: Sequence[str]) -> None:
        end = self._next_id - 1
        self._read = {d: self._read.get(d, end) for d in destinations}
        self._acked = {d: self._acked.get(d, end) for d in destinations}
        self._pacer.register(destinations)

    async def append(self, records: list[Record], checkpoints: Mapping[str, str] | None = None) -> None:
        if checkpoints:
            apply_checkpoints(self._checkpoints, checkpoints)
        if not records:
            return
        if self._closed:
            raise RuntimeError("append after close_input")
        chunk = Chunk(self._next_id, records, records_size(records))
        self._next_id += 1
        self._chunks.append(chunk)
        self._bytes += chunk.size
        while self._bytes > self._max_bytes and len(self._chunks) > 1:
            self._discard_oldest()
        self._release()
        self._wake()

    def _discard_oldest(self) -> None:
        old = self._chunks.popleft()
        self._bytes -= old.size
        for dest, acked in self._acked.items():
            if acked < old.id:
                if self._on_drop is not None:
                    self._on_drop(dest, len(old.records), SPOOL_FULL)
                self._acked[dest] = old.id
                self._read[dest] = max(self._read[dest], old.id)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _release(self) -> None:
        floor = min(self._acked.values(), default=self._next_id - 1)
        while self._chunks and self._chunks[0].id <= floor:
            self._bytes -= self._chunks.popleft().size

    async def next_chunk(self, destination: str) -> Chunk | None:
        self._pacer.taking(destination)
        try:
            while True:
                after = self._read[destination]
                for chunk in self._chunks:
                    if chunk.id > after:
                        self._read[destination] = chunk.id
                        return chunk
                if self._closed:
                    return None
                await self._changed.wait()
        finally:
            self._pacer.took(destination)

    async def wait_for_readers(self) -> None:
        await self._pacer.wait_while(self._lagging)

    def _lagging(self) -> bool:
        if self._closed:
            return False
        newest = self._next_id - 1
        read = self._read
        return any(newest - read[d] > MAX_READ_LAG_CHUNKS for d in self._pacer.active(list(read)))

    async def ack(self, destination: str, chunk_id: int) -> None:
        if chunk_id > self._acked[destination]:
            self._acked[destination] = chunk_id
            self._release()

    def pending(self, destination: str) -> int:
        acked = self._acked.get(destination, 0)
        return sum(len(c.records) for c in self._chunks if c.id > acked)

    def stored_bytes(self) -> int:
        return self._bytes

    def stored_chunks(self) -> int:
        return len(self._chunks)

    async def close_input(self) -> None:
        self._closed = True
        self._wake()

    async def aclose(self) -> None:
        await self.close_input()
