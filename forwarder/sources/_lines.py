"""Bytes -> lines: framing on ``\\n`` (``\\r\\n`` too), bad bytes replaced, long lines cut into marked parts.

The hot path works on whole read blocks, never byte by byte: one ``bytes.rfind`` per block, then one ``decode``
(in place, the block is not copied) and one ``str.split`` per slice of about 64 KiB cut at a newline, with per-line
work only for the rare long line.

* invalid UTF-8 is replaced by U+FFFD (``errors="replace"``), never a crash;
* NUL bytes become U+FFFD (destinations and JSON tooling mishandle raw NULs);
* a line longer than ``max_line_bytes`` is cut (at a UTF-8 boundary) into :class:`LinePart` strings numbered from 1,
  the last one flagged ``last``: nothing is lost;
* a last line without a newline is returned by :meth:`LineFramer.finish`.
"""

from __future__ import annotations

from typing import Final

DEFAULT_MAX_LINE_BYTES: Final = 256 * 1024
_SLICE_BYTES: Final = 64 * 1024
"""A read block is decoded in slices of about this size (bytes, cut at newlines)."""


class LinePart(str):
    """A piece of a line that was longer than the limit. ``part`` counts from 1; ``last`` marks the final piece."""

    part: int
    last: bool

    def __new__(cls, text: str, part: int, last: bool) -> LinePart:
        obj = super().__new__(cls, text)
        obj.part = part
        obj.last = last
        return obj


def _utf8_cut(data: bytes, limit: int) -> int:
    """The largest cut point <= ``limit`` that does not split a UTF-8 sequence (at least 1 when limit >= 1)."""
    cut = limit
    for _ in range(3):
        if cut <= 1 or (data[cut] & 0xC0) != 0x80:
            break
        cut -= 1
    if (data[cut] & 0xC0) == 0x80:
        return limit
    return cut


def _split(text: str) -> list[str]:
    """The lines of decoded ``text`` (split on ``\\n``), without a ``\\r`` before the ``\\n``, NULs replaced."""
    if "\r" in text:
        lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    else:
        lines = text.split("\n")
    if "\x00" in text:
        lines = [_clean(line) for line in lines]
    return lines


def _clean(text: str) -> str:
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return text


class LineFramer:
    """Stateful framer for one byte stream.

    Args:
        max_line_bytes: longest line forwarded whole, in bytes (UTF-8 as read); longer lines are cut into parts.
    """

    __slots__ = ("_max", "_part", "_rest")

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if max_line_bytes < 4:
            raise ValueError("max_line_bytes must be at least 4")
        self._max = max_line_bytes
        self._rest = b""
        self._part = 0

    def feed(self, data: bytes | bytearray) -> list[str]:
        """Frame ``data`` (any split of the stream); return the complete lines, without line terminators."""
        end = data.rfind(b"\n")
        if end < 0:
            self._rest += bytes(data)
            return self._cut_rest() if len(self._rest) > self._max else []
        rest = self._rest
        self._rest = bytes(data[end + 1 :])
        # Decoded in place (through a memoryview: no copy of the block), in slices of about _SLICE_BYTES cut at
        # newlines (a small string is cheaper to make and to split than a large one), the held rest of the previous
        # block with the first line. Decoding at a newline gives what decoding the whole would. A line can be longer
        # than the limit only in a slice of more than a third of it (a byte decodes to at most 3 UTF-8 bytes: U+FFFD).
        limit = self._max
        with memoryview(data) as view:
            if rest:
                first = data.find(b"\n")
                lead = rest + view[:first]
                lines = _split(lead.decode("utf-8", "replace"))
                long = 3 * len(lead) > limit
                start = first + 1
            else:
                lines = []
                long = False
                start = 0
            while start <= end:
                stop = end if end - start <= _SLICE_BYTES else data.find(b"\n", start + _SLICE_BYTES, end)
                if stop < 0:
                    stop = end
                lines += _split(str(view[start:stop], "utf-8", "replace"))
                if 3 * (stop - start) > limit:
                    long = True
                start = stop + 1
        if self._part:
            lines[0] = LinePart(lines[0], self._part + 1, True)
            self._part = 0
        if long and len(rest) + end > limit:  # (a block within the limit is never cut: what was read fits)
            lines = self._cut_long(lines)
        if len(self._rest) > self._max:
            lines.extend(self._cut_rest())
        return lines

    def finish(self) -> list[str]:
        """End of stream: the unterminated last line, if any (empty list otherwise)."""
        if not self._rest:
            if self._part:
                self._part = 0
            return []
        text = _clean(self._rest.decode("utf-8", "replace"))
        self._rest = b""
        if text.endswith("\r"):
            text = text[:-1]
        if self._part:
            part, self._part = self._part + 1, 0
            return [LinePart(text, part, True)]
        return [text]

    def _cut_rest(self) -> list[str]:
        out: list[str] = []
        while len(self._rest) > self._max:
            cut = _utf8_cut(self._rest, self._max)
            self._part += 1
            out.append(LinePart(_clean(self._rest[:cut].decode("utf-8", "replace")), self._part, False))
            self._rest = self._rest[cut:]
        return out

    def _cut_long(self, lines: list[str]) -> list[str]:
        limit = self._max
        quarter = limit // 4
        out: list[str] = []
        for line in lines:
            if len(line) <= quarter:
                out.append(line)
                continue
            raw = line.encode("utf-8", "surrogatepass")
            if len(raw) <= limit:
                out.append(line)
                continue
            first = line.part if isinstance(line, LinePart) else 1
            part = first - 1
            while raw:
                cut = _utf8_cut(raw, limit) if len(raw) > limit else len(raw)
                part += 1
                piece = raw[:cut].decode("utf-8", "replace")
                raw = raw[cut:]
                out.append(LinePart(piece, part, not raw))
        return out
