"""Sentry destination: every record as a Sentry structured log, every Python traceback also as a Sentry issue.

Enabled by ``SENTRY_DSN`` (``https://PUBLIC_KEY@HOST/PROJECT_ID``). Envelopes are POSTed, gzip-compressed, to
``<scheme>://<host>/api/<project>/envelope/`` with an ``X-Sentry-Auth`` header from sentry-sdk's ``Dsn.to_auth()``,
through our shared httpx client: no global ``sentry_sdk.init`` (it would capture the forwarder's own logging), and
no SDK-side queue (the SDK's logger drops logs past 1,000 queued; here the spool holds them and the one retry loop
decides). Event envelopes are built with sentry-sdk's ``Envelope``/``Item`` types; log envelopes, built for every
record, are written directly, byte for byte as those types would write them (a test holds them to it), and each
``log`` item's payload is serialised with one ``orjson.dumps`` call.

Wire format:

* Logs: one ``log`` item per envelope ("An envelope MUST contain at most one ``log`` envelope item";
  ``content_type: application/vnd.sentry.items.log+json``, header ``item_count``), payload ``{"items": [log, ...]}``
  (logs of different traces may share it, so the envelope has no ``trace`` header, as the spec requires); each log
  has ``timestamp`` (seconds, float), ``trace_id``, ``level`` (``trace|debug|info|warn|error|fatal``),
  ``severity_number``, ``body`` and typed ``attributes`` (``{"value": ..., "type": "string|integer|double|boolean"}``):
  ``host``, ``source``, ``service``, ``stream`` and every record attribute. https://develop.sentry.dev/sdk/telemetry/logs/
* Issues: a record holding a Python traceback (in its message, or a JSON line's ``exc_info`` field) also becomes an
  ``event`` envelope: ``exception.values`` (oldest first, with parsed ``stacktrace.frames``), tags ``host``,
  ``source``, ``service``, ``stream``, level ``error``. Its ``event_id`` is derived from the record, so a resend
  (split, restart) is the same event: https://develop.sentry.dev/sdk/foundations/transport/event-payloads/
* Logs and events never share an envelope ("SDKs MUST NOT combine different types of telemetry data in the same
  envelope": https://develop.sentry.dev/sdk/foundations/transport/envelope-items/), so a rate limit on one data category
  delays only that category.

Limits (checked November 2026; the develop docs moved from ``/sdk/data-model/`` to ``/sdk/foundations/transport/``):

* at most 100 logs per envelope ("SDKs MUST NOT send more than 100 logs per envelope (since 1.15.0). Relay is
  optimized for this limit.", logs spec 2.0.0): https://develop.sentry.dev/sdk/telemetry/logs/#buffering. Relay
  itself rejects more than 1,000 logs in an envelope (400 "envelope exceeded size limits for type 'log'":
  https://github.com/getsentry/sentry-cocoa/pull/6768), but SDKs must keep to the spec's 100, so 100 it stays.
* 1 MiB for an event, span or log envelope item; 200 MiB for a whole envelope after decompression:
  https://develop.sentry.dev/sdk/foundations/transport/envelopes/#size-limits (Relay's defaults, ``max_event_size``,
  ``max_envelope_size``: https://github.com/getsentry/relay/blob/master/relay-config/src/config.rs)
* events are rejected above 200 KB compressed / 1 MB decompressed: https://docs.sentry.io/concepts/data-management/size-limits/
* messages are cut at 8,192 characters, tag values at 200: https://develop.sentry.dev/sdk/data-handling/
* an event timestamp more than 30 days old or 60 s in the future is replaced by the time Sentry received it
  (``MAX_SECS_IN_PAST``/``MAX_SECS_IN_FUTURE``: https://github.com/getsentry/sentry/blob/master/src/sentry/constants.py)
* rate limits: ``X-Sentry-Rate-Limits: retry_after:categories:scope[:reason_code[:namespaces]], ...`` on any
  response (empty categories = all), else ``Retry-After`` on 429, else 60 s:
  https://develop.sentry.dev/sdk/foundations/transport/rate-limiting/
"""

from __future__ import annotations

import functools
import hashlib
import math
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import orjson
import structlog
import trio

from forwarder import __version__
from forwarder.config import ConfigError, HttpSettings, Secret
from forwarder.record import HOST, SERVICE, SOURCE, STREAM, TRUNCATED, Level, Record, Tags
from forwarder.sinks._http import gzip_bytes, make_client, parse_retry_after, post, transport_verdict
from forwarder.sinks._protocol import OK, Batch, Encoded, Outcome, Verdict, drop, retry, split
from forwarder.sinks._traceback import ParsedException, find_traceback, in_app, module_of, parse_traceback

ENV_VARS: tuple[str, ...] = ("SENTRY_DSN",)

# --- limits -----------------------------------------------------------------------------------------------------

