"""New Relic destination: the Log API's detailed JSON format, gzipped, authenticated by license key.

Wire format (https://docs.newrelic.com/docs/logs/log-api/introduction-log-api/#json-content), one POST per
batch::

    POST https://log-api.newrelic.com/log/v1          (EU: https://log-api.eu.newrelic.com/log/v1)
    Api-Key: <license key>
    Content-Type: application/json
    Content-Encoding: gzip

    [{"common": {"attributes": {"host": ..., "source": ..., "service": ...}},
      "logs": [{"timestamp": <ms>, "message": ...,
                "attributes": {"stream": ..., "level": ..., <record attributes>}}]}]

One ``{"common", "logs"}`` object per run of records sharing the same tags. The members of a JSON object carry no
order: :func:`encode`'s fast path sends ``stream`` and ``level`` after the record's attributes.

Authentication: the Log API doc's header table lists ``Api-Key`` with "A New Relic license key"
(https://docs.newrelic.com/docs/logs/log-api/introduction-log-api/#auth-header); newrelic-telemetry-sdk's
``LogClient`` sends the license key the same way (``client.py``: ``headers.update({"Api-Key": license_key,
...})``). (``X-License-Key`` is what New Relic's Fluent Bit plugin sends; both are accepted, we follow the
current doc.)

Region: New Relic's own agents derive the region from the license key, the prefix before the first ``x``
(``re.match("^(.+?)x", key)`` in newrelic-python-agent ``newrelic/core/config.py`` and
``newrelic/api/log.py``), so ``eu01xx…`` is region ``eu01``. Regions starting with ``eu`` select the
documented EU endpoint, every other key the US endpoint. ``FORWARDER_NEW_RELIC_URL`` overrides both (a proxy,
FedRAMP's ``https://gov-log-api.newrelic.com/log/v1``, tests).

Limits (https://docs.newrelic.com/docs/logs/log-api/introduction-log-api/#limits and
https://docs.newrelic.com/docs/logs/log-api/log-event-data/):

* "Payload total size: 1MB (10^6 bytes) maximum per POST. We highly recommend using compression." The doc
  does not say whether the compressed or the uncompressed body counts (New Relic's Fluent Bit plugin measures
  the gzipped body, Vector's ``new_relic`` sink the uncompressed batch). We bound the *uncompressed* JSON at
  10^6 bytes, which keeps the gzipped body under the limit on either reading (checked after compression too).
* "Number of attributes per event: 255 maximum." Counted here as everything the stored event gets from us:
  ``timestamp``, ``message``, the three common tags and the per-log attributes (nested objects count once per
  flattened leaf). Extra attributes are folded into one JSON string attribute, ``folded_attributes``.
* "Length of attribute name: 255 characters." Longer names are folded too.
* Attribute values: "The first 4,094 characters are stored in NRDB as a Log event field", longer values are
  stored as a blob of "up to 128KB"; "Data beyond 128KB will be truncated". Messages and string values are
  kept whole up to 128,000 UTF-8 bytes, then cut and marked ``truncated: true``.
* "Payloads with timestamps older than 48 hours may be dropped": the time stated by a line is used only within
  48 hours of its capture time, else the capture time is sent.
* Arrays are an unsupported attribute type: list values are sent as JSON strings. Nested objects are
  flattened to dotted names (what New Relic does with them on ingest), so the attribute count is exact.
* Reserved names (``accountId``, ``eventType`` are dropped on ingest; ``entity.*`` confuse entity synthesis)
  and record attributes that would shadow our fields (``host``, ``message``...) are renamed ``attr.<name>``.

Status codes: the Log API doc only documents ``429`` with ``Retry-After`` (seconds) for its rate limits
(https://docs.newrelic.com/docs/logs/log-api/introduction-log-api/#rate-limit-violations); the ingest
gateway's shared table is in the Metric API doc
(https://docs.newrelic.com/docs/data-apis/ingest-apis/metric-api/report-metrics-metric-api/#response-status-codes).
A ``202`` means "received": New Relic validates asynchronously and reports later problems as
``NrIntegrationError`` events in the account, which no HTTP client can see.

Why not newrelic-telemetry-sdk's ``LogClient``: it returns 429/5xx responses with their headers (it does not
hide them) and raises urllib3 errors for network failures, so a verdict per attempt is possible; but it
serialises and compresses inside ``send_batch`` (stdlib ``json`` + gzip level 6, ~5x slower than orjson +
level 1 here, and after our size checks, so the payload that is measured is not the one sent), it has no size
checks, it is synchronous (a worker thread per request that trio cannot cancel at the shutdown deadline), it
keeps its own urllib3 pool and TLS settings, reads ``HTTPS_PROXY`` but not ``NO_PROXY``, and has a fixed
``/log/v1`` path over HTTPS only. So we send the same wire format (checked against ``LogClient`` in the
tests) through the shared httpx client.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import operator
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import orjson

from forwarder.config import ConfigError, HttpSettings, Secret
from forwarder.record import HOST, SERVICE, SOURCE, STREAM, STREAMS, TRUNCATED, Level, Record, Tags
from forwarder.sinks._http import gzip_bytes, make_client, post, status_verdict, transport_verdict
from forwarder.sinks._protocol import OK, Batch, Encoded, Verdict

# --- limits -------------------------------------------------------------------------------------------------

LOG_API_DOC: Final = "https://docs.newrelic.com/docs/logs/log-api/introduction-log-api/#limits"
LOG_EVENT_DOC: Final = "https://docs.newrelic.com/docs/logs/log-api/log-event-data/"

MAX_PAYLOAD_BYTES: Final = 1_000_000
""""1MB(10^6 bytes) maximum per POST" (LOG_API_DOC). Applied to the uncompressed JSON body (the conservative
reading); the gzipped body is checked against it as well."""

MAX_ATTRIBUTES_PER_EVENT: Final = 255
""""Number of attributes per event: 255 maximum" (LOG_API_DOC, LOG_EVENT_DOC)."""

MAX_ATTRIBUTE_NAME_CHARS: Final = 255
""""Length of attribute name: 255 characters" (LOG_API_DOC)."""

SEARCHABLE_VALUE_CHARS: Final = 4_094
""""The first 4,094 characters are stored in NRDB as a Log event field"; longer values go to a blob
(LOG_API_DOC). Informational: longer values are still sent whole (up to :data:`MAX_VALUE_BYTES`)."""

MAX_VALUE_BYTES: Final = 128_000
"""Blob storage keeps "up to 128KB"; "Data beyond 128KB will be truncated" (LOG_EVENT_DOC). We cut messages
and string attribute values at 128,000 UTF-8 bytes (the smaller reading of "128KB") and mark them
``truncated``."""

MAX_TIMESTAMP_AGE_NS: Final = 48 * 3600 * 1_000_000_000
""""Payloads with timestamps older than 48 hours may be dropped" (LOG_API_DOC). A line's own time is sent
only when it is within this distance of its capture time."""

FIXED_ATTRIBUTES: Final = 5
"""Attributes of every stored event besides the per-log ones: timestamp, message, host, source, service."""

PER_LOG_ATTRIBUTES: Final = MAX_ATTRIBUTES_PER_EVENT - FIXED_ATTRIBUTES
"""At most this many keys in a log's ``attributes`` object (250)."""

