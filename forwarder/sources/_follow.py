"""Follow files by path or glob through rotation, truncation and deletion, with checkpoints kept in the spool.

How a file is followed (all intervals are named constants below):

* **Discovery**: every :data:`SCAN_INTERVAL_S` (and at once when a followed file is seen rotated away) each pattern
  is expanded (:func:`glob.glob`, ``**`` allowed); every regular file matched is identified by ``(st_dev, st_ino)``
  and opened once. A path that matches nothing yet is simply looked for again at the next scan.
* **Reading**: each open file is polled every :data:`POLL_INTERVAL_S`: ``fstat``, then ``pread`` in blocks of
  :data:`READ_SIZE` until its end. Reads are plain synchronous reads of the page cache (no thread hop: a block
  takes well under a millisecond). After each block the follower waits while the destinations that keep up lag
  behind (``wait_for_delivery``): a file is read no faster than it is delivered, so a big file read from its head
  stays in the file, not in memory or the spool. A stalled destination (down, hanging) holds nobody back: what
  it has not taken goes to the spool as before.
* **Identity**: device + inode, plus a fingerprint (BLAKE2b of the first :data:`FINGERPRINT_BYTES` bytes, or of as
  many as the file had when it was first seen; widened once the file is longer). A checkpoint whose fingerprint no
  longer matches belongs to another file that reused the inode: that file is read from its start.
* **Rotation by rename (+ create)**: the open descriptor keeps the old file; it is read to its end and kept open
  until it has not grown for :data:`ROTATE_WAIT_S` (a writer may still be writing to it before it reopens), then
  its unterminated last line (if any) is forwarded and it is closed, and its checkpoint removed with that last
  line: no pattern matches its new name, so it is not followed again (Fluent Bit's tail DB deletes a rotated file's
  entry when it stops following it too; should it match again later, it is read from its start). The new file at
  the path is found by the next scan (one is triggered at once) and read from its start. A file renamed to a name
  that still matches a pattern stays followed under its new name.
* **Copytruncate / truncation**: detected when the size drops below the read offset, or when the first bytes no
  longer match the fingerprint (the file was truncated and rewritten past our offset between two polls); the held
  partial line is forwarded and the file is read again from offset 0. Lines appended after our last read and
  before the truncation were never read from this file: with copytruncate they are in the copy (which a pattern
  should not match), so the loss is bounded by what the writer appended in one poll interval before the
  truncation (plus scheduling delay); logrotate's own race (lines written between its copy and its truncate) is
  lost for every reader.
* **Deletion**: a file whose link count is 0 is read to its end and closed after :data:`ROTATE_WAIT_S` without
  growth; its checkpoint is removed (with its last records): it can never be reopened, and a new file that reuses
  the inode must not be resumed. Checkpoints therefore do not pile up for every file ever followed (pod logs,
  dated files).
* **At start**, after the first scan, the checkpoints of files no pattern matched are removed (as Fluent Bit's tail
  DB does): files deleted or rotated away while the forwarder was not running, or no longer in the configuration.
  Such a file, should a pattern match it again later, is read from its start. Checkpoints marked deleted by an
  earlier version are removed then too.
* **Checkpoints**: after each block the file's position (``{"offset", "fp", "fp_len", "path"}`` JSON under the
  key ``tail:<st_dev>:<st_ino>``) is passed with the lines to ``submit``; the pipeline persists it in the same
  spool transaction as the records made from those lines. The offset covers only complete lines already submitted
  (never an unterminated line held by the framer, nor a CRI/Docker message still being joined), so a restart
  resumes exactly where the persisted records end.
* **Where a file starts**: with a checkpoint whose fingerprint matches: at its offset (at 0 if the file is now
  shorter: it was truncated while we were down); a file that appears after start: at its start; a file present at
  start with no checkpoint: at its start (``--read-from head``, the default) or after its last complete line
  (``--read-from tail``).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import orjson
import structlog
import trio

from forwarder.delivery.buffer import CHECKPOINT_REMOVED
from forwarder.record import STDOUT, printable
from forwarder.sources._container import ByteLines, ContainerDecoder, Event, make_decoder
from forwarder.sources._lines import LineFramer

POLL_INTERVAL_S: Final = 0.25
"""Seconds between two polls of an open file (size, truncation, rotation) once it has been read to its end."""
SCAN_INTERVAL_S: Final = 1.0
"""Seconds between two expansions of the path patterns: a new file is opened at most this long after it appears."""
ROTATE_WAIT_S: Final = 5.0
"""Seconds a rotated-away or deleted file is kept open after it last grew (its writer may not have reopened yet);
the same default as Fluent Bit's ``Rotate_Wait``."""
READ_SIZE: Final = 1024 * 1024
"""Bytes asked for per read."""
FINGERPRINT_BYTES: Final = 256
"""Bytes at the start of a file that identify it beside its inode."""
TAIL_SEEK_BYTES: Final = 64 * 1024
"""With ``--read-from tail``, how far back from the end we look for the start of the last (unterminated) line."""
CHECKPOINT_PREFIX: Final = "tail:"
"""Prefix of the checkpoint keys of tailed files (``tail:<st_dev>:<st_ino>``)."""