MAX_LOGS_PER_ENVELOPE: Final = 100
"""https://develop.sentry.dev/sdk/telemetry/logs/#buffering (logs spec 2.0.0, rechecked November 2026): "SDKs MUST NOT
send more than 100 logs per envelope (since 1.15.0). Relay is optimized for this limit." (Relay's own hard limit,
1,000, is not for SDKs to use.)"""
MAX_LOG_ITEM_BYTES: Final = 1024 * 1024
"""A ``log`` item's payload (``{"items": [...]}``), bytes: https://develop.sentry.dev/sdk/foundations/transport/envelopes/#size-limits"""
MAX_EVENT_BYTES: Final = 1024 * 1024
"""An ``event`` item's payload, bytes: https://develop.sentry.dev/sdk/foundations/transport/envelopes/#size-limits"""
MAX_ENVELOPE_BYTES: Final = 200 * 1024 * 1024
"""A whole envelope after decompression, bytes (ours stay near one item's size; kept for reference)."""
MAX_MESSAGE_CHARS: Final = 8192
"""An event's message and exception value, characters: https://develop.sentry.dev/sdk/data-handling/"""
MAX_TAG_VALUE_CHARS: Final = 200
"""An event tag value, characters: https://develop.sentry.dev/sdk/data-handling/"""
MAX_EXTRA_VALUE_CHARS: Final = 16 * 1024
"""One ``extra`` entry of an event (16 kB): https://develop.sentry.dev/sdk/data-handling/"""
MAX_SECS_IN_PAST: Final = 30 * 24 * 3600
MAX_SECS_IN_FUTURE: Final = 60
"""Sentry's accepted event-time window around receipt, seconds (src/sentry/constants.py); a line's own timestamp
outside it (relative to capture) is replaced by the capture time."""
DEFAULT_RATE_LIMIT_S: Final = 60.0
"""A 429 without ``X-Sentry-Rate-Limits`` or ``Retry-After`` means 60 s for all categories (rate-limiting spec)."""

EVENT_RATE_LIMIT_HOLD_S: Final = 60.0
"""Ours: an ``error``-category rate limit up to this long holds issue events (``RETRY``); a longer one (an
exhausted error quota, typically until the end of the billing period) drops them with reason ``rate_limited``, as
Sentry's SDKs do, so that the logs behind them keep flowing. The record itself is still delivered as a log."""
TAG_FRAGMENT_CACHE: Final = 256
"""Ours: (source, stream) pairs whose pre-serialised tag attributes are kept (a few per run in practice)."""
SENT_EVENT_MEMORY: Final = 10_000
"""Event ids remembered as delivered, so that a log batch that is split and re-encoded does not resend its events."""

LOG_CONTENT_TYPE: Final = "application/vnd.sentry.items.log+json"
ENVELOPE_CONTENT_TYPE: Final = "application/x-sentry-envelope"
ALL_CATEGORIES: Final = ""
LOG_CATEGORIES: Final = frozenset({"log_item", "log_byte"})
EVENT_CATEGORIES: Final = frozenset({"error"})
EXC_INFO: Final = "exc_info"
TRACE_ID_KEYS: Final = ("trace_id", "traceId", "trace.id", "otelTraceID")
SPAN_ID_KEYS: Final = ("span_id", "spanId", "span.id", "otelSpanID")
MECHANISM_TYPE: Final = "forwarder"

SDK_NAME: Final = "forwarder"


@functools.cache
def sdk_info() -> Mapping[str, Any]:
    """The ``sdk`` envelope header and event field:
    https://develop.sentry.dev/sdk/foundations/transport/event-payloads/sdk/

    Built on first use, not at import: ``importlib.metadata`` (to name the sentry-sdk version) takes ~10 ms to
    import and look up, which every forwarder start would pay, with or without Sentry enabled.
    """
    import importlib.metadata

    return {
        "name": SDK_NAME,
        "version": __version__,
        "packages": [{"name": "pypi:sentry-sdk", "version": importlib.metadata.version("sentry-sdk")}],
    }


SENTRY_CLIENT: Final = f"{SDK_NAME}/{__version__}"
"""``sentry_client`` of ``X-Sentry-Auth``."""

_LEVELS: Final[Mapping[Level | None, tuple[str, int]]] = {
    None: ("info", 9),
    Level.DEBUG: ("debug", 5),
    Level.INFO: ("info", 9),
    Level.WARNING: ("warn", 13),
    Level.ERROR: ("error", 17),
    Level.CRITICAL: ("fatal", 21),
}
"""Our level -> Sentry log ``level`` and the lowest ``severity_number`` of its range (OpenTelemetry's numbers):
https://develop.sentry.dev/sdk/telemetry/logs/#log-severity-number. A record with no level is ``info``."""

_ITEM_OVERHEAD: Final = len(b'{"items":[]}')
_log = structlog.get_logger("forwarder").bind(destination="sentry")


# --- config -----------------------------------------------------------------------------------------------------

_DSN_PROBLEMS: Final = (
    ("Unsupported scheme", "the scheme must be https or http"),
    ("Missing public key", "the public key before '@' is missing"),
    ("Missing hostname", "the host is missing"),
    ("Invalid project", "the project id after the last '/' must be a number"),
)


