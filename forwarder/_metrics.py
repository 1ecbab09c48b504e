"""The forwarder's own Prometheus metrics: a collector that reads the running forwarder's counters at scrape time.

Nothing on the hot path touches prometheus-client: the pipeline and the destination runners update plain counters
(:class:`~forwarder.pipeline.IngestStats`, :class:`~forwarder.delivery.destination.DestinationStats`) and
:class:`RuntimeCollector` turns them into metric families when ``/metrics`` is scraped. Request latencies are the
one exception: the runners append them to ``DestinationStats.latencies`` and :meth:`RuntimeCollector.drain` moves
them into cumulative histogram buckets (at every scrape and every :data:`DRAIN_INTERVAL_S`).

Names follow the Prometheus conventions (https://prometheus.io/docs/practices/naming/): counters end in
``_total``, sizes in ``_bytes``, times in ``_seconds``. Every metric is listed in :data:`METRICS` (the README table
is generated from the same list). The registry is private (:func:`make_registry`), never the global one.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from forwarder import __version__

if TYPE_CHECKING:
    from forwarder.app import Runtime

LATENCY_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds of the request latency histogram, seconds (``+Inf`` is added). A request times out at 10 s by
default (:class:`~forwarder.config.HttpSettings`), so the 10 s and 30 s buckets catch timeouts."""
DRAIN_INTERVAL_S: Final = 5.0
"""How often latencies are moved from ``DestinationStats.latencies`` into the histogram without a scrape, seconds
(the list holds at most 10,000 entries; at 5 s that is 2,000 requests per second per destination)."""

METRICS: Final[tuple[tuple[str, str, str, str], ...]] = (
    # (name as exposed, type, labels, help)
    ("forwarder_build_info", "gauge", "version, mode", "Always 1; the version and mode (run, tail) as labels."),
    ("forwarder_start_time_seconds", "gauge", "", "Start time of the forwarder, seconds since the epoch."),
    ("forwarder_input_lines_total", "counter", "stream", "Lines read from the agent, per stream."),
    ("forwarder_input_bytes_total", "counter", "stream", "Characters of lines read from the agent, per stream."),
    ("forwarder_records_total", "counter", "", "Records made from those lines and appended to the spool."),
    ("forwarder_records_filtered_total", "counter", "", "Records not forwarded: below FORWARDER_MIN_LEVEL."),
    ("forwarder_delivered_records_total", "counter", "destination", "Records a destination accepted."),
    ("forwarder_dropped_records_total", "counter", "destination, reason", "Records given up, by reason."),
    ("forwarder_retries_total", "counter", "destination", "Failed attempts that were retried."),
    ("forwarder_pending_records", "gauge", "destination", "Records spooled but not yet delivered or dropped."),
    ("forwarder_sent_batches_total", "counter", "destination", "Requests a destination accepted."),
    ("forwarder_sent_bytes_total", "counter", "destination", "Uncompressed payload bytes of accepted requests."),
    ("forwarder_request_duration_seconds", "histogram", "destination", "Duration of each send attempt."),
    (
        "forwarder_last_success_timestamp_seconds",
        "gauge",
        "destination",
        "Time of the last accepted request, seconds since the epoch (0: none yet).",
    ),
    ("forwarder_destination_healthy", "gauge", "destination", "1 if the destination passes /healthz, else 0."),
    ("forwarder_spool_bytes", "gauge", "", "Bytes held by the spool (on disk, or in memory with FORWARDER_BUFFER)."),
    ("forwarder_spool_chunks", "gauge", "", "Chunks held by the spool."),
    (
        "forwarder_checkpoint_lag_bytes",
        "gauge",
        "source",
        "Bytes of a tailed file not yet covered by a persisted checkpoint: its size minus the persisted offset (tail).",
    ),
    ("forwarder_child_restarts_total", "counter", "", "Times the agent was restarted (run mode)."),
    ("forwarder_child_exit_status", "gauge", "", "The agent's exit status, once it exited (run mode)."),
)
"""Every ``forwarder_*`` metric: name, type, labels, help. ``process_*`` metrics (CPU, memory, open files) come
from prometheus-client's process collector."""

_HELP: Final = {name: help_ for name, _type, _labels, help_ in METRICS}


def _help(name: str) -> str:
    return _HELP[name]


