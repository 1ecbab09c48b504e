"""Benchmark: the shaping step alone (multi-line grouping, JSON/level parsing, level filtering).

Feeds N deterministic, seeded lines (default 1,000,000; ~175 bytes/line on average) through one
:class:`forwarder.shaping.shaper.Shaper` in batches, the way the pipeline does (lists of lines per stream,
alternating stdout/stderr), and reports lines/s. Only the ``feed``/``flush`` calls are timed; generating the lines
is not. The mix:

* 60%: LiveKit-style JSON lines (``message``, ``level`` mostly INFO with some DEBUG/WARNING/ERROR, ``name``,
  ``pid``, ``code.*``, ``timestamp``; some with ``job_id``/``room``), on stdout;
* 40%: text: LiveKit dev-mode lines with ANSI colours, Python ``logging`` default formats, plain prints (some with
  level words in the middle of prose), logfmt, Python warnings with their source line, and tracebacks (plain and
  chained, some introduced by an ``ERROR`` log line), on stderr (prints on stdout).

With ``--read-size N`` the lines are framed from bytes too (each stream's lines as one byte stream, read N bytes at a
time, the streams alternating, through :class:`forwarder.sources._lines.LineFramer`): framing is timed with shaping,
as in ``forwarder tail`` (which reads 1 MiB at a time).

Usage: ``python bench/bench_shaping.py [--lines 1000000] [--batch 512] [--seed 7] [--min-level INFO]
[--read-size 1048576]``
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from collections.abc import Iterator

from forwarder.record import Level, Tags
from forwarder.shaping.shaper import Shaper
from forwarder.sources._lines import LineFramer

WORDS = [
    *("agent", "room", "track", "audio", "video", "session", "participant", "connect", "publish", "subscribe"),
    *("latency", "worker", "job", "dispatch", "transcript", "speech", "model", "token", "stream", "frame"),
    *("buffer", "codec", "opus", "reconnect", "timeout", "handshake"),
]
NAMES = ("livekit.agents", "livekit.plugins.openai", "livekit.rtc", "my-agent", "asyncio")
LEVELS = ("INFO",) * 14 + ("DEBUG",) * 3 + ("WARNING",) * 2 + ("ERROR",)
ESC = "\x1b"
COLOURS = {"DEBUG": "36", "INFO": "32", "WARNING": "33", "ERROR": "31"}


def _words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choices(WORDS, k=k))


def _ts(i: int) -> str:
    sec = i // 1000
    return f"2026-11-21T13:{(sec // 60) % 60:02d}:{sec % 60:02d}.{(i * 7919) % 1_000_000:06d}+00:00"


def _json_line(rng: random.Random, i: int) -> str:
    rec: dict[str, object] = {
        "message": _words(rng, rng.randint(2, 6)),
        "level": rng.choice(LEVELS),
        "name": rng.choice(NAMES),
        "pid": 27153,
        "code.file.path": "/app/agent.py",
    }
    if rng.random() < 0.4:
        rec["job_id"] = "AJ_" + format(rng.getrandbits(40), "x")
        rec["room"] = "room-" + str(rng.randint(1, 50))
    rec["code.line.number"] = rng.randint(1, 2000)
    rec["timestamp"] = _ts(i)
    return json.dumps(rec)


def _traceback(rng: random.Random, chained: bool) -> list[str]:
    def block(exc: str) -> list[str]:
        out = ["Traceback (most recent call last):"]
        for _ in range(rng.randint(1, 3)):
            out.append(
                f'  File "/app/.venv/lib/python3.11/site-packages/livekit/agents/{rng.choice(WORDS)}.py", '
                f"line {rng.randint(1, 900)}, in {rng.choice(WORDS)}"
            )
            out.append(f"    await self._{rng.choice(WORDS)}({rng.choice(WORDS)})")
        out.append(exc)
        return out

    lines = block("KeyError: 'missing'")
    if chained:
        lines += ["", "The above exception was the direct cause of the following exception:", ""]
        lines += block("RuntimeError: job failed while handling the room")
    return lines


def _text_lines(rng: random.Random, i: int) -> list[str]:
    """One text 'event': usually one line, sometimes a multi-line group."""
    r = rng.random()
    lvl = rng.choice(LEVELS)
    if r < 0.30:  # LiveKit dev mode, coloured
        return [
            f"2026-11-21 13:52:21,{i % 1000:03d} - {ESC}[{COLOURS.get(lvl, '32')}m{lvl}{ESC}[0m "
            f'{rng.choice(NAMES)} - {_words(rng, 10)} {ESC}[90m{{"retry_count": {i % 16}}}{ESC}[0m'
        ]
    if r < 0.42:  # logging.basicConfig default
        return [f"{lvl}:{rng.choice(NAMES)}:{_words(rng, 16)}"]
    if r < 0.54:  # asctime - name - levelname - message
        return [f"2026-11-21 13:52:21,{i % 1000:03d} - {rng.choice(NAMES)} - {lvl} - {_words(rng, 14)}"]
    if r < 0.80:  # prose, sometimes with a level word in the middle
        mid = rng.choice(("", " error", " warning", " ERROR", " info"))
        return [f"{_words(rng, 10)}{mid} {_words(rng, 10)}"]
    if r < 0.88:  # logfmt
        return [f'time="2026-11-21T13:52:21Z" level={lvl.lower()} msg="{_words(rng, 8)}" room=room-{i % 50}']
    if r < 0.92:  # a Python warning and its source line
        return [
            f"/app/.venv/lib/python3.11/site-packages/jwt/api_jwt.py:{i % 300}: InsecureKeyLengthWarning: "
            f"{_words(rng, 10)}",
            "  return self._jws.encode(",
        ]
    if r < 0.97:  # a traceback introduced by a log line
        return [f"ERROR:livekit.agents:{_words(rng, 6)}", *_traceback(rng, chained=False)]
    return _traceback(rng, chained=True)


def generate(n: int, batch: int, seed: int) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(stream, lines)`` batches, ``n`` lines in total, deterministic for ``seed``."""
    rng = random.Random(seed)
    out: list[str] = []
    err: list[str] = []
    i = n_json = 0
    while i < n:
        if n_json < 0.6 * (i + 1):  # keeps the share of JSON lines at 60% however long the text events are
            out.append(_json_line(rng, i))
            i += 1
            n_json += 1
        else:
            event = _text_lines(rng, i)
            event = event[: n - i]
            (out if len(event) == 1 and rng.random() < 0.3 else err).extend(event)
            i += len(event)
        if len(out) >= batch:
            yield "stdout", out
            out = []
        if len(err) >= batch:
            yield "stderr", err
            err = []
    if out:
        yield "stdout", out
    if err:
        yield "stderr", err