@dataclass(frozen=True)
class SentryConfig:
    """Validated Sentry settings.

    Attributes:
        dsn: the DSN (``https://PUBLIC_KEY@HOST/PROJECT_ID``), held as a secret.
        name: the destination's name (``"sentry"``).
    """

    dsn: Secret
    name: str = "sentry"

    def endpoint(self) -> str:
        """The envelope endpoint, ``<scheme>://<host>[:port]/api/<project>/envelope/`` (no key in it)."""
        from sentry_sdk.utils import Dsn

        return str(Dsn(self.dsn.reveal()).to_auth(SENTRY_CLIENT).get_api_url())

    def secret_values(self) -> list[str]:
        """The DSN and its keys, for scrubbing. Never log what this returns."""
        from sentry_sdk.utils import Dsn

        parsed = Dsn(self.dsn.reveal())
        return [v for v in (self.dsn.reveal(), parsed.public_key, parsed.secret_key) if v]

    def build(self, http: HttpSettings) -> SentrySink:
        """The sink (its httpx client opens no connection until the first send)."""
        return SentrySink(self, http)


def config_from_env(env: Mapping[str, str]) -> SentryConfig | None:
    """The Sentry config when ``SENTRY_DSN`` is set and not empty, else ``None``.

    Raises:
        ConfigError: ``SENTRY_DSN`` is not a valid DSN; the problem never repeats the value (it holds the key).
    """
    raw = (env.get("SENTRY_DSN") or "").strip()
    if not raw:
        return None
    # sentry-sdk is imported only once Sentry is configured (with botocore's, ~7 MiB of RSS nobody else needs).
    from sentry_sdk.utils import BadDsn, Dsn

    try:
        Dsn(raw).to_auth(SENTRY_CLIENT).get_api_url()
    except (BadDsn, ValueError) as exc:  # ValueError: a bad port. Say what is wrong without echoing the value
        text = str(exc)
        problem = next((msg for key, msg in _DSN_PROBLEMS if text.startswith(key)), "it cannot be parsed")
        raise ConfigError(
            "SENTRY_DSN",
            f"not a valid DSN: {problem}; expected https://PUBLIC_KEY@HOST/PROJECT_ID "
            "(Sentry: Project Settings > Client Keys)",
        ) from None
    return SentryConfig(Secret(raw))


# --- encode -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SentryEnvelope:
    """One request's payload: a gzip-compressed envelope and what it carries.

    Attributes:
        body: the envelope, gzip-compressed (sent with ``Content-Encoding: gzip``).
        categories: the rate-limit data categories of its items (``log_item``/``log_byte``, or ``error``).
        event_id: the event's id for an issue envelope, else ``None``.
        items: logs (or 1 event) in it.
    """

    body: bytes
    categories: frozenset[str]
    event_id: str | None = None
    items: int = 0


def encode(records: Sequence[Record], trace_id: str) -> Encoded:
    """Cut ``records`` into Sentry envelopes. Pure; thread-safe.

    Every record becomes one log (at most :data:`MAX_LOGS_PER_ENVELOPE` per envelope and
    :data:`MAX_LOG_ITEM_BYTES` per item; a log that alone exceeds the item limit is cut and marked
    ``truncated: true``). A record holding a Python traceback also becomes an issue event in an envelope of its
    own, whose batch has no records (the record is counted once, by its log). Issue batches come first, so a
    rate limit on logs does not hold issues back.

    Logs are packed greedily in order: an envelope takes the next logs until one more would pass either limit.
    Each envelope's ``{"items": [...]}`` is serialised with one ``orjson.dumps`` call; only an envelope whose
    :data:`MAX_LOGS_PER_ENVELOPE` logs would pass :data:`MAX_LOG_ITEM_BYTES` falls back to measuring log by log.

    Args:
        records: in order.
        trace_id: the ``trace_id`` (32 hex) for logs that do not carry their own.
    """
    events: list[Batch] = []
    logs: list[Batch] = []
    count = len(records)
    start = 0
    entries: list[dict[str, Any]] = []  # the logs of records[start:start + len(entries)], each built once
    slow_until = 0  # past a group of logs that did not fit in one item: pack log by log up to here
    carry: bytes | None = None  # the serialised first of ``entries``, which the previous item could not take
    while start < count:
        end = min(start + MAX_LOGS_PER_ENVELOPE, count)
        # built group by group and freed once sent: few objects alive at a time, few garbage-collector passes
        if not entries:
            entries = _log_entries(records[start:end], trace_id, events)
        elif len(entries) < end - start:
            entries += _log_entries(records[start + len(entries) : end], trace_id, events)
        if start >= slow_until and carry is None:
            payload = orjson.dumps({"items": entries})
            if len(payload) <= MAX_LOG_ITEM_BYTES:
                logs.append(_log_batch(records[start:end], payload, end - start))
                start = end
                entries = []
                continue
            slow_until = end  # so a log is serialised at most twice, however many do not fit
        parts: list[bytes] = []
        size = _ITEM_OVERHEAD - 1  # + (length + 1) per log: the first log has no comma before it
        for index in range(start, end):
            if carry is None:
                carry = _dump_log(entries[index - start], records[index], trace_id)
            if parts and size + len(carry) + 1 > MAX_LOG_ITEM_BYTES:
                break
            parts.append(carry)
            size += len(carry) + 1
            carry = None
        stop = start + len(parts)
        logs.append(_log_batch(records[start:stop], b'{"items":[' + b",".join(parts) + b"]}", len(parts)))
        del entries[: len(parts)]
        start = stop
    return Encoded(events + logs)


