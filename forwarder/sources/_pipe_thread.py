"""Drain a pipe from a dedicated OS thread, so the writer (the agent) never waits on our Python work.

The thread does only blocking ``os.read`` calls (which release the GIL), the mirror ``os.write`` and a
``deque.append``; framing and shaping run in the trio task that :func:`pump_pipe` starts. A burst from the agent
therefore lands in memory at pipe speed even while the event loop is busy shaping a large batch.

Backlog: bytes read but not framed yet stay in memory up to :data:`SPILL_ABOVE_BYTES`; past that (an agent writing
faster than we shape, for longer than a moment) the thread appends what it reads to a spill file instead: an unnamed
temporary file in the state directory (``O_TMPFILE``: it never has a name, and the kernel frees it when we exit or
crash), read back in order by the trio side, and truncated once it has been read back whole. So the agent keeps
writing at pipe speed and our memory stays small whatever the burst. The spill files of one agent's pipes share one
:class:`SpillBudget`: together they hold at most :func:`spill_bound` (a quarter of ``FORWARDER_SPOOL_MAX_BYTES``, at
most :data:`MAX_SPILL_BYTES`) and never more than the free disk minus the spool's margin (checked when a file is
created). Past that, or when
the spill file cannot be written (no state directory, disk full), the backlog grows in memory again, and the thread
stops reading once :data:`MAX_UNREAD_BYTES` are held there: the only case in which the agent can be slowed down,
and only by our own CPU, never by a destination. Spilled bytes are not durable: like bytes in memory, they are not
records yet.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO, Final, cast

import structlog
import trio

from forwarder.delivery.spool import DISK_MARGIN_FRACTION, DISK_MARGIN_MIN_BYTES
from forwarder.sources._lines import LineFramer
from forwarder.sources._pump import LineConsumer

READ_SIZE: Final = 1024 * 1024
PIPE_BUFFER_BYTES: Final = 1024 * 1024
"""Kernel buffer asked for the pipe (``F_SETPIPE_SZ``, Linux; 1 MiB is the default ``/proc/sys/fs/pipe-max-size``
an unprivileged process may ask for). The reader thread needs the GIL between two reads, which a busy event loop
holds for up to ``sys.getswitchinterval()`` (5 ms): with the default 64 KiB pipe a fast writer would block on a
full pipe several times per handoff; with 1 MiB it writes on while we catch up."""
SPILL_ABOVE_BYTES: Final = 16 * 1024 * 1024
"""Bytes read but not yet framed held in memory before what is read goes to the spill file instead."""
MAX_SPILL_BYTES: Final = 1024 * 1024 * 1024
"""The most bytes the spill files of one agent's pipes hold together (at ~175 bytes a line, ~6 million lines of
backlog)."""
SPILL_FRACTION_OF_SPOOL: Final = 0.25
"""The spill files of one agent's pipes hold together at most this fraction of ``FORWARDER_SPOOL_MAX_BYTES``
(:func:`spill_bound`), so a small disk sized for the spool is not filled by a burst."""
MAX_UNREAD_BYTES: Final = 64 * 1024 * 1024
"""Bytes read but not yet framed held in memory when nothing can be spilled (no spill directory, or the spill file
could not be written); the reader thread waits past this."""
SLICE_BYTES: Final = 1024 * 1024
"""Bytes the trio side frames and submits at a time. Framing the whole backlog at once (up to
:data:`MAX_UNREAD_BYTES`) would hold it three times over (bytes, decoded text, line strings); in slices the
transient copies stay ~1 MiB and :meth:`~forwarder.sources._pump.LineConsumer.wait_for_room` paces the rest."""

_log = structlog.get_logger("forwarder")


def spill_bound(spool_max_bytes: int) -> int:
    """The bound of the spill files of one agent's pipes together, for a spool bound of ``spool_max_bytes``, bytes."""
    return min(MAX_SPILL_BYTES, int(spool_max_bytes * SPILL_FRACTION_OF_SPOOL))