US_URL: Final = "https://log-api.newrelic.com/log/v1"
EU_URL: Final = "https://log-api.eu.newrelic.com/log/v1"

FOLDED_ATTRIBUTE: Final = "folded_attributes"
"""Holds, as a JSON object in a string, the attributes beyond the per-event limit (or with long names)."""
RENAMED_PREFIX: Final = "attr."
LEVEL: Final = "level"

_RESERVED: Final = frozenset((HOST, SOURCE, SERVICE, STREAM, LEVEL, "timestamp", "message", FOLDED_ATTRIBUTE))
_RESERVED_BY_NEW_RELIC: Final = frozenset(
    ("log", "LOG", "MESSAGE", "accountId", "eventType", "entity.guid", "entity.name", "entity.type")
)
_RENAMED: Final = _RESERVED | _RESERVED_BY_NEW_RELIC
"""Record attribute names renamed ``attr.<name>``: our own fields, names the Log API rewrites into
``message``, and reserved names (LOG_API_DOC: accountId/eventType are dropped on ingest, entity.* used for
entity synthesis)."""

_QUICK_CHARS: Final = MAX_VALUE_BYTES // 4
"""A string of at most this many characters cannot exceed MAX_VALUE_BYTES in UTF-8 (skips encoding it)."""
_MAX_DEPTH: Final = 16
"""Nested objects deeper than this are sent as one JSON string (bounded recursion)."""

ENV_VARS: tuple[str, ...] = ("NEW_RELIC_LICENSE_KEY", "FORWARDER_NEW_RELIC_URL")

