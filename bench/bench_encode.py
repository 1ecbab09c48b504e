"""Micro-benchmark: CPU cost per record of each sink's pure encode function, and of ``gzip_bytes`` alone.

Builds N records (default 100,000) from the bench input (``/tmp/prof/input.log``, the 1M-line input of scenario
(a); the first N lines are used) with :class:`forwarder.shaping.shaper.Shaper` the way ``forwarder/pipeline.py``
feeds it (lists of lines per stream, then ``flush_idle``/``flush``). Without that file (``--input ''`` or a missing
path) the lines come from ``bench_shaping.generate`` instead. Building the records is not timed.

Each sink's module-level encode function is then called on chunks of ``--chunk`` records (as the destination
runner calls ``sink.encode`` on the chunks it reads from the buffer; a 1 MiB spool chunk holds ~5,000 such lines),
``--repeat`` times over all the records; the best (lowest) CPU time (``time.process_time``, so other load on the
machine counts little) is reported as microseconds per record. The garbage collector is tuned as in the forwarder
process (``forwarder.app.tune_gc``). With the default 100,000 records (tens of MB of objects) each call reads
records that are not in the nearest CPU caches; ``--records 5000 --chunk 5000 --repeat 30`` gives figures with the
records in cache (lower).

Figures:

* ``datadog``: ``forwarder.sinks.datadog.encode(records, now_ns=...)``;
* ``newrelic``: ``forwarder.sinks.newrelic.encode(records)``;
* ``sentry``: ``forwarder.sinks.sentry.encode(records, trace_id)``;
* ``cloudwatch``: ``forwarder.sinks.cloudwatch.encode_events(records, group, stream, now_ms)`` (no gzip);
* ``gzip``: ``forwarder.sinks._http.gzip_bytes`` alone, on the uncompressed Datadog payloads of the same records.

For the sinks that gzip (datadog, newrelic, sentry) a second figure, ``excl. gzip``, is measured with the module's
``gzip_bytes`` name replaced by the identity function for that run (the benchmark's own process only).

Usage::

    /tmp/venv/bin/python bench/bench_encode.py [--records 100000] [--chunk 5000] [--repeat 3]
        [--input /tmp/prof/input.log] [--only datadog|newrelic|sentry|cloudwatch|gzip]

``--only`` may be given several times.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from types import ModuleType

from forwarder.app import tune_gc
from forwarder.record import Level, Record, Tags
from forwarder.shaping.shaper import Shaper
from forwarder.sinks import _http, cloudwatch, datadog, newrelic, sentry

DEFAULT_INPUT = "/tmp/prof/input.log"
NAMES = ("datadog", "newrelic", "sentry", "cloudwatch", "gzip")
TRACE_ID = "0123456789abcdef0123456789abcdef"
FEED_LINES = 512
"""Lines per ``Shaper.feed`` call (the pipeline feeds what a read returned)."""


def _input_lines(path: str, n: int) -> Iterator[tuple[str, list[str]]]:
    """``(stream, lines)`` batches: the first ``n`` lines of ``path`` on stdout, or generated lines."""
    if path and Path(path).is_file():
        with Path(path).open(encoding="utf-8", errors="replace") as f:
            lines = [line.rstrip("\n") for line in islice(f, n)]
        for i in range(0, len(lines), FEED_LINES):
            yield "stdout", lines[i : i + FEED_LINES]
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_shaping import generate  # only without the input file

    yield from generate(n, FEED_LINES, 7)


def build_records(path: str, n: int, now_ns: int) -> list[Record]:
    """Shape the first ``n`` input lines into records, captured around ``now_ns`` (1 ms apart per feed)."""
    shaper = Shaper(Tags("bench-host", "bench-agent", "cloud.livekit.io"), min_level=Level.INFO)
    records: list[Record] = []
    now = now_ns - 10**9
    for stream, lines in _input_lines(path, n):
        now += 1_000_000
        records.extend(shaper.feed(stream, lines, now))
        records.extend(shaper.flush_idle(now))
    records.extend(shaper.flush())
    return records


def _chunks(records: Sequence[Record], size: int) -> list[Sequence[Record]]:
    return [records[i : i + size] for i in range(0, len(records), size)]


def _cpu_per_record(run: Callable[[], object], n_records: int, repeat: int) -> float:
    """Best CPU time of ``repeat`` calls of ``run``, microseconds per record."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best / n_records * 1e6


