"""CloudWatch Logs destination: ``PutLogEvents`` through boto3, in batches that always satisfy the API.

API reference, https://docs.aws.amazon.com/AmazonCloudWatchLogs/latest/APIReference/API_PutLogEvents.html
(text as shipped in the botocore 1.44.5 service model, checked November 2026):

* "The maximum batch size is 1,048,576 bytes. This size is calculated as the sum of all event messages in
  UTF-8, plus 26 bytes for each log event."
* "The maximum number of log events in a batch is 10,000."
* "Each log event can be no larger than 1 MB." (256 KB before April 2025; older copies still say so.) We count
  the 26 bytes of overhead inside that 1 MB: a message is at most 1,048,550 UTF-8 bytes, which is also the most
  a batch of one event can hold.
* "The log events in the batch must be in chronological order by their timestamp" (ms since the epoch).
* "For valid events (within 14 days in the past to 2 hours in future), the time span in a single batch cannot
  exceed 24 hours. Otherwise, the operation fails."
* "Events more than 2 hours in the future are rejected while processing remaining valid events. Events older
  than 14 days or preceding the log group's retention period are rejected while processing remaining valid
  events." The request succeeds with ``rejectedLogEventsInfo`` (API_RejectedLogEventsInfo.html):
  ``tooNewLogEventStartIndex`` (inclusive), ``tooOldLogEventEndIndex`` ("exclusive"),
  ``expiredLogEventEndIndex``.
* The sequence token is ignored since January 2023; we never send one. Puts are throttled per account
  (``ThrottlingException``), not per stream.
* Retention values: API_PutRetentionPolicy.html. Names: API_CreateLogGroup.html, API_CreateLogStream.html
  (group ``[.-_/#A-Za-z0-9]+``, stream ``[^:*]*``, 1 to 512 characters each).

Records -> events: each record is one event whose message is a JSON object (``message``, ``level`` when
detected, ``host``, ``source``, ``service``, ``stream``, and ``attributes`` when the record has any), so that
Logs Insights discovers the fields. The event timestamp is the record's event time (the time the line states)
when it lies inside the accepted window with a 10-minute margin, else its capture time. A capture time older
than 14 days (a spool replayed after a long outage) is not sent and is counted as dropped (``too_old``); a
capture time more than 2 h ahead (the clock stepped back) is re-stamped to now. An event larger than the
per-event maximum has its message cut and gets ``attributes.truncated = true``; it is never dropped.

The boto3 client is synchronous: every call runs in a worker thread (``trio.to_thread``), and botocore's own
retries are off (one attempt) so that the forwarder's retry loop decides. ``AWS_ENDPOINT_URL_CLOUDWATCH_LOGS``
(or ``AWS_ENDPOINT_URL``), botocore's own variables, send the requests elsewhere. The ``PutLogEvents`` body is
serialised with orjson and handed to botocore through its ``before-call`` event (:func:`put_log_events`);
botocore still resolves the endpoint and credentials, signs (SigV4), sends and parses the answer.
"""

from __future__ import annotations

import bisect
import itertools
import json
import operator
import re
import string
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import orjson
import structlog
import trio

from forwarder.config import ConfigError, HttpSettings, Secret, parse_bool, parse_choice
from forwarder.record import TRUNCATED, Level, Record, Tags
from forwarder.sinks._protocol import Batch, Encoded, Verdict, drop, ok, retry, split

if TYPE_CHECKING:
    from mypy_boto3_logs.client import CloudWatchLogsClient

_log = structlog.get_logger("forwarder")

# --- limits ------------------------------------------------------------------------------------------------

API_DOC: Final = "https://docs.aws.amazon.com/AmazonCloudWatchLogs/latest/APIReference/API_PutLogEvents.html"
MAX_BATCH_EVENTS: Final = 10_000
"""Events per ``PutLogEvents`` request (:data:`API_DOC`)."""
MAX_BATCH_BYTES: Final = 1_048_576
"""Request size as the API counts it: UTF-8 message bytes plus :data:`EVENT_OVERHEAD_BYTES` per event."""
EVENT_OVERHEAD_BYTES: Final = 26
"""Bytes the API adds to each event's message when counting :data:`MAX_BATCH_BYTES` (:data:`API_DOC`)."""
MAX_EVENT_BYTES: Final = 1_048_576
"""Largest event, overhead included: "Each log event can be no larger than 1 MB" (:data:`API_DOC`)."""
MAX_MESSAGE_BYTES: Final = min(MAX_EVENT_BYTES, MAX_BATCH_BYTES) - EVENT_OVERHEAD_BYTES
"""Largest event message in UTF-8 bytes (1,048,550); longer messages are cut and marked ``truncated``."""
MAX_BATCH_SPAN_MS: Final = 24 * 3600 * 1000
"""A batch's newest minus oldest timestamp stays strictly below this, ms ("cannot exceed 24 hours")."""
MAX_EVENT_AGE_MS: Final = 14 * 24 * 3600 * 1000
"""Events older than this (ms) are rejected by the API (:data:`API_DOC`)."""
MAX_EVENT_FUTURE_MS: Final = 2 * 3600 * 1000
"""Events more than this (ms) in the future are rejected by the API (:data:`API_DOC`)."""
EVENT_TIME_MARGIN_MS: Final = 10 * 60 * 1000
"""A line's own timestamp is used only this far (ms) inside the accepted window (clock skew, delay)."""
# fmt: off
RETENTION_DAYS: Final = (
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653,
)
# fmt: on
"""Values ``PutRetentionPolicy`` accepts (API_PutRetentionPolicy.html)."""
MAX_NAME_CHARS: Final = 512
"""Longest log group or log stream name (API_CreateLogGroup.html, API_CreateLogStream.html)."""