@functools.cache
def _log_envelope_header() -> bytes:
    """The header line of every log envelope (serialised once; the same bytes as sentry-sdk's ``json_dumps`` for
    this ASCII-only header, checked by the tests)."""
    return orjson.dumps({"sdk": sdk_info()}) + b"\n"


def _log_batch(records: Sequence[Record], payload: bytes, count: int) -> Batch:
    """One log envelope: byte for byte what sentry-sdk's ``Envelope(headers={"sdk": ...}, items=[Item(type="log",
    content_type=..., headers={"item_count": count})]).serialize()`` gives, without building its objects."""
    item_header = b'{"item_count":%d,"type":"log","content_type":"%s","length":%d}\n' % (
        count,
        LOG_CONTENT_TYPE.encode(),
        len(payload),
    )
    raw = b"".join((_log_envelope_header(), item_header, payload, b"\n"))
    body = SentryEnvelope(gzip_bytes(raw), LOG_CATEGORIES, None, count)
    return Batch(records=records, payload=body, size=len(raw))


def _event_batch(record: Record, trace_id: str) -> Batch | None:
    event = build_event(record, trace_id)
    if event is None:
        return None
    from sentry_sdk.envelope import Envelope, Item, PayloadRef

    item = Item(payload=PayloadRef(bytes=_dump_event(event)), type="event", content_type="application/json")
    raw = Envelope(headers={"event_id": event["event_id"], "sdk": sdk_info()}, items=[item]).serialize()
    body = SentryEnvelope(gzip_bytes(raw), EVENT_CATEGORIES, event["event_id"], 1)
    return Batch(records=(), payload=body, size=len(raw))


def _typed(value: Any) -> dict[str, Any]:
    """A log attribute: ``{"value": v, "type": "string|integer|double|boolean"}``; other values as JSON text."""
    kind = type(value)
    if kind is str:
        return {"value": value, "type": "string"}
    if kind is bool:
        return {"value": value, "type": "boolean"}
    if kind is int:
        if -(2**63) <= value < 2**63:
            return {"value": value, "type": "integer"}
        return {"value": str(value), "type": "string"}
    if kind is float:
        if math.isfinite(value):
            return {"value": value, "type": "double"}
        return {"value": repr(value), "type": "string"}
    if isinstance(value, bool):  # subclasses (IntEnum, StrEnum...) by their base type
        return _typed(bool(value))
    if isinstance(value, int):
        return _typed(int(value))
    if isinstance(value, float):
        return _typed(float(value))
    if isinstance(value, str):
        return _typed(str(value))
    return {"value": _json_text(value), "type": "string"}


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return str(value)


_HEX_DIGITS: Final = frozenset("0123456789abcdef")
_ID_KEYS: Final = frozenset(TRACE_ID_KEYS + SPAN_ID_KEYS)
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**63 - 1
_PAST_NS: Final = MAX_SECS_IN_PAST * 10**9
_FUTURE_NS: Final = MAX_SECS_IN_FUTURE * 10**9
_TRACEBACK_MARK: Final = "Traceback (most recent call last)"
"""In every traceback header (plain and exception group): a record without it (nor ``exc_info``) has no event."""


def _levels_by_number() -> tuple[tuple[str, int], ...]:
    table = [_LEVELS[None]] * (max(Level) + 1)
    for level in Level:
        table[level] = _LEVELS[level]
    return tuple(table)


_LOG_LEVELS: Final = _levels_by_number()
"""``_LEVELS`` indexed by the level's number (hashing an ``IntEnum`` member calls Python code; indexing does not)."""


def _hex_id(attributes: Mapping[str, Any] | None, keys: Sequence[str], length: int) -> str | None:
    """The first of ``keys`` in ``attributes`` holding ``length`` hex digits (not all zeros), lower-cased."""
    if not attributes:
        return None
    for key in keys:
        value = attributes.get(key)
        if type(value) is str and len(value) == length:
            low = value.lower()
            if _HEX_DIGITS.issuperset(low) and low.strip("0"):
                return low
    return None


def _event_time_s(record: Record) -> float:
    captured = record.timestamp_ns
    stated = record.event_time_ns
    if stated is not None and captured - _PAST_NS <= stated <= captured + _FUTURE_NS:
        return stated / 1e9
    return captured / 1e9


def _tag_attributes(tags: Tags, stream: str) -> dict[str, dict[str, str]]:
    """The four tag attributes of a log (``host``, ``source``, ``service``, ``stream``), as plain dicts."""
    return {
        HOST: {"value": tags.host, "type": "string"},
        SOURCE: {"value": tags.source, "type": "string"},
        SERVICE: {"value": tags.service, "type": "string"},
        STREAM: {"value": stream, "type": "string"},
    }