# --- config -------------------------------------------------------------------------------------------------

_REGION_RE: Final = re.compile(r"^(.+?)x")
_KEY_RE: Final = re.compile(r"^[\x21-\x7e]+$")


def key_region(license_key: str) -> str | None:
    """The region New Relic's agents read from a license key: the prefix before the first ``x`` (``"eu01"``
    for ``eu01xx…``), or ``None`` for keys without one (US keys are hexadecimal)."""
    match = _REGION_RE.match(license_key)
    return match.group(1) if match else None


def region_url(license_key: str) -> tuple[str, str]:
    """``(region, Log API URL)`` for a license key: ``("eu", EU_URL)`` when its region starts with ``eu``,
    else ``("us", US_URL)``."""
    region = key_region(license_key)
    if region is not None and region.lower().startswith("eu"):
        return "eu", EU_URL
    return "us", US_URL


@dataclass(frozen=True)
class NewRelicConfig:
    """Validated New Relic settings.

    Attributes:
        license_key: the ingest license key (sent as ``Api-Key``).
        url: the Log API URL (from the key's region, or ``FORWARDER_NEW_RELIC_URL``).
        region: ``"us"``, ``"eu"`` or ``"override"``.
    """

    license_key: Secret
    url: str = field(repr=False)
    region: str
    name: str = "newrelic"

    def endpoint(self) -> str:
        """The URL without user info, query or fragment (never a secret)."""
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def secret_values(self) -> list[str]:
        """The license key, and the URL itself when it carries user info or a query (a key may be in it)."""
        values = [self.license_key.reveal()]
        parts = urllib.parse.urlsplit(self.url)
        if parts.query or parts.username or parts.password:
            values.append(self.url)
        return values

    def build(self, http: HttpSettings) -> NewRelicSink:
        """The sink; opens no connection until the first send."""
        return NewRelicSink(self, http)


def config_from_env(env: Mapping[str, str]) -> NewRelicConfig | None:
    """``NewRelicConfig`` when ``NEW_RELIC_LICENSE_KEY`` is set (non-blank), else ``None``.

    Raises:
        ConfigError: the key has characters an HTTP header cannot carry, or ``FORWARDER_NEW_RELIC_URL`` is
            not an http(s) URL with a host.
    """
    raw_key = (env.get("NEW_RELIC_LICENSE_KEY") or "").strip()
    if not raw_key:
        return None
    if not _KEY_RE.match(raw_key):
        raise ConfigError(
            "NEW_RELIC_LICENSE_KEY",
            "contains spaces, control or non-ASCII characters; expected the license key as shown in New "
            "Relic (printable ASCII, e.g. 40 characters)",
        )
    override = (env.get("FORWARDER_NEW_RELIC_URL") or "").strip()
    if override:
        try:
            parts = urllib.parse.urlsplit(override)
            _ = parts.port  # raises ValueError for a non-numeric or out-of-range port
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(
                "FORWARDER_NEW_RELIC_URL",
                "is not an http(s) URL with a host; expected e.g. https://log-api.newrelic.com/log/v1",
            )
        return NewRelicConfig(license_key=Secret(raw_key), url=override, region="override")
    region, url = region_url(raw_key)
    return NewRelicConfig(license_key=Secret(raw_key), url=url, region=region)


# --- encode -------------------------------------------------------------------------------------------------


