"""The durable spool: the :class:`~forwarder.delivery.buffer.Buffer` protocol on disk (``FORWARDER_BUFFER=disk``).

Storage, in the spool directory: an index in SQLite, ``spool.sqlite3`` (stdlib :mod:`sqlite3`, WAL journal), and one
file per chunk holding its data, ``chunks/<id>.chunk`` (as Fluent Bit's and Vector's disk buffers do)::

    chunks(id INTEGER PRIMARY KEY AUTOINCREMENT, created, n_records, bytes, data BLOB)   -- append-only log
    cursors(destination PRIMARY KEY, acked_id)     -- last chunk each destination acknowledged
    checkpoints(key PRIMARY KEY, value)            -- source positions (tailed files), stored with their records
                                                   -- (a value of CHECKPOINT_REMOVED deletes its row instead)

A row's ``data`` is empty when the chunk's data is in its file (every chunk written by this version); a spool
written by an earlier version keeps its data in the row, which is read as it is. Chunk data in files rather than in
SQLite pages costs one ``write``, one ``read`` and one ``unlink`` per chunk instead of writing every 4 KiB page to the
WAL, copying it into the database at the checkpoint, reading the page chain back, and overwriting it with zeros at
the delete (Debian's SQLite is built with ``SECURE_DELETE``): about 0.1 us of CPU per record for write + read +
delete, serialisation aside, instead of about 0.85 (``bench/bench_spool.py --parts``). A chunk acknowledged within
seconds is usually deleted before the kernel writes it to the disk at all.

Appended records are staged in memory and *sealed* into chunks (ids given, handed to the destinations) as soon as
``chunk_max_bytes`` of them are staged, or ``flush_interval_s`` after the first of them was appended (or captured,
when the shaper held it: :func:`_waited_s`), whichever comes first (:meth:`Spool.append`, :meth:`Spool.run`).
Persistence is *write-behind*: a sealed chunk is persisted by :meth:`Spool.run` in the background at its deadline
(the same ``flush_interval_s`` after its first record was appended or captured), or at once when more than
:data:`UNWRITTEN_MAX_CHUNKS` wait. A chunk is serialised once (:func:`encode_chunk`: orjson, column by column, the
:class:`~forwarder.record.Tags` once per chunk, level as int), compressed (zlib format, by ISA-L) when that pays
(see :data:`COMPRESS_ABOVE_FRACTION`), written to its file, and its row inserted in one transaction. A chunk that
every destination acknowledges before its deadline is never serialised nor written: its checkpoints are committed
with the acknowledgement that completes it, in the transaction that moves the cursor, which leaves the database
exactly as writing it and then deleting it would have (the usual case when destinations keep up: the spool then
costs a transaction per chunk, not the serialisation and the I/O). The chunks of one seal (staged records larger
than a chunk are cut into several, and the staged checkpoints ride on the last) are persisted or skipped together:
when every destination has acknowledged the first of them, the rest are written at once, with the seal's checkpoints
and the cursor, in one transaction. So a record is never acknowledged while the checkpoint covering it can only
become durable later; as without write-behind, a crash makes the source read again only what was in flight. Either
way, every appended record is on disk or acknowledged by every destination within ``flush_interval_s`` of its
append, the window a crash can lose, as before write-behind.

Invariants:

1. Order: chunk ids strictly increase (across restarts too: ``AUTOINCREMENT`` never reuses an id); every
   destination receives chunks in id order, and the records of a chunk in the order they were appended.
2. At-least-once: a destination's cursor moves only when it acknowledges a chunk (or when the chunk is discarded
   because the spool is full, which is counted); after a crash or restart each destination resumes after its
   persisted cursor, so a chunk that was not acknowledged is delivered again (duplicates are limited to the chunks
   that were in flight: handed out, not yet acknowledged; and, for a source that can read again, to chunks some
   destination acknowledged but another had not, within ``flush_interval_s`` before the crash).
3. Chunks are handed out when sealed, before they are persisted (write-behind). Chunks are persisted, or found
   acknowledged by every destination (never written), strictly in id order, so every chunk on disk is older than
   every unwritten one; a new destination starts at the last persisted chunk (:meth:`Spool.register` runs at
   startup, before any append). A cursor persisted past a chunk that was never written refers to nothing: after a
   crash, the records of such a chunk that were not acknowledged by every destination come back from the source
   (their checkpoint was not committed) under new, higher ids.
4. A chunk is deleted only once every registered destination has acknowledged it, or when the spool is full.
5. A checkpoint is never ahead of persisted or delivered data: checkpoints passed to :meth:`Spool.append` are
   committed in the same transaction as the chunk that holds those records (or a later one), or, for chunks every
   destination acknowledged before they were written, in the transaction of the acknowledgement that completed
   them; never before. All these commits happen under one lock, in chunk order.
6. Bounded: the stored bytes (chunk data bytes plus :data:`CHUNK_ROW_OVERHEAD_BYTES` per chunk) stay within
   ``max_bytes`` (itself clamped to the free disk minus a margin at open), except that the newest chunk is always
   kept. When a flush would exceed it, the oldest chunks are deleted first (their own transaction, then their
   files, so that the space is free before the new files are written) and every destination that had not been
   handed them counts them as dropped (``spool_full``). Memory is bounded too: sealed chunks wait to be written
   in at most :data:`UNWRITTEN_MAX_CHUNKS` (plus :data:`STAGED_MAX_CHUNKS` before an append waits for the disk)
   x ``chunk_max_bytes``, and count towards the cache's bound; a cache keeps the newest
   chunks (at most :data:`CACHE_CHUNKS` x ``chunk_max_bytes``, and only for destinations that are reading: one
   busy with a chunk for :data:`STALLED_AFTER_S` or more, e.g. down and retrying, pins nothing) so that
   destinations that keep up never read the disk; a destination that lags reads one chunk at a time from disk,
   and a chunk read back is shared with the other lagging destinations (at most :data:`SHARED_LOADS_CHUNKS` x
   ``chunk_max_bytes``, only while a destination still reading has not had it).
7. Crash safety: every change to the index, the cursors and the checkpoints is one SQLite transaction; a chunk's
   file is complete before the transaction inserting its row commits, and is deleted only after the transaction
   deleting its row committed. A SIGKILL at any point therefore leaves a consistent spool: the WAL replays or
   discards the last transaction, every row has its complete file, and a file without a row (cut short by the
   crash, or whose row was just deleted) is deleted at the next open. The file is written in place, without a
   temporary name and a rename: no row refers to it before it is complete, so a rename would add nothing. A clean
   :meth:`Spool.aclose` persists everything staged.

Durability choice: ``PRAGMA synchronous=NORMAL`` in WAL mode, and chunk files are not fsynced. A commit is then
written to the WAL without an fsync (the WAL is synced at each checkpoint), so a *process* crash (SIGKILL, OOM kill)
loses nothing committed, and the database is never corrupted; only a power loss or kernel crash may lose the last
commits since the last WAL checkpoint, and what is lost is a suffix of transactions (cursors never refer to lost
chunks; they roll back together). A chunk whose row survived a power loss but whose file had not reached the disk
reads back as unreadable and is counted as dropped (``spool_error``): nothing is lost silently. ``FULL`` and an
fsync per file would cost a disk flush for every chunk and every acknowledgement, which a log sidecar does not
justify.

Discarded chunk that a destination holds in flight (handed out by :meth:`Spool.next_chunk`, not yet acknowledged):
its records are in that destination's memory and it may still deliver them, so it is *not* counted as dropped when
the chunk is discarded. If the destination acknowledges it, it was delivered (or the runner counted its drops);
if the spool is closed before that, it is counted as ``spool_full`` then. Nothing is counted twice or lost silently.

Destinations: :meth:`Spool.register` keeps the cursors of known destinations, starts a new destination at the
current end (it receives what is appended from then on, not the backlog), and releases the cursor of a destination
no longer listed (its undelivered records are counted as dropped with reason ``destination_removed``); chunks no
remaining destination needs are deleted at once. Sources that can wait (tailed files) follow the destinations that
keep up with :meth:`Spool.wait_for_readers` (:class:`~forwarder.delivery.buffer.ReadPacer`).

Threads: SQLite and the chunk files are used from worker threads (:func:`trio.to_thread.run_sync`), except in
:meth:`Spool.open` and :meth:`Spool.register`, which run once at startup on the caller's thread: one writer
connection and one reader connection, each used under its own lock (``check_same_thread=False``); WAL lets a reader
run beside the writer. Serialisation, compression and decompression run in the worker thread too (ISA-L releases
the GIL); the event loop only moves lists. A second process opening the same directory is refused (an exclusive
``flock`` on ``spool.lock``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import sqlite3
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import accumulate, repeat
from operator import add, attrgetter
from pathlib import Path
from typing import Final, cast

import orjson
import structlog
import trio
from isal import isal_zlib

from forwarder.delivery.buffer import (
    CHECKPOINT_REMOVED,
    MAX_READ_LAG_CHUNKS,
    RECORD_OVERHEAD_BYTES,
    SPOOL_FULL,
    STALLED_AFTER_S,
    Chunk,
    DropCallback,
    ReadPacer,
    apply_checkpoints,
    records_size,
)
from forwarder.record import Level, Record, Tags

_log = structlog.get_logger("forwarder")

SPOOL_FILE: Final = "spool.sqlite3"
LOCK_FILE: Final = "spool.lock"
CHUNKS_DIR: Final = "chunks"
"""Sub-directory of the spool directory holding one ``<id>.chunk`` file per chunk (its :func:`encode_chunk` blob)."""
CHUNK_SUFFIX: Final = ".chunk"
DEFAULT_FLUSH_INTERVAL_S: Final = 0.2
"""Staged records are persisted at most this long after the first of them was appended, seconds."""
DEFAULT_CHUNK_MAX_BYTES: Final = 512 * 1024
"""A chunk is cut once its records reach this size (:func:`~forwarder.delivery.buffer.records_size`, bytes; see
:data:`SPLIT_TAIL_FRACTION`). 512 KiB rather than 1 MiB: between the source and the acknowledgement the pipeline
holds about four chunks (the read lag the sources are paced to, one being encoded, one being sent), so with 1 MiB
chunks at ~170,000 lines/s a chunk was acknowledged ~200-250 ms after its first record, past its write-behind
deadline, and was written; at 512 KiB nearly every chunk is acknowledged first and never written
(``bench/run_all.py --only a``: 207 of 211)."""
DEFAULT_COMPRESS_LEVEL: Final = 1
"""Compression level for chunk data (0 = always stored uncompressed; ISA-L levels go up to 3, higher levels are
taken as 3). Level 1 shrinks typical agent logs ~5-7x for ~0.25 us of CPU per record to compress and ~0.2 us to
decompress (``bench/bench_spool.py``; stdlib zlib took ~0.8 and ~0.45); it is used only when the stored bytes
matter (:data:`COMPRESS_ABOVE_FRACTION`)."""
COMPRESS_ABOVE_FRACTION: Final = 0.25
"""Chunks are compressed when the spool would then hold more than this fraction of ``max_bytes``, or when a
destination is stalled (busy with one chunk for :data:`STALLED_AFTER_S`, e.g. down and retrying): then the backlog
is what the bound must hold, and compression keeps ~5-7x more of it. Otherwise (destinations keep up, or a burst
is read back within seconds) the chunk is short-lived and stored as it is: with chunk files the smaller file saves
almost nothing (~0.05 us per record), while compressing and decompressing would cost ~0.45 us per record. The bound
is enforced on the bytes actually stored either way."""
CHUNK_ROW_OVERHEAD_BYTES: Final = 64
"""Counted per chunk on top of its data bytes (row, index and file overhead), so tiny chunks also fill the bound."""
SPLIT_TAIL_FRACTION: Final = 1.0
"""When staged records are cut into chunks, a tail shorter than this fraction of ``chunk_max_bytes`` joins the
chunk before it rather than making a small chunk of its own: a chunk holds ``chunk_max_bytes`` up to twice that,
so that an append (the pipeline's, ~1 MiB of input) makes one chunk, not a full one and a small remainder (each
chunk costs an acknowledgement, a transaction and a destination request of its own)."""
UNWRITTEN_MAX_CHUNKS: Final = 12
"""Sealed chunks wait in memory for their deadline (write-behind) up to this many ``chunk_max_bytes``; beyond it
:meth:`Spool.run` writes the oldest at once. 12 (6 MiB): a tailed block makes one chunk of ~1.8 x
``chunk_max_bytes``, and a destination that keeps up is about five chunks behind the newest (read lag, one being
encoded, one being sent); with 8, bench (a) wrote two chunks in three instead of skipping nearly all. They count
towards the cache's bound (:data:`CACHE_CHUNKS`, as large): the cache gives way first."""
STAGED_MAX_CHUNKS: Final = 2
"""While :meth:`Spool.run` is running, full chunks are written in the background and :meth:`Spool.append` returns at
once; it waits for the disk only when more than :data:`UNWRITTEN_MAX_CHUNKS` plus this many ``chunk_max_bytes``
wait to be written (memory bound). Without a running :meth:`Spool.run`, ``append`` writes each full chunk itself."""
CACHE_CHUNKS: Final = UNWRITTEN_MAX_CHUNKS
"""Newest chunks kept in memory after they were written, with the unwritten ones (:data:`UNWRITTEN_MAX_CHUNKS`), in
units of ``chunk_max_bytes`` (record bytes; the Python
objects take ~3-4x that); destinations that keep up, or lag by less than this, read them without touching the
disk. A burst larger than this is read back from disk (~0.5-1 us of CPU per record, depending on the garbage
collector's load: reading the file, orjson, building the records). As many as may wait unwritten, so the most
record bytes the spool holds in memory is the same whether they were written yet or not: with 4 (2 MiB), the
slower of four destinations in bench (b) read a written chunk back from disk that the faster ones had just read
from memory; with 12, (b) used ~4% less CPU for the same peak RSS."""
SHARED_LOADS_CHUNKS: Final = 2
"""A chunk read back from disk by one destination is kept (decoded) for the others that have not read it yet, in
at most this many ``chunk_max_bytes``: with several destinations behind the cache (a burst, or after an outage),
each chunk is read and decoded once rather than once per destination. Only used with two or more destinations."""
DISK_MARGIN_MIN_BYTES: Final = 100 * 1024 * 1024
DISK_MARGIN_FRACTION: Final = 0.05
"""``max_bytes`` is clamped at open to the spool's current size plus the free disk space minus a margin of
``max(DISK_MARGIN_MIN_BYTES, DISK_MARGIN_FRACTION x disk size)``, so the spool never fills the disk."""
MIN_CHUNKS_BOUND: Final = 4
"""The clamp never takes the bound below this many ``chunk_max_bytes`` (nor above the requested bound)."""
JOURNAL_SIZE_LIMIT_BYTES: Final = 32 * 1024 * 1024
"""The WAL file is truncated to this size after a checkpoint (it otherwise keeps its largest size)."""
BUSY_TIMEOUT_MS: Final = 5000
"""How long a connection waits for a lock held by another connection (e.g. an operator's sqlite3 shell), ms."""