@functools.lru_cache(maxsize=TAG_FRAGMENT_CACHE)
def _tag_fragments(host: str, source: str, service: str, stream: str) -> tuple[dict[str, Any], orjson.Fragment]:
    """The tag attributes of one source and stream serialised once: each value as an ``orjson.Fragment`` (for a
    record with attributes of its own), and the whole ``attributes`` object as one (for a record without)."""
    plain = _tag_attributes(Tags(host, source, service), stream)
    return {key: orjson.Fragment(orjson.dumps(value)) for key, value in plain.items()}, orjson.Fragment(
        orjson.dumps(plain)
    )


def _log_entries(
    records: Sequence[Record], trace_id: str, events: list[Batch] | None, *, plain: bool = False
) -> list[dict[str, Any]]:
    """The Sentry log of every record (before any size cut), in order; appends to ``events`` (unless ``None``) the
    issue-event batch of every record holding a traceback.

    Built for speed (it runs for every record). Unless ``plain``, the tag attributes are pre-serialised
    ``orjson.Fragment`` objects shared between logs (:func:`_tag_fragments`): such a log is only for
    ``orjson.dumps``, never to be read or changed. With ``plain``, every attribute is a ``{"value", "type"}`` dict
    (the same JSON).
    """
    entries: list[dict[str, Any]] = []
    append = entries.append
    levels = _LOG_LEVELS
    past_ns, future_ns, int_min, int_max = _PAST_NS, _FUTURE_NS, _INT_MIN, _INT_MAX
    no_ids = _ID_KEYS.isdisjoint
    mark = _TRACEBACK_MARK
    typed = _typed
    last_tags: Tags | None = None
    last_stream = ""
    tag_attrs: Mapping[str, Any] = {}
    tags_only: Any = None  # the ``attributes`` of a record without attributes of its own
    for record in records:
        tags = record.tags
        stream = record.stream
        if tags is not last_tags or stream != last_stream:
            if plain:
                tag_attrs = tags_only = _tag_attributes(tags, stream)
            else:
                tag_attrs, tags_only = _tag_fragments(tags.host, tags.source, tags.service, stream)
            last_tags, last_stream = tags, stream
        level = record.level
        name, severity = levels[0] if level is None else levels[level]
        captured = record.timestamp_ns
        stated = record.event_time_ns
        if stated is not None and -past_ns <= stated - captured <= future_ns:
            captured = stated
        message = record.message
        attrs = record.attributes
        if not attrs:
            append(
                {
                    "timestamp": captured / 1e9,
                    "trace_id": trace_id,
                    "level": name,
                    "severity_number": severity,
                    "body": message,
                    "attributes": tags_only,
                }
            )
            if events is not None and mark in message:
                event = _event_batch(record, trace_id)
                if event is not None:
                    events.append(event)
            continue
        attributes: dict[str, Any] = {}
        for key, value in attrs.items():
            kind = type(value)
            if kind is str:
                attributes[key] = {"value": value, "type": "string"}
            elif kind is int and int_min <= value <= int_max:
                attributes[key] = {"value": value, "type": "integer"}
            else:
                attributes[key] = typed(value)
        attributes.update(tag_attrs)  # a record attribute named like a tag keeps its place, with the tag's value
        entry: dict[str, Any] = {
            "timestamp": captured / 1e9,
            "trace_id": trace_id,
            "level": name,
            "severity_number": severity,
            "body": message,
            "attributes": attributes,
        }
        if not no_ids(attrs):
            entry["trace_id"] = _hex_id(attrs, TRACE_ID_KEYS, 32) or trace_id
            span_id = _hex_id(attrs, SPAN_ID_KEYS, 16)
            if span_id is not None:
                entry["span_id"] = span_id
        append(entry)
        if events is not None and (mark in message or EXC_INFO in attrs):
            event = _event_batch(record, trace_id)
            if event is not None:
                events.append(event)
    return entries


def log_entry(record: Record, trace_id: str) -> dict[str, Any]:
    """The Sentry log for ``record`` (before any size cut), as plain dicts: see the module docstring for the shape.

    Args:
        record: the record.
        trace_id: the ``trace_id`` (32 hex) used when the record carries no valid one of its own.
    """
    return _log_entries((record,), trace_id, None, plain=True)[0]


def _dump_log(entry: dict[str, Any], record: Record, trace_id: str) -> bytes:
    """One log (``entry``, the log of ``record``) as JSON; when it alone would not fit in a ``log`` item, the
    record's log is rebuilt as plain dicts and cut (:func:`_cut_log`)."""
    data = orjson.dumps(entry)
    limit = MAX_LOG_ITEM_BYTES - _ITEM_OVERHEAD
    if len(data) > limit:
        data = _cut_log(log_entry(record, trace_id), limit)
    return data