# --- config ------------------------------------------------------------------------------------------------

NAME: Final = "cloudwatch"
DEFAULT_REGION: Final = "us-west-2"
BOTOCORE_POOL_CONNECTIONS: Final = 10
"""botocore's default ``max_pool_connections``; raised to ``FORWARDER_REQUEST_CONCURRENCY`` when that is larger."""
DEFAULT_LOG_GROUP: Final = "/forwarder/{source}"
DEFAULT_LOG_STREAM: Final = "{host}/{source}"
NAME_FIELDS: Final = ("host", "source", "service")
"""Placeholders allowed in ``CLOUDWATCH_LOG_GROUP`` / ``CLOUDWATCH_LOG_STREAM``."""

TOO_OLD: Final = "too_old"
TOO_NEW: Final = "too_new"
EXPIRED: Final = "expired"
INVALID: Final = "invalid_parameter"

ENV_VARS: tuple[str, ...] = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS",
    "AWS_ENDPOINT_URL",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "CLOUDWATCH_ENABLED",
    "CLOUDWATCH_LOG_GROUP",
    "CLOUDWATCH_LOG_STREAM",
    "CLOUDWATCH_RETENTION_DAYS",
)

_GROUP_BAD_CHARS: Final = re.compile(r"[^.\-_/#A-Za-z0-9]")
_STREAM_BAD_CHARS: Final = re.compile(r"[:*]")
_REGION_RE: Final = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)+$")


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


@dataclass(frozen=True)
class CloudWatchConfig:
    """Validated CloudWatch Logs settings (built by :func:`config_from_env`).

    Attributes:
        region: AWS region of the log group.
        log_group: log group name template; ``{host}``, ``{source}`` and ``{service}`` are replaced by the record's
            tags (characters the API refuses become ``_``).
        log_stream: log stream name template, same placeholders.
        retention_days: retention set on a log group this forwarder creates, or ``None`` (never expire).
        access_key_id, secret_access_key, session_token: explicit credentials, or ``None`` to use boto3's default
            chain (instance profile, IRSA/web identity, ``AWS_PROFILE``...).
        endpoint_url: ``AWS_ENDPOINT_URL_CLOUDWATCH_LOGS`` / ``AWS_ENDPOINT_URL``, or ``None`` for AWS itself.
    """

    region: str = DEFAULT_REGION
    log_group: str = DEFAULT_LOG_GROUP
    log_stream: str = DEFAULT_LOG_STREAM
    retention_days: int | None = None
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    session_token: Secret | None = None
    endpoint_url: str | None = None
    name: str = NAME

    def endpoint(self) -> str:
        """Where events go, e.g. ``https://logs.us-west-2.amazonaws.com group=/forwarder/{source} stream=...``;
        no secret in it."""
        url = self.endpoint_url or (
            f"https://logs.{self.region}.amazonaws.com" + (".cn" if self.region.startswith("cn-") else "")
        )
        return f"{url} group={self.log_group} stream={self.log_stream}"

    def secret_values(self) -> list[str]:
        """The credentials held (access key id included, for scrubbing); never log them."""
        return [s.reveal() for s in (self.access_key_id, self.secret_access_key, self.session_token) if s]

    def build(self, http: HttpSettings) -> CloudWatchSink:
        """The sink; the boto3 client is created on the first send (in a worker thread)."""
        return CloudWatchSink(self, http)


