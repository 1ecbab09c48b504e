"""Benchmark: the CloudWatch Logs sink's CPU per record, without the network.

Shapes the first N lines of INPUT (e.g. the benchmark's own input file) into records with one
:class:`forwarder.shaping.shaper.Shaper`, then measures process CPU time (``time.process_time``, best of R) of:

* encode: :meth:`CloudWatchSink.encode` on chunks of ``--chunk`` records (as the spool hands them over);
* request: one ``PutLogEvents`` per batch through the sink's own path (request body, botocore's request building
  and SigV4 signing, response parsing). botocore's ``before-send`` event answers each request with a canned
  ``200`` before any socket is opened; the endpoint is a loopback address that is never contacted and the
  credentials are fake.

Usage: ``python bench/bench_cloudwatch.py INPUT [--records 100000] [--chunk 4000] [--repeat 7]``
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from botocore.awsrequest import AWSResponse
from botocore.compat import HTTPHeaders

from forwarder.config import HttpSettings
from forwarder.record import Level, Record, Tags
from forwarder.shaping.shaper import Shaper
from forwarder.sinks import cloudwatch as cw
from forwarder.sinks._protocol import Batch

_ANSWER = b'{"nextSequenceToken":"1"}'


class _CannedBody:
    """The raw body botocore reads from the canned answer."""

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield _ANSWER

    def read(self, *_: Any, **__: Any) -> bytes:
        return _ANSWER


def _answer(request: Any, **_: Any) -> Any:
    """``before-send`` handler: the canned answer (an ``AWSResponse``) instead of a network round trip."""
    headers = HTTPHeaders()
    headers["Content-Type"] = "application/x-amz-json-1.1"
    return AWSResponse(request.url, 200, headers, _CannedBody())


def _records(path: Path, count: int, now_ns: int) -> list[Record]:
    shaper = Shaper(Tags(host="bench-host", source="agent", service="bench"), min_level=Level.DEBUG)
    with path.open(encoding="utf-8", errors="replace") as lines:
        head = [line.rstrip("\n") for line in itertools.islice(lines, count)]
    records: list[Record] = []
    for start in range(0, len(head), 1000):
        records.extend(shaper.feed("stdout", head[start : start + 1000], now_ns))
    records.extend(shaper.flush())
    return records


def _best(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.process_time()
        run()
        times.append(time.process_time() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    now_ns = time.time_ns()
    records = _records(args.input, args.records, now_ns)
    env = {
        "AWS_ACCESS_KEY_ID": "AKIABENCHNOTAREALKEY",
        "AWS_SECRET_ACCESS_KEY": "bench-secret-not-a-real-key",
        "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": "http://127.0.0.1:9",
    }
    config = cw.config_from_env(env)
    assert config is not None
    sink = cw.CloudWatchSink(config, HttpSettings(timeout_s=5.0), clock=lambda: now_ns / 1e9)
    sink._get_client().meta.events.register("before-send.cloudwatch-logs.PutLogEvents", _answer)

    def encode() -> list[Batch]:
        batches: list[Batch] = []
        for start in range(0, len(records), args.chunk):
            batches.extend(sink.encode(records[start : start + args.chunk]).batches)
        return batches

    batches = encode()

    def request() -> None:
        for batch in batches:
            _, error = sink._put(batch.payload)
            if error is not None:
                raise error

    request()
    n = len(records)
    encode_us = _best(encode, args.repeat) / n * 1e6
    request_us = _best(request, args.repeat) / n * 1e6
    print(
        f"{n} records, {len(batches)} requests: encode {encode_us:.2f} + request and signing {request_us:.2f}"
        f" = {encode_us + request_us:.2f} us/record (process CPU, best of {args.repeat})"
    )


if __name__ == "__main__":
    main()