def _cut_utf8(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[: max(0, max_bytes)].decode("utf-8", "ignore")


def _cut_log(entry: dict[str, Any], limit: int) -> bytes:
    """Cut the longest strings (body, string attributes) of ``entry`` (a :func:`log_entry`, changed in place)
    until the encoded log fits in ``limit`` bytes, and mark it ``truncated``."""
    attributes: dict[str, Any] = entry["attributes"]
    attributes[TRUNCATED] = {"value": True, "type": "boolean"}
    data = orjson.dumps(entry)
    for _ in range(64):
        excess = len(data) - limit
        if excess <= 0:
            break
        strings: list[tuple[int, str | None]] = [(len(entry["body"].encode("utf-8")), None)]
        strings.extend(
            (len(v["value"].encode("utf-8")), k)
            for k, v in attributes.items()
            if v["type"] == "string" and len(v["value"]) > 64
        )
        length, key = max(strings, key=lambda s: s[0])
        # JSON escaping can make the encoded text longer than the raw string: cut at least half of it
        keep = min(length - excess - 16, length // 2) if length - excess - 16 > 0 else length // 2
        if key is None:
            entry["body"] = _cut_utf8(entry["body"], keep)
        else:
            attributes[key] = {"value": _cut_utf8(attributes[key]["value"], keep), "type": "string"}
        data = orjson.dumps(entry)
    return data


def _event_id(record: Record) -> str:
    digest = hashlib.blake2b(digest_size=16)
    tags = record.tags
    for part in (str(record.timestamp_ns), record.stream, tags.host, tags.source, tags.service, record.message):
        digest.update(part.encode("utf-8", "replace"))
        digest.update(b"\0")
    return digest.hexdigest()


def _traceback_text(record: Record) -> tuple[str, str, bool] | None:
    """(traceback text, message without it, came from a structured field) for a record holding one."""
    attrs = record.attributes
    if attrs:
        exc_info = attrs.get(EXC_INFO)
        if type(exc_info) is str and find_traceback(exc_info) >= 0:
            message = record.message
            at = find_traceback(message)
            return exc_info, (message[:at] if at >= 0 else message).strip(), True
    message = record.message
    if "Traceback (most recent call last)" not in message:
        return None
    at = find_traceback(message)
    if at < 0:
        return None
    return message[at:], message[:at].strip(), False


def build_event(record: Record, trace_id: str) -> dict[str, Any] | None:
    """The Sentry error event for a record holding a Python traceback, else ``None``.

    Shape (https://develop.sentry.dev/sdk/foundations/transport/event-payloads/): ``event_id`` (derived from the
    record, so stable across resends), ``timestamp``, ``platform: python``, ``level: error``, ``logger`` (a JSON line's
    ``name``), ``server_name`` (host), ``logentry.formatted`` (the log text before the traceback, if any),
    ``exception.values`` (oldest first; ``type``, ``module``, ``value``, ``stacktrace.frames`` with ``filename``,
    ``abs_path``, ``lineno``, ``function``, ``context_line``, ``in_app``, ``module``; ``mechanism``), ``tags``
    (host, source, service, stream), ``contexts.trace`` and ``extra`` (the record's other attributes).
    """
    found = _traceback_text(record)
    if found is None:
        return None
    text, prefix, structured = found
    exceptions = parse_traceback(text)
    if not exceptions:
        return None
    event_id = _event_id(record)
    attrs = record.attributes or {}
    tags = record.tags
    handled = structured or bool(prefix)
    event: dict[str, Any] = {
        "event_id": event_id,
        "timestamp": _event_time_s(record),
        "platform": "python",
        "level": "error",
        "server_name": tags.host,
        "exception": {"values": [_exception_payload(exc, handled) for exc in exceptions]},
        "tags": {
            HOST: tags.host[:MAX_TAG_VALUE_CHARS],
            SOURCE: tags.source[:MAX_TAG_VALUE_CHARS],
            SERVICE: tags.service[:MAX_TAG_VALUE_CHARS],
            STREAM: record.stream[:MAX_TAG_VALUE_CHARS],
        },
        "contexts": {
            "trace": {
                "trace_id": _hex_id(attrs, TRACE_ID_KEYS, 32) or trace_id,
                "span_id": _hex_id(attrs, SPAN_ID_KEYS, 16) or event_id[:16],
            }
        },
        "sdk": {"name": SDK_NAME, "version": __version__},
    }
    logger = attrs.get("name")
    if type(logger) is str and logger:
        event["logger"] = logger[:MAX_TAG_VALUE_CHARS]
    if prefix:
        event["logentry"] = {"formatted": prefix[:MAX_MESSAGE_CHARS]}
    extra = {k: _extra_value(v) for k, v in attrs.items() if k != EXC_INFO}
    if extra:
        event["extra"] = extra
    return event


def _extra_value(value: Any) -> Any:
    if type(value) is str:
        return value[:MAX_EXTRA_VALUE_CHARS]
    if value is None or type(value) in (bool, int, float):
        return value if type(value) is not float or math.isfinite(value) else repr(value)
    return _json_text(value)[:MAX_EXTRA_VALUE_CHARS]


def _exception_payload(exc: ParsedException, handled: bool) -> dict[str, Any]:
    frames = []
    for frame in exc.frames:
        out: dict[str, Any] = {
            "filename": frame.filename,
            "abs_path": frame.filename,
            "lineno": frame.lineno,
            "in_app": in_app(frame.filename),
        }
        if frame.function is not None:
            out["function"] = frame.function
        if frame.context_line is not None:
            out["context_line"] = frame.context_line
        module = module_of(frame.filename)
        if module is not None:
            out["module"] = module
        frames.append(out)
    payload: dict[str, Any] = {
        "type": exc.type,
        "value": exc.value[:MAX_MESSAGE_CHARS],
        "mechanism": {"type": MECHANISM_TYPE, "handled": handled},
    }
    if exc.module:
        payload["module"] = exc.module
    if frames:
        payload["stacktrace"] = {"frames": frames}
    return payload


def _dump_event(event: dict[str, Any]) -> bytes:
    """The event as JSON within :data:`MAX_EVENT_BYTES`: drop source lines, then the middle frames, then the oldest
    chained exceptions, then ``extra``, until it fits."""
    data = orjson.dumps(event)
    if len(data) <= MAX_EVENT_BYTES:
        return data
    values: list[dict[str, Any]] = event["exception"]["values"]
    for value in values:
        for frame in value.get("stacktrace", {}).get("frames", ()):
            frame.pop("context_line", None)
    data = orjson.dumps(event)
    while len(data) > MAX_EVENT_BYTES:
        longest = max(values, key=lambda v: len(v.get("stacktrace", {}).get("frames", ())))
        frames = longest.get("stacktrace", {}).get("frames", [])
        if len(frames) > 2:
            keep = len(frames) // 4
            longest["stacktrace"]["frames"] = frames[:keep] + frames[-keep:]
        elif len(values) > 1:
            values.pop(0)
        elif event.pop("extra", None) is None:
            values[0]["value"] = values[0]["value"][:1024]
            event.pop("logentry", None)
            data = orjson.dumps(event)
            break
        data = orjson.dumps(event)
    return data


# --- classify ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One quota limit: wait ``after`` seconds before sending data of ``categories`` (empty = every category)."""

    after: float
    categories: frozenset[str]


def parse_rate_limits(header: str | None) -> list[RateLimit]:
    """Parse ``X-Sentry-Rate-Limits`` (``retry_after:categories:scope[:reason_code[:namespaces]]``, several
    comma-separated, categories ``;``-separated, spaces ignored). Entries without a valid number are skipped."""
    if not header:
        return []
    out: list[RateLimit] = []
    for quota in header.split(","):
        fields = quota.strip().split(":")
        try:
            after = float(fields[0].strip())
        except ValueError:
            continue
        if not math.isfinite(after) or after < 0:
            continue
        categories = frozenset(c.strip() for c in fields[1].split(";") if c.strip()) if len(fields) > 1 else frozenset()
        out.append(RateLimit(after, categories))
    return out


def response_rate_limits(status: int, headers: Mapping[str, str]) -> list[RateLimit]:
    """The rate limits a response communicates: ``X-Sentry-Rate-Limits`` on any status; else, on 429,
    ``Retry-After`` or :data:`DEFAULT_RATE_LIMIT_S` for every category."""
    limits = parse_rate_limits(headers.get("X-Sentry-Rate-Limits"))
    if limits or status != 429:
        return limits
    after = parse_retry_after(headers.get("Retry-After"))
    return [RateLimit(DEFAULT_RATE_LIMIT_S if after is None else after, frozenset())]


def _applies(limit: RateLimit, categories: Iterable[str]) -> bool:
    return not limit.categories or not limit.categories.isdisjoint(categories)


# Sentry's envelope endpoint (Relay) status table (https://develop.sentry.dev/sdk/foundations/transport/ and
# https://develop.sentry.dev/sdk/foundations/transport/rate-limiting/):
#   2xx        accepted (X-Sentry-Rate-Limits may still announce limits)  -> OK
#   400        malformed envelope / invalid payload                        -> DROP (never deliverable)
#   401, 403   missing/invalid key, disabled project                      -> RETRY, loud (a fixed key delivers)
#   408, 5xx   timeout, Relay/Sentry trouble                              -> RETRY (Retry-After honoured)
#   413        envelope or item too large                                 -> SPLIT
#   429        rate limited: X-Sentry-Rate-Limits for this batch's categories, else Retry-After, else 60 s -> RETRY
#   other 4xx  not deliverable as sent (404: wrong host/project)          -> DROP
def classify(status: int, headers: Mapping[str, str], body: str, categories: frozenset[str]) -> Verdict:
    """The verdict for one envelope response. Pure.

    Args:
        status: HTTP status.
        headers: response headers (case-insensitive mapping).
        body: the response body (only its first 300 characters are kept, as detail).
        categories: the batch's data categories (:data:`LOG_CATEGORIES` or :data:`EVENT_CATEGORIES`).
    """
    if 200 <= status < 300:
        return OK
    detail = body[:300]
    if status == 429:
        applicable = [
            lim.after for lim in parse_rate_limits(headers.get("X-Sentry-Rate-Limits")) if _applies(lim, categories)
        ]
        if applicable:
            after = max(applicable)
        else:
            retry_after = parse_retry_after(headers.get("Retry-After"))
            after = DEFAULT_RATE_LIMIT_S if retry_after is None else retry_after
        limits = headers.get("X-Sentry-Rate-Limits")
        return retry("rate_limited", after, detail=f"X-Sentry-Rate-Limits: {limits}" if limits else detail)
    if status == 413:
        return split(detail)
    if status == 400:
        return drop("http_400", detail=detail)
    if status in (401, 403):
        return retry(
            f"http_{status}",
            parse_retry_after(headers.get("Retry-After")),
            detail=f"Sentry rejected the DSN key ({detail}); records are held"
            if detail
            else "Sentry rejected the DSN key; records are held",
            loud=True,
        )
    if status == 408 or status >= 500:
        return retry(f"http_{status}", parse_retry_after(headers.get("Retry-After")), detail=detail)
    return drop(f"http_{status}", detail=detail)


class RateLimiter:
    """Per-category rate-limit deadlines of one DSN (seconds on the sink's clock). Keeps the longest limit per
    category; the empty category means all."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def apply(self, limits: Iterable[RateLimit], now: float) -> None:
        """Record ``limits`` received at ``now``."""
        for limit in limits:
            until = now + limit.after
            for category in limit.categories or (ALL_CATEGORIES,):
                if until > self._until.get(category, 0.0):
                    self._until[category] = until

    def remaining(self, categories: Iterable[str], now: float) -> float:
        """Seconds until data of ``categories`` may be sent again (0 when not limited)."""
        until = self._until.get(ALL_CATEGORIES, 0.0)
        for category in categories:
            until = max(until, self._until.get(category, 0.0))
        return max(0.0, until - now)


# --- sink -------------------------------------------------------------------------------------------------------


@dataclass
class _SentState:
    events: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def remember(self, event_id: str) -> None:
        self.events[event_id] = None
        while len(self.events) > SENT_EVENT_MEMORY:
            self.events.popitem(last=False)


class SentrySink:
    """Sends envelopes to Sentry's envelope endpoint; one attempt per :meth:`send`.

    Args:
        config: the validated settings.
        http: shared HTTP client settings (CA bundle, timeout).
        clock: seconds on a monotonic clock, for rate-limit deadlines (default ``trio.current_time``, so a test's
            ``MockClock`` applies).

    Attributes:
        trace_id: this run's ``trace_id`` (uuid4 hex) for logs that carry none.
        events_dropped: issue events not delivered, by reason (their records were delivered as logs).
    """

    name = "sentry"
    ordered = False
    """Batches are independent (each record carries its timestamp): several may be in flight at once."""

    def __init__(
        self, config: SentryConfig, http: HttpSettings, *, clock: Callable[[], float] = trio.current_time
    ) -> None:
        from sentry_sdk.utils import Dsn

        auth = Dsn(config.dsn.reveal()).to_auth(SENTRY_CLIENT)
        self._url = str(auth.get_api_url())
        self._headers = {
            "X-Sentry-Auth": auth.to_header(),
            "Content-Type": ENVELOPE_CONTENT_TYPE,
            "Content-Encoding": "gzip",
        }
        self._client = make_client(http)
        self._clock = clock
        self._limits = RateLimiter()
        _log_envelope_header()  # the sentry-sdk version is looked up now, at start-up, not in the first encode
        self._sent = _SentState()
        self.trace_id = uuid.uuid4().hex
        self.events_dropped: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"SentrySink({self._url!r})"

    def encode(self, records: Sequence[Record]) -> Encoded:
        """See :func:`encode`; uses this run's :attr:`trace_id`."""
        return encode(records, self.trace_id)

    async def send(self, batch: Batch) -> Verdict:
        """POST one envelope (one attempt). A category still rate-limited is not sent: ``RETRY`` with the time
        left. An issue event already delivered (a re-encoded split) is not sent again."""
        envelope: SentryEnvelope = batch.payload
        event_id = envelope.event_id
        if event_id is not None and event_id in self._sent.events:
            return OK
        wait = self._limits.remaining(envelope.categories, self._clock())
        if wait > 0:
            return self._for_event(envelope, retry("rate_limited", wait, detail="category rate-limited by Sentry"))
        try:
            response = await post(self._client, self._url, content=envelope.body, headers=self._headers)
        except httpx.HTTPError as exc:
            return transport_verdict(exc)
        self._limits.apply(response_rate_limits(response.status_code, response.headers), self._clock())
        verdict = classify(response.status_code, response.headers, response.text, envelope.categories)
        if event_id is not None:
            if verdict is OK:
                self._sent.remember(event_id)
            else:
                verdict = self._for_event(envelope, verdict)
        return verdict

    def _for_event(self, envelope: SentryEnvelope, verdict: Verdict) -> Verdict:
        """Issue events have no records of their own: a drop is counted and logged here, a too-large event (which
        cannot be split) is dropped, and a long error-quota limit drops instead of holding the logs behind it."""
        if envelope.event_id is None:
            return verdict
        reason = None
        if verdict.outcome is Outcome.SPLIT:
            reason = "event_too_large"
        elif verdict.outcome is Outcome.DROP:
            reason = verdict.reason or "rejected"
        elif verdict.reason == "rate_limited" and (verdict.after or 0.0) > EVENT_RATE_LIMIT_HOLD_S:
            reason = "rate_limited"
        if reason is None:
            return verdict
        self.events_dropped[reason] += 1
        _log.warning(
            "issue_event_dropped",
            reason=reason,
            event_id=envelope.event_id,
            detail=verdict.detail[:300],
            note="the record was still sent as a log",
        )
        return drop(reason, detail=verdict.detail)

    async def aclose(self) -> None:
        """Close the HTTP client's connections."""
        await self._client.aclose()
