"""Lines -> records for one source: the composition of multi-line grouping, parsing and level filtering.

This is the interface the pipeline calls (``app.py``); the parts live in ``multiline.py`` (grouping, one
:class:`~forwarder.shaping.multiline.LineGrouper` per lane: a stream, or one tailed file's lines of a stream),
``parse.py`` (JSON lines, level detection, ANSI, timestamps) and ``filter.py`` (minimum level). Lines without
event times (the common case) are shaped in one pass that groups, parses and filters (``Shaper._shape``); lines with
event times go through the grouper's items first.

Record attributes set here besides a JSON line's own fields: ``level_original`` (the level as written, when it is
not the normalised name), ``truncated``/``part``/``last_part`` (pieces of a line cut by framing; every piece gets
the level of the first), ``multiline_capped`` (a group closed by ``max_group_bytes``; the next record of the stream
continues it and has the same level).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter
from typing import Any, Final

from forwarder.record import TRUNCATED, Level, Record, Tags
from forwarder.shaping.filter import filter_records
from forwarder.shaping.multiline import _EXC, _INDENT, _PLAIN, CAPPED, TRACEBACK, Item, LineGrouper
from forwarder.shaping.parse import (
    ANSI,
    LEVEL_ORIGINAL,
    TRACEBACK_HEADER,
    detect_level,
    json_record,
    normalize_level,
    strip_ansi,
)
from forwarder.sources._lines import LinePart

DEFAULT_MULTILINE_TIMEOUT_S: Final = 0.2
"""Idle time after which an open multi-line group is closed (seconds): long enough for a traceback written in a few
writes, short enough that the last line of a burst is not visibly late."""
DEFAULT_MAX_GROUP_BYTES: Final = 256 * 1024
"""Largest multi-line group (UTF-8 bytes) before it is closed and continued in a new record; the same as the default
line limit of framing (``forwarder.sources._lines.DEFAULT_MAX_LINE_BYTES``)."""

MULTILINE_CAPPED: Final = "multiline_capped"
"""Attribute set to ``True`` on a multi-line group closed by the size cap (the next record continues it)."""

_JSON_PART_LEVEL: Final = re.compile(r'"(?:level|levelname|severity)"\s*:\s*"([A-Za-z]{3,11})"')
_by_time = attrgetter("timestamp_ns")

Lane = tuple[str, str]
"""``(stream, origin)``: lines grouped together. ``origin`` is ``""`` for a process's own stream, else where the
lines come from (a tailed file's path)."""


class Shaper:
    """Turns framed lines of one source into records.

    Args:
        tags: host/source/service shared by every record.
        min_level: records with a detected level below it are not returned (counted in :attr:`filtered`);
            records with no level are always returned.
        strip_ansi: remove ANSI colour codes from messages (they are always ignored for level detection).
        multiline_timeout_s: a multi-line group (traceback...) idle this long is closed by :meth:`flush_idle`.
        max_group_bytes: a group is closed once its message would exceed this size (UTF-8 bytes).

    Attributes:
        filtered: records withheld because their level is below ``min_level``.
    """

    def __init__(
        self,
        tags: Tags,
        *,
        min_level: Level = Level.INFO,
        strip_ansi: bool = True,
        multiline_timeout_s: float = DEFAULT_MULTILINE_TIMEOUT_S,
        max_group_bytes: int = DEFAULT_MAX_GROUP_BYTES,
    ) -> None:
        self.tags = tags
        self.min_level = min_level
        self.strip_ansi = strip_ansi
        self.multiline_timeout_ns = int(multiline_timeout_s * 1e9)
        self.max_group_bytes = max_group_bytes
        self.filtered = 0
        self._groupers: dict[Lane, LineGrouper] = {}
        self._part_level: dict[Lane, tuple[Level, str | None] | None] = {}
        self._event_times: dict[Lane, deque[int | None]] = {}  # per lane: times of lines not yet in a record

    def feed(
        self,
        stream: str,
        lines: Sequence[str],
        now_ns: int,
        event_times_ns: Sequence[int] | None = None,
        origin: str = "",
    ) -> list[Record]:
        """Shape ``lines`` (in order, from ``stream``, captured at ``now_ns``); return the records that are complete.

        Lines may be :class:`~forwarder.sources._lines.LinePart` pieces of a cut line. The last text line of a
        lane is held until the next line of that lane or :meth:`flush_idle` (it may be followed by a continuation).

        Args:
            event_times_ns: optional, one per line: the time the line's container states (e.g. a CRI or Docker log
                timestamp), ns since the epoch. A record takes its first line's time as ``event_time_ns`` unless
                the line states its own (a JSON ``timestamp``), which wins.
            origin: where in ``stream`` the lines come from (a tailed file's path; ``""`` for a process's own
                stream). Lines are grouped into multi-line records only with lines of the same ``(stream, origin)``
                lane, so two files' lines never end up in one record.
        """
        lane = (stream, origin)
        grouper = self._groupers.get(lane)
        if grouper is None:
            grouper = self._groupers[lane] = LineGrouper(
                strip_ansi=self.strip_ansi, max_group_bytes=self.max_group_bytes
            )
        if event_times_ns is None and lane not in self._event_times:
            return self._shape(lane, grouper, lines, now_ns)  # the common case: one pass
        items = grouper.feed(lines, now_ns)
        queue = self._event_times.setdefault(lane, deque())
        queue.extend(repeat(None, len(lines)) if event_times_ns is None else event_times_ns)
        records: list[Record] = []
        self._records(lane, items, now_ns, None, records)
        _stamp(queue, items, records)
        return self._filter(records)

    def held(self, stream: str, origin: str = "") -> int:
        """Lines of the ``(stream, origin)`` lane fed but not returned yet (held in an open multi-line group)."""
        grouper = self._groupers.get((stream, origin))
        return 0 if grouper is None else grouper.held

    @property
    def lanes(self) -> int:
        """Lanes with state (an open group, a cut line in progress, or event times waiting)."""
        return len(self._groupers)

    def flush_idle(self, now_ns: int) -> list[Record]:
        """Close groups idle for at least the multi-line timeout at ``now_ns``; return their records."""
        return self._close(now_ns - self.multiline_timeout_ns, now_ns)

    def next_deadline_ns(self) -> int | None:
        """When :meth:`flush_idle` would next return something (ns, same clock as ``now_ns``), or ``None``."""
        last = [g.last_ns for g in self._groupers.values() if g.open]
        return min(last) + self.multiline_timeout_ns if last else None

    def flush(self) -> list[Record]:
        """End of input: close every open group and return the records."""
        return self._close(None, 0)

    # -- internals -----------------------------------------------------------------------------------------------

    def _close(self, deadline_ns: int | None, now_ns: int) -> list[Record]:
        out: list[Record] = []
        idle: list[Lane] = []
        for lane, grouper in self._groupers.items():
            items: list[Item] = []
            if deadline_ns is None:
                grouper.flush(items)
            else:
                grouper.flush_due(deadline_ns, items)
            if items:
                queue = self._event_times.get(lane)
                if queue is None:
                    self._records(lane, items, now_ns, self.min_level, out)
                else:
                    records: list[Record] = []
                    self._records(lane, items, now_ns, None, records)
                    _stamp(queue, items, records)
                    out.extend(self._filter(records))
            if lane[1] and not grouper.open and lane not in self._part_level and not self._event_times.get(lane):
                idle.append(lane)  # a file's lane with nothing held: forgotten (files come and go)
        for lane in idle:
            del self._groupers[lane]
            self._event_times.pop(lane, None)
        if len(out) > 1 and len(self._groupers) + len(idle) > 1:
            out.sort(key=_by_time)
        return out

    def _filter(self, records: list[Record]) -> list[Record]:
        kept, filtered = filter_records(records, self.min_level)
        self.filtered += filtered
        return kept

    def _shape(self, lane: Lane, grouper: LineGrouper, lines: Sequence[str], now_ns: int) -> list[Record]:
        """:meth:`feed` without event times: grouping, parsing and level filtering in one pass over ``lines``.

        The common lines are taken here, with the grouper's state read and set directly: a JSON candidate; a plain
        text line (not indented, not a traceback header) while the open group, if any, is plain; an indented line
        continuing the open group. A one-line group that such a line closes gets its record here too. Every other
        line goes to :meth:`LineGrouper.push`. Items the grouper emits wait in ``items`` and become records (through
        :meth:`_records`) before the next record made here, so the order is kept. The result is what
        ``grouper.feed`` then :meth:`_records` give; the shaping tests check both paths.
        """
        stream = lane[0]
        tags = self.tags
        strip = self.strip_ansi
        floor = self.min_level
        out: list[Record] = []
        append = out.append
        items: list[Item] = []
        filtered = 0
        level: Level | None
        for raw in lines:
            if type(raw) is str:  # not a LinePart
                c = raw[:1]
                if c == "{":  # a JSON candidate: complete by itself, it closes the open group
                    line = raw
                    head = grouper._head
                    if head is not None:
                        if grouper._lines is None and not grouper._flags:  # a one-line group (as below)
                            filtered += self._one_line_group(
                                grouper, head, lane, items=items, now_ns=now_ns, floor=floor, out=out
                            )
                            grouper._head = None
                        else:
                            grouper._close(items)
                        if strip and "\x1b" in raw:  # as LineGrouper.push: the line without its ANSI codes
                            line = ANSI.sub("", raw)
                    if items:
                        self._records(lane, items, now_ns, floor, out)
                        items.clear()
                    rec = json_record(line, now_ns, stream, tags, strip)
                    if rec is None:  # not a JSON object: plain text
                        rec = self._text_record(stream, line, now_ns)
                    level = rec.level
                    if level is None or level >= floor:
                        append(rec)
                    else:
                        filtered += 1
                    continue
                key = line = raw
                if "\x1b" in raw:
                    key = ANSI.sub("", raw)
                    c = key[:1]
                    if strip:
                        line = key
                if c in _INDENT:  # continues the open group, if any (unless blank lines wait after a traceback)
                    if grouper._head is not None and (grouper._mode != _EXC or not grouper._blanks):
                        grouper._add(line, now_ns, items)
                        continue
                elif c and c != "{" and (c != "T" or not key.startswith(TRACEBACK_HEADER)):
                    # a plain line: it closes a plain group (a traceback may take it: LineGrouper.push decides)
                    head = grouper._head
                    if head is None or grouper._mode == _PLAIN:
                        if head is not None:
                            if grouper._lines is None and not grouper._flags:  # a one-line group: its record
                                filtered += self._one_line_group(
                                    grouper, head, lane, items=items, now_ns=now_ns, floor=floor, out=out
                                )
                            else:
                                grouper._close(items)
                        grouper._head = line  # the head of the next group
                        grouper._key = key
                        grouper._first_ns = grouper._last_ns = now_ns
                        continue
            grouper.push(raw, now_ns, items)
        if items:
            self._records(lane, items, now_ns, floor, out)
        self.filtered += filtered
        return out

    def _one_line_group(
        self,
        grouper: LineGrouper,
        head: str,
        lane: Lane,
        *,
        items: list[Item],
        now_ns: int,
        floor: Level,
        out: list[Record],
    ) -> int:
        """Append the record of ``grouper``'s open one-line group (``head``) to ``out``, after the records of
        ``items`` (which it empties); returns 1 if the record was below ``floor`` (filtered), else 0."""
        if items:
            self._records(lane, items, now_ns, floor, out)
            items.clear()
        stream = lane[0]
        hit = detect_level(grouper._key)
        if hit is None:
            out.append(Record(grouper._first_ns, head, stream, self.tags))
        elif hit[0] < floor:
            return 1
        else:
            original = hit[1]
            attrs = None if original is None else {LEVEL_ORIGINAL: original}
            out.append(Record(grouper._first_ns, head, stream, self.tags, hit[0], attrs))
        return 0

    def _records(self, lane: Lane, items: list[Item], now_ns: int, min_level: Level | None, out: list[Record]) -> None:
        """Append the records for grouper items to ``out``; ``now_ns`` is the capture time of single-line items.

        With ``min_level``, records below it are left out and counted in :attr:`filtered` (what
        :func:`~forwarder.shaping.filter.filter_records` does, without building them first); with ``None`` every
        item gives a record (one per item, in order: :func:`_stamp` pairs them).
        """
        stream = lane[0]
        tags = self.tags
        strip = self.strip_ansi
        append = out.append
        error = Level.ERROR
        floor = Level.DEBUG if min_level is None else min_level  # every level is >= DEBUG
        filtered = 0
        level: Level | None
        for item in items:
            if type(item) is str:  # a JSON candidate
                rec = json_record(item, now_ns, stream, tags, strip)
                if rec is None:  # not a JSON object: plain text
                    rec = self._text_record(stream, item, now_ns)
            elif type(item) is tuple:
                message, key, ns, flags = item
                hit = detect_level(key) if key else None
                attrs: dict[str, Any] | None
                if hit is None:
                    level = attrs = None
                else:
                    level, original = hit
                    attrs = None if original is None else {LEVEL_ORIGINAL: original}
                if flags:
                    if flags & TRACEBACK and (level is None or level < error):
                        if level is not None and attrs is None:
                            attrs = {LEVEL_ORIGINAL: level.name}
                        level = error
                    if flags & CAPPED:
                        attrs = attrs or {}
                        attrs[MULTILINE_CAPPED] = True
                if level is not None and level < floor:
                    filtered += 1
                else:
                    append(Record(ns, message, stream, tags, level, attrs))
                continue
            else:
                assert isinstance(item, LinePart)
                rec = self._part_record(lane, item, now_ns)
            level = rec.level
            if level is None or level >= floor:
                append(rec)
            else:
                filtered += 1
        self.filtered += filtered

    def _text_record(self, stream: str, line: str, now_ns: int) -> Record:
        """The record of a single line that looked like JSON but is not a JSON object: plain text."""
        text = strip_ansi(line)
        hit = detect_level(text)
        message = text if self.strip_ansi else line
        if hit is None:
            return Record(now_ns, message, stream, self.tags)
        attrs = None if hit[1] is None else {LEVEL_ORIGINAL: hit[1]}
        return Record(now_ns, message, stream, self.tags, hit[0], attrs)

    def _part_record(self, lane: Lane, part: LinePart, now_ns: int) -> Record:
        plain = str.__str__(part)
        text = strip_ansi(plain)
        if part.part == 1:
            hit: tuple[Level, str | None] | None
            if text.startswith("{"):  # the head of a long JSON line: its level field, if it is in this piece
                hit = None
                m = _JSON_PART_LEVEL.search(text)
                if m is not None:
                    word = m.group(1)
                    found = normalize_level(word)
                    if found is not None:
                        hit = (found[0], word if found[1] else None)
            else:
                hit = detect_level(text)
            self._part_level[lane] = hit
        else:
            hit = self._part_level.get(lane)
        if part.last:
            self._part_level.pop(lane, None)
        attrs: dict[str, Any] = {TRUNCATED: True, "part": part.part, "last_part": part.last}
        level = None
        if hit is not None:
            level = hit[0]
            if hit[1] is not None:
                attrs[LEVEL_ORIGINAL] = hit[1]
        message = text if self.strip_ansi else plain
        return Record(now_ns, message, lane[0], tags=self.tags, level=level, attributes=attrs)


def _stamp(queue: deque[int | None], items: list[Item], records: list[Record]) -> None:
    """Give each record the event time of its first line; ``queue`` holds the times of the lines not yet used.

    A group of k lines has k - 1 newlines in its message (framed lines hold none), every other item is one line.
    """
    popleft = queue.popleft
    for item, rec in zip(items, records, strict=True):
        count = item[0].count("\n") + 1 if type(item) is tuple else 1
        first = popleft() if queue else None
        for _ in range(count - 1):
            if queue:
                popleft()
        if rec.event_time_ns is None:
            rec.event_time_ns = first
