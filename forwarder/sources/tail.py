"""``forwarder tail [OPTIONS] PATH[=STREAM]...``: follow log files (and ``-``, standard input) and forward their
lines; raw text, CRI (kubelet) or Docker json-file format.

* ``PATH`` is a file or a glob (``*``, ``?``, ``[...]``, ``**``); patterns are expanded again every
  :data:`~forwarder.sources._follow.SCAN_INTERVAL_S` so files created later are picked up. ``-`` is standard input
  (read to its end; ``forwarder tail -`` alone exits at EOF).
* ``=stdout`` / ``=stderr`` after a path sets the stream of its lines (raw format; default ``stdout``). With
  ``--format cri|docker`` every line states its own stream; the suffix then only applies to lines that are not in
  the format (forwarded as they are, never dropped). A path whose name really ends in ``=stdout`` can be given as
  ``PATH=stdout=stdout``.
* ``--read-from head|tail``: where a file that is present at start and has no checkpoint begins (default ``head``:
  the forwarder's promise is that nothing written is lost, so on a first start the existing content is forwarded).
  Files that appear later are always read from their start; files with a checkpoint always resume at it.

Following, rotation, truncation, identity and checkpoints: see :mod:`forwarder.sources._follow`; the container
formats: :mod:`forwarder.sources._container`. The source runs until cancelled (SIGTERM/SIGINT); an unterminated
last line of a file that is still followed is not forwarded at shutdown (it is read whole after the restart).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from forwarder.config import Config, ConfigError
from forwarder.record import STDERR, STDOUT
from forwarder.sources._container import ByteLines, Event, make_decoder
from forwarder.sources._follow import (
    READ_SIZE,
    FileSpec,
    TailConsumer,
    Tailer,
    max_held_bytes,
    runs_of,
    submit_runs,
)
from forwarder.sources.stdin import read_stdin

FORMATS: Final = ("raw", "cri", "docker")
READ_FROM: Final = ("head", "tail")
DEFAULT_READ_FROM: Final = "head"
STDIN: Final = "-"


class TailSource:
    """The ``tail`` source: ``await source(consumer)`` follows the files (and standard input) until cancelled and
    returns 0 (or returns 0 at EOF when standard input is the only path).

    Made by :func:`make_tail_source`; :meth:`checkpoint_lag` reports the files followed so far (for
    ``forwarder_checkpoint_lag_bytes``).
    """

    def __init__(self, run: Callable[[TailConsumer], Awaitable[int]], tailer: Tailer | None) -> None:
        self._run = run
        self._tailer = tailer
        self._consumer: TailConsumer | None = None

    async def __call__(self, consumer: TailConsumer) -> int:
        """Follow until cancelled (see the class); returns the exit status, 0."""
        self._consumer = consumer
        return await self._run(consumer)

    def checkpoint_lag(self) -> dict[str, int]:
        """``path -> bytes`` of each followed file not yet covered by a persisted checkpoint
        (:meth:`Tailer.checkpoint_lag` against the buffer's persisted checkpoints); empty before the source runs
        and for standard input, which has no checkpoint."""
        if self._tailer is None or self._consumer is None:
            return {}
        return self._tailer.checkpoint_lag(self._consumer.buffer.load_checkpoints())


def parse_path_spec(arg: str) -> FileSpec:
    """``PATH[=STREAM]`` -> :class:`FileSpec`. Only a final ``=stdout`` or ``=stderr`` is a stream; any other ``=``
    belongs to the path.

    Raises:
        ConfigError: the path is empty.
    """
    path, sep, suffix = arg.rpartition("=")
    if sep and suffix in (STDOUT, STDERR):
        stream = suffix
    else:
        path, stream = arg, STDOUT
    if not path:
        raise ConfigError("PATH", f"{arg!r} names no file (expected PATH[=stdout|stderr], a glob, or '-')")
    return FileSpec(path, stream)


async def read_stdin_container(
    consumer: TailConsumer, *, fmt: str, stream: str, max_line_bytes: int, fd: int = 0
) -> None:
    """Forward CRI/Docker lines from ``fd`` (default stdin) until EOF; lines not in the format go to ``stream``."""
    decoder = make_decoder(fmt, stream, max_line_bytes)
    lines = ByteLines(0, max_held_bytes(max_line_bytes))
    source = trio.lowlevel.FdStream(os.dup(fd))
    async with source:
        try:
            while True:
                data = await source.receive_some(READ_SIZE)
                if not data:
                    break
                events: list[Event] = []
                lines.feed(data, decoder, events)
                submit_runs(consumer, runs_of(events))
                await consumer.wait_for_room()
        finally:
            events = []
            lines.finish(decoder, events)
            decoder.flush(events)
            submit_runs(consumer, runs_of(events))


def make_tail_source(
    config: Config, paths: Sequence[str], *, fmt: str = "raw", read_from: str | None = None
) -> TailSource:
    """The ``tail`` source for :func:`forwarder.app.serve`: follows ``paths`` until cancelled, returns 0.

    Args:
        config: settings (``max_line_bytes``).
        paths: ``PATH[=STREAM]`` arguments (globs allowed; ``-`` is standard input).
        fmt: ``raw``, ``cri`` or ``docker``.
        read_from: ``head`` or ``tail`` for files present at start with no checkpoint; ``None`` means ``head``.

    Raises:
        ConfigError: an empty path, an unknown format or ``read_from`` value, or ``-`` given twice.
    """
    if fmt not in FORMATS:
        raise ConfigError("--format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    start = read_from or DEFAULT_READ_FROM
    if start not in READ_FROM:
        raise ConfigError("--read-from", f"{start!r} is not one of {', '.join(READ_FROM)}")
    specs = [parse_path_spec(p) for p in paths]
    stdin = [s for s in specs if s.pattern == STDIN]
    if len(stdin) > 1:
        raise ConfigError("PATH", "'-' (standard input) can be given only once")
    files = [s for s in specs if s.pattern != STDIN]
    max_line_bytes = config.max_line_bytes

    async def read_input(consumer: TailConsumer) -> None:
        spec = stdin[0]
        if fmt == "raw" and spec.stream == STDOUT:
            await read_stdin(consumer, max_line_bytes=max_line_bytes)
        elif fmt == "raw":
            await _read_stdin_raw(consumer, spec.stream, max_line_bytes)
        else:
            await read_stdin_container(consumer, fmt=fmt, stream=spec.stream, max_line_bytes=max_line_bytes)

    tailer = Tailer(files, fmt=fmt, read_from=start, max_line_bytes=max_line_bytes) if files else None

    async def source(consumer: TailConsumer) -> int:
        if tailer is None:
            await read_input(consumer)
            return 0
        async with trio.open_nursery() as nursery:
            if stdin:
                nursery.start_soon(read_input, consumer)
            await tailer.run(consumer)
        return 0

    return TailSource(source, tailer)


async def _read_stdin_raw(consumer: TailConsumer, stream: str, max_line_bytes: int) -> None:
    from forwarder.sources._pump import pump

    source = trio.lowlevel.FdStream(os.dup(0))
    async with source:
        await pump(source, stream, consumer, max_line_bytes=max_line_bytes)
