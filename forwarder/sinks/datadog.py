"""Datadog Logs destination: JSON arrays of log objects, gzip, POSTed to the logs intake of the account site.

API: "Send logs", https://docs.datadoghq.com/api/latest/logs/#send-logs (checked November 2026):

* "Maximum content size per payload (uncompressed): 5MB"            -> :data:`MAX_CONTENT_BYTES`
* "Maximum size for a single log: 1MB" (longer logs are truncated by Datadog with a 2xx)
                                                                    -> :data:`MAX_LOG_BYTES`
* "Maximum array size if sending multiple logs in an array: 1000 entries"
                                                                    -> :data:`MAX_ENTRIES`
* "Log events can be submitted with a timestamp that is up to 18 hours in the past."
                                                                    -> :data:`MAX_AGE_NS`
* "Add the Content-Encoding: gzip header to the request when sending compressed logs."

Like Vector's ``datadog_logs`` sink we aim below the 5 MB ceiling (:data:`BATCH_GOAL_BYTES`, 4,250,000 bytes),
so that a request is never refused for its size.

Endpoints (one per site, https://docs.datadoghq.com/getting_started/site/):

* an **API key** goes to ``https://http-intake.logs.<site>/api/v2/logs`` in the ``DD-API-KEY`` header;
* a **client token** (``pub…``) is only accepted by the browser intake, whose host is the site with its dots
  before the top-level domain turned into dashes (as Datadog's browser SDK builds it, ``buildEndpointHost``):
  ``https://browser-intake-datadoghq.com``, ``https://browser-intake-us3-datadoghq.com``,
  ``https://browser-intake-datadoghq.eu``...; the token travels as the ``dd-api-key`` query parameter.

``FORWARDER_DATADOG_URL`` replaces the scheme, host and port (and an optional path prefix) of either;
``/api/v2/logs`` is appended. The token never appears in :meth:`DatadogConfig.endpoint`, in verdicts, or in
anything logged.

Each record becomes one object (reserved attributes per https://docs.datadoghq.com/logs/log_configuration/attributes_naming_convention/#reserved-attributes)::

    {"message": ..., "status": "error", "hostname": host, "ddsource": source, "service": service,
     "ddtags": "stream:stderr", "stream": "stderr", "timestamp": <ms since epoch>, ...record attributes}
"""

from __future__ import annotations

import math
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import orjson

from forwarder.config import ConfigError, HttpSettings, Secret, parse_choice
from forwarder.record import TRUNCATED, Level, Record, Tags
from forwarder.sinks._http import gzip_bytes, make_client, parse_retry_after, post, transport_verdict
from forwarder.sinks._protocol import OK, Batch, Encoded, Outcome, Verdict, drop, retry, split

# ------------------------------------------------------------------------------------------------------------
# Limits, from https://docs.datadoghq.com/api/latest/logs/#send-logs

DOC_URL: Final = "https://docs.datadoghq.com/api/latest/logs/#send-logs"
MAX_ENTRIES: Final = 1_000
"""Logs per request ("Maximum array size ...: 1000 entries"), :data:`DOC_URL`."""
MAX_CONTENT_BYTES: Final = 5_000_000
"""Uncompressed bytes per request ("Maximum content size per payload (uncompressed): 5MB"), :data:`DOC_URL`.
Read as decimal megabytes, the stricter reading."""
BATCH_GOAL_BYTES: Final = 4_250_000
"""Uncompressed bytes we aim for per request: below :data:`MAX_CONTENT_BYTES` like Vector's ``datadog_logs``
sink (``BATCH_GOAL_BYTES``), so that no request is refused for its size."""
MAX_LOG_BYTES: Final = 1_000_000
"""Bytes of one encoded log object ("Maximum size for a single log: 1MB"), :data:`DOC_URL`; decimal, the
stricter reading. A longer record has its message cut and carries ``truncated: true``."""
CUT_TO_BYTES: Final = MAX_LOG_BYTES - 1_000
"""Size an over-long log object is cut to: 1 KB under :data:`MAX_LOG_BYTES`, since Datadog's docs do not say which
bytes of a log count towards its 1 MB (our own choice)."""
MAX_AGE_NS: Final = 18 * 3600 * 1_000_000_000
"""Oldest accepted timestamp ("up to 18 hours in the past"), :data:`DOC_URL`."""
AGE_MARGIN_NS: Final = 3600 * 1_000_000_000
"""Our own safety margin: a time older than ``MAX_AGE_NS - AGE_MARGIN_NS`` (17 h) when encoded is not used,
since the request may be retried for a while before Datadog sees it."""
MAX_FUTURE_NS: Final = 2 * 3600 * 1_000_000_000
"""Our own guard (not a documented Datadog limit): an event time over 2 h ahead of the clock is not used."""