def _cut_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, on a character boundary."""
    return text.encode("utf-8", "replace")[:max_bytes].decode("utf-8", "ignore")


def _too_long(text: str) -> bool:
    return len(text) > _QUICK_CHARS and len(text.encode("utf-8", "replace")) > MAX_VALUE_BYTES


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, default=str, ensure_ascii=False)


def _put(out: dict[str, Any], overflow: dict[str, Any], key: str, value: Any, depth: int) -> bool:
    """Store one attribute in ``out`` (flattening objects, stringifying arrays, cutting long strings).

    Returns True when a value was cut.
    """
    if len(key) > MAX_ATTRIBUTE_NAME_CHARS:
        overflow[key] = value
        return False
    kind = type(value)
    if kind is str:
        if len(value) > _QUICK_CHARS and _too_long(value):
            out[key] = _cut_utf8(value, MAX_VALUE_BYTES)
            return True
        out[key] = value
        return False
    if kind is int or kind is float or kind is bool or value is None:
        out[key] = value
        return False
    if kind is dict and value and depth < _MAX_DEPTH:
        cut = False
        for sub_key, sub_value in value.items():
            cut |= _put(out, overflow, f"{key}.{sub_key}", sub_value, depth + 1)
        return cut
    text = _json_text(value) if kind in (dict, list, tuple) else str(value)
    if _too_long(text):
        out[key] = _cut_utf8(text, MAX_VALUE_BYTES)
        return True
    out[key] = text
    return False


def _fold(attrs: dict[str, Any], overflow: dict[str, Any], limit: int) -> bool:
    """Keep at most ``limit`` keys in ``attrs`` (``stream``/``level``/``truncated`` first) by moving the last
    ones, and ``overflow``, into one JSON string attribute. Returns True when that string had to be cut (the
    caller then adds ``truncated``, for which a slot is left free)."""
    protected = [k for k in (STREAM, LEVEL, TRUNCATED) if k in attrs]
    kept: dict[str, Any] = {k: attrs[k] for k in protected}
    others = [(k, v) for k, v in attrs.items() if k not in kept]
    room = limit - 1 - len(kept)  # one slot for the folded string
    rest = dict(others[room:])
    rest.update(overflow)
    text = _json_text(rest)
    cut = _too_long(text)
    if cut:
        if TRUNCATED not in kept and room > 0:  # free a slot for ``truncated``
            room -= 1
            rest = dict(others[room:])
            rest.update(overflow)
            text = _json_text(rest)
        text = _cut_utf8(text, MAX_VALUE_BYTES)
    kept.update(others[:room])
    attrs.clear()
    attrs.update(kept)
    attrs[FOLDED_ATTRIBUTE] = text
    return cut


def log_entry(record: Record) -> dict[str, Any]:
    """One record as a Log API log object: ``{"timestamp": ms, "message": str, "attributes": {...}}``.

    ``attributes`` holds ``stream``, ``level`` (when detected), the record's attributes (flattened, reserved
    names renamed ``attr.<name>``, extras folded into ``folded_attributes``) and ``truncated: true`` when a
    value was cut. At most :data:`PER_LOG_ATTRIBUTES` keys.
    """
    ts = record.timestamp_ns
    event = record.event_time_ns
    if event is not None and -MAX_TIMESTAMP_AGE_NS < event - ts < MAX_TIMESTAMP_AGE_NS:
        ts = event
    message = record.message
    cut = False
    if len(message) > _QUICK_CHARS and _too_long(message):
        message = _cut_utf8(message, MAX_VALUE_BYTES)
        cut = True
    attrs: dict[str, Any] = {STREAM: record.stream}
    if record.level is not None:
        attrs[LEVEL] = record.level.name
    source = record.attributes
    overflow: dict[str, Any] = {}
    if source:
        for key, value in source.items():
            name = key if type(key) is str else str(key)
            if name in _RENAMED:
                name = RENAMED_PREFIX + name
            kind = type(value)
            if len(name) > MAX_ATTRIBUTE_NAME_CHARS:
                overflow[name] = value
            elif kind is str:
                if len(value) > _QUICK_CHARS and _too_long(value):
                    attrs[name] = _cut_utf8(value, MAX_VALUE_BYTES)
                    cut = True
                else:
                    attrs[name] = value
            elif kind is int or kind is float or kind is bool:
                attrs[name] = value
            else:
                cut |= _put(attrs, overflow, name, value, 0)
    if cut:
        attrs[TRUNCATED] = True
    if (len(attrs) > PER_LOG_ATTRIBUTES or overflow) and _fold(attrs, overflow, PER_LOG_ATTRIBUTES):
        attrs[TRUNCATED] = True
    return {"timestamp": ts // 1_000_000, "message": message, "attributes": attrs}


def _dumps(entry: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(entry, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):  # > 64-bit ints, lone surrogates, exotic types
        return json.dumps(entry, default=str, ensure_ascii=False).encode("utf-8", "replace")


def _fit(entry: dict[str, Any], budget: int) -> bytes:
    """Serialise ``entry``, shrinking it to at most ``budget`` bytes if needed: every attribute but
    stream/level is folded into one string, then the longer of message and that string is cut, repeatedly."""
    data = _dumps(entry)
    if len(data) <= budget:
        return data
    attrs: dict[str, Any] = entry["attributes"]
    keep: dict[str, Any] = {k: attrs[k] for k in (STREAM, LEVEL) if k in attrs}
    rest = {k: v for k, v in attrs.items() if k not in keep and k != TRUNCATED}
    only_folded = FOLDED_ATTRIBUTE in rest and len(rest) == 1
    folded = str(rest[FOLDED_ATTRIBUTE]) if only_folded else _json_text(rest)
    message = str(entry["message"])
    while True:
        shrunk_attrs: dict[str, Any] = {**keep, TRUNCATED: True, FOLDED_ATTRIBUTE: folded}
        shrunk = {"timestamp": entry["timestamp"], "message": message, "attributes": shrunk_attrs}
        data = _dumps(shrunk)
        excess = len(data) - budget
        if excess <= 0 or not (message or folded):
            return data
        # JSON escaping can make a character up to 6 bytes: cut by at least the excess (in encoded bytes).
        if len(message.encode("utf-8", "replace")) >= len(folded.encode("utf-8", "replace")):
            message = _cut_utf8(message, max(0, len(message.encode("utf-8", "replace")) - excess - 64))
        else:
            folded = _cut_utf8(folded, max(0, len(folded.encode("utf-8", "replace")) - excess - 64))


# --- encode: the fast path ------------------------------------------------------------------------------------
#
# Most records need none of log_entry's care: their attribute names are plain, their values JSON scalars, their strings
# short. encode() takes the records of a group in blocks, checks a block's attributes at once with C-level set
# operations (_plain_renames: names and value types), builds its log objects with one comprehension (_plain_entries) and
# serialises them with one orjson.dumps; a block that fits in the request body is appended as one piece, one that does
# not is cut where the body is full (_Encoder.place). What is in doubt goes back to the per-record path (log_entry,
# _dumps, _fit): a block with attributes that are not plain (log_entry builds its logs), a block orjson refuses (record
# by record, as before), a block too large for the checks it skipped (halved until it is small enough, or is one
# record). The bodies are the same either way (same logs, same sizes, same cuts: tests/sinks/test_newrelic.py compares
# them with the per-record model); only the order of members differs (on the fast path ``stream``, ``level`` and renamed
# attributes come after the record's own attributes), which a JSON object does not carry.

_BLOCK_RECORDS: Final = 256
"""Records serialised by one ``orjson.dumps`` call, at most (fewer when logs are long, see _BLOCK_BYTES)."""

_BLOCK_BYTES: Final = MAX_VALUE_BYTES // 2
"""Aimed size of a serialised block: blocks stay under MAX_VALUE_BYTES (see :meth:`_Encoder.place`) without
being halved."""

_PLAIN_TYPES: Final = frozenset((str, int, float, bool, type(None)))
"""Attribute value types sent as they are (strings up to MAX_VALUE_BYTES: the size of their log bounds them)."""

_PLAIN_MAX_ATTRIBUTES: Final = PER_LOG_ATTRIBUTES - 2
"""Record attributes that always fit next to ``stream`` and ``level`` without folding."""

_OWN_FIELDS: Final = frozenset((STREAM, LEVEL))

_BASE_ATTRIBUTES: Final[dict[str, dict[Level | None, dict[str, Any]]]] = {
    stream: {None: {STREAM: stream}} | {level: {STREAM: stream, LEVEL: level.name} for level in Level}
    for stream in STREAMS
}
"""``stream`` and ``level`` by stream and level: the ``attributes`` of every log of the fast path without
attributes of its own (shared, so never mutated: renames never concern ``stream`` or ``level``), merged into a
copy of the record's attributes for the others."""


