"""structlog setup for the forwarder's own diagnostics: one JSON object per line on stderr, ``"logger":
"forwarder"``, never fed back into the pipeline, every configured secret value replaced by ``[REDACTED]``."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any, Final, TextIO

import orjson
import structlog

LOGGER_NAME: Final = "forwarder"
REDACTED: Final = "[REDACTED]"

_secrets: list[str] = []


def set_secrets(values: Iterable[str]) -> None:
    """Declare the secret values to scrub from every diagnostic line (values shorter than 4 are ignored)."""
    _secrets[:] = sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def scrub(text: str) -> str:
    """``text`` with every declared secret value replaced by ``[REDACTED]``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _render(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> str:
    event_dict.setdefault("logger", LOGGER_NAME)
    try:
        text = orjson.dumps(event_dict, default=str).decode()
    except orjson.JSONEncodeError:
        # A value orjson refuses: a str with lone surrogates (a file name or an environment value that is not UTF-8,
        # which Python decodes with ``surrogateescape``) or an int beyond 64 bits. The stdlib encodes it; each lone
        # surrogate becomes a ``\\udcff`` escape (still one valid JSON line) and every other character stays as it
        # is, so that ``scrub`` still finds a secret value with non-ASCII characters.
        text = json.dumps(event_dict, default=str, ensure_ascii=False, separators=(",", ":"))
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return scrub(text)


class LineLogger:
    """The structlog logger: writes each rendered line to ``stream`` under a lock (worker threads log too), and
    never raises. A diagnostics stream that fails (a pipe whose reader went away, journald restarting under a
    systemd service, a full disk behind a redirect) must not stop the forwarder: the line is dropped and counted
    in :attr:`dropped`. ``None`` (Python's ``sys.stderr`` when the process started with descriptor 2 closed) drops
    every line.

    A stream with a file descriptor is written with ``os.write``, UTF-8, bypassing Python's buffer: a write that
    failed there would stay buffered and fail again when the interpreter flushes at exit, which turns the agent's
    exit status into 120.
    """

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self._fd = _fileno(stream)
        self._lock = threading.Lock()
        self.dropped = 0

    def msg(self, message: str) -> None:
        """Write ``message`` and a newline."""
        with self._lock:
            try:
                if self._fd is not None:
                    _write_all(self._fd, (message + "\n").encode("utf-8", "backslashreplace"))
                elif self._stream is not None:
                    self._stream.write(message + "\n")
                    self._stream.flush()
                else:
                    self.dropped += 1
            except (OSError, ValueError):  # ValueError: the stream was closed
                self.dropped += 1

    debug = info = warning = warn = error = critical = exception = fatal = failure = err = log = msg


def _fileno(stream: TextIO | None) -> int | None:
    """``stream``'s file descriptor (after flushing what it holds), or ``None`` (no stream, or not a file)."""
    if stream is None:
        return None
    try:
        fd = stream.fileno()
        stream.flush()
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError and a ValueError
        return None
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def configure(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route structlog to ``stream`` (default stderr) as JSON lines at ``level`` (a :mod:`logging` level name),
    through one :class:`LineLogger`."""
    logger = LineLogger(stream if stream is not None else sys.stderr)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_args: logger,
        cache_logger_on_first_use=False,
    )