DESTINATION_REMOVED: Final = "destination_removed"
"""Drop reason for records pending for a destination that is no longer configured (its cursor is released)."""
SPOOL_ERROR: Final = "spool_error"
"""Drop reason for records the spool could not write (I/O error) or read back (unreadable or missing chunk)."""

FORMAT_VERSION: Final = 1
_CODEC_ZLIB: Final = 0x01
_CODEC_STDJSON: Final = 0x02
_SQLITE_FULL: Final = 13
_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
_LEVELS: Final[dict[int, Level]] = {int(level): level for level in Level}

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created INTEGER NOT NULL,
    n_records INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (destination TEXT PRIMARY KEY, acked_id INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


class SpoolLockedError(RuntimeError):
    """Another process already has this spool directory open."""


# --- serialisation -------------------------------------------------------------------------------------------


def encode_chunk(records: Sequence[Record], compress_level: int = DEFAULT_COMPRESS_LEVEL) -> bytes:
    """Serialise ``records`` to one blob: a codec byte, then (zlib-format compressed) JSON, column by column::

        [version, tags, tag_index, timestamps_ns, messages, streams, levels, attributes, event_times_ns]

    ``tags`` lists each distinct ``[host, source, service]`` once; ``tag_index`` is ``0`` when every record has the
    first tags, else one index per record; each other column has one value per record (``level`` as its int,
    ``null`` for none). Columns rather than rows: a handful of lists instead of one tuple per record, so encoding
    allocates almost nothing the garbage collector tracks. orjson is used; a chunk orjson refuses (an integer beyond
    64 bits, a lone surrogate, a non-string key) falls back to the stdlib encoder (values it cannot encode are
    stored as their ``str()``), flagged in the codec byte. ``compress_level`` > 0 compresses with ISA-L (zlib
    format, levels above 3 taken as 3).
    """
    head, data = _encode(records, compress_level)
    return head + data


_timestamp_ns: Final = attrgetter("timestamp_ns")
_message: Final = attrgetter("message")
_stream: Final = attrgetter("stream")
_level: Final = attrgetter("level")
_attributes: Final = attrgetter("attributes")
_event_time_ns: Final = attrgetter("event_time_ns")


def _encode(records: Sequence[Record], compress_level: int) -> tuple[bytes, bytes]:
    """:func:`encode_chunk` as (codec byte, data), written to a file with one ``writev`` without joining them."""
    tag_objects = [r.tags for r in records]
    first = tag_objects[0] if tag_objects else None
    tags: list[tuple[str, str, str]] = []
    tag_index: int | list[int] = 0
    if first is not None:
        tags.append((first.host, first.source, first.service))
        if tag_objects.count(first) != len(tag_objects):  # list.count compares by identity first: one C loop
            seen: dict[int, int] = {id(first): 0}
            indexes = []
            for t in tag_objects:
                k = seen.get(id(t))
                if k is None:
                    k = seen[id(t)] = len(tags)
                    tags.append((t.host, t.source, t.service))
                indexes.append(k)
            tag_index = indexes
    payload = (
        FORMAT_VERSION,
        tags,
        tag_index,
        list(map(_timestamp_ns, records)),
        list(map(_message, records)),
        list(map(_stream, records)),
        list(map(_level, records)),
        list(map(_attributes, records)),
        list(map(_event_time_ns, records)),
    )
    codec = 0
    try:
        data = orjson.dumps(payload, default=str)
    except (orjson.JSONEncodeError, TypeError):
        codec |= _CODEC_STDJSON
        data = json.dumps(payload, default=str, skipkeys=True).encode("ascii")
    if compress_level > 0:
        codec |= _CODEC_ZLIB
        data = isal_zlib.compress(data, min(compress_level, isal_zlib.ISAL_BEST_COMPRESSION))
    return bytes((codec,)), data


def decode_chunk(blob: bytes) -> list[Record]:
    """The records of a blob made by :func:`encode_chunk`.

    Raises:
        ValueError, TypeError, KeyError, IndexError, zlib/ISA-L error: the blob is not a chunk this version can
            read (:data:`_DECODE_ERRORS`).
    """
    return _decode(blob)[0]


def _decode(blob: bytes) -> tuple[list[Record], int]:
    """:func:`decode_chunk`, and the records' :func:`~forwarder.delivery.buffer.records_size` (from the messages
    column, without a second pass over the records)."""
    codec = blob[0]
    data = memoryview(blob)[1:]
    if codec & _CODEC_ZLIB:
        data = memoryview(isal_zlib.decompress(data))
    payload = json.loads(bytes(data)) if codec & _CODEC_STDJSON else orjson.loads(data)
    if payload[0] != FORMAT_VERSION:
        raise ValueError(f"unknown spool chunk format {payload[0]!r}")
    _, tag_rows, tag_index, stamps, messages, streams, level_ints, attributes, event_times = payload
    if not stamps:
        return [], 0
    tags = [Tags(*t) for t in tag_rows]
    levels = _LEVELS
    lv = [levels[x] if x is not None else None for x in level_ints]
    tg = [tags[0]] * len(stamps) if isinstance(tag_index, int) else [tags[k] for k in tag_index]
    columns = (stamps, messages, streams, tg, lv, attributes, event_times)
    if len({len(c) for c in columns}) != 1:
        raise ValueError("spool chunk columns differ in length")
    return list(map(Record, *columns)), sum(map(len, messages)) + RECORD_OVERHEAD_BYTES * len(stamps)


_ISAL_ERROR: Final = cast("type[Exception]", isal_zlib.error)  # its stub declares an instance
_DECODE_ERRORS: Final = (ValueError, TypeError, KeyError, IndexError, _ISAL_ERROR)


def effective_max_bytes(requested: int, *, stored: int, free: int, total: int, floor: int) -> int:
    """The spool's byte bound: ``requested``, but at most ``stored + free - margin`` (margin
    ``max(DISK_MARGIN_MIN_BYTES, DISK_MARGIN_FRACTION * total)``), and never below ``min(requested, floor)``.

    Args:
        requested: ``FORWARDER_SPOOL_MAX_BYTES``, bytes.
        stored: bytes the spool already holds (they are on the disk, not in ``free``).
        free: free bytes on the spool's file system (for an unprivileged user).
        total: size of that file system, bytes.
        floor: the smallest useful bound, bytes (a few chunks).
    """
    margin = max(DISK_MARGIN_MIN_BYTES, int(total * DISK_MARGIN_FRACTION))
    return max(min(requested, stored + free - margin), min(requested, floor))


def read_stored_chunks(directory: Path) -> list[tuple[int, int, bytes]]:
    """Every chunk stored in the spool ``directory``, in id order, as ``(id, stored data bytes, blob)`` (the blob as
    made by :func:`encode_chunk`; read it with :func:`decode_chunk`): for tests and inspection, with its own
    SQLite connection (the spool may be open in another process: WAL readers see the last commit).

    Raises:
        FileNotFoundError: a chunk's file is missing.
        sqlite3.Error: the database cannot be read.
    """
    conn = sqlite3.connect(directory / SPOOL_FILE)
    try:
        rows = conn.execute("SELECT id, bytes, data FROM chunks ORDER BY id").fetchall()
    finally:
        conn.close()
    folder = directory / CHUNKS_DIR
    return [(cid, size, data or (folder / f"{cid}{CHUNK_SUFFIX}").read_bytes()) for cid, size, data in rows]


# --- the store: SQLite index + chunk files (synchronous, called from worker threads) ---------------------------


@dataclass(slots=True)
class _WriteResult:
    written: list[tuple[int, int]]
    """(chunk id, records) of the chunks inserted."""
    evicted: list[tuple[int, int]]
    """(chunk id, records) of the chunks deleted to stay within the bound, oldest first."""
    error: sqlite3.Error | OSError | None = None
    """Why the write failed (nothing of it was persisted; ``evicted`` still lists the chunks deleted before)."""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
    return conn


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already done so (it does on SQLITE_FULL, for one)."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _is_full(exc: BaseException) -> bool:
    """The error says the disk (or the database's size limit) is full."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS


def _put_checkpoints(conn: sqlite3.Connection, checkpoints: Mapping[str, str]) -> None:
    """Store ``checkpoints`` (inside a transaction): upsert each, delete those set to ``CHECKPOINT_REMOVED``."""
    conn.executemany(
        "INSERT INTO checkpoints (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [(k, v) for k, v in checkpoints.items() if v != CHECKPOINT_REMOVED],
    )
    conn.executemany(
        "DELETE FROM checkpoints WHERE key = ?", [(k,) for k, v in checkpoints.items() if v == CHECKPOINT_REMOVED]
    )


def _write_file(path: Path, head: bytes, data: bytes) -> None:
    """Write ``head + data`` to a new file at ``path`` (replacing an orphan of the same name), in one ``writev``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        written = os.writev(fd, (head, data))
        if written < len(head) + len(data):  # a short write (interrupted): write the rest
            rest = memoryview(head + data)[written:]
            while rest:
                rest = rest[os.write(fd, rest) :]
    finally:
        os.close(fd)


class _Store:
    """The index (SQLite) and the chunk files: thread-safe (a lock per connection; files are written and deleted
    under the writer lock); the byte/chunk counters change only under the writer lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._dir = path.parent / CHUNKS_DIR
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._dir.mkdir(exist_ok=True)
        self._w = _connect(path)
        try:
            self._w.executescript(_SCHEMA)
            self._r = _connect(path)
        except BaseException:
            self._w.close()
            raise
        count, total, max_id = self._w.execute(
            "SELECT count(*), coalesce(sum(bytes), 0), coalesce(max(id), 0) FROM chunks"
        ).fetchone()
        seq = self._w.execute("SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'chunks'").fetchone()
        cur = self._w.execute("SELECT coalesce(max(acked_id), 0) FROM cursors").fetchone()
        self.stored_chunks: int = count
        self.stored_bytes: int = total + count * CHUNK_ROW_OVERHEAD_BYTES
        self.last_id: int = max(max_id, seq[0], cur[0])
        """Highest chunk id ever persisted."""
        self.evicted_upto = 0
        """Highest chunk id deleted to stay within the bound, this run; set before that delete commits (and reset
        if it fails), so that a reader that missed a chunk can tell that it may have been discarded."""
        self._deleted_floor = 0
        self._remove_orphans()

    def _file(self, cid: int) -> Path:
        return self._dir / f"{cid}{CHUNK_SUFFIX}"

    def _remove_orphans(self) -> None:
        """Delete the chunk files no row refers to: cut short by a crash before their row committed, or left by a
        crash after their row was deleted (see invariant 7)."""
        names = [p.name for p in self._dir.iterdir()]
        if not names:
            return
        ids = {cid for (cid,) in self._w.execute("SELECT id FROM chunks WHERE length(data) = 0")}
        removed = 0
        for name in names:
            stem = name.removesuffix(CHUNK_SUFFIX)
            if stem != name and stem.isdigit() and int(stem) not in ids:
                self._unlink(int(stem))
                removed += 1
        if removed:
            _log.info("spool_orphan_files_removed", files=removed)

    def _unlink(self, cid: int) -> None:
        # missing: a chunk written by an earlier version (data in its row), or already gone
        try:
            self._file(cid).unlink(missing_ok=True)
        except OSError as exc:  # its row is gone: the file is removed at the next start (an orphan)
            _log.warning("spool_unlink_failed", chunk=cid, error=exc.strerror or str(exc))

    def checkpoints(self) -> dict[str, str]:
        with self._wlock:
            return dict(self._w.execute("SELECT key, value FROM checkpoints").fetchall())

    def register(self, destinations: Sequence[str], end: int) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """Keep/insert/delete cursors; returns (acked per destination, pending records per destination, pending
        records of each removed destination)."""
        with self._wlock:
            w = self._w
            w.execute("BEGIN IMMEDIATE")
            try:
                known = dict(w.execute("SELECT destination, acked_id FROM cursors").fetchall())
                removed: dict[str, int] = {}
                for dest, acked in known.items():
                    if dest not in destinations:
                        removed[dest] = self._pending_after(acked)
                        w.execute("DELETE FROM cursors WHERE destination = ?", (dest,))
                acked_by = {d: known.get(d, end) for d in destinations}
                w.executemany(
                    "INSERT OR IGNORE INTO cursors (destination, acked_id) VALUES (?, ?)",
                    [(d, a) for d, a in acked_by.items() if d not in known],
                )
                freed = self._delete_upto(min(acked_by.values(), default=end))
                pending = {d: self._pending_after(a) for d, a in acked_by.items()}
                w.execute("COMMIT")
            except BaseException:
                _rollback(w)
                raise
            self._apply_freed(freed)
            return acked_by, pending, removed

    def _pending_after(self, acked: int) -> int:
        row = self._w.execute("SELECT coalesce(sum(n_records), 0) FROM chunks WHERE id > ?", (acked,)).fetchone()
        return int(row[0])

    def _delete_upto(self, floor: int) -> list[tuple[int, int]]:
        """Delete the rows of the chunks with id <= floor (inside a transaction); returns their (id, bytes)."""
        if floor <= self._deleted_floor:
            return []
        rows: list[tuple[int, int]] = self._w.execute("SELECT id, bytes FROM chunks WHERE id <= ?", (floor,)).fetchall()
        if rows:
            self._w.execute("DELETE FROM chunks WHERE id <= ?", (floor,))
        return rows

    def _apply_freed(self, freed: list[tuple[int, int]]) -> None:
        """After the delete of ``freed`` (id, bytes) committed: count it, and delete the files."""
        self.stored_chunks -= len(freed)
        self.stored_bytes -= sum(size for _, size in freed) + len(freed) * CHUNK_ROW_OVERHEAD_BYTES
        for cid, _ in freed:
            self._unlink(cid)

    def write(
        self,
        chunks: Sequence[Chunk],
        encoded: Sequence[tuple[bytes, bytes]],
        checkpoints: Mapping[str, str],
        max_bytes: int,
        *,
        elided_upto: int = 0,
        cursor: tuple[str, int] | None = None,
    ) -> _WriteResult:
        """Persist ``chunks`` (their files, then their rows and ``checkpoints`` in one transaction), deleting the
        oldest chunks first as needed to stay within ``max_bytes`` (the newest chunk is always kept). ``encoded``
        holds each chunk's :func:`_encode` output, in order: the caller serialises them on the event loop (the
        GIL would serialise the work anyway; in a worker thread it only added hand-offs), this runs in a worker
        thread for the I/O. Every cursor moves to at least ``elided_upto`` (chunks every destination acknowledged
        before they were written) in the same transaction, and ``cursor`` ((destination, chunk id), if given) to at
        least its chunk id. A failure (:class:`sqlite3.Error`, :class:`OSError`) is returned in the result, not
        raised: the chunks deleted before it stay deleted, and the caller must count them."""
        now = time.time_ns()
        sizes = [len(head) + len(data) for head, data in encoded]
        evicted: list[tuple[int, int]] = []
        with self._wlock:
            try:
                excess = self.stored_bytes + sum(sizes) + len(sizes) * CHUNK_ROW_OVERHEAD_BYTES - max_bytes
                if excess > 0:  # make room first, so that the space is free before the new files are written
                    old, freed = self._select_oldest(excess, self.stored_chunks - (0 if chunks else 1))
                    if old:
                        self._evict(old)
                        evicted += old
                        excess -= freed
                skip = 0  # one flush larger than the bound: its oldest chunks are not written; the newest always is
                while excess > 0 and skip < len(chunks) - 1:
                    excess -= sizes[skip] + CHUNK_ROW_OVERHEAD_BYTES
                    skip += 1
                skipped_upto = max(chunks[skip - 1].id if skip else 0, elided_upto)
                self._insert(
                    chunks[skip:],
                    encoded[skip:],
                    sizes[skip:],
                    now=now,
                    checkpoints=checkpoints,
                    skipped_upto=skipped_upto,
                    cursor=cursor,
                )
            except (sqlite3.Error, OSError) as exc:
                return _WriteResult([], evicted, exc)
            kept = chunks[skip:]
            self.stored_chunks += len(kept)
            self.stored_bytes += sum(sizes[skip:]) + len(kept) * CHUNK_ROW_OVERHEAD_BYTES
            self.last_id = max(self.last_id, kept[-1].id if kept else 0, skipped_upto)
            evicted += [(c.id, len(c.records)) for c in chunks[:skip]]
            return _WriteResult([(c.id, len(c.records)) for c in kept], evicted)

    def _insert(
        self,
        chunks: Sequence[Chunk],
        encoded: Sequence[tuple[bytes, bytes]],
        sizes: Sequence[int],
        *,
        now: int,
        checkpoints: Mapping[str, str],
        skipped_upto: int,
        cursor: tuple[str, int] | None,
    ) -> None:
        """Write the chunks' files, then insert their rows and the checkpoints in one transaction (cursors move past
        ``skipped_upto``, the last chunk of this flush that is not written, if any: discarded, or acknowledged by
        every destination first). On failure the files written are deleted again."""
        w = self._w
        written: list[int] = []
        try:
            for chunk, (head, data) in zip(chunks, encoded, strict=True):
                written.append(chunk.id)
                _write_file(self._file(chunk.id), head, data)
            w.execute("BEGIN IMMEDIATE")
            try:
                if skipped_upto:
                    w.execute("UPDATE cursors SET acked_id = max(acked_id, ?)", (skipped_upto,))
                if cursor is not None:
                    w.execute(
                        "UPDATE cursors SET acked_id = max(acked_id, ?) WHERE destination = ?", (cursor[1], cursor[0])
                    )
                w.executemany(
                    "INSERT INTO chunks (id, created, n_records, bytes, data) VALUES (?, ?, ?, ?, x'')",
                    [(c.id, now, len(c.records), size) for c, size in zip(chunks, sizes, strict=True)],
                )
                if checkpoints:
                    _put_checkpoints(w, checkpoints)
                w.execute("COMMIT")
            except BaseException:
                _rollback(w)
                raise
        except BaseException:
            for cid in written:
                self._unlink(cid)
            raise

    def _select_oldest(self, excess: int, limit: int) -> tuple[list[tuple[int, int]], int]:
        """Up to ``limit`` of the oldest chunks whose removal brings ``excess`` bytes to <= 0; returns them as
        (id, records) and the bytes they free."""
        out: list[tuple[int, int]] = []
        freed = 0
        after = 0
        while excess > 0 and len(out) < limit:
            batch = self._w.execute(
                "SELECT id, n_records, bytes FROM chunks WHERE id > ? ORDER BY id LIMIT 512", (after,)
            ).fetchall()
            if not batch:
                break
            for cid, n, size in batch:
                if excess <= 0 or len(out) >= limit:
                    break
                out.append((cid, n))
                excess -= size + CHUNK_ROW_OVERHEAD_BYTES
                freed += size + CHUNK_ROW_OVERHEAD_BYTES
                after = cid
        return out, freed

    def _evict(self, oldest: list[tuple[int, int]]) -> None:
        """Delete the chunks ``oldest`` (the oldest stored ones, (id, records)) in their own transaction, moving
        every cursor past them, then their files."""
        w = self._w
        upto = oldest[-1][0]
        before, self.evicted_upto = self.evicted_upto, max(self.evicted_upto, upto)
        w.execute("BEGIN IMMEDIATE")
        try:
            freed = self._delete_upto(upto)
            w.execute("UPDATE cursors SET acked_id = max(acked_id, ?)", (upto,))
            w.execute("COMMIT")
        except BaseException:
            _rollback(w)
            self.evicted_upto = before
            raise
        self._apply_freed(freed)

    def ack(
        self,
        destination: str,
        acked: int,
        floor: int,
        elided_upto: int = 0,
        checkpoints: Mapping[str, str] | None = None,
    ) -> None:
        """Persist ``destination``'s cursor and delete the chunks every destination acknowledged (id <= floor), in
        one transaction; with ``elided_upto`` (the last of the chunks every destination acknowledged before they
        were written: never written), also commit their ``checkpoints``. The cursor, at least ``elided_upto``, keeps
        their ids from being reused after a restart."""
        with self._wlock:
            w = self._w
            w.execute("BEGIN IMMEDIATE")
            try:
                w.execute("UPDATE cursors SET acked_id = max(acked_id, ?) WHERE destination = ?", (acked, destination))
                if checkpoints:
                    _put_checkpoints(w, checkpoints)
                freed = self._delete_upto(floor)
                w.execute("COMMIT")
            except BaseException:
                _rollback(w)
                raise
            self.last_id = max(self.last_id, elided_upto)
            self._deleted_floor = max(self._deleted_floor, floor)
            self._apply_freed(freed)

    def load_after(self, after: int) -> tuple[int, int, bytes | None] | None:
        """(id, records, blob) of the first chunk with id > ``after``, or ``None``; the blob is ``None`` (logged)
        when the chunk's file is missing (lost in a power loss, or removed by hand) or cannot be read."""
        while True:
            with self._rlock:
                row = self._r.execute(
                    "SELECT id, n_records, data FROM chunks WHERE id > ? ORDER BY id LIMIT 1", (after,)
                ).fetchone()
            if row is None:
                return None
            cid, n, data = row
            if data:  # written by an earlier version: the data is in the row
                return cid, n, data
            try:
                return cid, n, self._file(cid).read_bytes()
            except FileNotFoundError:
                with self._rlock:
                    still = self._r.execute("SELECT 1 FROM chunks WHERE id = ?", (cid,)).fetchone()
                if still is None:
                    continue  # discarded meanwhile (spool full): as if the query had run after that delete
                _log.error("spool_chunk_missing", chunk=cid, records=n)
            except OSError:
                _log.exception("spool_chunk_unreadable", chunk=cid, records=n)
            return cid, n, None

    def close(self) -> None:
        with self._wlock, self._rlock:
            self._r.close()
            self._w.close()