_attributes_key: Final = operator.itemgetter("attributes")


_DUMPS_OPTIONS: Final = orjson.OPT_PASSTHROUGH_DATETIME
"""orjson refuses datetimes (log_entry sends ``str(value)``, orjson its own format): the block goes record by
record."""


def _plain_values(sources: Iterable[dict[Any, Any]]) -> bool:
    """Whether every value of the dicts ``sources`` is of a _PLAIN_TYPES type (one C-level pass)."""
    return _PLAIN_TYPES.issuperset(map(type, itertools.chain.from_iterable(map(dict.values, sources))))


def _plain_renames(sources: list[dict[Any, Any]], names: set[str]) -> tuple[tuple[str, str], ...] | None:
    """Whether the attributes ``sources`` (the non-empty ones of a block) are *plain* (log_entry would send them
    as they are, but for renames), and the renames: ``None`` when one needs log_entry's care (more than
    _PLAIN_MAX_ATTRIBUTES attributes, a name that is not a ``str``, is longer than MAX_ATTRIBUTE_NAME_CHARS or is
    ``stream``/``level``, a value that is not of a _PLAIN_TYPES type), else the ``(name, "attr." + name)`` pairs
    for the reserved names present (a JSON line's own ``timestamp``...).

    ``names`` caches the names already found plain (and learns new ones). String lengths are not checked here:
    the callers bound them by the size of the serialised logs.
    """
    if not sources:
        return ()
    keys: set[Any] = set().union(*sources)
    if len(keys) > _PLAIN_MAX_ATTRIBUTES and max(map(len, sources)) > _PLAIN_MAX_ATTRIBUTES:
        return None
    renames: tuple[tuple[str, str], ...] = ()
    if not names.issuperset(keys):
        for name in keys.difference(names):
            if name in _RENAMED:
                if name in _OWN_FIELDS:
                    return None
                renames += ((name, RENAMED_PREFIX + name),)
            elif type(name) is str and len(name) <= MAX_ATTRIBUTE_NAME_CHARS:
                names.add(name)
            else:
                return None
    if not _plain_values(sources):
        return None
    return renames