_log = structlog.get_logger("forwarder")

Identity = tuple[int, int]
"""``(st_dev, st_ino)``."""
Run = tuple[str, list[str], list[int] | None]
"""Consecutive lines of one stream: ``(stream, lines, event times or None)``."""


class CheckpointStore(Protocol):
    """Where persisted checkpoints are read at start (the buffer)."""

    def load_checkpoints(self) -> dict[str, str]:
        """Every persisted checkpoint (key -> value)."""
        ...


class TailConsumer(Protocol):
    """What a tailer feeds (:class:`forwarder.pipeline.Ingest`)."""

    @property
    def buffer(self) -> CheckpointStore:
        """The buffer the checkpoints are persisted in."""
        ...

    def submit(
        self,
        stream: str,
        lines: list[str],
        checkpoints: Mapping[str, str] | None = None,
        event_times_ns: list[int] | None = None,
        origin: str = "",
    ) -> None:
        """Queue lines (and checkpoints persisted with them); never blocks. ``origin`` names the file they come
        from: lines of different origins are never grouped into one multi-line record."""
        ...

    async def wait_for_room(self) -> None:
        """Wait while too much is pending."""
        ...

    async def wait_for_delivery(self) -> None:
        """Wait while too much is pending or the destinations that keep up lag behind (a file can wait)."""
        ...


@dataclass(frozen=True)
class FileSpec:
    """One ``PATH[=STREAM]`` argument: a path or glob, and the stream of its lines (raw format) or of its lines
    that are not in the container format (cri/docker)."""

    pattern: str
    stream: str


