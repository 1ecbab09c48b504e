"""structlog setup for the forwarder's own diagnostics: one JSON object per line on stderr, ``"logger":
"forwarder"``, never fed back into the pipeline, every configured secret value replaced by ``[REDACTED]``."""

from __future__ import annotations

import json
import logging
import sys
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


def configure(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route structlog to ``stream`` (default stderr) as JSON lines at ``level`` (a :mod:`logging` level name)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
