"""Parsing of single lines: JSON log lines, level detection for text lines, ANSI codes, timestamps.

Everything here is pure (no state) and built for the hot path: cheap prefix checks first, a compiled regex only
once a prefix says it may match, never a regex over every line.

JSON lines (tried only when the line starts with ``{``; :func:`json_record`):

* ``message`` comes from the first of ``message``, ``msg``, ``event`` that is present (a non-string value is
  JSON-encoded); with none of them the whole line is the message;
* ``level`` comes from the first of ``level``, ``levelname``, ``severity``, ``status`` holding a known level word
  (``status`` and the others only as strings; ``level`` may also be a number: Python's ``logging`` numbers, or
  pino's when the line looks like pino's, i.e. its message is in ``msg`` and it has ``time``); the level as written
  is kept in the ``level_original`` attribute when it is not the level's name in some case (``warn``, ``30``);
* every other field stays, with its JSON type, in ``attributes``; the field the message and the level came from are
  removed; the line's own ``timestamp`` (or ``time``, ``ts``, ``@timestamp``) is kept and also parsed into
  ``event_time_ns`` (ISO 8601 with ``Z``/``+00:00``/no zone = UTC, or epoch seconds/ms/us/ns as a number);
* a line that is not a JSON object (array, number, broken JSON) is plain text.

Text lines (:func:`detect_level`, on the line with ANSI codes removed), in this order:

* glog: ``E1121 13:52:21.767 ...`` (``I``/``W``/``E``/``F`` + 4 digits + space);
* a level word at the very start: upper case followed by a space, ``:``, ``|``, ``[`` or the end (``WARN x``,
  ``ERROR:root:msg``, ``INFO:     Started``, logrus ``ERRO[0001]``), any other case only followed by ``:``
  (``error: x``, ``Warning: x``);
* a bracketed level word at the start: ``[warn]``, ``[ ERROR ]``;
* after a leading timestamp (``2026-11-21 13:52:21,767``, ISO 8601, ``2026/11/21 13:52:21``, ``13:52:21``, or
  one in brackets): the next word (``- DEBUG asyncio -``, ``[error]``, ``INFO``), or Python's
  ``%(asctime)s - %(name)s - %(levelname)s - %(message)s``;
* logfmt: a line whose first token is ``key=value`` and which has ``level=`` / ``lvl=``;
* a Python warning: ``path:NN: SomeWarning: msg`` is WARNING.

A level word anywhere else (in the middle of prose) is not a level.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from forwarder.record import Level, Record, Tags

# --- levels ---------------------------------------------------------------------------------------------------

_WORDS: Final[dict[str, Level]] = {
    "TRACE": Level.DEBUG,
    "TRC": Level.DEBUG,
    "DEBUG": Level.DEBUG,
    "DBG": Level.DEBUG,
    "DEBU": Level.DEBUG,  # logrus text formatter
    "INFO": Level.INFO,
    "INF": Level.INFO,
    "NOTICE": Level.INFO,
    "INFORMATION": Level.INFO,
    "WARN": Level.WARNING,
    "WARNING": Level.WARNING,
    "WRN": Level.WARNING,
    "ERROR": Level.ERROR,
    "ERR": Level.ERROR,
    "ERRO": Level.ERROR,  # logrus
    "CRITICAL": Level.CRITICAL,
    "CRIT": Level.CRITICAL,
    "FATAL": Level.CRITICAL,
    "FATA": Level.CRITICAL,  # logrus
    "FTL": Level.CRITICAL,
    "PANIC": Level.CRITICAL,
    "PANI": Level.CRITICAL,  # logrus
    "ALERT": Level.CRITICAL,
    "EMERG": Level.CRITICAL,
    "EMERGENCY": Level.CRITICAL,
}
"""Level words (upper case) and the level each one means."""

_DIFFERS: Final[dict[str, bool]] = {w: w != lvl.name for w, lvl in _WORDS.items()}
"""Per level word (upper case): whether it differs from its level's name (``WARN`` vs ``WARNING``)."""

LEVEL_ORIGINAL: Final = "level_original"
"""Attribute holding the level as the line wrote it, when it is not just the normalised name in another case."""