class SpillBudget:
    """The bytes the spill files of several pipes (one agent's stdout and stderr) may take on disk together.

    Each pipe counts its file's size (what it occupies, read back or not) here before it writes; thread-safe.

    Args:
        max_bytes: the bound, bytes (:func:`spill_bound`); lowered by :meth:`clamp_to_disk`.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        """Bytes counted by the pipes now."""
        self._lock = threading.Lock()

    def adjust(self, delta: int) -> bool:
        """Count ``delta`` more bytes (negative: fewer); refused (``False``, nothing counted) if that would take
        :attr:`used` past :attr:`max_bytes`. A decrease is always taken."""
        with self._lock:
            if delta > 0 and self.used + delta > self.max_bytes:
                return False
            self.used += delta
            return True

    def clamp_to_disk(self, free: int, margin: int) -> int:
        """Lower :attr:`max_bytes` so that the files grow by at most ``free - margin`` bytes past :attr:`used`
        (``free``: the disk's free bytes, less any bytes counted in :attr:`used` but not written yet); returns the
        room left, bytes (negative: even what is counted does not fit)."""
        with self._lock:
            self.max_bytes = min(self.max_bytes, self.used + free - margin)
            return self.max_bytes - self.used


_Spilled = tuple[int, int]
"""``(offset, length)`` of bytes in the spill file."""


class _Shared:
    """State shared by the reader thread and the trio task (guarded by ``lock``).

    ``chunks`` holds what was read, in order: bytes in memory, or ``(offset, length)`` of bytes in the spill file.
    ``unread`` counts the bytes in memory, ``spilled`` the bytes in the file not yet read back (decreased only once
    they have been read, so the reader thread may truncate the file when it is 0).
    """

    def __init__(self, spill_dir: Path | None, budget: SpillBudget) -> None:
        self.lock = threading.Lock()
        self.chunks: deque[bytes | _Spilled] = deque()
        self.unread = 0
        self.spilled = 0
        self.spilled_total = 0
        self.spill_dir = spill_dir
        self.budget = budget
        self.counted = 0
        """Bytes of the spill file counted in ``budget``."""
        self.spill: IO[bytes] | None = None
        self.spill_end = 0
        self.eof = False
        self.closed = False
        self.notified = False
        self.room = threading.Event()
        self.room.set()

    def spill_fits(self, size: int) -> bool:
        """Whether ``size`` more bytes fit in the spill file within the budget shared with the agent's other pipe;
        if so they are counted there. The file's size counts, not only what is still unread: read-back bytes are
        freed only when the whole file has been read back and it restarts (call with ``lock`` held)."""
        end = 0 if self.spilled == 0 else self.spill_end
        if not self.budget.adjust(end + size - self.counted):
            return False
        self.counted = end + size
        return True

    def release(self) -> None:
        """Uncount the spill file from the budget (it is closed, or could not be written)."""
        self.budget.adjust(-self.counted)
        self.counted = 0

    def has_room(self) -> bool:
        """Whether the reader thread may read on (call with ``lock`` held). While the spill file takes the
        backlog, memory never comes near :data:`MAX_UNREAD_BYTES`."""
        return self.unread <= MAX_UNREAD_BYTES


def _write_all(fd: int, data: bytes) -> bool:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            import select

            select.select([], [fd], [])
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.EBADF, errno.EINVAL):
                return False
            raise
    return True


def _grow_pipe(fd: int) -> None:
    """Ask for a :data:`PIPE_BUFFER_BYTES` pipe buffer (best effort: not a pipe, not Linux, or over the limit)."""
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setpipe is None:
        return
    try:
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < PIPE_BUFFER_BYTES:
            fcntl.fcntl(fd, setpipe, PIPE_BUFFER_BYTES)
    except OSError:
        pass


def _open_spill(shared: _Shared, first: int) -> IO[bytes]:
    """Create the spill file in ``shared.spill_dir``, lowering the shared budget to what the free disk minus the
    spool's margin (``DISK_MARGIN_MIN_BYTES``, ``DISK_MARGIN_FRACTION``) allows.

    Raises:
        OSError: the file cannot be created, or not even ``first`` bytes would fit.
    """
    assert shared.spill_dir is not None
    disk = shutil.disk_usage(shared.spill_dir)
    margin = max(DISK_MARGIN_MIN_BYTES, int(disk.total * DISK_MARGIN_FRACTION))
    # The first write's bytes are counted in the budget already (spill_fits) but are not on the disk yet.
    if shared.budget.clamp_to_disk(disk.free - first, margin) < 0:
        raise OSError(errno.ENOSPC, f"less than {margin} bytes would be left free on the disk")
    # Unnamed (O_TMPFILE where supported); closed by pump_pipe, freed by the kernel if we crash.
    spill = tempfile.TemporaryFile(dir=shared.spill_dir, prefix="pipe-spill-")  # noqa: SIM115
    _log.info(
        "pipe_spilling",
        directory=str(shared.spill_dir),
        max_bytes=shared.budget.max_bytes,
        hint="the agent writes faster than lines are shaped; the backlog goes to a spill file",
    )
    return spill


def _spill(shared: _Shared, data: bytes) -> _Spilled | None:
    """Append ``data`` to the spill file (created on first use, truncated first when everything in it was read
    back); its place in the file, or ``None`` if it cannot be written (logged once; spilling is then off). Called
    by the reader thread with ``lock`` held, so the file is never closed under it."""
    try:
        if shared.spill is None:
            shared.spill = _open_spill(shared, len(data))
        fd = shared.spill.fileno()
        if shared.spilled == 0 and shared.spill_end > 0:
            os.ftruncate(fd, 0)
            shared.spill_end = 0
        offset = shared.spill_end
        written = 0
        while written < len(data):
            written += os.pwrite(fd, memoryview(data)[written:], offset + written)
    except OSError as exc:
        _log.warning("pipe_spill_failed", directory=str(shared.spill_dir), error=str(exc))
        shared.spill_dir = None
        shared.budget.adjust(-len(data))  # counted by spill_fits, never written
        shared.counted -= len(data)
        return None
    shared.spill_end = offset + len(data)
    return (offset, len(data))


def _read_spilled(shared: _Shared, place: _Spilled) -> bytes:
    """The bytes at ``place`` in the spill file (in the trio thread; a page-cache read of at most ``READ_SIZE``).
    A read that fails or comes back short (an I/O error) is logged with the bytes lost: never a crash."""
    offset, length = place
    data = b""
    error = "spill file shorter than written"
    try:
        assert shared.spill is not None
        data = os.pread(shared.spill.fileno(), length, offset)
        while 0 < len(data) < length:
            more = os.pread(shared.spill.fileno(), length - len(data), offset + len(data))
            if not more:
                break
            data += more
    except OSError as exc:
        error = str(exc)
    if len(data) < length:
        _log.error("pipe_spill_read_failed", lost_bytes=length - len(data), error=error)
    return data


def _reader(fd: int, mirror_fd: int | None, shared: _Shared, notify: Callable[[], None]) -> None:
    """Thread body: read until EOF, mirror, queue (in memory, or spilled); ask the trio side to wake (once per batch
    of reads)."""
    token_call = notify
    mirror = mirror_fd
    try:
        while True:
            shared.room.wait()
            try:
                data = os.read(fd, READ_SIZE)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if data and mirror is not None and not _write_all(mirror, data):
                _log.warning("mirror_disabled", fd=mirror)
                mirror = None
            with shared.lock:
                place: _Spilled | None = None
                if (
                    data
                    and shared.spill_dir is not None
                    and not shared.closed
                    and shared.unread + len(data) > SPILL_ABOVE_BYTES
                    and shared.spill_fits(len(data))
                ):
                    place = _spill(shared, data)
                if place is not None:
                    shared.chunks.append(place)
                    shared.spilled += place[1]
                    shared.spilled_total += place[1]
                elif data:
                    shared.chunks.append(data)
                    shared.unread += len(data)
                else:
                    shared.eof = True
                if not shared.has_room():
                    shared.room.clear()
                must_notify = not shared.notified
                shared.notified = True
            if must_notify:
                try:
                    token_call()
                except trio.RunFinishedError:
                    return
            if not data:
                return
    finally:
        os.close(fd)


class PipeActivity:
    """Progress of one :func:`pump_pipe`, for deciding whether a pipe is idle (see ``child.PIPE_GRACE_S``).

    Attributes:
        ticks: increases whenever bytes were read or framed.
    """

    def __init__(self) -> None:
        self.ticks = 0
        self._shared: _Shared | None = None
        self.waiting_for_room = False

    @property
    def spilled_bytes(self) -> int:
        """Bytes that went through the spill file so far."""
        return self._shared.spilled_total if self._shared is not None else 0

    @property
    def memory_bytes(self) -> int:
        """Bytes read but not yet framed, held in memory now."""
        return self._shared.unread if self._shared is not None else 0

    @property
    def reading(self) -> bool:
        """``False`` while the reader thread waits for the backlog to shrink (it is at its bound)."""
        return self._shared is None or self._shared.room.is_set()

    def busy(self) -> bool:
        """Bytes read but not yet framed, or framed lines waiting for the shaper: the pipe is not idle."""
        shared = self._shared
        return self.waiting_for_room or (shared is not None and bool(shared.chunks))


async def pump_pipe(
    fd: int,
    stream: str,
    consumer: LineConsumer,
    *,
    max_line_bytes: int,
    mirror_fd: int | None = None,
    activity: PipeActivity | None = None,
    spill_dir: Path | None = None,
    spill_budget: SpillBudget | None = None,
) -> None:
    """Read the pipe ``fd`` (blocking mode, owned: closed at EOF) to EOF in a thread; frame and submit its lines as
    ``stream``. ``mirror_fd`` receives every byte unchanged; ``activity`` tracks progress; ``spill_dir`` is where a
    backlog past :data:`SPILL_ABOVE_BYTES` goes (``None``: it stays in memory, up to :data:`MAX_UNREAD_BYTES`), within
    ``spill_budget`` (shared with the agent's other pipe; default: one of :data:`MAX_SPILL_BYTES` for this pipe). If
    cancelled, every byte already read is still framed and submitted."""
    _grow_pipe(fd)
    shared = _Shared(spill_dir, spill_budget or SpillBudget(MAX_SPILL_BYTES))
    activity = activity or PipeActivity()
    activity._shared = shared
    framer = LineFramer(max_line_bytes)
    wake = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def on_data() -> None:  # runs in the trio thread
        with shared.lock:
            shared.notified = False
        wake.set()

    def notify() -> None:  # runs in the reader thread
        token.run_sync_soon(on_data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(trio.to_thread.run_sync, _reader, fd, mirror_fd, shared, notify, abandon_on_cancel=True)
        )
        try:
            while True:
                await wake.wait()
                wake = trio.Event()
                while True:  # frame in slices of SLICE_BYTES: bounded transient memory, readers never starve
                    taken: list[bytes | _Spilled] = []
                    size = 0
                    with shared.lock:
                        queued = shared.chunks
                        while queued and size < SLICE_BYTES:
                            item = queued.popleft()
                            taken.append(item)
                            size += len(item) if isinstance(item, bytes) else item[1]
                        more = bool(queued)
                        eof = shared.eof and not more
                    chunks, spilled = _resolve(shared, taken)
                    with shared.lock:
                        shared.unread -= size - spilled
                        shared.spilled -= spilled
                        if shared.has_room():
                            shared.room.set()
                    if chunks:
                        activity.ticks += 1
                        lines = framer.feed(b"".join(chunks) if len(chunks) > 1 else chunks[0])
                        del chunks
                        if lines:
                            consumer.submit(stream, lines)
                            del lines
                            activity.waiting_for_room = True
                            try:
                                await consumer.wait_for_room()
                            finally:
                                activity.waiting_for_room = False
                    if not more:
                        break
                if eof:
                    break
        finally:
            with shared.lock:
                left = list(shared.chunks)
                shared.chunks.clear()
            data, _ = _resolve(shared, left)
            with shared.lock:
                shared.closed = True
                if shared.spill is not None:
                    shared.spill.close()
                shared.release()
            lines = framer.feed(b"".join(data)) if data else []
            lines.extend(framer.finish())
            if lines:
                consumer.submit(stream, lines)


def _resolve(shared: _Shared, items: list[bytes | _Spilled]) -> tuple[list[bytes], int]:
    """``items`` as bytes (spilled ones read back), and how many of their bytes were spilled."""
    if all(isinstance(item, bytes) for item in items):
        return cast("list[bytes]", items), 0
    out: list[bytes] = []
    spilled = 0
    for item in items:
        if isinstance(item, bytes):
            out.append(item)
        else:
            out.append(_read_spilled(shared, item))
            spilled += item[1]
    return out, spilled