assert BATCH_GOAL_BYTES + 2 <= MAX_CONTENT_BYTES and MAX_LOG_BYTES + 2 <= BATCH_GOAL_BYTES

API_PATH: Final = "/api/v2/logs"
REGIONS: Final[Mapping[str, str]] = {
    "us1": "datadoghq.com",
    "us3": "us3.datadoghq.com",
    "us5": "us5.datadoghq.com",
    "eu": "datadoghq.eu",
    "ap1": "ap1.datadoghq.com",
    "ap2": "ap2.datadoghq.com",
    "us1-fed": "ddog-gov.com",
}
"""``DATADOG_REGION`` -> Datadog site (https://docs.datadoghq.com/getting_started/site/)."""
DEFAULT_REGION: Final = "us1"
CLIENT_TOKEN_PREFIX: Final = "pub"  # noqa: S105 (a prefix, not a secret)

TOKEN_VAR: Final = "DATADOG_TOKEN"  # noqa: S105 (a variable name)
REGION_VAR: Final = "DATADOG_REGION"
URL_VAR: Final = "FORWARDER_DATADOG_URL"
ENV_VARS: tuple[str, ...] = (TOKEN_VAR, REGION_VAR, URL_VAR)

ATTRIBUTES_KEY: Final = "attributes"
"""Record attributes whose names clash with a field we set go nested under this key (``@attributes.x``)."""
ORIGINAL_TIMESTAMP: Final = "original_timestamp"
"""Set (ms since the epoch) when the record's own times are too old for Datadog; ``timestamp`` is then now."""
RESERVED: Final = frozenset(
    {
        "message", "status", "hostname", "ddsource", "service", "ddtags", "stream", "timestamp",
        # Datadog's preprocessing reads these before ours (host, source) or as alternatives to them (date).
        "host", "source", "@timestamp", "date",
        ATTRIBUTES_KEY, ORIGINAL_TIMESTAMP,
    }
)  # fmt: skip
"""Keys a record attribute may not set at the top level (they would override or shadow our fields)."""

STATUS: Final[Mapping[Level, str]] = {
    Level.DEBUG: "debug",
    Level.INFO: "info",
    Level.WARNING: "warning",
    Level.ERROR: "error",
    Level.CRITICAL: "critical",
}
"""Level -> Datadog ``status`` (https://docs.datadoghq.com/logs/log_configuration/processors/#log-status-remapper).
A record without a level has no ``status``: Datadog shows it as ``info`` unless a pipeline remaps an
attribute."""


# ------------------------------------------------------------------------------------------------------------
# Config


def site_for(region: str) -> str:
    """The Datadog site of a ``DATADOG_REGION`` value (``"eu"`` -> ``"datadoghq.eu"``).

    Raises:
        KeyError: not a key of :data:`REGIONS`.
    """
    return REGIONS[region]


def intake_base(site: str, *, client_token: bool) -> str:
    """``https://<intake host>`` for ``site``: the browser intake for a client token, else the HTTP intake."""
    if client_token:
        *labels, tld = site.split(".")
        return f"https://browser-intake-{'-'.join(labels)}.{tld}"
    return f"https://http-intake.logs.{site}"