@dataclass
class Position:
    """A file's checkpoint: next offset to read (after the last complete line submitted) and its fingerprint.

    Attributes:
        offset: bytes from the start of the file.
        fp: hex BLAKE2b-64 digest of the first ``fp_len`` bytes.
        fp_len: how many bytes the fingerprint covers (at most :data:`FINGERPRINT_BYTES`).
        path: where the file was last seen (informational).
        deleted: read from a mark earlier versions wrote for a deleted file (``"deleted": true``; this version removes
            the checkpoint instead, and never writes it): never resume it.
    """

    offset: int
    fp: str
    fp_len: int
    path: str = ""
    deleted: bool = False

    def dumps(self) -> str:
        """The checkpoint value (compact JSON)."""
        data = {"offset": self.offset, "fp": self.fp, "fp_len": self.fp_len, "path": printable(self.path)}
        return orjson.dumps(data).decode()

    @classmethod
    def loads(cls, text: str) -> Position | None:
        """Parse a value written by :meth:`dumps`; ``None`` if it is not one."""
        try:
            data = orjson.loads(text)
            return cls(
                int(data["offset"]),
                str(data["fp"]),
                int(data["fp_len"]),
                str(data.get("path", "")),
                bool(data.get("deleted", False)),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


def fingerprint(prefix: bytes) -> str:
    """Hex BLAKE2b-64 digest of ``prefix``."""
    return hashlib.blake2b(prefix, digest_size=8).hexdigest()


def checkpoint_key(ident: Identity) -> str:
    """The checkpoint key of the file with identity ``ident``."""
    return f"{CHECKPOINT_PREFIX}{ident[0]}:{ident[1]}"


class _Framer(LineFramer):
    __slots__ = ()

    @property
    def held(self) -> int:
        """Bytes of the unterminated last line held back."""
        return len(self._rest)


class _RawReader:
    """Raw lines of one stream; :attr:`committed` is the offset after the last complete line handed out."""

    def __init__(self, stream: str, max_line_bytes: int, offset: int) -> None:
        self.stream = stream
        self._framer = _Framer(max_line_bytes)
        self._end = offset
        self.last_start: int | None = None

    @property
    def committed(self) -> int:
        return self._end - self._framer.held

    def feed(self, data: bytes) -> list[Run]:
        start = self._end
        self._end += len(data)
        lines = self._framer.feed(data)
        self.last_start = None
        if len(lines) >= 2 and type(lines[-1]) is str and type(lines[-2]) is str:
            # Both last lines are whole: the last one starts after the newline before the last newline in data.
            end = data.rfind(b"\n")
            before = data.rfind(b"\n", 0, end)
            if before >= 0:
                self.last_start = start + before + 1
        return [(self.stream, lines, None)] if lines else []

    def finish(self) -> list[Run]:
        self.last_start = None
        lines = self._framer.finish()
        return [(self.stream, lines, None)] if lines else []


def runs_of(events: list[Event]) -> list[Run]:
    """Group decoded events into runs of consecutive lines of the same stream (with times, or without)."""
    runs: list[Run] = []
    last: tuple[str, bool] | None = None
    lines: list[str] = []
    times: list[int] | None = None
    for stream, time_ns, message in events:
        key = (stream, time_ns is None)
        if key != last:
            last = key
            lines = []
            times = None if time_ns is None else []
            runs.append((stream, lines, times))
        lines.append(message)
        if times is not None:
            assert time_ns is not None
            times.append(time_ns)
    return runs


def max_held_bytes(max_line_bytes: int) -> int:
    """Longest container log line held while waiting for its newline (a runtime cuts lines at 16 KiB; JSON
    escaping can inflate that)."""
    return max(4 * max_line_bytes, 1024 * 1024)


class _ContainerReader:
    """CRI or Docker json-file lines; :attr:`committed` never passes a message still being joined."""

    def __init__(self, fmt: str, stream: str, max_line_bytes: int, offset: int) -> None:
        self._decoder: ContainerDecoder = make_decoder(fmt, stream, max_line_bytes)
        self._lines = ByteLines(offset, max_held_bytes(max_line_bytes))
        self._events = 0

    @property
    def committed(self) -> int:
        held = self._decoder.held_start
        return self._lines.offset if held is None else held

    @property
    def last_start(self) -> int | None:
        if self._events < 2:
            return None
        held = self._decoder.held_start
        last = self._decoder.last_start
        return last if held is None else min(held, last)

    def feed(self, data: bytes) -> list[Run]:
        events: list[Event] = []
        self._lines.feed(data, self._decoder, events)
        self._events = len(events)
        return runs_of(events)

    def finish(self) -> list[Run]:
        events: list[Event] = []
        self._lines.finish(self._decoder, events)
        self._decoder.flush(events)
        self._events = 0
        return runs_of(events)


Reader = _RawReader | _ContainerReader


def submit_runs(
    consumer: TailConsumer,
    runs: list[Run],
    checkpoints: Mapping[str, str] | None = None,
    stream: str = STDOUT,
    origin: str = "",
) -> None:
    """Submit ``runs`` (of the file named ``origin``, ``""`` for stdin) in order; ``checkpoints`` go with the last
    one (or alone, on ``stream``, if there are no lines)."""
    if not runs:
        if checkpoints:
            consumer.submit(stream, [], checkpoints, origin=origin)
        return
    last = len(runs) - 1
    for i, (run_stream, lines, times) in enumerate(runs):
        cps = checkpoints if i == last else None
        consumer.submit(run_stream, lines, cps, event_times_ns=times, origin=origin)


def _line_start_near_end(fd: int, size: int) -> int:
    """Offset after the last ``\\n`` within :data:`TAIL_SEEK_BYTES` of the end (``size`` if there is none)."""
    if size == 0:
        return 0
    start = max(0, size - TAIL_SEEK_BYTES)
    tail = os.pread(fd, size - start, start)
    cut = tail.rfind(b"\n")
    if cut < 0:
        return 0 if start == 0 else size
    return start + cut + 1


class Tailer:
    """Discovers and follows the files of ``specs`` and feeds their lines to a consumer until cancelled.

    Args:
        specs: path patterns and their streams.
        fmt: ``raw``, ``cri`` or ``docker``.
        read_from: ``head`` or ``tail``: where a file present at start with no checkpoint begins.
        max_line_bytes: framing limit.
    """

    def __init__(self, specs: list[FileSpec], *, fmt: str, read_from: str, max_line_bytes: int) -> None:
        self.specs = specs
        self.fmt = fmt
        self.read_from = read_from
        self.max_line_bytes = max_line_bytes
        self.positions: dict[str, Position] = {}
        self.followers: dict[Identity, _Follower] = {}
        self.matched: dict[Identity, str] = {}
        self._scan_requested = trio.Event()
        self._warned: set[tuple[str, int]] = set()

    async def run(self, consumer: TailConsumer) -> None:
        """Scan and follow until cancelled."""
        stale: dict[str, str] = {}
        for key, value in consumer.buffer.load_checkpoints().items():
            if key.startswith(CHECKPOINT_PREFIX):
                pos = Position.loads(value)
                if pos is not None and pos.deleted:
                    stale[key] = CHECKPOINT_REMOVED  # an earlier version's mark for a deleted file
                elif pos is not None:
                    self.positions[key] = pos
        async with trio.open_nursery() as nursery:
            self.scan(nursery, consumer, initial=True)
            self._forget_unmatched(consumer, stale)
            while True:
                with trio.move_on_after(SCAN_INTERVAL_S):
                    await self._scan_requested.wait()
                self._scan_requested = trio.Event()
                self.scan(nursery, consumer, initial=False)

    def _forget_unmatched(self, consumer: TailConsumer, stale: dict[str, str]) -> None:
        """After the first scan: remove the checkpoints of files no pattern matches any more (deleted or rotated
        away while we were not running), together with ``stale`` (earlier versions' deleted marks), as Fluent Bit's
        tail DB does at start. A file that matches again later is read from its start."""
        matched = {checkpoint_key(ident) for ident in self.matched}
        unmatched = [key for key in self.positions if key not in matched]
        for key in unmatched:
            del self.positions[key]
            stale[key] = CHECKPOINT_REMOVED
        if stale:
            _log.info("tail_checkpoints_removed", count=len(stale))
            consumer.submit(STDOUT, [], stale)

    def checkpoint_lag(self, persisted: Mapping[str, str]) -> dict[str, int]:
        """Bytes of each followed file not yet covered by a persisted checkpoint: ``path -> bytes`` (the path as
        :func:`~forwarder.record.printable` gives it).

        For each open file: its size now minus the offset of its checkpoint in ``persisted`` (the buffer's
        :meth:`CheckpointStore.load_checkpoints`), or minus the offset reading started at when none is persisted
        yet (or the persisted one is past the end: the file was truncated). A deleted file still being drained has
        no checkpoint (its checkpoints are removals: its inode may be reused): its size minus the last offset it
        handed on. Files sharing a path (a rotated-away file still being drained and its successor) are summed.
        Right after a truncation the figure is low until the new checkpoint is persisted (within the flush
        interval). A file that cannot be ``fstat``-ed is left out.
        """
        lag: dict[str, int] = {}
        for follower in list(self.followers.values()):
            try:
                size = os.fstat(follower.fd).st_size
            except OSError:
                continue
            value = persisted.get(follower.key)
            pos = Position.loads(value) if value is not None else None
            if pos is not None and not pos.deleted and pos.offset <= size:
                done = pos.offset
            elif follower.deleted and 0 <= follower.committed <= size:
                done = follower.committed
            else:
                done = follower.start
            path = printable(follower.path)  # a metrics label: valid UTF-8
            lag[path] = lag.get(path, 0) + max(0, size - done)
        return lag

    def request_scan(self) -> None:
        """Scan now instead of at the next interval (a followed file was rotated away)."""
        self._scan_requested.set()

    def new_reader(self, spec: FileSpec, offset: int) -> Reader:
        """A reader of this tailer's format starting at ``offset``."""
        if self.fmt == "raw":
            return _RawReader(spec.stream, self.max_line_bytes, offset)
        return _ContainerReader(self.fmt, spec.stream, self.max_line_bytes, offset)

    def scan(self, nursery: trio.Nursery, consumer: TailConsumer, *, initial: bool) -> None:
        """Expand every pattern; open the files not followed yet."""
        found: dict[Identity, tuple[str, FileSpec]] = {}
        for spec in self.specs:
            pattern = spec.pattern
            # glob.glob, not Path.glob: patterns may be absolute and use "**".
            paths = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]  # noqa: PTH207
            for path in paths:
                try:
                    st = Path(path).stat()
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.setdefault((st.st_dev, st.st_ino), (path, spec))
        self.matched = {ident: path for ident, (path, _spec) in found.items()}
        for ident, (path, spec) in found.items():
            if ident not in self.followers:
                self._open(nursery, consumer, ident, path, spec, initial=initial)

    def _open(
        self,
        nursery: trio.Nursery,
        consumer: TailConsumer,
        ident: Identity,
        path: str,
        spec: FileSpec,
        *,
        initial: bool,
    ) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if (path, exc.errno or 0) not in self._warned:
                self._warned.add((path, exc.errno or 0))
                _log.warning("tail_open_failed", path=path, error=exc.strerror)
            return
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != ident or not stat.S_ISREG(st.st_mode):
                os.close(fd)  # replaced between the scan and the open: the next scan sees the new one
                return
            prefix = os.pread(fd, FINGERPRINT_BYTES, 0)
            key = checkpoint_key(ident)
            pos = self.positions.get(key)
            if pos is not None and not pos.deleted and fingerprint(prefix[: pos.fp_len]) == pos.fp:
                if len(prefix) >= pos.fp_len and st.st_size >= pos.offset:
                    offset, reason = pos.offset, "checkpoint"
                else:
                    offset, reason = 0, "checkpoint_truncated"
            elif initial and self.read_from == "tail":
                offset, reason = _line_start_near_end(fd, st.st_size), "read_from_tail"
            else:
                offset, reason = 0, "head" if pos is None else "inode_reused"
        except OSError as exc:
            os.close(fd)
            _log.warning("tail_open_failed", path=path, error=exc.strerror)
            return
        _log.info("tail_file_opened", path=path, offset=offset, size=st.st_size, start=reason)
        follower = _Follower(
            self, consumer, ident=ident, key=key, path=path, spec=spec, fd=fd, offset=offset, prefix=prefix
        )
        self.followers[ident] = follower
        nursery.start_soon(follower.run)


