"""The ingest path: framed lines from sources -> shaping -> redaction -> buffer.

Sources call :meth:`Ingest.submit` (synchronous, never waits on a destination) with lists of lines; one task
(:meth:`Ingest.run`) takes everything pending at once, shapes it, scrubs secrets and appends the records to the
buffer. Readers are therefore drained at once whatever the destinations do; the only limit is
:data:`MAX_PENDING_BYTES` of lines not yet shaped (local CPU work), past which :meth:`Ingest.wait_for_room` makes
readers wait. Sources that can wait without losing anything (tailed files) call :meth:`Ingest.wait_for_delivery`
instead: they also wait for the destinations that keep up, so that a file read from its head is read no faster than
it is delivered (the file is the buffer; a stalled destination holds nobody back).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio

from forwarder.delivery.buffer import Buffer
from forwarder.record import Record
from forwarder.shaping.redact import Redactor
from forwarder.shaping.shaper import Lane, Shaper

MAX_PENDING_BYTES: Final = 4 * 1024 * 1024
"""Lines read but not yet shaped, bytes (approximate: characters). A ``str`` line costs ~50 bytes more than its
characters, so 4 MiB of ~175-byte lines is ~5 MiB of memory; readers (tail, the pipe thread's own byte buffer)
wait past it, which only ever happens when the source is faster than shaping (tail from head)."""
SHAPE_SLICE_BYTES: Final = 256 * 1024
"""Lines shaped and appended to the buffer at a time, bytes (characters): bounds the records alive at once (a
record with a few attributes is ~1 KiB of Python objects) while keeping per-append costs negligible. A submit is
never cut, so a slice is about one tailed block (:data:`~forwarder.sources._follow.READ_SIZE`): an append is then
about one spool chunk (:data:`~forwarder.delivery.spool.DEFAULT_CHUNK_MAX_BYTES`), which the spool can skip
writing once every destination has it, and less is read ahead (:data:`PACED_PENDING_BYTES`). With 1 MiB, bench
(a) peaked at 80 MiB RSS, not 64 (memory buffer), and the durable spool had to write most chunks."""

PACED_PENDING_BYTES: Final = SHAPE_SLICE_BYTES
"""Lines pending (not yet shaped) past which :meth:`Ingest.wait_for_delivery` waits, bytes: with one slice being
shaped and at most this much more read ahead, the buffer sees the delivery lag at once."""

RecordObserver = Callable[[list[Record]], None]
"""Called with each list of records just appended (e.g. the ``/logs`` ring buffer); must be fast."""


@dataclass
class IngestStats:
    """Counts of the ingest path: lines read per stream, records appended, records filtered by level."""

    lines: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    records: int = 0
    filtered: int = 0


class Ingest:
    """Owns the shaper and feeds the buffer.

    Args:
        shaper: turns lines into records (stateful: multi-line groups).
        buffer: where records go.
        redactor: scrubs secret values and user patterns from messages.
        stats: counters to update.
        observers: called with each list of appended records (e.g. the ``/logs`` ring); must be fast.
    """

    def __init__(
        self,
        shaper: Shaper,
        buffer: Buffer,
        redactor: Redactor,
        stats: IngestStats | None = None,
        observers: Sequence[RecordObserver] = (),
    ) -> None:
        self.shaper = shaper
        self.buffer = buffer
        self.redactor = redactor
        self.stats = stats or IngestStats()
        self.observers = list(observers)
        self._pending: list[tuple[Lane, list[str], list[int] | None, int]] = []
        self._submitted: Counter[Lane] = Counter()
        """Lines submitted so far, per lane (``(stream, origin)``, as the shaper groups them)."""
        self._shaped: Counter[Lane] = Counter()
        """Lines fed to the shaper so far, per lane."""
        self._unsettled: dict[Lane, None] = {}
        """Lanes that may have lines not yet in records (not shaped yet, or held by the shaper). A lane found settled
        is forgotten, counters included (a tailed file's path is a lane, and files come and go); its counts start
        again at 0 if it comes back."""
        self._checkpoints: deque[tuple[dict[Lane, int], dict[str, str]]] = deque()
        """Checkpoints with the line counts submitted before them, waiting until all those lines are in records."""
        self._pending_bytes = 0
        self._wakeup = trio.Event()
        self._room = trio.Event()
        self._closed = False

    def submit(
        self,
        stream: str,
        lines: list[str],
        checkpoints: Mapping[str, str] | None = None,
        event_times_ns: list[int] | None = None,
        origin: str = "",
    ) -> None:
        """Queue ``lines`` of ``stream`` for shaping. Never blocks.

        Args:
            stream: ``stdout`` or ``stderr``.
            lines: framed lines, in order.
            checkpoints: source positions that become durable together with the records made from these lines.
            event_times_ns: the time each line states (e.g. a CRI or Docker log timestamp), ns since the epoch, one
                per line; becomes the records' ``event_time_ns``.
            origin: where in ``stream`` the lines come from, when several sources share it (a tailed file's path);
                lines of different origins never join one multi-line record (see
                :meth:`~forwarder.shaping.shaper.Shaper.feed`).
        """
        if lines:
            size = sum(map(len, lines))
            lane = (stream, origin)
            self._pending.append((lane, lines, event_times_ns, size))
            self._submitted[lane] += len(lines)
            self._unsettled[lane] = None
            self._pending_bytes += size
            self.stats.lines[stream] += len(lines)
            self.stats.bytes[stream] += size
        if checkpoints:
            # Only unsettled lanes can hold back a checkpoint: every line of the others is in records already.
            submitted = self._submitted
            self._checkpoints.append(({lane: submitted[lane] for lane in self._unsettled}, dict(checkpoints)))
        self._wakeup.set()

    async def wait_for_room(self) -> None:
        """Wait while more than :data:`MAX_PENDING_BYTES` of lines are pending (a reader calls this after submit)."""
        await self._wait_pending_at_most(MAX_PENDING_BYTES)

    async def _wait_pending_at_most(self, limit: int) -> None:
        while self._pending_bytes > limit and not self._closed:
            if self._room.is_set():  # one event for every waiter: replacing an unset one would strand its waiters
                self._room = trio.Event()
            await self._room.wait()

    async def wait_for_delivery(self) -> None:
        """Wait until at most :data:`PACED_PENDING_BYTES` of lines are pending, then while a destination that keeps
        up lags behind the buffer's newest chunks (:meth:`~forwarder.delivery.buffer.Buffer.wait_for_readers`).
        For sources that can wait without losing anything (tailed files): they then read no faster than delivery,
        and what they read reaches the destinations from memory."""
        await self._wait_pending_at_most(PACED_PENDING_BYTES)
        if not self._closed:
            await self.buffer.wait_for_readers()

    def close(self) -> None:
        """No more input: :meth:`run` shapes what is pending, flushes open groups and returns."""
        self._closed = True
        self._wakeup.set()

    async def run(self) -> None:
        """Shape and append until :meth:`close`; then flush every open multi-line group."""
        shaper = self.shaper
        while True:
            deadline_ns = shaper.next_deadline_ns()
            if not self._pending and not self._closed:
                if deadline_ns is None:
                    await self._wakeup.wait()
                else:
                    with trio.move_on_after(max(0.0, (deadline_ns - time.time_ns()) / 1e9)):
                        await self._wakeup.wait()
            self._wakeup = trio.Event()
            pending, self._pending = self._pending, []
            redact = self.redactor.apply
            index = 0
            while True:
                # Shape and append in slices of SHAPE_SLICE_BYTES so that the records alive at once stay bounded;
                # each checkpoint goes with the slice that makes it ready (never durable before its lines), and a
                # slice does not end where the shaper holds the last line of a checkpoint whose next line is queued.
                now = time.time_ns()
                records: list[Record] = []
                size = 0
                full_at = 0  # the slice's size when it reached SHAPE_SLICE_BYTES (one submit may take it far past)
                while index < len(pending):
                    if size >= SHAPE_SLICE_BYTES:
                        full_at = full_at or size
                        if not self._completes_a_checkpoint(pending[index], size - full_at):
                            break
                    lane, lines, times, nbytes = pending[index]
                    index += 1
                    size += nbytes
                    self._shaped[lane] += len(lines)
                    records.extend(shaper.feed(lane[0], redact(lines), now, times, lane[1]))
                self._pending_bytes -= size
                self._room.set()  # waiters check their own limit
                if index < len(pending):
                    await self._append(records, self._ready_checkpoints())
                    continue
                records.extend(shaper.flush_idle(now))
                closing = self._closed and not self._pending
                if closing:
                    records.extend(shaper.flush())
                await self._append(records, self._ready_checkpoints())
                break
            if closing:
                return
            # Let readers run between batches so a busy shaper never starves the pipes.
            await trio.lowlevel.checkpoint()

    def _completes_a_checkpoint(self, item: tuple[Lane, list[str], list[int] | None, int], extra: int) -> bool:
        """Whether a slice that is full already, and took ``extra`` bytes since, should still take ``item`` (a
        pending submit): when the oldest waiting checkpoint has all its lines shaped but the shaper holds the last of
        them (a text line that a continuation could follow), records past the checkpoint before it are out already,
        and ``item`` continues that lane (which releases the held line). Ending the slice there would append those
        records without their checkpoint, and a crash before the next append became durable would read them again:
        a tailed file submits each block but its last line, then that line, and both belong in one slice. At most
        :data:`SHAPE_SLICE_BYTES` more, counted from where the slice became full (one block may take it far past
        :data:`SHAPE_SLICE_BYTES`): so a slice takes a held line's submit, never the next block itself (which would
        leave that block's own last line for the next slice)."""
        if extra + item[3] > SHAPE_SLICE_BYTES:
            return False
        held = self.shaper.held
        before: dict[Lane, int] = {}
        for marks, _ in self._checkpoints:  # those shaped in this slice are ready: the first that is not decides
            for lane, n in marks.items():
                shaped = self._shaped[lane]
                released = shaped - held(*lane)
                if released < n:
                    return shaped >= n and lane == item[0] and released > before.get(lane, 0)
            before = marks
        return False

    def _ready_checkpoints(self) -> dict[str, str]:
        """The checkpoints all of whose lines are in records by now. A line may be held by the shaper (the last
        text line of a lane waits for a possible continuation): a checkpoint covering it must wait too, or a crash
        after the checkpoint became durable would lose that line."""
        ready: dict[str, str] = {}
        shaper = self.shaper
        self._settle()
        while self._checkpoints:
            marks, checkpoints = self._checkpoints[0]
            if any(self._shaped[lane] - shaper.held(*lane) < n for lane, n in marks.items()):
                break
            ready.update(checkpoints)
            self._checkpoints.popleft()
        return ready

    def _settle(self) -> None:
        """Forget the lanes all of whose lines are in records: their counters, and their marks in the waiting
        checkpoints (which they no longer hold back). Keeps the work per checkpoint proportional to the lanes in
        use, not to every file ever followed."""
        shaper = self.shaper
        submitted, shaped = self._submitted, self._shaped
        settled = [
            lane for lane in self._unsettled if shaped[lane] == submitted[lane] and not shaper.held(lane[0], lane[1])
        ]
        if not settled:
            return
        for lane in settled:
            del self._unsettled[lane], submitted[lane], shaped[lane]
        for marks, _ in self._checkpoints:
            for lane in settled:
                marks.pop(lane, None)

    async def _append(self, records: list[Record], checkpoints: dict[str, str]) -> None:
        self.stats.filtered = self.shaper.filtered
        if records:
            self.stats.records += len(records)
            for observer in self.observers:
                observer(records)
        if records or checkpoints:
            await self.buffer.append(records, checkpoints or None)