def _parse_base_url(raw: str) -> str:
    """Validate ``FORWARDER_DATADOG_URL`` and return the full intake URL (``/api/v2/logs`` appended).

    Raises:
        ConfigError: not ``http(s)://host[:port][/prefix]``, or it holds credentials, a query or a fragment.
    """
    expected = "expected http(s)://HOST[:PORT][/PREFIX] (the path /api/v2/logs is appended)"
    try:
        parts = urllib.parse.urlsplit(raw)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        raise ConfigError(URL_VAR, f"not a valid URL; {expected}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(URL_VAR, f"{raw!r} is not a valid URL; {expected}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(URL_VAR, f"credentials in the URL are not supported; {expected}")
    if parts.query or parts.fragment:
        raise ConfigError(URL_VAR, f"{raw!r} has a query or fragment; {expected}")
    path = parts.path.rstrip("/")
    if not path.endswith(API_PATH):
        path += API_PATH
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


@dataclass(frozen=True)
class DatadogConfig:
    """Validated Datadog settings.

    Attributes:
        token: ``DATADOG_TOKEN``, a client token (``pub…``) or an API key.
        region: a key of :data:`REGIONS`.
        url_override: the full intake URL derived from ``FORWARDER_DATADOG_URL``, or ``None``.
    """

    token: Secret
    region: str = DEFAULT_REGION
    url_override: str | None = None
    name: str = field(default="datadog", init=False)

    @property
    def client_token(self) -> bool:
        """Whether the token is a client token (``pub…``, browser intake) rather than an API key."""
        return self.token.reveal().startswith(CLIENT_TOKEN_PREFIX)

    @property
    def site(self) -> str:
        """The Datadog site, e.g. ``datadoghq.eu``."""
        return site_for(self.region)

    def url(self) -> str:
        """The intake URL without any secret (no query string)."""
        if self.url_override is not None:
            return self.url_override
        return intake_base(self.site, client_token=self.client_token) + API_PATH

    def endpoint(self) -> str:
        """Where records go, for the startup line and ``forwarder check``; never contains the token."""
        return self.url()

    def secret_values(self) -> list[str]:
        """The token (and its URL-encoded form, as it appears in a query string), for scrubbing."""
        value = self.token.reveal()
        quoted = urllib.parse.quote(value, safe="")
        return [value] if quoted == value else [value, quoted]

    def build(self, http: HttpSettings) -> DatadogSink:
        """A :class:`DatadogSink` on the shared httpx client settings (no connection is opened yet)."""
        return DatadogSink(self, http)


def config_from_env(env: Mapping[str, str]) -> DatadogConfig | None:
    """Datadog settings from ``DATADOG_TOKEN``, ``DATADOG_REGION`` and ``FORWARDER_DATADOG_URL``.

    Returns ``None`` when ``DATADOG_TOKEN`` is absent or empty (the destination is not enabled).

    Raises:
        ConfigError: ``DATADOG_REGION`` is not one of :data:`REGIONS` (the message lists them), or
            ``FORWARDER_DATADOG_URL`` is not a usable base URL. Never includes the token.
    """
    raw_token = env.get(TOKEN_VAR, "").strip()
    if not raw_token:
        return None
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in raw_token):
        problem = "contains whitespace or control characters; expected an API key or a client token"
        raise ConfigError(TOKEN_VAR, problem)
    region = parse_choice(env, REGION_VAR, tuple(REGIONS), DEFAULT_REGION)
    raw_url = env.get(URL_VAR, "").strip()
    return DatadogConfig(
        token=Secret(raw_token),
        region=region,
        url_override=_parse_base_url(raw_url) if raw_url else None,
    )


# ------------------------------------------------------------------------------------------------------------
# encode(): records -> gzip'd JSON arrays within the limits

_DUMPS_OPTIONS: Final = orjson.OPT_NON_STR_KEYS
_NS_PER_MS: Final = 1_000_000


def _sanitize(value: Any) -> Any:
    """``value`` made serialisable by orjson: lone surrogates replaced, ints beyond 64 bits and unknown
    objects as strings, non-finite floats as ``None``. Only used when orjson refuses a record (rare)."""
    if isinstance(value, str):
        # Lone surrogates (e.g. from JSON "\ud800") become U+FFFD; escaped surrogate pairs are joined.
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {_sanitize(k) if isinstance(k, str) else str(k): _sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_sanitize(v) for v in value]
    return _sanitize(str(value))