# Exact-string table for JSON values: the common spellings hit without an ``upper()`` call.
_JSON_WORDS: Final[dict[str, tuple[Level, bool]]] = {}
for _w, _lvl in _WORDS.items():
    _keep = _w != _lvl.name
    for _v in (_w, _w.lower(), _w.capitalize()):
        _JSON_WORDS[_v] = (_lvl, _keep)

_JSON_NAMES: Final[dict[str, Level]] = {v: lvl for v, (lvl, keep) in _JSON_WORDS.items() if not keep}
"""The JSON ``level`` values that are a level's name (``INFO``, ``info``, ``Info``...): one lookup, nothing to keep."""
_json_name = _JSON_NAMES.get

_HITS: Final[dict[str, tuple[Level, str | None]]] = {
    v: (lvl, v if keep else None) for v, (lvl, keep) in _JSON_WORDS.items()
}
""":func:`detect_level` results for the usual spellings of the level words (shared tuples, no allocation)."""
_UPPER_HITS: Final[dict[str, tuple[Level, str | None]]] = {w: _HITS[w] for w in _WORDS}
"""The same for the upper-case level words only."""

_PY_NUMBERS: Final[dict[int, Level]] = {
    10: Level.DEBUG,
    20: Level.INFO,
    30: Level.WARNING,
    40: Level.ERROR,
    50: Level.CRITICAL,
}
_PINO_NUMBERS: Final[dict[int, Level]] = {
    10: Level.DEBUG,
    20: Level.DEBUG,
    30: Level.INFO,
    40: Level.WARNING,
    50: Level.ERROR,
    60: Level.CRITICAL,
}


def normalize_level(value: object, *, pino: bool = False) -> tuple[Level, bool] | None:
    """Map a level as written (``"warn"``, ``"ERROR"``, ``"E"`` is not accepted, ``30``) to a :class:`Level`.

    Args:
        value: a string (level word, any case, surrounding spaces ignored) or an int (Python ``logging`` numbers
            10..50, or pino's 10..60 when ``pino`` is true).
        pino: interpret numbers with pino's scale (30 = info) instead of Python's (30 = warning).

    Returns:
        ``(level, differs)`` where ``differs`` says the written form is not the level's name in some case
        (``"warn"``, ``30``), or ``None`` for an unknown value.
    """
    if type(value) is str:
        hit = _JSON_WORDS.get(value)
        if hit is not None:
            return hit
        key = value.strip().upper()
        lvl = _WORDS.get(key)
        return None if lvl is None else (lvl, key != lvl.name)
    if type(value) is int:
        lvl = (_PINO_NUMBERS if pino else _PY_NUMBERS).get(value)
        return None if lvl is None else (lvl, True)
    return None


# --- ANSI -----------------------------------------------------------------------------------------------------