def _plain_entries(block: Sequence[Record], renames: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
    """log_entry for records with plain attributes (see :func:`_plain_renames`), built without looking at them
    (long strings are not cut: the caller checks the size of the serialised logs).

    Raises:
        KeyError: a record's stream is neither ``stdout`` nor ``stderr`` (the caller takes the per-record path).
    """
    bases = _BASE_ATTRIBUTES
    low, high = -MAX_TIMESTAMP_AGE_NS, MAX_TIMESTAMP_AGE_NS
    entries = [
        {
            "timestamp": (
                event
                if (event := record.event_time_ns) is not None and low < event - record.timestamp_ns < high
                else record.timestamp_ns
            )
            // 1_000_000,
            "message": record.message,
            # dict | dict copies the record's attributes table as it is (one memcpy) where {**a, **b} re-inserts
            # every key of a dict that had keys removed (the shaper's JSON attributes: message and level).
            "attributes": (
                source | bases[record.stream][record.level]
                if (source := record.attributes)
                else bases[record.stream][record.level]
            ),
        }
        for record in block
    ]
    for name, renamed in renames:
        for attrs in map(_attributes_key, entries):
            if name in attrs:  # never a shared base: those only hold stream and level
                attrs[renamed] = attrs.pop(name)
    return entries


_CLOSE: Final = b"]}"


def _gzip_slack(size: int) -> int:
    """Bytes gzip may add to ``size`` bytes of incompressible input: zlib's ``deflateBound`` is
    ``n + (n >> 12) + (n >> 14) + (n >> 25) + 7`` plus an 18-byte gzip wrapper; this bound is larger."""
    return (size >> 11) + 64


def _group_head(tags: Tags) -> bytes:
    common = orjson.dumps({HOST: tags.host, SOURCE: tags.source, SERVICE: tags.service})
    return b'{"common":{"attributes":' + common + b'},"logs":['


class _Builder:
    """Accumulates serialised logs into one request body of at most ``max_bytes`` bytes.

    ``parts`` holds the body in order (``[``, group heads, pieces of comma-separated logs, the commas and the
    ``]},`` between groups) for one final join; ``size`` is the length of the finished body (with its final
    ``]}]``).
    """

    __slots__ = ("head", "max_bytes", "parts", "records", "size")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.parts: list[bytes | memoryview] = [b"["]
        self.head: bytes | None = None
        self.records: list[Record] = []
        self.size = 2  # "[" and "]"

    def room(self, head: bytes) -> int:
        """How many bytes of comma-separated logs of group ``head`` still fit."""
        if head is self.head:
            return self.max_bytes - self.size - 1  # the comma before them
        return self.max_bytes - self.size - (1 if self.head is not None else 0) - len(head) - len(_CLOSE)

    def append(self, head: bytes, piece: bytes | memoryview, records: Sequence[Record]) -> None:
        """Append ``piece``, the comma-separated logs of ``records`` in group ``head`` (the caller checked
        :meth:`room`, or the body is empty)."""
        parts = self.parts
        if head is self.head:
            parts.append(b",")
            self.size += 1 + len(piece)
        else:
            if self.head is not None:
                parts.append(_CLOSE + b",")
                self.size += 1
            parts.append(head)
            self.size += len(head) + len(_CLOSE) + len(piece)
            self.head = head
        parts.append(piece)
        self.records.extend(records)

    def add(self, record: Record, head: bytes, entry: bytes) -> bool:
        """Append ``entry`` (in the group ``head``) if it fits; False when the body would exceed the limit."""
        if self.records and len(entry) > self.room(head):
            return False
        self.append(head, entry, (record,))
        return True

    def body(self) -> bytes:
        """The request body, ``[{"common": ..., "logs": [...]}, ...]``: :attr:`size` bytes."""
        return b"".join((*self.parts, _CLOSE + b"]"))


class _Encoder:
    """Cuts records into request bodies of at most ``max_bytes`` bytes of JSON (see :func:`encode`)."""

    __slots__ = ("batches", "block_records", "builder", "max_bytes", "names")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.batches: list[Batch] = []
        self.builder = _Builder(max_bytes)
        self.names: set[str] = set()
        self.block_records = _BLOCK_RECORDS

    def add_run(self, run: Sequence[Record], head: bytes) -> None:
        """Append ``run``, records of group ``head``, block by block."""
        # One record alone must fit, even gzipped: its JSON leaves room for gzip's worst-case growth.
        budget = self.max_bytes - 2 - len(head) - len(_CLOSE) - _gzip_slack(self.max_bytes)
        start = 0
        while start < len(run):
            end = start + self.block_records
            self.add_block(run[start:end], head, budget)
            start = end

    def add_block(self, block: Sequence[Record], head: bytes, budget: int) -> None:
        """Append the records of ``block`` (group ``head``); ``budget`` is the most one log may take."""
        sources = [source for record in block if (source := record.attributes)]
        renames = _plain_renames(sources, self.names)
        entries: list[dict[str, Any]] | None = None
        if renames is not None:
            try:
                entries = _plain_entries(block, renames)
            except KeyError:  # a stream that is neither stdout nor stderr
                entries = None
        if entries is None:
            entries = [log_entry(record) for record in block]
        try:
            data = orjson.dumps(entries, option=_DUMPS_OPTIONS)
        except (TypeError, orjson.JSONEncodeError):  # > 64-bit ints, lone surrogates, exotic values
            for record in block:
                self.add(record, head, _serialised(record, budget))
            return
        # The next block aims at _BLOCK_BYTES.
        self.block_records = max(1, min(_BLOCK_RECORDS, len(block) * _BLOCK_BYTES // len(data)))
        self.place(head, budget, block, entries, data)

    def place(
        self, head: bytes, budget: int, block: Sequence[Record], entries: list[dict[str, Any]], data: bytes
    ) -> None:
        """Append ``data``, the JSON array of ``entries`` (the logs of ``block``), cutting it where the body is
        full (the next body starts with the log that did not fit).

        Logs that take at most MAX_VALUE_BYTES bytes together hold no string that log_entry would cut, and none
        of them is over ``budget`` when together they are not: such a block is cut at the count of logs its
        average size says fit (again if they do not); a larger one is halved until it is, or is one record, which
        then takes the per-record path.
        """
        size = len(data) - 2
        if size <= MAX_VALUE_BYTES and size <= budget:
            room = self.builder.room(head)
            if size <= room:
                self.builder.append(head, memoryview(data)[1:-1], block)
                return
            if len(block) == 1:
                self.add(block[0], head, data[1:-1])
                return
            cut = min(len(block) - 1, max(1, len(block) * room // size))
        elif len(block) == 1:
            self.add(block[0], head, _serialised(block[0], budget))
            return
        else:
            cut = len(block) // 2
        for part, part_entries in ((block[:cut], entries[:cut]), (block[cut:], entries[cut:])):
            self.place(head, budget, part, part_entries, orjson.dumps(part_entries, option=_DUMPS_OPTIONS))

    def add(self, record: Record, head: bytes, entry: bytes) -> None:
        """Append one serialised log, starting a new body when it does not fit in this one."""
        if not self.builder.add(record, head, entry):
            self.finish()
            self.builder.add(record, head, entry)

    def finish(self) -> None:
        """Close the current body (if it has records) into a batch and start a new one."""
        builder = self.builder
        if not builder.records:
            return
        self.builder = _Builder(self.max_bytes)
        body = builder.body()
        payload = gzip_bytes(body)
        if len(payload) > self.max_bytes and len(builder.records) > 1:
            # Incompressible data grew under gzip: halve (gzip adds at most ~0.03%, so this is rare).
            half = len(builder.records) // 2
            for part in (builder.records[:half], builder.records[half:]):
                self.batches.extend(encode(part, max_payload_bytes=self.max_bytes).batches)
            return
        self.batches.append(Batch(records=builder.records, payload=payload, size=len(body)))


def _serialised(record: Record, budget: int) -> bytes:
    """The per-record path: log_entry serialised, cut to ``budget`` bytes when longer."""
    entry = _dumps(log_entry(record))
    if len(entry) > budget:
        entry = _fit(log_entry(record), budget)
    return entry


def encode(records: Sequence[Record], *, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> Encoded:
    """Cut ``records`` (in order) into gzipped Log API request bodies of at most ``max_payload_bytes`` bytes
    of JSON each (and gzipped bodies no larger). Pure and thread-safe; never drops a record (an oversized one
    is cut and marked ``truncated`` until it fits).

    Bodies are filled greedily (a log goes into the current body when it fits, else starts the next one);
    consecutive records with the same tags share one ``{"common", "logs"}`` group.

    Returns:
        :class:`Encoded` whose batches carry the gzipped body as ``payload`` and the JSON size as ``size``.
    """
    encoder = _Encoder(max_payload_bytes)
    heads: dict[tuple[str, str, str], bytes] = {}
    for run, tags in _runs(records):
        key = (tags.host, tags.source, tags.service)
        head = heads.get(key)
        if head is None:
            head = heads[key] = _group_head(tags)
        encoder.add_run(run, head)
    encoder.finish()
    return Encoded(encoder.batches)


def _runs(records: Sequence[Record]) -> Iterator[tuple[Sequence[Record], Tags]]:
    """``(records, tags)`` for each run of consecutive records sharing one tags object (the records of a source
    share it). Compares identities only (``Tags.__eq__`` is Python code); runs with equal tags share a group
    anyway (:func:`encode` finds the same head for them)."""
    if not records:
        return
    tags = [record.tags for record in records]
    changes = bytes(map(operator.is_not, tags[1:], tags))  # changes[i] == 1: record i + 1 starts a run
    start = 0
    while (end := changes.find(1, start) + 1) > 0:
        yield records[start:end], tags[start]
        start = end
    yield records[start:], tags[start]


# --- classify -----------------------------------------------------------------------------------------------


def classify(response: httpx.Response) -> Verdict:
    """The verdict for one Log API response.

    New Relic ingest status table (Log API doc for 429; Metric API doc for the gateway's shared codes)::

        202 Accepted (any 2xx)          OK  (validation continues asynchronously: NrIntegrationError events)
        400 structure invalid           DROP  (every record of the batch counted, logged once per batch)
        401 / 403 authentication        RETRY, loud: a wrong or rotated key must not lose data
        404 / 405 / 411 / 414 / 415     DROP  (our request is wrong; retrying cannot help)
        408 request timeout             RETRY
        413 payload too big             SPLIT
        429 rate limit (+ Retry-After)  RETRY after Retry-After seconds
        5xx server error                RETRY  ("please retry")
    """
    verdict = status_verdict(response)
    return OK if verdict is None else verdict


# --- sink ---------------------------------------------------------------------------------------------------


class NewRelicSink:
    """Sends gzipped Log API payloads with the shared httpx client; one attempt per :meth:`send`.

    Args:
        config: URL and license key.
        http: timeouts and CA bundle for the client.
    """

    name = "newrelic"
    ordered = False
    """Batches are independent (each record carries its timestamp): several may be in flight at once."""

    def __init__(self, config: NewRelicConfig, http: HttpSettings) -> None:
        self._url = config.url
        self._secrets = [s for s in config.secret_values() if s]
        self._headers = {
            "Api-Key": config.license_key.reveal(),
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        }
        self._client = make_client(http)

    def encode(self, records: Sequence[Record]) -> Encoded:
        """See :func:`encode`."""
        return encode(records)

    async def send(self, batch: Batch) -> Verdict:
        """POST ``batch.payload`` once: the verdict from :func:`classify`, or ``RETRY`` for a transport error."""
        try:
            response = await post(self._client, self._url, content=batch.payload, headers=self._headers)
        except httpx.HTTPError as exc:
            verdict = transport_verdict(exc)
        else:
            verdict = classify(response)
        return self._scrubbed(verdict)

    def _scrubbed(self, verdict: Verdict) -> Verdict:
        detail = verdict.detail
        if not detail:
            return verdict
        for secret in self._secrets:
            if secret in detail:
                detail = detail.replace(secret, "[REDACTED]")
        return verdict if detail is verdict.detail else dataclasses.replace(verdict, detail=detail)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