def _dumps(obj: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(obj, default=str, option=_DUMPS_OPTIONS)
    except orjson.JSONEncodeError:
        return orjson.dumps(_sanitize(obj), option=_DUMPS_OPTIONS)


def _cut(obj: dict[str, Any], limit: int) -> bytes:
    """Cut ``obj["message"]`` (on a UTF-8 character boundary) until ``obj`` encodes to at most ``limit`` bytes
    and mark it ``truncated``. If the attributes alone are too large, they are first folded into the message
    as JSON text."""
    obj = _sanitize(obj)
    obj[TRUNCATED] = True
    data = orjson.dumps(obj, option=_DUMPS_OPTIONS)
    estimated = False
    for _ in range(8):
        excess = len(data) - limit
        if excess <= 0:
            return data
        message = str(obj["message"])
        encoded_len = len(orjson.dumps(message)) - 2  # JSON escapes can make it longer than its UTF-8 bytes
        if excess > encoded_len:
            # Even an empty message would not fit: the attributes are too large. Keep the base fields and put
            # the attributes' JSON text after the message, which is then cut like any message.
            extras = {k: v for k, v in obj.items() if k not in RESERVED and k != TRUNCATED}
            nested = obj.get(ATTRIBUTES_KEY)
            if isinstance(nested, dict):
                extras.update(nested)
            if not extras:
                break
            obj = {k: v for k, v in obj.items() if k in RESERVED and k != ATTRIBUTES_KEY}
            obj["message"] = f"{message} {orjson.dumps(extras, option=_DUMPS_OPTIONS).decode()}"
            obj[TRUNCATED] = True
            data = orjson.dumps(obj, option=_DUMPS_OPTIONS)
            estimated = False
            continue
        raw = message.encode("utf-8")
        if not estimated:
            # First cut: proportional to the escaped length (exact for evenly escaped text).
            keep = len(raw) * (encoded_len - excess) // encoded_len
            estimated = True
        else:
            # Then by the remaining excess: each raw byte removed removes at least one encoded byte.
            keep = len(raw) - excess
        obj["message"] = raw[: max(0, keep)].decode("utf-8", "ignore")
        data = orjson.dumps(obj, option=_DUMPS_OPTIONS)
    # Unreachable unless the tags alone exceed the limit.
    raise ValueError("a Datadog log object cannot be cut to the size limit")


def encode_record(record: Record, now_ns: int) -> bytes:
    """One record as a Datadog log object (UTF-8 JSON bytes; over :data:`MAX_LOG_BYTES` it is cut to
    :data:`CUT_TO_BYTES` and marked ``truncated``).

    ``timestamp`` (ms since the epoch) is the event time when it is at most 17 h old and at most 2 h ahead of
    ``now_ns``, else the capture time when at most 17 h old, else ``now_ns`` with the record's own time kept
    in ``original_timestamp``. ``status`` is the level (omitted without one). Attributes are merged at the top
    level, except names in :data:`RESERVED`, which go under ``attributes``.
    """
    fresh_after = now_ns - (MAX_AGE_NS - AGE_MARGIN_NS)
    obj = _record_object(record, now_ns, fresh_after)
    data = _dumps(obj)
    if len(data) > MAX_LOG_BYTES:
        data = _cut(obj, CUT_TO_BYTES)
    return data


def _record_object(record: Record, now_ns: int, fresh_after: int) -> dict[str, Any]:
    tags = record.tags
    stream = record.stream
    event = record.event_time_ns
    captured = record.timestamp_ns
    original: int | None = None
    if event is not None and fresh_after <= event <= now_ns + MAX_FUTURE_NS:
        ts = event // _NS_PER_MS
    elif captured >= fresh_after:
        ts = captured // _NS_PER_MS
    else:
        ts = now_ns // _NS_PER_MS
        original = (event if event is not None else captured) // _NS_PER_MS
    obj: dict[str, Any] = {
        "message": record.message,
        "hostname": tags.host,
        "ddsource": tags.source,
        "service": tags.service,
        "ddtags": _DDTAGS.get(stream) or f"stream:{stream}",
        "stream": stream,
        "timestamp": ts,
    }
    level = record.level
    if level is not None:
        obj["status"] = STATUS[level]
    if original is not None:
        obj[ORIGINAL_TIMESTAMP] = original
    attributes = record.attributes
    if attributes:
        if RESERVED.isdisjoint(attributes):
            obj.update(attributes)
        else:
            nested: dict[str, Any] = {}
            for key, value in attributes.items():
                if key in RESERVED:
                    nested[key] = value
                else:
                    obj[key] = value
            obj[ATTRIBUTES_KEY] = nested
    return obj


_DDTAGS: Final = {"stdout": "stream:stdout", "stderr": "stream:stderr"}

# The batch encoder. Each record becomes a dict that orjson.dumps encodes to the same object as encode_record's:
# the constant fields (hostname, ddsource, service, ddtags, stream and status: one set per tags, stream and level)
# are pre-encoded once into an orjson.Fragment, put as the value of "hostname" (the fragment is the rest of the
# object's text from that value on: '"worker-7","ddsource":"CA_agent42",...,"status":"info"'), so that a record
# only adds its own fields. A whole window of records is then encoded by one orjson.dumps of their list.

_HEAD_KEY: Final = "hostname"
_HEAD_TEXT_START: Final = len(b'{"hostname":')
_RESERVED_BUT_TIMESTAMP: Final = RESERVED - {"timestamp"}
"""The reserved names but ``timestamp`` (which a JSON line's attributes nearly always carry; it is nested here)."""
_Heads = dict[Level | None, orjson.Fragment]


def _heads(tags: Tags, stream: str) -> _Heads | None:
    """Level (or ``None``) -> the fragment of the constant fields of ``tags``, ``stream`` and that level's
    ``status``; ``None`` when the tags cannot be encoded as they are (those records take the dict path)."""
    fields: dict[str, Any] = {
        "hostname": tags.host,
        "ddsource": tags.source,
        "service": tags.service,
        "ddtags": _DDTAGS.get(stream) or f"stream:{stream}",
        "stream": stream,
    }
    heads: _Heads = {}
    for level in (None, *STATUS):
        try:
            data = orjson.dumps(fields if level is None else {**fields, "status": STATUS[level]}, default=str)
        except orjson.JSONEncodeError:
            return None
        assert data.startswith(b'{"hostname":') and data.endswith(b"}")
        heads[level] = orjson.Fragment(data[_HEAD_TEXT_START:-1])
    return heads


def _record_objects(records: Sequence[Record], now_ns: int) -> list[dict[str, Any]]:
    """``records`` as dicts that ``orjson.dumps`` encodes to their log objects (with the constant fields as one
    fragment; keys in another order than :func:`_record_object`'s).

    The common shapes are built here in line: a fresh time, attributes with no reserved name but ``timestamp``
    (nested under ``attributes``). An old record, one with another reserved attribute name, or one whose tags do
    not encode is left to :func:`_record_object`.
    """
    fresh_after = now_ns - (MAX_AGE_NS - AGE_MARGIN_NS)
    future_limit = now_ns + MAX_FUTURE_NS
    others_disjoint = _RESERVED_BUT_TIMESTAMP.isdisjoint
    cache: dict[tuple[int, str], _Heads | None] = {}
    objects: list[dict[str, Any]] = []
    append = objects.append
    last_tags: Tags | None = None
    last_stream = ""
    heads: _Heads | None = None
    for record in records:
        event = record.event_time_ns
        if event is not None and fresh_after <= event <= future_limit:
            ts = event // _NS_PER_MS
        else:
            ts = record.timestamp_ns
            if ts < fresh_after:
                append(_record_object(record, now_ns, fresh_after))
                continue
            ts //= _NS_PER_MS
        tags = record.tags
        stream = record.stream
        if tags is not last_tags or stream != last_stream:
            key = (id(tags), stream)
            if key not in cache:
                cache[key] = _heads(tags, stream)
            heads, last_tags, last_stream = cache[key], tags, stream
        attributes = record.attributes
        if attributes:
            if heads is None or not others_disjoint(attributes):
                append(_record_object(record, now_ns, fresh_after))
                continue
            obj = attributes.copy()
            if "timestamp" in obj:  # nested, then overwritten
                obj[ATTRIBUTES_KEY] = {"timestamp": obj["timestamp"]}
            obj[_HEAD_KEY] = heads[record.level]
            obj["message"] = record.message
            obj["timestamp"] = ts
            append(obj)
        elif heads is None:
            append(_record_object(record, now_ns, fresh_after))
        else:
            append({_HEAD_KEY: heads[record.level], "message": record.message, "timestamp": ts})
    return objects


FAST_MARGIN: Final = 0.8
"""Records are encoded together (one ``orjson.dumps``) only in groups expected, from the bytes per record seen so
far, to take at most this fraction of the room left (in the batch, and :data:`MAX_LOG_BYTES`)."""
MIN_GROUP: Final = 8
"""When fewer records than this are expected to fit, they are encoded one at a time instead."""


def _encoded_size(obj: dict[str, Any]) -> float:
    """Bytes ``obj`` takes in an array (its JSON and a separator), or 0 when it does not encode as it is."""
    try:
        return len(orjson.dumps(obj, default=str)) + 1
    except orjson.JSONEncodeError:
        return 0


class _Packer:
    """Greedy packing of records into batches: a record goes into the current batch unless that would take it over
    ``max_entries`` objects or ``goal`` bytes, the same batches as if each record were encoded alone.

    Groups of records are encoded by one ``orjson.dumps`` of their objects (the fast path); the group is kept if
    it encoded, fits the batch and is at most :data:`MAX_LOG_BYTES` + 2 bytes (so that no object in it can be
    over the limit). Otherwise its records are encoded one at a time (:meth:`_add_each`), as are records near the
    end of a batch's byte goal.
    """

    def __init__(self, records: Sequence[Record], now_ns: int, max_entries: int, goal: int) -> None:
        self.records = records
        self.now_ns = now_ns
        self.max_entries = max_entries
        self.goal = goal
        self.batches: list[Batch] = []
        self.start = 0
        """Index in ``records`` of the current batch's first record."""
        self.count = 0
        """Objects in the current batch."""
        self.size = 1
        """Bytes of the current batch's array: ``[``, then each part's length plus the ``,`` or ``]`` after it."""
        self.parts: list[bytes | memoryview] = []
        """The current batch's array contents, in pieces of one or more objects (without brackets; views of the
        groups' arrays, not copies)."""
        self.whole: bytes | None = None
        """The current batch's whole array while it is one group (so that it is not copied)."""
        self.per_record = 0.0
        """Encoded bytes per record lately (0 before any)."""

    def add(self, window: Sequence[Record], objects: list[dict[str, Any]]) -> None:
        """Add the next ``len(window)`` records (at most ``max_entries - count``) and their ``objects``."""
        total = len(objects)
        done = 0
        while done < total:
            k = total - done
            # Bytes a group may add: what is left of the goal, and at most MAX_LOG_BYTES (+1: its "," or "]").
            expected_room = min(self.goal - self.size, MAX_LOG_BYTES + 1) * FAST_MARGIN
            if not self.per_record:  # nothing encoded yet: guess from the first record
                self.per_record = _encoded_size(objects[done])
            if not self.per_record:  # it does not encode: a small group first
                k = min(k, MIN_GROUP)
            elif self.per_record * k > expected_room:  # then fewer: expected_room / per_record < k
                k = int(expected_room / self.per_record)
            if k < MIN_GROUP:  # near the end of the batch, or large records
                done = self._add_each(window, objects, done, total, until_flush=True)
                continue
            group = objects if k == total else objects[done : done + k]
            try:
                data = orjson.dumps(group, default=str)
            except orjson.JSONEncodeError:  # unencodable values or non-string keys: one at a time
                done = self._add_each(window, objects, done, done + k, until_flush=False)
                continue
            cost = len(data) - 1
            self.per_record = cost / k
            if cost > MAX_LOG_BYTES + 1 or self.size + cost > self.goal:
                done = self._add_each(window, objects, done, done + k, until_flush=False)
                continue
            if self.count:
                self._open()
                self.parts.append(memoryview(data)[1:-1])
            else:
                self.whole = data
            self.count += k
            self.size += cost
            done += k

    def _add_each(
        self, window: Sequence[Record], objects: list[dict[str, Any]], lo: int, hi: int, *, until_flush: bool
    ) -> int:
        """Add the records ``lo`` to ``hi`` one at a time (a record that does not encode, or is over
        :data:`MAX_LOG_BYTES`, through :func:`encode_record`); with ``until_flush``, stop after the first one that
        starts a new batch. Returns the index after the last record added."""
        encoded = 0
        for index in range(lo, hi):
            try:
                data = orjson.dumps(objects[index], default=str)
            except orjson.JSONEncodeError:
                data = encode_record(window[index], self.now_ns)
            if len(data) > MAX_LOG_BYTES:
                data = encode_record(window[index], self.now_ns)
            cost = len(data) + 1
            encoded += cost
            flush = bool(self.count) and (self.count >= self.max_entries or self.size + cost > self.goal)
            if flush:
                self.flush()
            self._open()
            self.parts.append(data)
            self.count += 1
            self.size += cost
            if flush and until_flush:
                hi = index + 1
                break
        self.per_record = encoded / (hi - lo)
        return hi

    def _open(self) -> None:
        """Turn a batch held as one whole array into parts, before another part is added."""
        if self.whole is not None:
            self.parts.append(memoryview(self.whole)[1:-1])
            self.whole = None

    def flush(self) -> None:
        """Close the current batch (if it holds anything) and start a new one."""
        if not self.count:
            return
        if self.whole is not None:
            raw = self.whole
        else:  # one copy: "[", part, ",", part, ..., "]" joined
            pieces: list[bytes | memoryview] = [b","] * (2 * len(self.parts) + 1)
            pieces[1::2] = self.parts
            pieces[0], pieces[-1] = b"[", b"]"
            raw = b"".join(pieces)
        end = self.start + self.count
        assert len(raw) == self.size <= MAX_CONTENT_BYTES and self.count <= MAX_ENTRIES
        self.batches.append(Batch(records=self.records[self.start : end], payload=gzip_bytes(raw), size=self.size))
        self.start, self.count, self.size, self.parts, self.whole = end, 0, 1, [], None


def encode(
    records: Sequence[Record],
    *,
    now_ns: int | None = None,
    max_entries: int = MAX_ENTRIES,
    goal_bytes: int = BATCH_GOAL_BYTES,
) -> Encoded:
    """Cut ``records`` (in order) into gzip'd JSON-array payloads within Datadog's limits.

    Each record is the object :func:`encode_record` makes (keys may come in another order). Records are packed
    greedily: a batch takes records until the next would take it over ``max_entries`` objects or ``goal_bytes``.
    Typical records are encoded a batch at a time with one ``orjson.dumps``; a group that does not encode or might
    be over a limit is encoded one record at a time (see :class:`_Packer`).

    Args:
        records: the records to encode.
        now_ns: the clock used for the 18 h window (default ``time.time_ns()``).
        max_entries: logs per request, at most :data:`MAX_ENTRIES`.
        goal_bytes: uncompressed bytes per request, at most :data:`BATCH_GOAL_BYTES`.

    Returns:
        batches whose ``payload`` is the gzip'd array and ``size`` its uncompressed length (<= ``goal_bytes``,
        <= ``max_entries`` objects). Nothing is dropped: over-long records are cut and marked ``truncated``.
    """
    now = time.time_ns() if now_ns is None else now_ns
    packer = _Packer(records, now, max(1, min(max_entries, MAX_ENTRIES)), min(goal_bytes, BATCH_GOAL_BYTES))
    total = len(records)
    index = 0
    while index < total:
        take = min(packer.max_entries - packer.count, total - index)
        window = records[index : index + take]
        packer.add(window, _record_objects(window, now))
        index += take
        if packer.count >= packer.max_entries:
            packer.flush()
    packer.flush()
    return Encoded(packer.batches)


# ------------------------------------------------------------------------------------------------------------
# classify(): response -> verdict
#
# Datadog's status table (https://docs.datadoghq.com/api/latest/logs/#send-logs):
#   202 Accepted                 -> OK (any 2xx)
#   400 Bad request (payload)    -> DROP "http_400", the body (first 300 characters) logged once for the batch
#   401 Unauthorized (no key)    -> RETRY, loud: a rotated key must not lose data; the spool holds it
#   403 Permission issue (key)   -> RETRY, loud
#   408 Request Timeout          -> RETRY honouring Retry-After
#   413 Payload too large        -> SPLIT (a single record still too large: dropped and counted by the runner)
#   429 Too Many Requests        -> RETRY honouring Retry-After
#   500, 503 (any 5xx)           -> RETRY honouring Retry-After
# Not in the table: other 4xx -> DROP "http_<code>" (the request can never succeed as is); 1xx/3xx (a proxy
# or a wrong FORWARDER_DATADOG_URL; redirects are not followed) -> RETRY, loud: nothing is dropped for them.
# Network errors and timeouts (send(), via _http.transport_verdict) -> RETRY.

BODY_EXCERPT_CHARS: Final = 300


def classify(response: httpx.Response) -> Verdict:
    """The verdict for one intake response (pure: reads status, ``Retry-After`` and the body only)."""
    status = response.status_code
    if 200 <= status < 300:
        return OK
    after = parse_retry_after(response.headers.get("Retry-After"))
    if status == 413:
        return split(detail=_excerpt(response))
    if status == 400:
        return drop("http_400", detail=_excerpt(response))
    if status in (401, 403):
        return retry(
            f"http_{status}",
            after,
            detail=f"Datadog rejected DATADOG_TOKEN (HTTP {status}); records are held until it is fixed",
            loud=True,
        )
    if status in (408, 429) or status >= 500:
        return retry(f"http_{status}", after, detail=_excerpt(response))
    if 400 <= status < 500:
        return drop(f"http_{status}", detail=_excerpt(response))
    return retry(f"http_{status}", after, detail=f"unexpected HTTP {status} from the intake", loud=True)


def _excerpt(response: httpx.Response) -> str:
    return response.text[:BODY_EXCERPT_CHARS]


# ------------------------------------------------------------------------------------------------------------
# The sink

REDACTED: Final = "<redacted>"


class DatadogSink:
    """Sends encoded batches to the Datadog logs intake, one attempt per :meth:`send`.

    Args:
        config: the validated settings (token kind decides the URL and how the token is passed).
        http: shared client settings (timeouts, ``SSL_CERT_FILE``).
    """

    name = "datadog"
    ordered = False
    """Batches are independent (each record carries its timestamp): several may be in flight at once."""

    def __init__(self, config: DatadogConfig, http: HttpSettings) -> None:
        self._config = config
        self._secrets = config.secret_values()
        self._url = config.url()
        token = config.token.reveal()
        self._headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        self._params: dict[str, str] = {}
        if config.client_token:
            self._params["dd-api-key"] = token
        else:
            self._headers["DD-API-KEY"] = token
        self._client = make_client(http)

    def __repr__(self) -> str:
        return f"DatadogSink({self._url!r})"

    def encode(self, records: Sequence[Record]) -> Encoded:
        """See :func:`encode`."""
        return encode(records)

    async def send(self, batch: Batch) -> Verdict:
        """POST ``batch.payload`` (gzip'd JSON array) once; return :func:`classify`'s verdict, or ``RETRY``
        for a transport error. Verdict details never contain the token."""
        try:
            response = await post(
                self._client, self._url, content=batch.payload, headers=self._headers, params=self._params
            )
        except httpx.HTTPError as exc:
            return self._scrub(transport_verdict(exc))
        return self._scrub(classify(response))

    def _scrub(self, verdict: Verdict) -> Verdict:
        if verdict.outcome is Outcome.OK or not verdict.detail:
            return verdict
        detail = verdict.detail
        for secret in self._secrets:
            detail = detail.replace(secret, REDACTED)
        if detail == verdict.detail:
            return verdict
        return Verdict(verdict.outcome, verdict.after, verdict.reason, verdict.dropped, detail, verdict.loud)

    async def aclose(self) -> None:
        """Close the HTTP client's connections."""
        await self._client.aclose()


__all__ = [
    "BATCH_GOAL_BYTES",
    "ENV_VARS",
    "MAX_AGE_NS",
    "MAX_CONTENT_BYTES",
    "MAX_ENTRIES",
    "MAX_LOG_BYTES",
    "REGIONS",
    "DatadogConfig",
    "DatadogSink",
    "classify",
    "config_from_env",
    "encode",
    "encode_record",
]
