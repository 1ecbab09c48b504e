"""Secret scrubbing of forwarded lines: configured secret values and ``FORWARDER_REDACT`` patterns become
``[REDACTED]`` before shaping, so an agent that logs its environment never ships our keys to a third party.

Scrubbing runs on raw lines (before JSON parsing), so a secret inside any JSON field is caught too. Fast path: one
``in`` test per secret and one ``search`` per pattern on the batch's joined text; lines are rewritten only when one of
them may be present. A pattern whose match may depend on where a line ends (anchors ``^``, ``$``, ``\\A``, ``\\Z``,
lookarounds, atomic groups, possessive repeats) cannot be tested on the joined text: with one, every line is
scrubbed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from forwarder.sources._lines import LinePart

REDACTED: Final = "[REDACTED]"
_LINE_BOUND: Final = re.compile(r"\^|\$|\\[AZ]|\(\?[=!<>]|[*+?}]\+")
"""In a pattern's source: a construct with which a match inside a line alone may fail in the joined text (anchors,
lookarounds, atomic groups and possessive repeats, which see or may swallow what follows the line). Deliberately
broad (``[^x]`` is caught too): such a pattern is simply tested line by line."""
MIN_SECRET_CHARS: Final = 4
"""Shorter values are not scrubbed (they would redact ordinary words)."""


class Redactor:
    """Replaces secret values and pattern matches by ``[REDACTED]``.

    Args:
        secrets: literal values (shorter than :data:`MIN_SECRET_CHARS` ignored).
        patterns: regular expressions (already validated by config).
    """

    def __init__(self, secrets: Iterable[str] = (), patterns: Iterable[str] = ()) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True)
        self._patterns = [re.compile(p) for p in patterns]
        # Patterns that can be tested once on a batch's joined text: whatever they match inside a line they also
        # match there (a match spanning lines only costs a needless line-by-line pass).
        self._joinable = [p for p in self._patterns if _LINE_BOUND.search(p.pattern) is None]
        self._line_only = len(self._joinable) < len(self._patterns)

    @property
    def active(self) -> bool:
        """Whether there is anything to scrub."""
        return bool(self._secrets or self._patterns)

    def scrub(self, text: str) -> str:
        """``text`` with every secret and pattern match replaced."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        for pattern in self._patterns:
            text = pattern.sub(REDACTED, text)
        return text

    def apply(self, lines: list[str]) -> list[str]:
        """``lines`` scrubbed (the same list when nothing matched); :class:`LinePart` marks are kept."""
        if not self.active:
            return lines
        if not self._line_only:
            joined = "\n".join(lines)
            if not any(secret in joined for secret in self._secrets) and not any(
                pattern.search(joined) for pattern in self._joinable
            ):
                return lines
        out: list[str] = []
        for line in lines:
            clean = self.scrub(line)
            if clean is not line and isinstance(line, LinePart):
                clean = LinePart(clean, line.part, line.last)
            out.append(clean)
        return out