@dataclass
class _Histogram:
    """Cumulative bucket counts of one destination's request latencies."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total: float = 0.0

    def add(self, values: Iterable[float]) -> None:
        counts = self.counts
        for value in values:
            counts[bisect.bisect_left(LATENCY_BUCKETS_S, value)] += 1
            self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class RuntimeCollector:
    """A prometheus-client collector reading a :class:`~forwarder.app.Runtime` at scrape time.

    Must be used from the trio thread that runs the forwarder (the ASGI handler and the drain task both are), so
    that it reads counters between updates.

    Args:
        rt: the running forwarder.
        healthy: ``destination -> bool`` as ``/healthz`` judges it now (for ``forwarder_destination_healthy``).
        scrub: removes secret values from label values (defence in depth: reasons and names carry none).
    """

    def __init__(
        self,
        rt: Runtime,
        healthy: Callable[[], Mapping[str, bool]],
        scrub: Callable[[str], str] = lambda s: s,
    ) -> None:
        self.rt = rt
        self._healthy = healthy
        self._scrub = scrub
        self._histograms: dict[str, _Histogram] = {}

    def drain(self) -> None:
        """Move every destination's pending latencies (``DestinationStats.latencies``) into the histograms."""
        for name, stats in self.rt.destinations.items():
            if stats.latencies:
                values, stats.latencies = stats.latencies, []
                self._histograms.setdefault(name, _Histogram()).add(values)

    def collect(self) -> Iterable[Metric]:
        """Every ``forwarder_*`` metric family, read from the runtime now."""
        rt = self.rt
        scrub = self._scrub
        self.drain()

        info = InfoMetricFamily("forwarder_build", _help("forwarder_build_info"), labels=["version", "mode"])
        info.add_metric([__version__, rt.mode], {})
        yield info
        yield GaugeMetricFamily("forwarder_start_time_seconds", _help("forwarder_start_time_seconds"), rt.started)

        ingest = rt.ingest_stats
        lines = CounterMetricFamily("forwarder_input_lines", _help("forwarder_input_lines_total"), labels=["stream"])
        chars = CounterMetricFamily("forwarder_input_bytes", _help("forwarder_input_bytes_total"), labels=["stream"])
        for stream in sorted(set(ingest.lines) | {"stdout", "stderr"}):
            lines.add_metric([stream], ingest.lines.get(stream, 0))
            chars.add_metric([stream], ingest.bytes.get(stream, 0))
        yield lines
        yield chars
        yield CounterMetricFamily("forwarder_records", _help("forwarder_records_total"), ingest.records)
        yield CounterMetricFamily(
            "forwarder_records_filtered", _help("forwarder_records_filtered_total"), ingest.filtered
        )

        dest = ["destination"]
        delivered = CounterMetricFamily(
            "forwarder_delivered_records", _help("forwarder_delivered_records_total"), labels=dest
        )
        dropped = CounterMetricFamily(
            "forwarder_dropped_records", _help("forwarder_dropped_records_total"), labels=["destination", "reason"]
        )
        retries = CounterMetricFamily("forwarder_retries", _help("forwarder_retries_total"), labels=dest)
        pending = GaugeMetricFamily("forwarder_pending_records", _help("forwarder_pending_records"), labels=dest)
        batches = CounterMetricFamily("forwarder_sent_batches", _help("forwarder_sent_batches_total"), labels=dest)
        sent = CounterMetricFamily("forwarder_sent_bytes", _help("forwarder_sent_bytes_total"), labels=dest)
        latency = HistogramMetricFamily(
            "forwarder_request_duration_seconds", _help("forwarder_request_duration_seconds"), labels=dest
        )
        last = GaugeMetricFamily(
            "forwarder_last_success_timestamp_seconds",
            _help("forwarder_last_success_timestamp_seconds"),
            labels=dest,
        )
        health = GaugeMetricFamily("forwarder_destination_healthy", _help("forwarder_destination_healthy"), labels=dest)
        healthy = self._healthy()
        buffer = rt.buffer
        for name, stats in rt.destinations.items():
            label = [name]
            delivered.add_metric(label, stats.delivered)
            for reason, count in sorted(stats.dropped.items()):
                dropped.add_metric([name, scrub(reason)], count)
            retries.add_metric(label, stats.retries)
            pending.add_metric(label, buffer.pending(name) if buffer is not None else 0)
            batches.add_metric(label, stats.batches)
            sent.add_metric(label, stats.bytes_sent)
            hist = self._histograms.get(name) or _Histogram()
            latency.add_metric(label, hist.buckets(), hist.total)
            last.add_metric(label, stats.last_success or 0.0)
            health.add_metric(label, 1.0 if healthy.get(name, True) else 0.0)
        yield from (delivered, dropped, retries, pending, batches, sent, latency, last, health)

        yield GaugeMetricFamily(
            "forwarder_spool_bytes", _help("forwarder_spool_bytes"), buffer.stored_bytes() if buffer else 0
        )
        yield GaugeMetricFamily(
            "forwarder_spool_chunks", _help("forwarder_spool_chunks"), buffer.stored_chunks() if buffer else 0
        )
        lag = GaugeMetricFamily(
            "forwarder_checkpoint_lag_bytes", _help("forwarder_checkpoint_lag_bytes"), labels=["source"]
        )
        for key, value in sorted(_checkpoint_lag(rt).items()):
            lag.add_metric([scrub(key)], value)
        yield lag

        yield CounterMetricFamily(
            "forwarder_child_restarts", _help("forwarder_child_restarts_total"), rt.child_restarts
        )
        if rt.child_exit_status is not None:
            yield GaugeMetricFamily(
                "forwarder_child_exit_status", _help("forwarder_child_exit_status"), rt.child_exit_status
            )


def _checkpoint_lag(rt: Runtime) -> Mapping[str, int]:
    """Bytes behind per tailed source, from ``Runtime.checkpoint_lag`` (set by the tail source; ``None`` in run
    mode). A report that fails (e.g. the spool is closing) yields no samples rather than breaking ``/metrics``."""
    if rt.checkpoint_lag is None:
        return {}
    try:
        return rt.checkpoint_lag()
    except Exception:  # noqa: BLE001 - a failing report must not break /metrics
        return {}


def make_registry(collector: RuntimeCollector, *, process: bool = True) -> CollectorRegistry:
    """A private registry holding ``collector`` (and prometheus-client's ``process_*`` collector)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
    return registry
