"""The contract between the delivery runner and every sink: verdicts, batches and the :class:`Sink` protocol.

Modelled on Fluent Bit's output contract (ok / retry / error) with Vector's split for oversized payloads:

* ``encode(records)`` is pure: it cuts records into payloads within the destination's limits and reports records
  it had to drop (e.g. too old for the API) by reason. It may be called from a worker thread.
* ``send(batch)`` makes exactly one attempt and returns a :class:`Verdict`. It never sleeps and never retries:
  the one retry loop (:mod:`forwarder.delivery.retry`) decides.

A sink knows nothing of the spool, the retry loop or the wiring.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from forwarder.record import Record


class Outcome(enum.Enum):
    """What the runner does with a batch after one attempt."""

    OK = "ok"
    """Delivered (possibly with some records rejected by the destination: see :attr:`Verdict.dropped`)."""
    RETRY = "retry"
    """Not delivered; send the same batch again after a backoff (at least :attr:`Verdict.after` seconds)."""
    SPLIT = "split"
    """Payload too large: halve the batch and send both halves; a single record still too large is dropped."""
    DROP = "drop"
    """Never deliverable (e.g. 400 Bad Request): count every record as dropped with :attr:`Verdict.reason`."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of one attempt to send one batch.

    Attributes:
        outcome: see :class:`Outcome`.
        after: for ``RETRY``, the minimum wait in seconds the destination asked for (``Retry-After``, rate-limit
            headers), or ``None`` to use the runner's backoff alone.
        reason: a short machine-friendly reason (``"http_400"``, ``"throttled"``...), used as a metric label for
            drops and in logs for retries. Never contains a secret.
        dropped: for ``OK``, records the destination rejected inside an accepted request, by reason (e.g.
            CloudWatch's ``rejectedLogEventsInfo``).
        detail: a human-readable explanation for logs (a response body excerpt...), never a secret.
        loud: log this verdict at error level (e.g. 401/403: credentials are wrong and data is held back).
    """

    outcome: Outcome
    after: float | None = None
    reason: str = ""
    dropped: Mapping[str, int] = field(default_factory=dict)
    detail: str = ""
    loud: bool = False


OK = Verdict(Outcome.OK)
SPLIT = Verdict(Outcome.SPLIT, reason="too_large")


def ok(dropped: Mapping[str, int] | None = None) -> Verdict:
    """An ``OK`` verdict, optionally with records the destination rejected inside the accepted request."""
    return Verdict(Outcome.OK, dropped=dict(dropped or {})) if dropped else OK


def retry(reason: str, after: float | None = None, *, detail: str = "", loud: bool = False) -> Verdict:
    """A ``RETRY`` verdict; ``after`` is the destination's requested minimum wait in seconds."""
    return Verdict(Outcome.RETRY, after=after, reason=reason, detail=detail, loud=loud)


def drop(reason: str, *, detail: str = "") -> Verdict:
    """A ``DROP`` verdict: every record of the batch is counted as dropped with ``reason``."""
    return Verdict(Outcome.DROP, reason=reason, detail=detail, loud=True)


def split(detail: str = "") -> Verdict:
    """A ``SPLIT`` verdict: the payload was too large for the destination."""
    return Verdict(Outcome.SPLIT, reason="too_large", detail=detail)


@dataclass(slots=True)
class Batch:
    """One request's worth of records and their encoded payload.

    Attributes:
        records: the records in the payload (kept so that ``SPLIT`` can re-encode halves and counts are exact).
        payload: the sink's request body or call arguments (``bytes`` for HTTP sinks).
        size: the payload's uncompressed size in bytes (for metrics).
    """

    records: Sequence[Record]
    payload: Any
    size: int


@dataclass(slots=True)
class Encoded:
    """What :meth:`Sink.encode` returns: batches within the limits and records dropped while encoding, by reason."""

    batches: list[Batch]
    dropped: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class Sink(Protocol):
    """A destination. Implementations live one per module in :mod:`forwarder.sinks`."""

    name: str
    """Short stable name (``"datadog"``...): metric label, cursor name, log field."""

    ordered: bool
    """``True``: batches must be sent one at a time, in order (the NDJSON file). ``False``: the runner may have up to
    ``FORWARDER_REQUEST_CONCURRENCY`` batches of a chunk in flight at once, so ``send`` must allow overlapping
    calls, and batches may arrive out of order (every record carries its own timestamp)."""

    def encode(self, records: Sequence[Record]) -> Encoded:
        """Cut ``records`` (in order) into batches within the destination's limits. Pure, thread-safe."""
        ...

    async def send(self, batch: Batch) -> Verdict:
        """Make exactly one attempt to deliver ``batch``; never sleeps, never raises for delivery errors."""
        ...

    async def aclose(self) -> None:
        """Release connections and threads."""
        ...