def _reads(batches: list[tuple[str, list[str]]], size: int) -> list[tuple[str, bytes]]:
    """Each stream's lines as one byte stream (every line with its newline), cut in reads of ``size`` bytes; the two
    streams' reads alternate."""
    per_stream: dict[str, list[bytes]] = {}
    for stream, lines in batches:
        data = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
        per_stream.setdefault(stream, []).append(data)
    cut = {s: [b"".join(d)[i : i + size] for i in range(0, len(b"".join(d)), size)] for s, d in per_stream.items()}
    out: list[tuple[str, bytes]] = []
    for i in range(max(map(len, cut.values()), default=0)):
        out.extend((stream, reads[i]) for stream, reads in cut.items() if i < len(reads))
    return out


def main() -> None:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=512, help="lines per feed() call (per stream)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--min-level", default="INFO")
    ap.add_argument("--read-size", type=int, default=0, help="frame from bytes read this many at a time (0: off)")
    args = ap.parse_args()

    batches = list(generate(args.lines, args.batch, args.seed))
    n_lines = sum(len(lines) for _, lines in batches)
    n_bytes = sum(len(line.encode()) + 1 for _, lines in batches for line in lines)
    n_json = sum(1 for _, lines in batches for line in lines if line.startswith("{"))

    # The input is generated up front (not timed) and would otherwise sit in the collector's oldest generation,
    # rescanned on every full collection: the pipeline never holds a million lines. Freeze it out of the way.
    gc.collect()
    gc.freeze()

    reads = _reads(batches, args.read_size) if args.read_size > 0 else []
    shaper = Shaper(Tags("bench-host", "bench-agent", "cloud.livekit.io"), min_level=Level.parse(args.min_level))
    framers = {"stdout": LineFramer(), "stderr": LineFramer()}
    records = 0
    now = 1_795_269_178_000_000_000
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if reads:
        for stream, data in reads:
            now += 1_000_000
            records += len(shaper.feed(stream, framers[stream].feed(data), now))
            records += len(shaper.flush_idle(now))
    else:
        for stream, lines in batches:
            now += 1_000_000
            records += len(shaper.feed(stream, lines, now))
            records += len(shaper.flush_idle(now))
    records += len(shaper.flush())
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0

    print(
        f"lines:      {n_lines:,} ({n_json / n_lines:.0%} JSON, {n_bytes / n_lines:.0f} bytes/line avg, "
        f"{len(batches):,} batches)"
    )
    if reads:
        print(f"framing:    {len(reads):,} reads of up to {args.read_size:,} bytes, timed with shaping")
    print(f"records:    {records:,} forwarded, {shaper.filtered:,} filtered below {args.min_level}")
    print(f"wall:       {wall:.3f} s   -> {n_lines / wall:,.0f} lines/s")
    print(f"cpu:        {cpu:.3f} s   -> {n_lines / cpu:,.0f} lines/s (CPU time of this process)")


if __name__ == "__main__":
    main()