def _lock_directory(directory: Path) -> int:
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolLockedError(f"spool {directory} is in use by another forwarder process") from None
    return fd


def _load_chunk(store: _Store, after: int) -> tuple[Chunk | None, int | None, int]:
    """Load and decode the first chunk after ``after`` (worker thread). Returns (chunk or None, id, records):
    ``(None, id, n)`` for an unreadable or missing chunk, ``(None, None, 0)`` if there is none."""
    row = store.load_after(after)
    if row is None:
        return None, None, 0
    cid, n, blob = row
    if blob is None:
        return None, cid, n
    try:
        records, size = _decode(blob)
    except _DECODE_ERRORS:
        _log.exception("spool_chunk_unreadable", chunk=cid, records=n)
        return None, cid, n
    return Chunk(cid, records, size), cid, n


# --- the Buffer ------------------------------------------------------------------------------------------------


def _waited_s(records: list[Record], limit_s: float) -> float:
    """How long the older of ``records``' first and last record has waited since it was captured (its
    ``timestamp_ns``), in seconds, clamped to ``[0, limit_s]``.

    A record can reach the spool late: the shaper holds a text line until the next line of its stream shows that no
    continuation follows, or until ``FORWARDER_MULTILINE_TIMEOUT`` (so the last line of a burst arrives 0.2 s after
    it was read). Counting the stage's ``flush_interval_s`` from capture rather than from the append keeps the two
    waits from adding up. The clamp keeps a wall clock step (or a record with a made-up time) from doing more than
    sealing at once, or than counting from the append.
    """
    captured_ns = min(records[0].timestamp_ns, records[-1].timestamp_ns)
    return min(max((time.time_ns() - captured_ns) / 1e9, 0.0), limit_s)


