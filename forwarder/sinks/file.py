"""The embedded default destination: every record as one NDJSON line (every field) in a local file.

Used when no destination secret is present (``FORWARDER_FILE_SINK=auto``), or beside others with
``FORWARDER_FILE_SINK=on``. The file is ``<state dir>/records.ndjson``; the path is printed at start.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final

import orjson
import trio

from forwarder.record import Record
from forwarder.sinks._protocol import OK, Batch, Encoded, Verdict, retry

FILE_NAME: Final = "records.ndjson"
MAX_BATCH_BYTES: Final = 4 * 1024 * 1024
"""Bytes per write: large enough to amortise the syscall, small enough to bound memory."""


def encode_records(records: Sequence[Record]) -> list[bytes]:
    """Each record as one NDJSON line (``Record.to_dict`` shape, ``\\n``-terminated)."""
    dumps = orjson.dumps
    newline = orjson.OPT_APPEND_NEWLINE
    return [dumps(r.to_dict(), option=newline) for r in records]


class FileSink:
    """Appends NDJSON lines to ``path``; the parent directory is created on the first send."""

    name = "file"
    ordered = True
    """Batches are appended one at a time, in order: the file keeps the order of the records."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def encode(self, records: Sequence[Record]) -> Encoded:
        """Batches of at most :data:`MAX_BATCH_BYTES`; payload is the bytes to append."""
        lines = encode_records(records)
        batches: list[Batch] = []
        start = 0
        size = 0
        for i, line in enumerate(lines):
            if size and size + len(line) > MAX_BATCH_BYTES:
                batches.append(Batch(records[start:i], b"".join(lines[start:i]), size))
                start, size = i, 0
            size += len(line)
        if start < len(lines):
            batches.append(Batch(records[start:], b"".join(lines[start:]), size))
        return Encoded(batches)

    async def send(self, batch: Batch) -> Verdict:
        """Append the batch; a failing disk is a ``RETRY`` (the data stays in the buffer)."""
        try:
            await trio.to_thread.run_sync(self._write, batch.payload)
        except OSError as exc:
            return retry("io_error", detail=f"{type(exc).__name__}: {exc.strerror}")
        return OK

    def _write(self, payload: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as fh:
            fh.write(payload)

    async def aclose(self) -> None:
        """Nothing to release: each send opens and closes the file."""
