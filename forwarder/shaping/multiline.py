"""Multi-line grouping for one stream: Python tracebacks, warnings with their source line, indented continuations.

A :class:`LineGrouper` sees the framed lines of ONE stream in order (stdout and stderr each have their own, so
interleaving on the other stream never breaks a group) and emits *items* in the same order:

* a ``str``: a line starting with ``{`` (a JSON candidate). Such a line is complete by itself: it never joins a
  group and closes the open one;
* a :class:`~forwarder.sources._lines.LinePart`: a piece of a line cut by framing; complete by itself too;
* a :data:`Group` tuple ``(message, key, first_ns, flags)``: one or more text lines joined with ``\\n``. ``key`` is
  the line to detect the group's level from (the first line without ANSI codes), ``first_ns`` the capture time of
  the first line, ``flags`` a mix of :data:`TRACEBACK` and :data:`CAPPED`.

Rules (a line "continues" the open group, or closes it and starts the next one):

* an indented line (space or tab) continues any group: warning source lines, ``  File ...`` frames, wrapped text;
* ``Traceback (most recent call last):`` continues a group of one plain line (the log line that introduces a
  traceback, e.g. ``ERROR:root:failed``, joins it) or starts a group; then come indented frame lines, then the
  exception line (the first unindented line starting with a letter or ``_``). A group of several lines (such as a
  warning and its source line) does not take a following traceback;
* after the exception line, ``During handling of the above exception, another exception occurred:`` or
  ``The above exception was the direct cause of the following exception:`` (with the blank lines around them) and
  the next ``Traceback ...`` block continue the group; blank lines there are held until the next line shows
  whether a chain follows, and are emitted as empty lines if not;
* a Python warning ``path:NN: XWarning: msg`` takes its indented source line by the first rule;
* a blank line outside a traceback is an item of its own (empty message), never the head of a group.

:meth:`LineGrouper.feed` takes a batch of lines, :meth:`LineGrouper.push` one line; ``Shaper`` takes the common lines
itself in one pass and hands the others to ``push`` (see ``Shaper._shape``).

Because any text line may be followed by a continuation, the last text line of a batch stays open until the next
line arrives or the group has been idle for the timeout (:meth:`LineGrouper.flush_due`, driven by the pipeline
through ``Shaper.next_deadline_ns``). A group that would grow past ``max_group_bytes`` (UTF-8 bytes of the joined
message) is closed with :data:`CAPPED`; the rest continues as a new group with the same key and mode, so its level
is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from forwarder.shaping.parse import ANSI, TRACEBACK_HEADER
from forwarder.sources._lines import LinePart

TRACEBACK: Final = 1
"""Group flag: the group contains a Python traceback (its level is at least ERROR)."""
CAPPED: Final = 2
"""Group flag: the group was closed by the size cap; the next group of the stream continues it."""

Group = tuple[str, str, int, int]
"""``(message, key, first_ns, flags)``: see the module docstring."""
Item = str | Group
"""What :meth:`LineGrouper.feed` emits: a JSON-candidate line, a :class:`LinePart`, or a :data:`Group`."""

CHAIN_CAUSE: Final = "The above exception was the direct cause of the following exception:"
CHAIN_CONTEXT: Final = "During handling of the above exception, another exception occurred:"

# modes of the open group
_PLAIN: Final = 0  # text line(s): takes indented lines and an immediately following traceback
_FRAMES: Final = 1  # inside a traceback, before the exception line
_EXC: Final = 2  # after the exception line: a chain sentence may follow (after blank lines)
_CHAIN: Final = 3  # after a chain sentence: blank lines, then the next "Traceback ..."


_INDENT: Final = frozenset(" \t")


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class LineGrouper:
    """Groups the lines of one stream (see the module docstring).

    Args:
        strip_ansi: emit lines without ANSI codes (they are always removed for classification).
        max_group_bytes: the largest joined message of a group, in UTF-8 bytes; at least one line per group.
    """

    __slots__ = (
        "_blanks",
        "_cap",
        "_first_ns",
        "_flags",
        "_head",
        "_key",
        "_last_ns",
        "_lines",
        "_mode",
        "_size",
        "_strip",
    )

    def __init__(self, *, strip_ansi: bool = True, max_group_bytes: int = 256 * 1024) -> None:
        self._strip = strip_ansi
        self._cap = max_group_bytes
        self._head: str | None = None  # first line of the open group, None when no group is open
        self._key = ""
        self._lines: list[str] | None = None  # all lines once there is more than the head
        self._size = 0
        self._first_ns = 0
        self._last_ns = 0
        self._mode = _PLAIN
        self._flags = 0
        self._blanks = 0  # blank lines held after an exception line

    @property
    def open(self) -> bool:
        """Whether a group is open (held until a following line or the idle timeout closes it)."""
        return self._head is not None

    @property
    def held(self) -> int:
        """Lines taken but not emitted yet: the open group's lines and the blank lines held after it."""
        if self._head is None:
            return 0
        return (1 if self._lines is None else len(self._lines)) + self._blanks

    @property
    def last_ns(self) -> int:
        """Capture time of the open group's latest line (meaningless when no group is open)."""
        return self._last_ns

    def feed(self, lines: Sequence[str], now_ns: int) -> list[Item]:
        """Take ``lines`` (captured at ``now_ns``) and return the items that are complete, in order."""
        out: list[Item] = []
        append = out.append
        push = self.push
        for raw in lines:
            if raw[:1] == "{" and self._head is None and type(raw) is str:  # fast path: a JSON candidate
                append(raw)
            else:
                push(raw, now_ns, out)
        return out

    def push(self, raw: str, now_ns: int, out: list[Item]) -> None:
        """Take one line (captured at ``now_ns``); append the items it completes to ``out``.

        :meth:`feed` is this for every line. ``Shaper`` calls it for the lines its own fast path does not take
        (see ``Shaper._shape``, which also reads and sets the open group's state: ``_head``, ``_key``,
        ``_first_ns``, ``_last_ns``, ``_lines``, ``_flags``).
        """
        if type(raw) is LinePart:
            if self._head is not None:
                self._close(out)
            out.append(raw)
            return
        line = raw
        if "\x1b" in line:
            key = ANSI.sub("", line)
            if self._strip:
                line = key
        else:
            key = line
        c = key[:1]
        if self._head is not None:
            if self._mode == _PLAIN:
                if c in _INDENT:
                    self._add(line, now_ns, out)
                    return
                if c == "T" and self._lines is None and key.startswith(TRACEBACK_HEADER):
                    self._add(line, now_ns, out)  # a single line introducing a traceback joins it
                    self._mode = _FRAMES
                    self._flags |= TRACEBACK
                    return
                if self._lines is None and not self._flags:  # the common case: one plain line
                    out.append((self._head, self._key, self._first_ns, 0))
                    self._head = None
                else:
                    self._close(out)
            elif self._traceback_line(line, c, key, now_ns, out):
                return
            else:
                self._close(out)
        if c == "{":  # a JSON candidate (which may have had ANSI codes)
            out.append(line)
        elif not c:
            out.append((line, "", now_ns, 0))
        else:
            # No group is open here, so the mode is _PLAIN and the flags are 0: _close resets them, and the one-line
            # close above happens only with no flags (every mode but _PLAIN comes with TRACEBACK).
            self._head = line
            self._key = key
            self._first_ns = self._last_ns = now_ns
            if c == "T" and key.startswith(TRACEBACK_HEADER):
                self._mode = _FRAMES
                self._flags = TRACEBACK

    def flush_due(self, deadline_ns: int, out: list[Item]) -> None:
        """Close the open group if its latest line arrived at or before ``deadline_ns``; append its items."""
        if self._head is not None and self._last_ns <= deadline_ns:
            self._close(out)

    def flush(self, out: list[Item]) -> None:
        """End of input: close the open group, if any; append its items."""
        if self._head is not None:
            self._close(out)

    # -- internals -----------------------------------------------------------------------------------------------

    def _traceback_line(self, line: str, c: str, key: str, now_ns: int, out: list[Item]) -> bool:
        """Whether ``line`` continues the open traceback group (and add it); False closes the group."""
        mode = self._mode
        if mode == _FRAMES:
            if c in _INDENT:
                self._add(line, now_ns, out)
                return True
            if c.isalpha() or c == "_":  # the exception line: "ValueError: x", "KeyboardInterrupt"
                self._add(line, now_ns, out)
                self._mode = _EXC
                return True
            return False
        if mode == _EXC:
            if not c:
                self._blanks += 1
                self._last_ns = now_ns
                return True
            if key.startswith(CHAIN_CONTEXT) or key.startswith(CHAIN_CAUSE):
                for _ in range(self._blanks):
                    self._add("", now_ns, out)
                self._blanks = 0
                self._add(line, now_ns, out)
                self._mode = _CHAIN
                return True
            if c in _INDENT and not self._blanks:
                self._add(line, now_ns, out)
                return True
            return False
        # _CHAIN
        if not c or c in _INDENT:
            self._add(line, now_ns, out)
            return True
        if c == "T" and key.startswith(TRACEBACK_HEADER):
            self._add(line, now_ns, out)
            self._mode = _FRAMES
            return True
        return False

    def _add(self, line: str, now_ns: int, out: list[Item]) -> None:
        lines = self._lines
        if lines is None:
            assert self._head is not None
            lines = self._lines = [self._head]
            self._size = _utf8_len(self._head)
        n = _utf8_len(line) + 1
        if self._size + n > self._cap:
            # close what we have, flagged; the rest goes on as a new group with the same key, mode and flags
            out.append(("\n".join(lines), self._key, self._first_ns, self._flags | CAPPED))
            self._head = line
            self._lines = None
            self._first_ns = now_ns
        else:
            lines.append(line)
            self._size += n
        self._last_ns = now_ns

    def _close(self, out: list[Item]) -> None:
        head = self._head
        assert head is not None
        lines = self._lines
        out.append((head if lines is None else "\n".join(lines), self._key, self._first_ns, self._flags))
        blanks = self._blanks
        if blanks:
            last = self._last_ns
            out.extend(("", "", last, 0) for _ in range(blanks))
            self._blanks = 0
        self._head = None
        self._lines = None
        self._mode = _PLAIN
        self._flags = 0