class _Follower:
    """Follows one open file until it is rotated away/deleted and idle, or an error occurs."""

    def __init__(
        self,
        tailer: Tailer,
        consumer: TailConsumer,
        *,
        ident: Identity,
        key: str,
        path: str,
        spec: FileSpec,
        fd: int,
        offset: int,
        prefix: bytes,
    ) -> None:
        self.tailer = tailer
        self.consumer = consumer
        self.ident = ident
        self.key = key
        self.path = path
        self.origin = path
        """The path the file was opened under (kept after a rotation renames it): its lines' multi-line lane."""
        self.spec = spec
        self.fd = fd
        self.offset = offset
        self.start = offset
        """Where reading started (or restarted, after a truncation): nothing before it is owed."""
        self.reader = tailer.new_reader(spec, offset)
        self.fp = fingerprint(prefix)
        self.fp_len = len(prefix)
        self.committed = -1
        self.seen: tuple[int, int] = (-1, -1)
        self.leaving_since: float | None = None
        self.deleted = False
        self.closing = False
        """Set when the file, rotated away or deleted, is closed for good: its checkpoint is removed."""

    async def run(self) -> None:
        """Poll, read, detect truncation/rotation/deletion; close when done (or on error/cancellation)."""
        try:
            while True:
                st = os.fstat(self.fd)
                if (st.st_size, st.st_mtime_ns) != self.seen:
                    self.seen = (st.st_size, st.st_mtime_ns)
                    if st.st_size < self.offset or not self._fingerprint_holds():
                        self._truncated(st.st_size)
                grew = await self._read_to_end()
                if self._gone(grew):
                    self._close_out()
                    return
                await trio.sleep(POLL_INTERVAL_S)
        except OSError as exc:
            # The file becomes unreadable (EIO, ESTALE...): stop; the next scan reopens it at the last checkpoint.
            _log.warning("tail_read_failed", path=self.path, error=exc.strerror or str(exc), offset=self.committed)
        finally:
            self.tailer.followers.pop(self.ident, None)
            os.close(self.fd)

    def _fingerprint_holds(self) -> bool:
        """Whether the first bytes are still the ones fingerprinted (widening the fingerprint when possible)."""
        prefix = os.pread(self.fd, FINGERPRINT_BYTES, 0)
        if len(prefix) < self.fp_len or fingerprint(prefix[: self.fp_len]) != self.fp:
            return False
        if len(prefix) > self.fp_len:
            self.fp, self.fp_len = fingerprint(prefix), len(prefix)
        return True

    def _truncated(self, size: int) -> None:
        _log.info("tail_file_truncated", path=self.path, offset=self.offset, size=size)
        runs = self.reader.finish()
        self.offset = self.start = 0
        self.reader = self.tailer.new_reader(self.spec, 0)
        prefix = os.pread(self.fd, FINGERPRINT_BYTES, 0)
        self.fp, self.fp_len = fingerprint(prefix), len(prefix)
        self.committed = -1
        self._submit(runs)

    async def _read_to_end(self) -> bool:
        grew = False
        while True:
            data = os.pread(self.fd, READ_SIZE, self.offset)
            if not data:
                return grew
            grew = True
            self.offset += len(data)
            if self.fp_len < FINGERPRINT_BYTES and not self._fingerprint_holds():
                # Rewritten under us while we read: start over (what was read of the new content is re-read).
                self.offset -= len(data)
                self._truncated(self.offset)
                continue
            self._submit(self.reader.feed(data))
            await self.consumer.wait_for_delivery()
            await trio.lowlevel.checkpoint()
            if len(data) < READ_SIZE:
                return grew

    def _submit(self, runs: list[Run]) -> None:
        """Submit ``runs`` with the checkpoint after them. The last line goes in a submit of its own, preceded by
        the checkpoint of where it starts: the shaper may hold a last text line (a continuation could follow), and
        the pipeline makes a checkpoint durable only once every line before it is in a record; so only the held
        line's own checkpoint waits, not the whole block's."""
        split = self.reader.last_start
        if split is not None and self.committed < split < self.reader.committed:
            stream, lines, times = runs[-1]
            head: list[Run] = runs[:-1]
            if len(lines) > 1:
                head.append((stream, lines[:-1], None if times is None else times[:-1]))
            submit_runs(self.consumer, head, self._checkpoint(split), self.spec.stream, self.origin)
            runs = [(stream, lines[-1:], None if times is None else times[-1:])]
        submit_runs(self.consumer, runs, self._checkpoint(self.reader.committed), self.spec.stream, self.origin)

    def _checkpoint(self, offset: int) -> dict[str, str] | None:
        """The checkpoint for ``offset`` if it moved (also remembered for a file that is opened again); its removal
        once the file is deleted, or closed for good after a rotation."""
        if offset == self.committed:
            return None
        self.committed = offset
        if self.deleted or self.closing:
            # Deleted: never reopened by its path; its inode may be reused by a file that must start afresh.
            # Rotated away and closed: no pattern matches its name, so it is not followed again (Fluent Bit's tail
            # DB deletes a rotated file's entry when it stops following it too).
            self.tailer.positions.pop(self.key, None)
            return {self.key: CHECKPOINT_REMOVED}
        pos = Position(offset, self.fp, self.fp_len, self.path)
        self.tailer.positions[self.key] = pos
        return {self.key: pos.dumps()}

    def _gone(self, grew: bool) -> bool:
        """Whether the file was rotated away or deleted and has been idle for :data:`ROTATE_WAIT_S`."""
        st = os.fstat(self.fd)
        moved = False
        if st.st_nlink == 0:
            self.deleted = moved = True
        else:
            try:
                current = Path(self.path).stat()
                moved = (current.st_dev, current.st_ino) != self.ident
            except FileNotFoundError:
                moved = True
            except OSError as exc:
                moved = exc.errno == errno.ENOTDIR
            if moved:
                elsewhere = self.tailer.matched.get(self.ident)
                if elsewhere is not None and elsewhere != self.path:
                    _log.info("tail_file_renamed", path=elsewhere, previous=self.path)
                    self.path = elsewhere
                    moved = False
        now = trio.current_time()
        if not moved:
            self.leaving_since = None
            return False
        if self.leaving_since is None:
            _log.info("tail_file_deleted" if self.deleted else "tail_file_rotated", path=self.path, offset=self.offset)
            self.leaving_since = now
            self.tailer.request_scan()
        elif grew:
            self.leaving_since = now
        return now - self.leaving_since >= ROTATE_WAIT_S

    def _close_out(self) -> None:
        """Forward the unterminated last line with the removal of the file's checkpoint (it is deleted, or rotated
        away to a name no pattern matches: it will not be followed again)."""
        runs = self.reader.finish()
        self.committed = -1
        self.closing = True
        self._submit(runs)
        _log.info("tail_file_closed", path=self.path, offset=self.offset, deleted=self.deleted)