def _gzip_all(payloads: list[bytes]) -> list[bytes]:
    return [_http.gzip_bytes(p) for p in payloads]


def _identity(data: bytes) -> bytes:
    return data


def _without_gzip(module: ModuleType, run: Callable[[], object]) -> Callable[[], object]:
    """``run`` with ``module.gzip_bytes`` replaced by the identity function while it runs."""

    def wrapped() -> object:
        saved = getattr(module, "gzip_bytes")  # noqa: B009 (a module's attribute, checked by the caller)
        setattr(module, "gzip_bytes", _identity)  # noqa: B010
        try:
            return run()
        finally:
            setattr(module, "gzip_bytes", saved)  # noqa: B010

    return wrapped


def main() -> None:
    """Build the records, run the selected encoders, print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000, help="input lines to shape (default 100,000)")
    ap.add_argument("--chunk", type=int, default=5_000, help="records per encode call (default 5,000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is kept (default 3)")
    ap.add_argument("--input", default=DEFAULT_INPUT, help=f"input lines (default {DEFAULT_INPUT})")
    ap.add_argument("--only", action="append", choices=NAMES, help="run only this one (repeatable)")
    args = ap.parse_args()
    selected = args.only or list(NAMES)

    now_ns = time.time_ns()
    records = build_records(args.input, args.records, now_ns)
    chunks = _chunks(records, args.chunk)
    n = len(records)
    raw_bytes = sum(len(r.message) for r in records) / max(n, 1)
    print(f"records: {n:,} (from {args.records:,} lines; messages {raw_bytes:.0f} chars avg), {len(chunks)} chunks")
    tune_gc()  # as the forwarder process does after start-up: records frozen out of the way, its GC thresholds

    now_ms = now_ns // 1_000_000
    runs: dict[str, tuple[ModuleType | None, Callable[[], object]]] = {
        "datadog": (datadog, lambda: [datadog.encode(c, now_ns=now_ns) for c in chunks]),
        "newrelic": (newrelic, lambda: [newrelic.encode(c) for c in chunks]),
        "sentry": (sentry, lambda: [sentry.encode(c, TRACE_ID) for c in chunks]),
        "cloudwatch": (
            None,
            lambda: [
                cloudwatch.encode_events(c, cloudwatch.DEFAULT_LOG_GROUP, cloudwatch.DEFAULT_LOG_STREAM, now_ms)
                for c in chunks
            ],
        ),
    }
    print(f"{'encode':<12}{'us/record':>12}{'excl. gzip':>14}")
    for name in selected:
        if name == "gzip":
            payloads = [gzip.decompress(b.payload) for c in chunks for b in datadog.encode(c, now_ns=now_ns).batches]
            size = sum(map(len, payloads)) / max(n, 1)
            us = _cpu_per_record(partial(_gzip_all, payloads), n, args.repeat)
            print(f"{'gzip':<12}{us:>12.3f}{'':>14}   ({size:.0f} uncompressed bytes/record, Datadog payloads)")
            continue
        module, run = runs[name]
        us = _cpu_per_record(run, n, args.repeat)
        excl = ""
        if module is not None and hasattr(module, "gzip_bytes"):
            excl = f"{_cpu_per_record(_without_gzip(module, run), n, args.repeat):.3f}"
        print(f"{name:<12}{us:>12.3f}{excl:>14}")


if __name__ == "__main__":
    main()