@dataclass(slots=True)
class _Sealed:
    """A chunk handed out to destinations and not yet persisted (write-behind, see the module docstring)."""

    chunk: Chunk
    deadline: float
    """When it must be persisted (trio clock, seconds): ``flush_interval_s`` after its first record was appended (or
    captured, see :func:`_waited_s`)."""
    checkpoints: dict[str, str] | None
    """Checkpoints that become durable with this chunk (those appended with its last records)."""
    closes: bool
    """The last chunk of its seal: the one the staged checkpoints ride on. The chunks before it are never skipped
    without it (their records are read again after a crash until its checkpoints are committed)."""


def _merged_checkpoints(taken: Sequence[_Sealed]) -> dict[str, str]:
    """The checkpoints that ride on ``taken`` (in chunk order: a later one wins)."""
    checkpoints: dict[str, str] = {}
    for s in taken:
        if s.checkpoints:
            checkpoints.update(s.checkpoints)
    return checkpoints


class Spool:
    """The durable :class:`~forwarder.delivery.buffer.Buffer` (see the module docstring for its invariants).

    Create it with :meth:`open`. Attributes:
        directory: the spool directory.
        max_bytes: the effective byte bound (the requested one, clamped to the free disk at open).
    """

    def __init__(
        self,
        directory: Path,
        store: _Store,
        lock_fd: int,
        *,
        max_bytes: int,
        on_drop: DropCallback | None,
        flush_interval_s: float,
        chunk_max_bytes: int,
        compress_level: int,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._store = store
        self._lock_fd: int | None = lock_fd
        self._on_drop = on_drop
        self._flush_interval_s = flush_interval_s
        self._chunk_max_bytes = chunk_max_bytes
        self._compress_level = compress_level
        self._cache_max_bytes = CACHE_CHUNKS * chunk_max_bytes

        self._dests: list[str] = []
        self._acked: dict[str, int] = {}
        self._read: dict[str, int] = {}
        self._pending: dict[str, int] = {}
        """Records in sealed chunks (stored or not yet) after the destination's cursor."""
        self._out: dict[str, dict[int, int]] = {}
        """Chunks handed out and not acknowledged (id -> records), per destination."""
        self._lost: dict[str, dict[int, tuple[int, str]]] = {}
        """Chunks discarded (spool full, or a failed write) while handed out to the destination and not yet
        acknowledged: id -> (records, reason)."""
        self._failed: dict[int, int] = {}
        """Sealed chunks whose write failed (id -> records), already counted for the destinations that had not been
        handed them; they skip them when they get there."""

        self._staged: list[Record] = []
        self._staged_bytes = 0
        self._staged_checkpoints: dict[str, str] = {}
        self._staged_since = 0.0
        self._unwritten: dict[int, _Sealed] = {}
        """Sealed chunks not yet persisted, in id order (they are older than nothing on disk)."""
        self._unwritten_bytes = 0
        self._next_id = store.last_id + 1
        self._last_id = store.last_id
        """Highest chunk id sealed (handed out, or to be): persisted, unwritten or elided."""
        self._cache: dict[int, Chunk] = {}
        self._cache_bytes = 0
        self._loaded: dict[int, Chunk] = {}
        """Chunks read back from disk, kept for the other destinations (see :data:`SHARED_LOADS_CHUNKS`)."""
        self._loaded_bytes = 0
        self._loading: dict[int, trio.Event] = {}
        """Disk reads in progress, by the ``after`` they read from: a second destination waits for the first."""
        self._evicted_applied = 0
        """Highest chunk id discarded (spool full) whose discard :meth:`_applied` has counted."""
        self._elided = 0
        """Chunks never written because every destination had acknowledged them first (this run)."""
        self._ack_failing = False
        """The last acknowledgement could not be committed (logged once until one commits: :meth:`_store_ack`)."""
        self._pacer = ReadPacer()
        self._checkpoints = store.checkpoints()

        self._flush_lock = trio.Lock()
        self._changed = trio.Event()
        self._wakeup = trio.Event()
        """Wakes :meth:`run`: records staged, a chunk full, the acknowledged floor passed an unwritten chunk, or
        input closed."""
        self._running = False
        self._input_closed = False
        self._closed = False

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        max_bytes: int,
        on_drop: DropCallback | None = None,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        chunk_max_bytes: int = DEFAULT_CHUNK_MAX_BYTES,
        compress_level: int = DEFAULT_COMPRESS_LEVEL,
    ) -> Spool:
        """Open (creating it if needed) the spool in ``directory``, resuming what a previous run left.

        Args:
            directory: created with its parents if missing; holds ``spool.sqlite3`` (+ ``-wal``, ``-shm``),
                ``chunks/`` and ``spool.lock``.
            max_bytes: bound on stored bytes; clamped to the free disk space (see :func:`effective_max_bytes`).
            on_drop: told ``(destination, records, reason)`` about records discarded before a destination
                delivered them (``spool_full``, ``destination_removed``, ``spool_error``).
            flush_interval_s: appended records are persisted (or acknowledged by every destination) at most this
                long after being appended, seconds.
            chunk_max_bytes: a chunk is cut at this many record bytes (message + 64 per record).
            compress_level: compression level (zlib format, ISA-L levels 1-3) for chunk data when compression pays
                (:data:`COMPRESS_ABOVE_FRACTION`), 0 for never.

        Raises:
            SpoolLockedError: another process has the directory open.
            sqlite3.DatabaseError: the database cannot be opened (e.g. not a database).
            OSError: the directory cannot be created or written.
        """
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock_directory(directory)
        try:
            store = _Store(directory / SPOOL_FILE)
        except BaseException:
            os.close(lock_fd)
            raise
        usage = shutil.disk_usage(directory)
        bound = effective_max_bytes(
            max_bytes,
            stored=store.stored_bytes,
            free=usage.free,
            total=usage.total,
            floor=MIN_CHUNKS_BOUND * chunk_max_bytes,
        )
        if bound < max_bytes:
            _log.warning("spool_max_bytes_clamped", requested=max_bytes, max_bytes=bound, free_disk_bytes=usage.free)
        return cls(
            directory,
            store,
            lock_fd,
            max_bytes=bound,
            on_drop=on_drop,
            flush_interval_s=flush_interval_s,
            chunk_max_bytes=chunk_max_bytes,
            compress_level=compress_level,
        )

    # -- Buffer protocol ----------------------------------------------------------------------------------------

    def register(self, destinations: Sequence[str]) -> None:
        """Declare the enabled destinations. Known ones keep their persisted cursor; new ones start at the last
        persisted chunk (they receive what is appended from now on); the cursors of destinations no longer listed
        are deleted, their pending records counted as dropped (``destination_removed``), and chunks nobody needs
        any more are deleted. Blocks briefly on the database (call it at startup, before the first append)."""
        dests = list(dict.fromkeys(destinations))
        acked, pending, removed = self._store.register(dests, self._last_id)
        for dest, count in removed.items():
            _log.warning("spool_destination_released", destination=dest, records=count)
            if count:
                self._drop(dest, count, DESTINATION_REMOVED)
        self._pacer.register(dests)
        for dest in dests:
            a = max(acked[dest], self._acked.get(dest, 0))
            self._acked[dest] = a
            self._read[dest] = max(a, self._read.get(dest, a))
            self._pending[dest] = pending[dest]
            self._out.setdefault(dest, {})
            self._lost.setdefault(dest, {})
        for dest in [d for d in self._acked if d not in dests]:
            for table in (self._acked, self._read, self._pending, self._out, self._lost):
                table.pop(dest, None)
        self._dests = dests

    async def append(self, records: list[Record], checkpoints: Mapping[str, str] | None = None) -> None:
        """Stage ``records`` and ``checkpoints``; each full chunk (``chunk_max_bytes``) is sealed at once and handed
        to the destinations, the rest within ``flush_interval_s``. Sealed chunks are persisted in the background by
        :meth:`run` (write-behind, see the module docstring), ``checkpoints`` in the same transaction as these
        records, never before. Never waits on a destination; waits for the disk only when more than
        :data:`UNWRITTEN_MAX_CHUNKS` + :data:`STAGED_MAX_CHUNKS` chunks wait to be written (or, when :meth:`run` is
        not running, to write each full chunk itself).

        Raises:
            RuntimeError: after :meth:`close_input`.
        """
        if not records and not checkpoints:
            return
        if self._input_closed:
            raise RuntimeError("append after close_input")
        since = trio.current_time() - (_waited_s(records, self._flush_interval_s) if records else 0.0)
        # A new stage, or records captured before the stage began (the shaper held them): the deadline moves.
        if (not self._staged and not self._staged_checkpoints) or since < self._staged_since:
            self._staged_since = since
            self._wakeup.set()
        if checkpoints:
            self._staged_checkpoints.update(checkpoints)
        if records:
            self._staged.extend(records)
            self._staged_bytes += records_size(records)
            if self._staged_bytes >= self._chunk_max_bytes:
                self._seal()
                if not self._running:
                    await self.flush()
                elif self._unwritten_bytes > (UNWRITTEN_MAX_CHUNKS + STAGED_MAX_CHUNKS) * self._chunk_max_bytes:
                    await self._persist(everything=True)  # the disk does not keep up: wait for it
                else:
                    self._wakeup.set()

    def load_checkpoints(self) -> dict[str, str]:
        """The checkpoints persisted so far (with their records)."""
        return dict(self._checkpoints)

    async def run(self) -> None:
        """Seal staged records ``flush_interval_s`` after the first of them was appended (or captured); persist each
        sealed chunk at its deadline, at once when more than :data:`UNWRITTEN_MAX_CHUNKS` wait, or not at all when
        every destination acknowledged it first (then only its checkpoints are committed); returns after
        :meth:`close_input`."""
        self._running = True
        try:
            while not self._input_closed:
                now = trio.current_time()
                wake_at = math.inf
                if self._staged or self._staged_checkpoints:
                    deadline = self._staged_since + self._flush_interval_s
                    if now >= deadline or self._staged_bytes >= self._chunk_max_bytes:
                        self._seal()
                    else:
                        wake_at = deadline
                if self._unwritten:
                    oldest = next(iter(self._unwritten.values()))
                    if (
                        self._acked_unwritten()
                        or oldest.deadline <= now
                        or self._unwritten_bytes > UNWRITTEN_MAX_CHUNKS * self._chunk_max_bytes
                    ):
                        await self._persist(everything=False)
                        continue
                    wake_at = min(wake_at, oldest.deadline)
                with trio.move_on_at(wake_at):
                    await self._wait_wakeup()
        finally:
            self._running = False

    async def _wait_wakeup(self) -> None:
        await self._wakeup.wait()
        self._wakeup = trio.Event()

    async def next_chunk(self, destination: str) -> Chunk | None:
        """The next chunk after the last one handed to ``destination`` (from its cursor after a restart); waits for
        one; ``None`` once the input is closed and every chunk was handed out. Chunks are handed out when sealed,
        before they are persisted; the newest come from memory, older ones are read from disk one at a time.

        Raises:
            KeyError: ``destination`` is not registered.
        """
        self._pacer.taking(destination)
        try:
            return await self._next_chunk(destination)
        finally:
            self._pacer.took(destination)

    async def wait_for_readers(self) -> None:
        """Wait while a destination that is not stalled lags more than
        :data:`~forwarder.delivery.buffer.MAX_READ_LAG_CHUNKS` chunks behind the newest one (staged records count
        as the chunks they will become; see :meth:`~forwarder.delivery.buffer.Buffer.wait_for_readers`); returns at
        once after :meth:`close_input`."""
        await self._pacer.wait_while(self._lagging)

    def _lagging(self) -> bool:
        if self._input_closed:
            return False
        # Staged records count as the chunks they will become.
        newest = self._last_id + -(-self._staged_bytes // self._chunk_max_bytes)
        read = self._read
        return any(newest - read[d] > MAX_READ_LAG_CHUNKS for d in self._pacer.active(self._dests))

    def _in_memory(self, cid: int) -> Chunk | None:
        sealed = self._unwritten.get(cid)
        if sealed is not None:
            return sealed.chunk
        return self._cache.get(cid) or self._loaded.get(cid)

    async def _next_chunk(self, destination: str) -> Chunk | None:
        while True:
            if self._closed:
                return None
            after = self._read[destination]
            if after < self._last_id:
                chunk = self._in_memory(after + 1)
                if chunk is None and after + 1 in self._failed:  # counted when its write failed
                    self._read[destination] = after + 1
                    self._forget_failed()
                    continue
                if chunk is None:
                    loading = self._loading.get(after)
                    if loading is not None:  # another destination is reading this very chunk: share it
                        await loading.wait()
                        continue
                    last = min(self._last_id, min(self._unwritten, default=self._last_id + 1) - 1)
                    self._loading[after] = done = trio.Event()
                    try:
                        chunk, cid, n = await trio.to_thread.run_sync(_load_chunk, self._store, after)
                    finally:
                        del self._loading[after]
                        done.set()
                    if chunk is not None and len(self._dests) > 1:
                        self._share_loaded(chunk)
                    if self._read.get(destination) != after:
                        continue  # chunks were discarded meanwhile (spool full): the cursor moved
                    if cid != after + 1 and self._store.evicted_upto > self._evicted_applied:
                        # Chunks were discarded (spool full) by a write whose result is not applied yet: wait for it
                        # (it holds the flush lock until then), so that they are counted, not skipped.
                        async with self._flush_lock:
                            pass
                        continue
                    if chunk is None:
                        if cid is None:
                            # Nothing on disk after `after` although `last` says so: skip the gap, up to the next
                            # chunk in memory if any (sealed chunks are newer than every stored one).
                            newer = [c for c in (*self._unwritten, *self._cache, *self._failed) if after < c <= last]
                            self._read[destination] = max(after, min(newer, default=last + 1) - 1)
                            continue
                        self._read[destination] = cid
                        self._out[destination][cid] = n
                        self._drop(destination, n, SPOOL_ERROR)
                        continue
                self._read[destination] = chunk.id
                self._out[destination][chunk.id] = len(chunk.records)
                self._prune_cache()
                self._prune_loaded()
                return chunk
            if self._input_closed and not self._staged:
                return None
            await self._changed.wait()

    async def ack(self, destination: str, chunk_id: int) -> None:
        """``destination`` is done with every chunk up to ``chunk_id`` (delivered or deliberately dropped); its
        cursor is persisted and chunks every destination is done with are deleted (or, not yet written, never
        written). A ``chunk_id`` beyond the last chunk handed out is clamped to it.

        Raises:
            KeyError: ``destination`` is not registered.
            RuntimeError: after :meth:`aclose`.
        """
        if self._closed:
            raise RuntimeError("ack after aclose")
        lost = self._lost[destination]
        for cid in [c for c in lost if c <= chunk_id]:
            del lost[cid]
        target = min(chunk_id, self._read[destination])
        if target <= self._acked[destination]:
            return
        out = self._out[destination]
        done = [c for c in out if c <= target]
        self._pending[destination] -= sum(out.pop(c) for c in done)
        self._acked[destination] = target
        if self._acked_unwritten():
            # Every destination now has the oldest unwritten chunks: skip writing them (under the flush lock, which
            # also waits for a write under way, so that their checkpoints are committed in chunk order).
            async with self._flush_lock:
                if self._closed:
                    return  # aclose() got there first: this cursor is not persisted (delivered again, at-least-once)
                if self._acked_unwritten():
                    await self._ack_eliding(destination, target)
                    return
        await self._store_ack(destination, target)

    def _acked_unwritten(self) -> int:
        """How many of the oldest unwritten chunks every destination has acknowledged."""
        floor = self._floor()
        count = 0
        for cid in self._unwritten:
            if cid > floor:
                break
            count += 1
        return count

    @staticmethod
    def _seal_end(sealed: list[_Sealed], count: int) -> int:
        """``count`` (a prefix of ``sealed``) extended to the end of the seal its last chunk belongs to: the chunks
        of one seal are persisted (or skipped) together, in one transaction with the checkpoints that ride on the
        last of them, so that no record is delivered and acknowledged while the checkpoint covering it can only
        become durable later (after a crash, the source would read it again: more than the chunk in flight)."""
        while count and not sealed[count - 1].closes:
            count += 1
        return count

    async def _ack_eliding(self, destination: str, target: int) -> None:
        """:meth:`ack` when every destination has now acknowledged the oldest unwritten chunks (flush lock held):
        they are never written. When they end a seal, their checkpoints are committed in the transaction that moves
        the cursor and deletes what every destination acknowledged; when they end inside one, the rest of that seal
        is written with the seal's checkpoints and the cursor in one transaction (as if the seal had been written
        whole and the chunks deleted). Either way, what a destination acknowledged is never read again from the
        source after a crash."""
        sealed = list(self._unwritten.values())
        elided = self._acked_unwritten()
        due = self._seal_end(sealed, elided)
        if due > elided:
            await self._persist_taken(sealed[:due], elided, cursor=(destination, target))
            # Then delete the stored chunks every destination has acknowledged (the cursor is persisted already).
            await self._store_ack(destination, target)
            return
        taken = sealed[:elided]
        checkpoints = _merged_checkpoints(taken)
        upto = taken[-1].chunk.id
        if not await self._store_ack(destination, target, upto, checkpoints):
            self._wakeup.set()  # they stay unwritten and acknowledged: run() commits them (not writing them) now
            return
        for s in taken:
            del self._unwritten[s.chunk.id]
            self._unwritten_bytes -= s.chunk.size
        self._elided += len(taken)
        apply_checkpoints(self._checkpoints, checkpoints)

    async def _store_ack(
        self, destination: str, target: int, upto: int = 0, checkpoints: Mapping[str, str] | None = None
    ) -> bool:
        """:meth:`_Store.ack` in a worker thread; ``False`` when it failed (disk full, I/O error), which is logged
        once per run of failures, not raised: an acknowledgement must not stop the forwarder. Nothing is lost: the
        cursor only moves forward and the delete takes every chunk up to the floor, so the next acknowledgement that
        commits catches up; until then a restart delivers those chunks again (at-least-once)."""
        try:
            await trio.to_thread.run_sync(self._store.ack, destination, target, self._floor(), upto, checkpoints)
        except (sqlite3.Error, OSError) as exc:
            if not self._ack_failing:
                self._ack_failing = True
                _log.error(
                    "spool_ack_failed", destination=destination, chunk=target, error=f"{type(exc).__name__}: {exc}"
                )
            return False
        if self._ack_failing:
            self._ack_failing = False
            _log.info("spool_ack_recovered", destination=destination, chunk=target)
        return True

    def pending(self, destination: str) -> int:
        """Records appended but not yet acknowledged by ``destination`` (staged ones included); 0 if unknown."""
        if destination not in self._pending:
            return 0
        return self._pending[destination] + len(self._staged)

    def stored_bytes(self) -> int:
        """Bytes of chunk data on disk (compressed), plus :data:`CHUNK_ROW_OVERHEAD_BYTES` per chunk."""
        return self._store.stored_bytes

    def stored_chunks(self) -> int:
        """Chunks on disk."""
        return self._store.stored_chunks

    async def close_input(self) -> None:
        """No more appends: persist what is staged or unwritten; readers get ``None`` after the last chunk."""
        if self._input_closed:
            return
        self._input_closed = True
        self._wakeup.set()
        await self.flush()
        self._wake()

    async def aclose(self) -> None:
        """Persist what is staged or unwritten (shielded from cancellation, so a clean shutdown loses nothing
        appended), count discarded in-flight chunks never acknowledged, close the database and release the
        directory lock. What was not acknowledged stays for the next start."""
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            await self.close_input()
            async with self._flush_lock:
                self._closed = True
            self._wake()
            for dest, lost in self._lost.items():
                by_reason: Counter[str] = Counter()
                for count, reason in lost.values():
                    by_reason[reason] += count
                for reason, count in by_reason.items():
                    if count:
                        self._drop(dest, count, reason)
                lost.clear()
            await trio.to_thread.run_sync(self._store.close)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- beyond the protocol ------------------------------------------------------------------------------------

    def held_bytes(self) -> int:
        """Record bytes (:func:`~forwarder.delivery.buffer.records_size`) held in memory: staged, sealed and not
        yet written, and cached (chunks handed out to destinations are theirs)."""
        return self._staged_bytes + self._unwritten_bytes + self._cache_bytes + self._loaded_bytes

    @property
    def last_chunk_id(self) -> int:
        """Id of the newest chunk sealed (handed out to destinations, persisted or not; 0 if none ever was)."""
        return self._last_id

    @property
    def elided_chunks(self) -> int:
        """Chunks never written because every destination acknowledged them before their deadline (this run)."""
        return self._elided

    async def flush(self) -> None:
        """Seal the staged records and persist every unwritten chunk and checkpoint now (one transaction; chunks
        every destination has acknowledged are not written, only their checkpoints). A write error is logged and
        the records are counted as dropped (``spool_error``, or ``spool_full`` when the disk is full) for every
        destination that had not delivered them; it is not raised."""
        if not self._closed and (self._staged or self._staged_checkpoints):
            self._seal()
        await self._persist(everything=True)

    # -- internals ----------------------------------------------------------------------------------------------

    def _floor(self) -> int:
        """The highest chunk id every destination has acknowledged (0 with no destination)."""
        return min(self._acked.values()) if self._dests else 0

    def _seal(self) -> None:
        """Cut the staged records into chunks (:meth:`_split`), give them ids and hand them to the readers
        (:attr:`_unwritten`); the staged checkpoints go with the last one. A checkpoint-only stage becomes an empty
        chunk."""
        groups = self._split(self._staged, self._staged_bytes)
        checkpoints, self._staged_checkpoints = self._staged_checkpoints or None, {}
        self._staged, self._staged_bytes = [], 0
        deadline = self._staged_since + self._flush_interval_s
        last = len(groups) - 1
        for i, (group, size) in enumerate(groups):
            chunk = Chunk(self._next_id, group, size)
            self._next_id += 1
            self._last_id = chunk.id
            self._unwritten[chunk.id] = _Sealed(chunk, deadline, checkpoints if i == last else None, i == last)
            self._unwritten_bytes += size
            n = len(group)
            for dest in self._dests:
                self._pending[dest] += n
        self._prune_cache()
        self._wake()

    async def _persist(self, *, everything: bool) -> None:
        """Persist the oldest unwritten chunks that are due (past their deadline, or beyond
        :data:`UNWRITTEN_MAX_CHUNKS`; all with ``everything``), to the end of their seal, in one transaction, and
        commit the checkpoints of those every destination has acknowledged without writing them. See :meth:`flush`
        for errors."""
        async with self._flush_lock:
            if self._closed or not self._unwritten:
                return
            now = trio.current_time()
            sealed = list(self._unwritten.values())
            elided = self._acked_unwritten()
            excess = self._unwritten_bytes - UNWRITTEN_MAX_CHUNKS * self._chunk_max_bytes
            due = elided
            for s in sealed[elided:]:
                if not (everything or s.deadline <= now or excess > 0):
                    break
                excess -= s.chunk.size
                due += 1
            due = self._seal_end(sealed, due)
            if due:
                await self._persist_taken(sealed[:due], elided)

    async def _persist_taken(self, taken: list[_Sealed], elided: int, cursor: tuple[str, int] | None = None) -> None:
        """Persist ``taken`` (the oldest unwritten chunks, ending a seal; flush lock held) in one transaction: the
        first ``elided`` (acknowledged by every destination) are not written, the others are; the checkpoints of
        all are committed, and ``cursor`` (destination, chunk id), if given, is moved too."""
        checkpoints = _merged_checkpoints(taken)
        chunks = [s.chunk for s in taken[elided:]]
        elided_upto = taken[elided - 1].chunk.id if elided else 0
        if chunks or checkpoints:
            result, reason = await self._write(chunks, checkpoints, elided_upto, cursor)
        else:
            result, reason = _WriteResult([], []), ""
        for s in taken:
            del self._unwritten[s.chunk.id]
            self._unwritten_bytes -= s.chunk.size
        if result.error is not None:
            self._applied([], {}, result)  # chunks discarded to make room before the failure
            self._discard([(c.id, len(c.records)) for c in chunks], reason)
            # Their positions still hold: the records are counted as dropped, not read again.
            later = next(iter(self._unwritten.values()), None)
            if later is not None:
                later.checkpoints = {**checkpoints, **(later.checkpoints or {})}
            else:
                for key, value in checkpoints.items():
                    self._staged_checkpoints.setdefault(key, value)
        else:
            self._elided += elided
            self._applied(chunks, checkpoints, result)
        self._wake()

    async def _write(
        self,
        chunks: list[Chunk],
        checkpoints: dict[str, str],
        elided_upto: int,
        cursor: tuple[str, int] | None = None,
    ) -> tuple[_WriteResult, str]:
        """Run the write in a worker thread. Returns its result (with every chunk discarded to make room, also by a
        failed attempt) and, when it failed (logged here), the drop reason for its records."""
        store = self._store
        evicted: list[tuple[int, int]] = []
        attempt = 1
        while True:
            level = self._level_for(sum(c.size for c in chunks))
            encoded = [_encode(chunk.records, level) for chunk in chunks]
            write = partial(store.write, elided_upto=elided_upto, cursor=cursor)
            result = await trio.to_thread.run_sync(write, chunks, encoded, checkpoints, self.max_bytes)
            evicted += result.evicted
            result.evicted = evicted
            exc = result.error
            if exc is None:
                return result, ""
            full = _is_full(exc)
            if full and attempt == 1:
                # The disk (or the database's size limit) filled up before our bound did: lower the bound below
                # what is stored and retry once; the retry deletes the oldest chunks (and their files) first.
                self.max_bytes = max(self._chunk_max_bytes, int(store.stored_bytes * 0.9))
                _log.error("spool_disk_full", max_bytes=self.max_bytes, error=str(exc))
                attempt += 1
                continue
            _log.error(
                "spool_write_failed", error=f"{type(exc).__name__}: {exc}", records=sum(len(c.records) for c in chunks)
            )
            return result, SPOOL_FULL if full else SPOOL_ERROR

    def _level_for(self, new_bytes: int) -> int:
        """The compression level for a write of ``new_bytes`` record bytes: the configured one when the spool would
        hold more than :data:`COMPRESS_ABOVE_FRACTION` of its bound or a destination is stalled, else 0."""
        level = self._compress_level
        if level <= 0 or self._store.stored_bytes + new_bytes > self.max_bytes * COMPRESS_ABOVE_FRACTION:
            return level
        stalled = len(self._pacer.active(self._dests)) < len(self._dests)
        return level if stalled else 0

    def _split(self, records: list[Record], total: int) -> list[tuple[list[Record], int]]:
        """Cut ``records`` (``total`` bytes by :func:`records_size`) into runs of about ``chunk_max_bytes``."""
        limit = self._chunk_max_bytes
        if total < limit * (1 + SPLIT_TAIL_FRACTION):  # one run, its tail (if any) shorter than the fraction
            return [(records, total)]
        # Cumulative record bytes (C-level loops), then each cut found by bisection: a run ends at the first record
        # that brings it to ``limit`` bytes or more.
        totals = list(accumulate(map(add, map(len, map(_message, records)), repeat(RECORD_OVERHEAD_BYTES))))
        groups: list[tuple[list[Record], int]] = []
        start = 0
        base = 0
        count = len(records)
        while start < count:
            end = bisect_left(totals, base + limit, lo=start)
            if end >= count:
                groups.append((records[start:], totals[-1] - base))
                break
            if totals[-1] - totals[end] < limit * SPLIT_TAIL_FRACTION:  # a short tail joins this run
                groups.append((records[start:], totals[-1] - base))
                break
            groups.append((records[start : end + 1], totals[end] - base))
            base = totals[end]
            start = end + 1
        return groups

    def _applied(self, chunks: list[Chunk], checkpoints: dict[str, str], result: _WriteResult) -> None:
        """Bring the in-memory state in line with a committed write: its checkpoints, its chunks (cached while a
        destination still reading has not had them), and the chunks it discarded to stay within the bound."""
        apply_checkpoints(self._checkpoints, checkpoints)
        evicted_ids = {cid for cid, _ in result.evicted}
        for chunk in chunks:
            if chunk.id not in evicted_ids:
                self._cache_put(chunk)
        if not result.evicted:
            return
        last = result.evicted[-1][0]
        self._evicted_applied = max(self._evicted_applied, last)
        self._discard(result.evicted, SPOOL_FULL)
        for dest in self._dests:  # every chunk up to the last discarded one is gone: nobody reads them any more
            self._acked[dest] = max(self._acked[dest], last)
            self._read[dest] = max(self._read[dest], last)

    def _discard(self, discarded: list[tuple[int, int]], reason: str) -> None:
        """Account for the chunks ``discarded`` ((id, records), oldest first) for every destination: nothing for one
        that acknowledged them; for one that holds them in flight, counted later unless it acknowledges them
        (:attr:`_lost`); the others count them as dropped now. Chunks that are not the oldest ones left (a failed
        write of sealed chunks) are remembered in :attr:`_failed` for the destinations to skip."""
        drops: Counter[str] = Counter()
        stored_floor = self._evicted_applied
        for cid, n in discarded:
            for cache in (self._cache, self._loaded):
                gone = cache.pop(cid, None)
                if gone is not None:
                    if cache is self._cache:
                        self._cache_bytes -= gone.size
                    else:
                        self._loaded_bytes -= gone.size
            if cid > stored_floor:
                self._failed[cid] = n
            for dest in self._dests:
                if self._acked[dest] >= cid:
                    continue
                self._pending[dest] -= n
                if self._read[dest] >= cid:  # in flight: the destination may still deliver it
                    self._lost[dest][cid] = (self._out[dest].pop(cid, n), reason)
                else:
                    drops[dest] += n
        self._forget_failed()
        for dest, count in drops.items():
            self._drop(dest, count, reason)

    def _forget_failed(self) -> None:
        """Forget the failed chunks every destination has gone past."""
        if self._failed:
            low = min(self._read.values(), default=self._last_id)
            for cid in [c for c in self._failed if c <= low]:
                del self._failed[cid]

    def _cache_put(self, chunk: Chunk) -> None:
        self._cache[chunk.id] = chunk
        self._cache_bytes += chunk.size
        self._prune_cache()

    def _prune_cache(self) -> None:
        """Drop the oldest cached chunks while the cache and the unwritten chunks are over the bound, or while
        every destination still reading has read them (a destination stalled for :data:`STALLED_AFTER_S` keeps
        nothing here)."""
        cache = self._cache
        if not cache:
            return
        read = self._read
        active = self._pacer.active(self._dests)
        while cache:
            oldest = next(iter(cache))
            if self._cache_bytes + self._unwritten_bytes <= self._cache_max_bytes and any(
                read[d] < oldest for d in active
            ):
                return
            self._cache_bytes -= cache.pop(oldest).size

    def _share_loaded(self, chunk: Chunk) -> None:
        """Keep ``chunk`` (just read back from disk) for the other destinations, within the bound."""
        if chunk.id in self._loaded or chunk.id in self._cache:
            return
        self._loaded[chunk.id] = chunk
        self._loaded_bytes += chunk.size
        self._prune_loaded()

    def _prune_loaded(self) -> None:
        """Forget shared chunks every destination still reading has had, then the oldest while over the bound (a
        stalled destination, see :data:`STALLED_AFTER_S`, keeps nothing here)."""
        loaded = self._loaded
        if not loaded:
            return
        read = self._read
        active = self._pacer.active(self._dests)
        bound = SHARED_LOADS_CHUNKS * self._chunk_max_bytes
        for cid in [c for c in loaded if not any(read[d] < c for d in active)]:
            self._loaded_bytes -= loaded.pop(cid).size
        while loaded and self._loaded_bytes > bound:
            self._loaded_bytes -= loaded.pop(next(iter(loaded))).size

    def _drop(self, destination: str, count: int, reason: str) -> None:
        if self._on_drop is not None:
            self._on_drop(destination, count, reason)
        else:
            _log.error("records_dropped", destination=destination, reason=reason, records=count)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


__all__ = [
    "CHUNKS_DIR",
    "CHUNK_ROW_OVERHEAD_BYTES",
    "DEFAULT_CHUNK_MAX_BYTES",
    "DEFAULT_COMPRESS_LEVEL",
    "DEFAULT_FLUSH_INTERVAL_S",
    "DESTINATION_REMOVED",
    "SPOOL_ERROR",
    "SPOOL_FILE",
    "STALLED_AFTER_S",
    "Spool",
    "SpoolLockedError",
    "decode_chunk",
    "effective_max_bytes",
    "encode_chunk",
    "read_stored_chunks",
]