ANSI: Final = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI (colours: ESC [ 36 m)
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC (hyperlinks, titles)
    r"|\x1b[@-Z\\-_]"  # other two-byte escapes
)


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (colours, OSC hyperlinks). Cheap when there is no ESC."""
    if "\x1b" not in text:
        return text
    return ANSI.sub("", text)


# --- timestamps -----------------------------------------------------------------------------------------------

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE: Final = datetime(1970, 1, 1)  # a naive timestamp is taken as UTC
_fromiso = datetime.fromisoformat


def parse_timestamp(value: object) -> int | None:
    """Nanoseconds since the epoch for a timestamp as a log line writes it, or ``None``.

    Accepts ISO 8601 / RFC 3339 strings (``T`` or space, fraction of up to 9 digits kept to the ns, ``Z``,
    ``+00:00``, ``+0000``; no zone means UTC), and epoch numbers (also as digit strings) whose magnitude gives the
    unit: < 1e11 seconds, < 1e14 milliseconds, < 1e17 microseconds, else nanoseconds.
    """
    t = type(value)
    if t is str:
        s: str = value  # type: ignore[assignment]
        try:
            dt = _fromiso(s)
        except ValueError:
            try:
                num = float(s)
            except ValueError:
                return None
            return _epoch_ns(num)
        td = dt - (_EPOCH_NAIVE if dt.tzinfo is None else _EPOCH)
        ns: int = (td.days * 86400 + td.seconds) * 1_000_000_000 + td.microseconds * 1000
        if s[26:27] in _ASCII_DIGITS:
            ns += _sub_us(s)
        return ns
    if t is int or t is float:
        return _epoch_ns(value)  # type: ignore[arg-type]
    return None


_ASCII_DIGITS: Final = frozenset("0123456789")


def _sub_us(s: str) -> int:
    """The nanoseconds below the microsecond of an ISO 8601 string that ``datetime.fromisoformat`` accepted (it keeps
    6 fraction digits): its 7th to 9th fraction digits when it has that many, else 0.

    E.g. ``...:58.043707123Z`` -> 123, ``...:58.0437071Z`` -> 100, ``...:58.0437+00:00`` -> 0 (the digit at index 26
    belongs to the zone there).
    """
    frac = s[20:27]
    if s[19:20] not in ".," or not (frac.isdigit() and frac.isascii()):
        return 0
    end = 27
    while end < 29 and s[end : end + 1] in _ASCII_DIGITS:
        end += 1
    return int(s[26:end].ljust(3, "0"))


def _epoch_ns(num: float) -> int | None:
    if not math.isfinite(num):
        return None
    mag = abs(num)
    if type(num) is int:
        if mag < 1e11:
            return num * 1_000_000_000
        if mag < 1e14:
            return num * 1_000_000
        return num * 1000 if mag < 1e17 else num
    # a float near 1.8e9 s resolves ~0.24 us: round to whole microseconds rather than invent nanoseconds
    if mag < 1e11:
        return round(num * 1_000_000) * 1000
    if mag < 1e14:
        return round(num * 1000) * 1000
    return round(num) * 1000 if mag < 1e17 else round(num)


# --- JSON lines -----------------------------------------------------------------------------------------------

_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError
TRACEBACK_HEADER: Final = "Traceback (most recent call last):"
_ABSENT: Final = object()
MAX_JSON_DEPTH: Final = 200
"""Ours: a JSON line whose value nests deeper than this many arrays and objects is plain text (the whole line is the
message). ``orjson.loads`` reads up to 1,024 levels but ``orjson.dumps`` writes at most 254
(https://github.com/ijl/orjson#serialize: "Recursion limit reached"), and each destination wraps attributes in a few
levels of its own (New Relic's and Sentry's envelopes the most, about 5): deeper attributes could not be sent."""


def json_record(line: str, now_ns: int, stream: str, tags: Tags, strip: bool = True) -> Record | None:
    """The record for a JSON-object log line, or ``None`` when ``line`` is not a JSON object.

    Args:
        line: one line, expected to start with ``{`` (the caller's cheap check).
        now_ns: capture time (ns since the epoch) -> ``Record.timestamp_ns``.
        stream: ``"stdout"``/``"stderr"``.
        tags: the source's shared tags.
        strip: remove ANSI escape codes from the message.

    See the module docstring for the field mapping.
    """
    try:
        d = _loads(line)
    except _JSONDecodeError:
        return None
    if type(d) is not dict:
        return None
    # Only a line with that many brackets can nest that deep: a typical line pays one len().
    if len(line) > 2 * MAX_JSON_DEPTH and line.count("{") + line.count("[") > MAX_JSON_DEPTH and _nests_deeper(d):
        return None
    message = d.pop("message", None)
    pino = False
    if type(message) is not str:
        message, pino = _json_message(d, message, line)

    lv = d.pop("level", _ABSENT)
    try:
        level = _json_name(lv)  # the common case: the level's name, nothing more to do
    except TypeError:  # an array or object: not a level
        level = None
    if level is None:
        level = _json_level(d, lv, pino, message)

    ts = d.get("timestamp")
    event_ns: int | None
    if type(ts) is str:  # inlined fast path of parse_timestamp for ISO 8601 with a zone
        try:
            td = _fromiso(ts) - _EPOCH
        except (ValueError, TypeError):  # not ISO 8601, or no zone (naive minus aware)
            event_ns = parse_timestamp(ts)
        else:
            event_ns = (td.days * 86400 + td.seconds) * 1_000_000_000 + td.microseconds * 1000
            if ts[26:27] in _ASCII_DIGITS:  # maybe more than 6 fraction digits
                event_ns += _sub_us(ts)
    elif ts is None:
        ts = d.get("time")
        if ts is None:
            ts = d.get("ts")
            if ts is None:
                ts = d.get("@timestamp")
        event_ns = None if ts is None else parse_timestamp(ts)
    else:
        event_ns = parse_timestamp(ts)

    if strip and "\x1b" in message:
        message = ANSI.sub("", message)
    return Record(now_ns, message, stream, tags, level, d or None, event_ns)


def _nests_deeper(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` (parsed JSON) nests more than ``limit`` arrays and objects deep (an iterative walk)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if type(item) is dict:
            children: Any = item.values()
        elif type(item) is list:
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _json_message(d: dict[str, Any], msg: object, line: str) -> tuple[str, bool]:
    """``(message, looks_like_pino)`` when ``message`` was not a string (``msg`` is what it held, or None)."""
    pino = False
    if msg is None:
        msg = d.pop("msg", None)
        if msg is None:
            msg = d.pop("event", None)
        else:
            pino = "time" in d
    if msg is None:
        return line, pino
    if type(msg) is str:
        return msg, pino
    return orjson.dumps(msg).decode(), pino


def _json_level(d: dict[str, Any], lv: object, pino: bool, message: str) -> Level | None:
    """The level when ``level`` did not hold a level's name (``lv`` is what it held, or ``_ABSENT``)."""
    if lv is not _ABSENT:
        hit = normalize_level(lv, pino=pino)
        if hit is not None:
            if hit[1]:
                d[LEVEL_ORIGINAL] = lv
            return hit[0]
        d["level"] = lv  # unknown value: kept as it was
    for key in ("levelname", "severity", "status"):
        lv = d.get(key)
        if type(lv) is str:
            hit = normalize_level(lv)
            if hit is not None:
                del d[key]
                if hit[1]:
                    d[LEVEL_ORIGINAL] = lv
                return hit[0]
    if TRACEBACK_HEADER in message:
        return Level.ERROR
    return None


# --- text lines -----------------------------------------------------------------------------------------------

_DIGITS: Final = _ASCII_DIGITS
_PREFIX3: Final = frozenset(v[:3] for w in _WORDS for v in (w, w.lower(), w.capitalize()))
"""First three letters of every level word in upper, lower and capitalised case: the gate before any regex."""
_GLOG: Final[dict[str, Level]] = {"I": Level.INFO, "W": Level.WARNING, "E": Level.ERROR, "F": Level.CRITICAL}
_UPPER_SEPS: Final = frozenset(" \t:|[")
_HEAD_WORD: Final = re.compile(r"[A-Za-z]{3,11}")
_BRACKET_WORD: Final = re.compile(r"\[\s*([A-Za-z]{3,11})\s*\]")
_TIMESTAMP: Final = re.compile(
    r"\[?(?:\d{4}[-/]\d\d[-/]\d\d(?:[T ]\d\d:\d\d(?::\d\d)?)?|\d\d?:\d\d(?::\d\d)?)"
    r"(?:[.,]\d+)?(?:\s?(?:Z|UTC|[AP]M|[+-]\d\d:?\d\d))?\]?"
)
_AFTER_TIMESTAMP: Final = re.compile(r"(?:\s*[-|:]\s*|\s+)(\[)?\s*([A-Za-z]{3,11})\s*(\])?(?=([\s:|\]]|$))")
_PY_ASCTIME_NAME: Final = re.compile(r"\s+-\s+\S+\s+-\s+([A-Z]{3,11})\s+-(?:\s|$)")
_LOGFMT: Final = re.compile(r"(?:^|\s)(?:level|lvl)=\"?([A-Za-z]{3,11})\b")
_PY_WARNING: Final = re.compile(r"\S[^\n]*?:\d+: (?:[A-Za-z_][\w.]*)?Warning: ")


def detect_level(text: str) -> tuple[Level, str | None] | None:
    """The level a text line states, and the level as written when that is not the level's name in some case.

    E.g. ``"WARN x"`` -> ``(WARNING, "WARN")``, ``"[error] x"`` -> ``(ERROR, None)``, ``"E1121 ..."`` ->
    ``(ERROR, "E")``, a Python warning -> ``(WARNING, None)``.

    ``text`` must already be free of ANSI codes. Returns ``None`` when the line states no level. The rules are in
    the module docstring; a level word in the middle of prose is never taken.
    """
    c = text[:1]
    hit: tuple[Level, str | None] | None = None
    if c in _DIGITS:
        if text[19:20] == "," and text[23:26] == " - " and text[4:5] == "-":  # the fast path of _after_timestamp
            end = text.find(" ", 26)
            hit = _UPPER_HITS.get(text[26:end] if end > 0 else text[26:])
            if hit is None:
                hit = _asctime_name(text, 23)
        else:
            hit = _after_timestamp(text)
    elif c == "[":
        m = _BRACKET_WORD.match(text)
        if m is not None:
            word = m.group(1)
            lvl = _WORDS.get(word.upper())
            if lvl is not None:
                return _hit(lvl, word)
        elif text[1:2] in _DIGITS:
            hit = _after_timestamp(text)
    elif text[:3] in _PREFIX3:
        m = _HEAD_WORD.match(text)
        if m is not None:
            word = m.group()
            lvl = _WORDS.get(word.upper())
            if lvl is not None:
                sep = text[m.end() : m.end() + 1]
                if sep == ":" or (word.isupper() and (not sep or sep in _UPPER_SEPS)):
                    return _hit(lvl, word)
    elif c in _GLOG and text[1:5].isdigit() and text[5:6] == " ":
        return _GLOG[c], c  # the single letter always differs from the name
    if hit is not None:
        return hit
    eq = text.find("=", 0, 64)
    if eq > 0:
        sp = text.find(" ", 0, eq)
        if sp < 0:  # first token is key=value: logfmt
            m = _LOGFMT.search(text)
            if m is not None:
                word = m.group(1)
                lvl = _WORDS.get(word.upper())
                if lvl is not None:
                    return _hit(lvl, word)
    if "Warning: " in text and _PY_WARNING.match(text) is not None:
        return Level.WARNING, None
    return None


def _after_timestamp(text: str) -> tuple[Level, str | None] | None:
    # Fast path for Python's default asctime "YYYY-MM-DD HH:MM:SS,mmm - " (livekit dev mode, logging defaults).
    if text[19:20] == "," and text[23:26] == " - " and text[4:5] == "-":
        end = text.find(" ", 26)
        hit = _UPPER_HITS.get(text[26:end] if end > 0 else text[26:])
        if hit is not None:
            return hit
        pos = 23
    else:
        m = _TIMESTAMP.match(text)
        if m is None:
            return None
        pos = m.end()
        m = _AFTER_TIMESTAMP.match(text, pos)
        if m is not None:
            opened, word, closed, sep = m.groups()
            lvl = _WORDS.get(word.upper())
            # upper case (INFO), bracketed ([error]) or followed by ':' (error:); not "Error rate is low"
            if lvl is not None and (word.isupper() or (opened and closed) or sep == ":"):
                return _hit(lvl, word)
    return _asctime_name(text, pos)


def _asctime_name(text: str, pos: int) -> tuple[Level, str | None] | None:
    """Python's ``%(asctime)s - %(name)s - %(levelname)s - ...``: the level after the name, from ``pos``."""
    m = _PY_ASCTIME_NAME.match(text, pos)
    if m is not None:
        return _UPPER_HITS.get(m.group(1))
    return None


def _hit(lvl: Level, word: str) -> tuple[Level, str | None]:
    """``(lvl, word if it differs from the level's name else None)``; ``word`` is a level word in any case."""
    hit = _HITS.get(word)
    if hit is None:  # an unusual case mix ("wARN")
        return lvl, (word if _DIFFERS[word.upper()] else None)
    return hit