def _check_template(variable: str, template: str, bad_chars: re.Pattern[str], accepted: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:
        raise ConfigError(variable, f"{template!r} has an unbalanced brace; expected {accepted}") from None
    for field_name in fields:
        if field_name not in NAME_FIELDS:
            raise ConfigError(
                variable, f"unknown placeholder {{{field_name}}}; expected {{host}}, {{source}} or {{service}}"
            )
    literal = template.format(**dict.fromkeys(NAME_FIELDS, "x"))
    if bad_chars.search(literal) or len(literal) > MAX_NAME_CHARS:
        raise ConfigError(variable, f"{template!r} is not a valid name; expected {accepted}")


def config_from_env(env: Mapping[str, str]) -> CloudWatchConfig | None:
    """CloudWatch settings from ``env``, or ``None`` when CloudWatch is not enabled.

    Enabled when ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` are both set (``AWS_SESSION_TOKEN`` is used with
    them), or when ``CLOUDWATCH_LOG_GROUP`` is set (credentials then come from boto3's default chain: instance
    profile, IRSA, ``AWS_PROFILE``...), or when ``CLOUDWATCH_ENABLED=true``. ``CLOUDWATCH_ENABLED=false`` disables
    it whatever else is set (for agents that hold AWS keys for other services).

    Raises:
        ConfigError: only one of the two keys is set, or an invalid region, endpoint, name or retention.
    """
    enabled = parse_choice(env, "CLOUDWATCH_ENABLED", ("auto", "true", "false"), "auto")
    if enabled == "false":
        return None
    key_id = _get(env, "AWS_ACCESS_KEY_ID")
    secret_key = _get(env, "AWS_SECRET_ACCESS_KEY")
    group = _get(env, "CLOUDWATCH_LOG_GROUP")
    has_keys = key_id is not None and secret_key is not None
    if (key_id is None) != (secret_key is None):
        missing = "AWS_SECRET_ACCESS_KEY" if key_id is not None else "AWS_ACCESS_KEY_ID"
        raise ConfigError(missing, "not set; set both AWS keys, or neither to use the default credential chain")
    if not has_keys and group is None and enabled == "auto":
        return None

    region_variable = "AWS_REGION" if _get(env, "AWS_REGION") else "AWS_DEFAULT_REGION"
    region = _get(env, region_variable) or DEFAULT_REGION
    if not _REGION_RE.match(region):
        raise ConfigError(region_variable, f"{region!r} is not a region; expected e.g. us-west-2")

    endpoint_url: str | None = None
    if not parse_bool(env, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", False):
        for variable in ("AWS_ENDPOINT_URL_CLOUDWATCH_LOGS", "AWS_ENDPOINT_URL"):
            endpoint_url = _get(env, variable)
            if endpoint_url is not None:
                parts = urlsplit(endpoint_url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise ConfigError(variable, "not a URL; expected http(s)://host[:port]")
                break

    group = group or DEFAULT_LOG_GROUP
    stream = _get(env, "CLOUDWATCH_LOG_STREAM") or DEFAULT_LOG_STREAM
    _check_template(
        "CLOUDWATCH_LOG_GROUP", group, _GROUP_BAD_CHARS, "1-512 of A-Z a-z 0-9 . - _ / # and {host} {source} {service}"
    )
    _check_template(
        "CLOUDWATCH_LOG_STREAM",
        stream,
        _STREAM_BAD_CHARS,
        "1-512 characters other than : and *, and {host} {source} {service}",
    )

    retention: int | None = None
    raw_retention = _get(env, "CLOUDWATCH_RETENTION_DAYS")
    if raw_retention is not None:
        if not raw_retention.isdigit() or int(raw_retention) not in RETENTION_DAYS:
            raise ConfigError(
                "CLOUDWATCH_RETENTION_DAYS",
                f"{raw_retention!r} is not accepted; expected one of {', '.join(map(str, RETENTION_DAYS))}",
            )
        retention = int(raw_retention)

    token = _get(env, "AWS_SESSION_TOKEN") if has_keys else None
    return CloudWatchConfig(
        region=region,
        log_group=group,
        log_stream=stream,
        retention_days=retention,
        access_key_id=Secret(key_id) if key_id else None,
        secret_access_key=Secret(secret_key) if secret_key else None,
        session_token=Secret(token) if token else None,
        endpoint_url=endpoint_url,
    )


# --- encode ------------------------------------------------------------------------------------------------

_LEVEL_NAMES: Final = {level: level.name for level in Level}


def resolve_names(group_template: str, stream_template: str, tags: Tags) -> tuple[str, str]:
    """The ``(log group, log stream)`` for records with ``tags``: placeholders replaced, characters the API refuses
    replaced by ``_``, cut to 512 characters, never empty."""
    values = {"host": tags.host, "source": tags.source, "service": tags.service}
    group = _GROUP_BAD_CHARS.sub("_", group_template.format(**values))[:MAX_NAME_CHARS] or "_"
    stream = _STREAM_BAD_CHARS.sub("_", stream_template.format(**values))[:MAX_NAME_CHARS] or "_"
    return group, stream


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body, default=str)
    except (orjson.JSONEncodeError, TypeError):
        # lone surrogates, integers beyond 64 bits, non-string keys: the stdlib copes; ASCII escapes keep it UTF-8
        return json.dumps(body, default=str, ensure_ascii=True).encode()


def _cut_utf8(text: str, max_bytes: int) -> str:
    return text.encode("utf-8", "surrogatepass")[: max(0, max_bytes)].decode("utf-8", "ignore")


def _shrink(body: dict[str, Any]) -> bytes:
    encoded = _dumps(body)
    while len(encoded) > MAX_MESSAGE_BYTES and body["message"]:
        message: str = body["message"]
        excess = len(encoded) - MAX_MESSAGE_BYTES
        body["message"] = _cut_utf8(message, len(message.encode("utf-8", "surrogatepass")) - excess)
        encoded = _dumps(body)
    return encoded


def _fit(body: dict[str, Any]) -> bytes:
    """``body`` (from :func:`event_body`) serialised within :data:`MAX_MESSAGE_BYTES`, marked ``truncated``, its
    message cut. If the attributes alone are too large, they are replaced by ``{"truncated": true}`` and appended to
    the message as JSON text before it is cut."""
    attributes = body.get("attributes") or {}
    out = dict(body)
    out["attributes"] = {**attributes, TRUNCATED: True}
    out["message"] = ""
    if len(_dumps(out)) > MAX_MESSAGE_BYTES:
        out["attributes"] = {TRUNCATED: True}
        out["message"] = body["message"] + "\n" + _dumps(attributes).decode()
    else:
        out["message"] = body["message"]
    return _shrink(out)


def event_body(record: Record) -> dict[str, Any]:
    """The JSON object sent as an event's message: ``message``, ``level`` (name; absent when not detected),
    ``host``, ``source``, ``service``, ``stream``, ``attributes`` (absent when empty).

    This is the reference shape: :func:`encode_events` splices the same bytes from pre-encoded parts and falls back
    to ``_dumps(event_body(record))`` for anything unusual."""
    tags = record.tags
    body: dict[str, Any] = {"message": record.message}
    if record.level is not None:
        body["level"] = _LEVEL_NAMES[record.level]
    body["host"] = tags.host
    body["source"] = tags.source
    body["service"] = tags.service
    body["stream"] = record.stream
    if record.attributes:
        body["attributes"] = record.attributes
    return body


_LEVEL_FIELD: Final = {level: b',"level":' + orjson.dumps(name) for level, name in _LEVEL_NAMES.items()}
"""``,"level":"INFO"`` and so on: the pre-encoded ``level`` member of :func:`event_body`."""


def _tag_fields(tags: Tags, stream: str) -> bytes | None:
    """The ``host``, ``source``, ``service`` and ``stream`` members of :func:`event_body` as JSON text with a leading
    comma, or ``None`` when orjson cannot encode them (lone surrogates from an undecodable environment)."""
    try:
        members = orjson.dumps({"host": tags.host, "source": tags.source, "service": tags.service, "stream": stream})
    except (orjson.JSONEncodeError, TypeError):
        return None
    return b"," + members[1:-1]


def encode_events(records: Sequence[Record], group_template: str, stream_template: str, now_ms: int) -> Encoded:
    """Cut ``records`` into ``PutLogEvents`` calls that satisfy every limit of :data:`API_DOC`. Pure.

    Args:
        records: in any time order; each becomes one event (or is counted in ``dropped``).
        group_template, stream_template: see :class:`CloudWatchConfig`; records are grouped by resolved names.
        now_ms: the current time, ms since the epoch (decides which timestamp to use and what is too old).

    Returns:
        batches whose ``payload`` is the keyword arguments of ``put_log_events`` (``logGroupName``,
        ``logStreamName``, ``logEvents`` sorted by ``timestamp``), whose ``records`` are in the same order as the
        events and whose ``size`` is the API's byte count (message bytes + 26 per event); at most
        :data:`MAX_BATCH_EVENTS` events, :data:`MAX_BATCH_BYTES` bytes, a span below :data:`MAX_BATCH_SPAN_MS`.
        ``dropped`` counts records whose capture time is older than 14 days (``too_old``).
    """
    oldest_ms = now_ms - MAX_EVENT_AGE_MS
    event_lo = oldest_ms + EVENT_TIME_MARGIN_MS
    event_hi = now_ms + MAX_EVENT_FUTURE_MS - EVENT_TIME_MARGIN_MS
    too_old = 0
    # Parallel lists (no per-record tuple): fewer objects for the cyclic GC to track on this hot path.
    stamps: list[int] = []
    costs: list[int] = []  # message bytes + EVENT_OVERHEAD_BYTES
    events: list[dict[str, Any]] = []
    kept: list[Record] = []
    targets: list[tuple[str, str]] = []
    target_of: dict[int, int] = {}  # id(tags) -> index in targets (the records keep their tags alive)
    fields_of: dict[tuple[int, str], bytes | None] = {}  # (id(tags), stream) -> _tag_fields(...)
    last_tags: Tags | None = None
    last_stream = ""
    fields: bytes | None = None
    dumps = orjson.dumps
    level_field = _LEVEL_FIELD
    add_stamp, add_cost, add_event, add_kept = stamps.append, costs.append, events.append, kept.append
    for record in records:
        ts = record.timestamp_ns // 1_000_000
        stated = record.event_time_ns
        if stated is not None and event_lo <= stated // 1_000_000 <= event_hi:
            ts = stated // 1_000_000
        elif ts < oldest_ms:
            too_old += 1
            continue
        elif ts > event_hi:
            ts = now_ms
        tags = record.tags
        stream = record.stream
        if tags is not last_tags or stream != last_stream:  # consecutive records mostly share both
            last_tags, last_stream = tags, stream
            if id(tags) not in target_of:
                names = resolve_names(group_template, stream_template, tags)
                if names not in targets:
                    targets.append(names)
                target_of[id(tags)] = targets.index(names)
            key = (id(tags), stream)
            if key not in fields_of:
                fields_of[key] = _tag_fields(tags, stream)
            fields = fields_of[key]
        # Fast path: the bytes of _dumps(event_body(record)), spliced from pre-encoded parts (one dumps for the
        # message, one for the attributes). Anything orjson refuses takes the reference path.
        encoded: bytes | None = None
        if fields is not None:
            level = record.level
            attributes = record.attributes
            try:
                encoded = b"".join(
                    (
                        b'{"message":',
                        dumps(record.message),
                        level_field[level] if level is not None else b"",
                        fields,
                        b',"attributes":' + dumps(attributes, default=str) if attributes else b"",
                        b"}",
                    )
                )
            except (orjson.JSONEncodeError, TypeError):
                encoded = None
        if encoded is None:
            encoded = _dumps(event_body(record))
        size = len(encoded)
        if size > MAX_MESSAGE_BYTES:
            encoded = _fit(event_body(record))
            size = len(encoded)
        add_stamp(ts)
        add_cost(size + EVENT_OVERHEAD_BYTES)
        add_event({"timestamp": ts, "message": encoded.decode()})
        add_kept(record)

    batches: list[Batch] = []
    if len(targets) == 1 and all(map(operator.le, stamps, itertools.islice(stamps, 1, None))):
        batches = _cut(targets[0], stamps, events, kept, costs)  # one target, already in time order: no copies
    else:
        order = sorted(range(len(stamps)), key=stamps.__getitem__)  # stable: equal times keep their order
        keys = [target_of[id(record.tags)] for record in kept] if len(targets) > 1 else []
        for target, names in enumerate(targets):
            indexes = order if len(targets) == 1 else [i for i in order if keys[i] == target]
            batches += _cut(
                names,
                [stamps[i] for i in indexes],
                [events[i] for i in indexes],
                [kept[i] for i in indexes],
                [costs[i] for i in indexes],
            )
    return Encoded(batches, {TOO_OLD: too_old} if too_old else {})


def _cut(
    names: tuple[str, str],
    stamps: list[int],
    events: list[dict[str, Any]],
    records: list[Record],
    costs: list[int],
) -> list[Batch]:
    """``events`` (sorted by time; ``stamps``, ``records``, ``costs`` parallel to them) cut into the longest runs
    that fit one request each, in order.

    A run ends before the first event that would exceed :data:`MAX_BATCH_EVENTS`, :data:`MAX_BATCH_BYTES` (running
    sum of ``costs``) or :data:`MAX_BATCH_SPAN_MS` after the run's first timestamp: found by bisection, since both
    the running sum and the times only grow. A run always takes at least its first event: an event's cost is at most
    :data:`MAX_MESSAGE_BYTES` + :data:`EVENT_OVERHEAD_BYTES` <= :data:`MAX_BATCH_BYTES`, and its span is 0.
    """
    group, stream = names
    batches: list[Batch] = []
    ends = list(itertools.accumulate(costs))  # ends[i]: bytes of events[0..i]
    count = len(ends)
    start = 0
    base = 0  # bytes before start
    while start < count:
        end = min(count, start + MAX_BATCH_EVENTS)
        end = bisect.bisect_right(ends, base + MAX_BATCH_BYTES, start, end)
        end = bisect.bisect_left(stamps, stamps[start] + MAX_BATCH_SPAN_MS, start, end)
        batches.append(_batch(group, stream, events[start:end], records[start:end], ends[end - 1] - base))
        base = ends[end - 1]
        start = end
    return batches


def _batch(group: str, stream: str, events: list[dict[str, Any]], records: list[Record], size: int) -> Batch:
    payload = {"logGroupName": group, "logStreamName": stream, "logEvents": events}
    return Batch(records=records, payload=payload, size=size)


# --- classify ----------------------------------------------------------------------------------------------

# CloudWatch Logs answers (https://docs.aws.amazon.com/AmazonCloudWatchLogs/latest/APIReference/CommonErrors.html
# and API_PutLogEvents.html#API_PutLogEvents_Errors), and what we do:
#
# | answer                                                      | verdict                                          |
# |-------------------------------------------------------------|--------------------------------------------------|
# | 200                                                         | OK                                               |
# | 200 with rejectedLogEventsInfo                              | OK; rejected events dropped                      |
# |                                                             | (too_new, too_old, expired)                      |
# | DataAlreadyAcceptedException                                | OK (no longer returned: sequence tokens retired) |
# | ThrottlingException, ServiceUnavailableException,           | RETRY (backoff)                                  |
# | InternalFailure, any 5xx, LimitExceededException,           |                                                  |
# | OperationAbortedException, InvalidSequenceTokenException,   |                                                  |
# | ResourceNotFoundException (still missing after re-create)   |                                                  |
# | network errors, timeouts (botocore)                         | RETRY                                            |
# | UnrecognizedClientException, AccessDeniedException,         | RETRY, loud: credentials or permissions          |
# | InvalidSignatureException, ExpiredTokenException, 401, 403, | are wrong; the data stays in the spool           |
# | missing credentials, TLS errors                             | until they are fixed                             |
# | InvalidParameterException, ValidationException,             | SPLIT (bisect to isolate the bad event);         |
# | SerializationException, 413, client-side validation         | one event still refused: DROP                    |
# |                                                             | invalid_parameter                                |
# | any other 4xx / unknown code                                | RETRY, loud (held, never lost silently)          |

_RETRY_CODES: Final = {
    "ThrottlingException": "throttled",
    "Throttling": "throttled",
    "TooManyRequestsException": "throttled",
    "RequestLimitExceeded": "throttled",
    "ServiceUnavailableException": "unavailable",
    "ServiceUnavailable": "unavailable",
    "InternalFailure": "server_error",
    "InternalServerError": "server_error",
    "RequestTimeout": "timeout",
    "RequestTimeoutException": "timeout",
    "LimitExceededException": "limit_exceeded",
    "OperationAbortedException": "conflict",
    "InvalidSequenceTokenException": "sequence_token",
    "ResourceNotFoundException": "not_found",
}
_CREDENTIAL_CODES: Final = frozenset(
    {
        "UnrecognizedClientException",
        "AccessDeniedException",
        "AccessDenied",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredTokenException",
        "ExpiredToken",
        "RequestExpired",
        "NotAuthorized",
        "UnauthorizedOperation",
    }
)
_INVALID_CODES: Final = frozenset(
    {
        "InvalidParameterException",
        "ValidationException",
        "SerializationException",
        "RequestEntityTooLargeException",
    }
)


def rejected_counts(info: Mapping[str, Any], events: int) -> dict[str, int]:
    """Events rejected inside an accepted request, by reason, from ``rejectedLogEventsInfo``.

    Events are sorted by time, so the rejected ones are a prefix (too old / expired) and a suffix (too new).
    ``tooOldLogEventEndIndex`` is exclusive per the API reference (moto reports the last too-old index instead,
    so against moto one too-old event counts as delivered); ``expiredLogEventEndIndex`` is undocumented and read
    the same way; ``tooNewLogEventStartIndex`` is inclusive.
    """
    counts: dict[str, int] = {}
    old_end = _index(info.get("tooOldLogEventEndIndex"), events)
    expired_end = _index(info.get("expiredLogEventEndIndex"), events)
    new_start = _index(info.get("tooNewLogEventStartIndex"), events)
    prefix = max(old_end or 0, expired_end or 0)
    if expired_end:
        counts[EXPIRED] = expired_end
    if old_end and old_end > (expired_end or 0):
        counts[TOO_OLD] = old_end - (expired_end or 0)
    if new_start is not None and events - max(new_start, prefix) > 0:
        counts[TOO_NEW] = events - max(new_start, prefix)
    return counts


def _index(value: Any, events: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return min(max(value, 0), events)


def classify(response: Mapping[str, Any] | None, error: BaseException | None, events: int) -> Verdict:
    """The verdict for one ``put_log_events`` attempt. Pure.

    Args:
        response: the parsed response of a successful call (``error`` is then ``None``).
        error: the exception the call raised: a ``botocore.exceptions.ClientError`` (service answer), another
            ``BotoCoreError`` or ``OSError`` (network, credentials, client-side validation), or anything else
            (a bug: loud ``RETRY``, the data is held).
        events: events in the request (to count rejected ones and to tell a single-event batch).

    See the table above this function.
    """
    if error is None:
        info = (response or {}).get("rejectedLogEventsInfo")
        return ok(rejected_counts(info, events)) if info else ok()

    from botocore import exceptions as bce  # botocore is imported only once CloudWatch is used (~3 MiB RSS)

    if isinstance(error, bce.ClientError):
        err = error.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        operation = error.operation_name or "PutLogEvents"
        detail = f"{operation}: {code or status}: {err.get('Message', '')}"[:500]
        if code == "DataAlreadyAcceptedException":
            return ok()
        if code in _RETRY_CODES:
            return retry(_RETRY_CODES[code], detail=detail)
        if code in _CREDENTIAL_CODES or status in (401, 403):
            return retry("credentials", detail=detail, loud=True)
        if code in _INVALID_CODES or status == 413:
            return drop(INVALID, detail=detail) if events <= 1 else split(detail)
        if status >= 500 or status == 0:
            return retry("server_error", detail=detail)
        return retry("client_error", detail=detail, loud=True)
    detail = f"{type(error).__name__}: {error}"[:500]
    if isinstance(
        error,
        (
            bce.NoCredentialsError,
            bce.PartialCredentialsError,
            bce.CredentialRetrievalError,
            bce.TokenRetrievalError,
            bce.SSOError,
            bce.MetadataRetrievalError,
        ),
    ):
        return retry("credentials", detail=detail, loud=True)
    if isinstance(error, bce.SSLError):
        return retry("tls", detail=detail, loud=True)
    if isinstance(error, bce.ParamValidationError):
        return drop(INVALID, detail=detail) if events <= 1 else split(detail)
    if isinstance(error, (bce.BotoCoreError, OSError)):
        return retry("network", detail=detail)
    return retry("internal_error", detail=detail, loud=True)


# --- request body ---------------------------------------------------------------------------------------

PUT_BODY_EVENT: Final = "before-call.cloudwatch-logs.PutLogEvents"
"""The botocore event (https://docs.aws.amazon.com/botocore/latest/topics/events.html) emitted after botocore has
serialised a ``PutLogEvents`` request and before it signs and sends it; its ``params`` is the request dict."""

PUT_BODY_HANDLER_ID: Final = "forwarder-cloudwatch-prepared-body"
"""The ``unique_id`` :func:`_use_prepared_body` is registered under on the sink's client."""

_PREPARED: Final = threading.local()
"""``body``: the ``PutLogEvents`` body the current thread is about to send (set by :func:`put_log_events`)."""


def _use_prepared_body(params: dict[str, Any], **_: Any) -> None:
    """botocore handler for :data:`PUT_BODY_EVENT`: when the calling thread prepared a body, it replaces the one
    botocore serialised (which has the same names and an empty ``logEvents``). Everything after it is botocore's
    own: ``Content-Length``, SigV4 signing (payload hash included), sending, response and error parsing."""
    body = getattr(_PREPARED, "body", None)
    if body is not None:
        _PREPARED.body = None
        params["body"] = body


def _check_body_sent(cause: BaseException | None) -> None:
    """Raise ``RuntimeError`` (from ``cause``) if :func:`_use_prepared_body` did not take this thread's body."""
    if getattr(_PREPARED, "body", None) is not None:
        _PREPARED.body = None
        raise RuntimeError("PutLogEvents went out without the prepared body; its events were not sent") from cause


def put_log_events(client: CloudWatchLogsClient, payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """``client.put_log_events(**payload)``, with the request body serialised by orjson instead of botocore.

    botocore's JSON serializer walks every event through the service model in Python and then runs the stdlib's
    ``json.dumps``: ~3 us per event. ``orjson.dumps(payload)`` writes the same JSON document (compact and UTF-8,
    where botocore's has spaces and ``\\u`` escapes) for ~0.5 us. The call goes through botocore as usual, with the
    names and an empty ``logEvents``; :func:`_use_prepared_body` puts the full body in before botocore signs and sends
    the request, so endpoint resolution, credentials, SigV4, timeouts and error parsing stay botocore's.

    Args:
        client: a client with :func:`_use_prepared_body` registered for :data:`PUT_BODY_EVENT`.
        payload: ``logGroupName``, ``logStreamName``, ``logEvents`` (a :attr:`Batch.payload` of :func:`encode_events`).

    Returns:
        the parsed response. Raises what botocore raises, or ``RuntimeError`` if botocore did not call the handler
        (the request went out without the events): a retry, never a drop as invalid.
    """
    _PREPARED.body = orjson.dumps(payload)
    try:
        response = client.put_log_events(
            logGroupName=payload["logGroupName"], logStreamName=payload["logStreamName"], logEvents=[]
        )
    except Exception as exc:
        _check_body_sent(exc)
        raise
    _check_body_sent(None)
    return response


# --- sink --------------------------------------------------------------------------------------------------


class CloudWatchSink:
    """Sends batches with ``PutLogEvents``; creates the log group and stream when the API says they are missing.

    Args:
        config: validated settings.
        http: timeouts (``timeout_s`` for connect and read, seconds) and ``ca_file`` (``SSL_CERT_FILE``).
        clock: seconds since the epoch, for :meth:`encode` (tests shift it).

    One :meth:`send` is one attempt: ``PutLogEvents``; on ``ResourceNotFoundException`` it creates the group (with
    the retention, if set) and the stream, ``ResourceAlreadyExistsException`` being fine, and puts once more.
    """

    name = NAME
    ordered = False
    """PutLogEvents needs no sequence token since 2023: puts to one stream may overlap, in any order."""

    def __init__(self, config: CloudWatchConfig, http: HttpSettings, *, clock: Callable[[], float] = time.time):
        self.config = config
        self._http = http
        self._clock = clock
        self._client: CloudWatchLogsClient | None = None
        self._lock = threading.Lock()
        self._secrets = [s for s in config.secret_values() if s]

    # encode ------------------------------------------------------------------------------------------------------

    def encode(self, records: Sequence[Record]) -> Encoded:
        """See :func:`encode_events` (pure apart from reading the clock; thread-safe)."""
        return encode_events(records, self.config.log_group, self.config.log_stream, int(self._clock() * 1000))

    # send --------------------------------------------------------------------------------------------------------

    async def send(self, batch: Batch) -> Verdict:
        """One attempt, in a worker thread; never raises for delivery errors. A shutdown cancels the wait at
        once (the thread is abandoned and ends within the timeouts; a put it completes may be sent again at the next
        start)."""
        response, error = await trio.to_thread.run_sync(
            self._put, batch.payload, abandon_on_cancel=True, thread_name="forwarder-cloudwatch"
        )
        verdict = classify(response, error, len(batch.payload["logEvents"]))
        if verdict.detail and self._secrets:
            detail = verdict.detail
            for secret in self._secrets:
                detail = detail.replace(secret, "***")
            verdict = Verdict(verdict.outcome, verdict.after, verdict.reason, verdict.dropped, detail, verdict.loud)
        return verdict

    def _get_client(self) -> CloudWatchLogsClient:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                config = self.config
                session = boto3.session.Session(
                    aws_access_key_id=config.access_key_id.reveal() if config.access_key_id else None,
                    aws_secret_access_key=config.secret_access_key.reveal() if config.secret_access_key else None,
                    aws_session_token=config.session_token.reveal() if config.session_token else None,
                    region_name=config.region,
                )
                self._client = session.client(
                    "logs",
                    endpoint_url=config.endpoint_url,
                    verify=self._http.ca_file or None,
                    config=Config(
                        retries={"total_max_attempts": 1, "mode": "standard"},
                        connect_timeout=self._http.timeout_s,
                        max_pool_connections=max(BOTOCORE_POOL_CONNECTIONS, self._http.concurrency),
                        read_timeout=self._http.timeout_s,
                        parameter_validation=False,  # encode_events already enforces every limit
                        user_agent_extra="forwarder/0.1",
                    ),
                )
                self._client.meta.events.register(PUT_BODY_EVENT, _use_prepared_body, unique_id=PUT_BODY_HANDLER_ID)
            return self._client

    def _put(self, payload: dict[str, Any]) -> tuple[Mapping[str, Any] | None, BaseException | None]:
        """Runs in a worker thread: put, create on ``ResourceNotFoundException``, put once more."""
        from botocore import exceptions as bce

        try:
            client = self._get_client()
            try:
                return put_log_events(client, payload), None
            except bce.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                    raise
            self._create(client, payload["logGroupName"], payload["logStreamName"])
            return put_log_events(client, payload), None
        except Exception as exc:  # noqa: BLE001 (classify() decides; send() never raises for delivery errors)
            return None, exc

    def _create(self, client: CloudWatchLogsClient, group: str, stream: str) -> None:
        from botocore import exceptions as bce

        try:
            client.create_log_group(logGroupName=group)
        except bce.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceAlreadyExistsException":
                raise
        else:
            _log.info("cloudwatch_log_group_created", group=group, retention_days=self.config.retention_days)
            if self.config.retention_days is not None:
                try:
                    client.put_retention_policy(logGroupName=group, retentionInDays=self.config.retention_days)
                except bce.ClientError as exc:
                    _log.warning(
                        "cloudwatch_retention_failed", group=group, error=exc.response.get("Error", {}).get("Code", "")
                    )
        try:
            client.create_log_stream(logGroupName=group, logStreamName=stream)
        except bce.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceAlreadyExistsException":
                raise
        else:
            _log.info("cloudwatch_log_stream_created", group=group, stream=stream)

    async def aclose(self) -> None:
        """Close the client's connection pool (if a client was created). Does not wait for the creation lock: an
        abandoned worker thread may hold it while resolving credentials."""
        client, self._client = self._client, None
        if client is not None:
            client.close()
