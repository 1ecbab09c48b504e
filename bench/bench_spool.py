"""Benchmark: what the durable spool costs compared with the in-memory buffer.

Buffer level (each scenario in its own process, so CPU time and peak RSS are its own, with the forwarder's GC
tuning, :func:`forwarder.app.tune_gc`): N records (default 1,000,000) of ~175-byte lines (60% LiveKit-style JSON
shaped into message/level/attributes, 40% text; seeded) are appended in batches of 1,000 (as the ingest path does)
while one destination reads and acknowledges every chunk.

* ``memory``: :class:`~forwarder.delivery.buffer.MemoryBuffer`.
* ``spool``: :class:`~forwarder.delivery.spool.Spool`, the destination keeping up (chunks come from its cache).
* ``spool-raw``: the same with compression off (``compress_level=0``), to show what compression costs.
* ``spool-backlog``: the destination is down while everything is written (write path alone), then it reads the
  whole backlog from disk (read path alone: load, decompress, decode, ack + delete).
* ``parts`` (not in the comparison): the spool's store alone, chunk by chunk, in one thread, a reader
  :data:`PARTS_LAG` chunks behind the writer (so every chunk is read back from disk): CPU microseconds per record
  (``time.thread_time``) of the write (serialise, compress when asked, file + index row), of the read (file,
  decompress, decode into records) and of the acknowledgement (cursor + delete), uncompressed and compressed.

Reported per scenario: records/s (wall), CPU microseconds per record (user+sys of every thread), peak RSS, and the
spool's bytes on disk per record.

Pipeline level (``--pipeline``): ``forwarder run`` with ``FORWARDER_BUFFER=memory`` and ``=disk`` (the embedded
file sink as destination), the issue's criterion (the spool costs at most 15% throughput of the whole pipeline):

* burst: a child writes N generated lines at once; the file sink cannot keep up, so with the spool most chunks
  go to disk and are read back (the spool's worst case). Wall time until every record was in the sink.
* paced: a child writing ``--paced-records`` lines at ``--rate`` lines/s (below capacity, as an agent does): the
  throughput is the child's, so the figure to compare is CPU per record.

Reported: records/s, CPU microseconds per record (user+sys of the forwarder process, all threads, and of the writer
it reaps), peak RSS of the forwarder process (`VmHWM`).

Usage: ``python bench/bench_spool.py [--records 1000000] [--pipeline] [--repeat 1] [--rate 50000] [--parts]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forwarder.app import tune_gc
from forwarder.delivery import spool as spool_module
from forwarder.delivery.buffer import Buffer, Chunk, MemoryBuffer
from forwarder.delivery.spool import Spool
from forwarder.record import Level, Record, Tags

BATCH = 1000
POOL = 10_000
SCENARIOS = ("memory", "spool", "spool-raw", "spool-backlog", "spool-backlog-raw")
PARTS_LAG = 5
"""Chunks the reader of the ``parts`` scenario stays behind the writer (more than the spool's cache would hold)."""


def make_lines(count: int, seed: int = 42) -> list[str]:
    """``count`` typical agent lines, ~175 bytes: 60% JSON (LiveKit logger shape), 40% text."""
    rng = random.Random(seed)
    words = ["agent", "room", "track", "audio", "video", "session", "participant", "connect", "publish"]
    out = []
    for i in range(count):
        phrase = " ".join(rng.choices(words, k=6))
        if i % 5 < 3:
            out.append(
                orjson.dumps(
                    {
                        "message": f"{phrase} #{i}",
                        "level": rng.choice(("INFO", "INFO", "INFO", "WARNING", "DEBUG")),
                        "name": "livekit.agents",
                        "pid": 4242,
                        "job_id": f"AJ_{rng.randrange(16**10):010x}",
                        "timestamp": "2026-11-21T13:52:58.043707+00:00",
                    }
                ).decode()
            )
        else:
            out.append(f"2026-11-21 13:52:21,767 - INFO livekit.agents - {phrase} {rng.random():.6f} #{i}")
    return out


def make_records(lines: list[str]) -> list[Record]:
    """Records as shaping makes them: JSON lines become message + level + attributes."""
    tags = Tags("worker-7f9c", "agent-abc123", "cloud.livekit.io")
    now = time.time_ns()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("{"):
            fields = orjson.loads(line)
            message = fields.pop("message")
            level = Level.parse(fields.pop("level"))
            fields.pop("timestamp")
            out.append(Record(now + i, message, "stdout", tags, level, fields, now + i - 5000))
        else:
            out.append(Record(now + i, line, "stderr", tags))
    return out


async def _produce(buffer: Buffer, pool: list[Record], n: int) -> None:
    done = 0
    while done < n:
        start = done % POOL
        await buffer.append(pool[start : start + BATCH])
        done += BATCH
        await trio.lowlevel.checkpoint()


async def _consume(buffer: Buffer, dest: str) -> int:
    got = 0
    while (chunk := await buffer.next_chunk(dest)) is not None:
        got += len(chunk.records)
        await buffer.ack(dest, chunk.id)
    return got


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_scenario(name: str, n: int, workdir: Path) -> dict[str, Any]:
    """One buffer-level scenario; returns its figures."""
    tune_gc()
    pool = make_records(make_lines(POOL))
    buffer: Buffer
    spool: Spool | None = None
    if name == "memory":
        buffer = MemoryBuffer(1 << 40)
    else:
        spool = Spool.open(workdir / "spool", max_bytes=1 << 40, compress_level=0 if name.endswith("-raw") else 1)
        buffer = spool
    buffer.register(["dest"])
    result: dict[str, Any] = {"scenario": name, "records": n}
    got = 0

    async def consume() -> None:
        nonlocal got
        got = await _consume(buffer, "dest")

    if name.startswith("spool-backlog"):
        assert spool is not None
        cpu0, t0 = _cpu(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(buffer.run)
            await _produce(buffer, pool, n)
            await buffer.close_input()
        cpu1, t1 = _cpu(), time.perf_counter()
        result["disk_bytes_per_record"] = round(spool.stored_bytes() / n, 1)
        await consume()
        cpu2, t2 = _cpu(), time.perf_counter()
        result["write_records_per_s"] = round(n / (t1 - t0))
        result["write_cpu_us_per_record"] = round((cpu1 - cpu0) / n * 1e6, 3)
        result["read_records_per_s"] = round(n / (t2 - t1))
        result["read_cpu_us_per_record"] = round((cpu2 - cpu1) / n * 1e6, 3)
        result["records_per_s"] = round(n / (t2 - t0))
        result["cpu_us_per_record"] = round((cpu2 - cpu0) / n * 1e6, 3)
    else:
        cpu0, t0 = _cpu(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(buffer.run)
            nursery.start_soon(consume)
            await _produce(buffer, pool, n)
            await buffer.close_input()
        cpu1, t1 = _cpu(), time.perf_counter()
        result["records_per_s"] = round(n / (t1 - t0))
        result["cpu_us_per_record"] = round((cpu1 - cpu0) / n * 1e6, 3)
    await buffer.aclose()
    assert got == n, (got, n)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def run_parts(n: int, workdir: Path, compress_level: int) -> dict[str, Any]:
    """The ``parts`` scenario: CPU per record of the store's write, read (+ decode) and ack, chunk by chunk."""
    tune_gc()
    pool = make_records(make_lines(POOL))
    chunks: list[tuple[list[Record], int]] = []
    start = 0
    while start < POOL:  # cut like the spool does: records_size reaches chunk_max_bytes
        size, end = 0, start
        while end < POOL and size < spool_module.DEFAULT_CHUNK_MAX_BYTES:
            size += len(pool[end].message) + 64
            end += 1
        chunks.append((pool[start:end], size))
        start = end
    store = spool_module._Store(workdir / spool_module.SPOOL_FILE)
    store.register(["dest"], 0)
    write = read = ack = 0.0
    written = read_records = 0
    cid = 0
    while written < n:
        for records, size in chunks:
            cid += 1
            t0 = time.thread_time()
            encoded = [spool_module._encode(records, compress_level)]  # serialisation counts as part of the write
            store.write([Chunk(cid, records, size)], encoded, {"k": str(cid)}, 1 << 40)
            write += time.thread_time() - t0
            written += len(records)
            if cid > PARTS_LAG:
                t0 = time.thread_time()
                chunk, _, _ = spool_module._load_chunk(store, cid - PARTS_LAG - 1)
                read += time.thread_time() - t0
                assert chunk is not None and chunk.id == cid - PARTS_LAG
                read_records += len(chunk.records)
                del chunk
                t0 = time.thread_time()
                store.ack("dest", cid - PARTS_LAG, cid - PARTS_LAG)
                ack += time.thread_time() - t0
    stored = store.stored_bytes / max(1, written - read_records)
    store.close()
    return {
        "scenario": f"parts (compress_level={compress_level})",
        "records": written,
        "write_cpu_us_per_record": round(write / written * 1e6, 3),
        "read_decode_cpu_us_per_record": round(read / read_records * 1e6, 3),
        "ack_cpu_us_per_record": round(ack / read_records * 1e6, 3),
        "stored_bytes_per_record": round(stored, 1),
    }


WRITER = r"""
import sys, time
path, rate = sys.argv[1], float(sys.argv[2])
out = sys.stdout
start = time.perf_counter()
with open(path) as fh:
    if rate <= 0:
        out.write(fh.read())
    else:
        for i, line in enumerate(fh):
            out.write(line)
            if i % 1000 == 999:
                out.flush()
                delay = start + (i + 1) / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
out.flush()
time.sleep(3600)  # keep stdout open: the bench stops the forwarder once every line is in the sink
"""
SINK_TIMEOUT_S = 900.0


def _wait_for_lines(sink: Path, n: int, proc: subprocess.Popen[bytes]) -> None:
    """Poll the NDJSON sink until it holds ``n`` lines."""
    seen = 0
    offset = 0
    deadline = time.monotonic() + SINK_TIMEOUT_S
    while seen < n:
        if proc.poll() is not None:
            raise RuntimeError(f"forwarder exited early ({proc.returncode}) with {seen} of {n} lines in the sink")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{seen} of {n} lines after {SINK_TIMEOUT_S} s")
        if sink.exists():
            with sink.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
            offset += len(data)
            seen += data.count(b"\n")
        if seen < n:
            time.sleep(0.02)


def run_pipeline(buffer: str, lines_file: Path, n: int, workdir: Path, rate: float | None) -> dict[str, Any]:
    """``forwarder run`` on a child writing ``lines_file`` (all at once when ``rate`` is None: a burst the
    destination cannot keep up with; else ``rate`` lines/s) with the given buffer. The wall time runs until every
    line is in the file sink (the child keeps its stdout open, so no exit-time flush is measured); then the
    forwarder is stopped with SIGTERM. Returns wall time, CPU (of the forwarder and the writer it runs, the same in
    both buffer modes) and the forwarder's peak RSS."""
    state = workdir / f"state-{buffer}"
    env = dict(
        os.environ,
        FORWARDER_STATE_DIR=str(state),
        FORWARDER_BUFFER=buffer,
        FORWARDER_HTTP_ADDR="off",
        FORWARDER_LOG_LEVEL="WARNING",
        FORWARDER_MIN_LEVEL="DEBUG",
    )
    for var in ("DATADOG_TOKEN", "SENTRY_DSN", "NEW_RELIC_LICENSE_KEY", "AWS_ACCESS_KEY_ID"):
        env.pop(var, None)
    child = [sys.executable, "-c", WRITER, str(lines_file), str(rate or 0)]
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with Path(os.devnull).open("wb") as devnull, (workdir / f"stderr-{buffer}.txt").open("wb") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "forwarder", "run", "--", *child],
            stdout=devnull,
            stderr=errors,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            _wait_for_lines(state / "records.ndjson", n, proc)
            wall = time.perf_counter() - t0
            peak_kib = _vm_hwm_kib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, _status, usage = os.wait4(proc.pid, 0)  # CPU time of the forwarder and of the writer it reaped
            proc.returncode = 0
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "mode": "burst" if rate is None else f"paced {rate:.0f}/s",
        "buffer": buffer,
        "records": n,
        "records_per_s": round(n / wall),
        "wall_s": round(wall, 2),
        "cpu_us_per_record": round(cpu / n * 1e6, 2),
        "peak_rss_mib": round(peak_kib / 1024, 1),
    }


def _vm_hwm_kib(pid: int) -> int:
    """The peak RSS of process ``pid`` since its exec (``VmHWM``, KiB). Not ``wait4``'s ``ru_maxrss``: that also
    counts the pre-exec copy of this benchmark process (large after the buffer-level scenarios) and the reaped
    writer."""
    with Path(f"/proc/{pid}/status").open() as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def write_lines(path: Path, count: int) -> None:
    with path.open("w") as fh:
        for start in range(0, count, 100_000):
            fh.write("\n".join(make_lines(min(100_000, count - start), seed=start)) + "\n")


def pipeline(records: int, repeat: int, paced_records: int, rate: float) -> None:
    """Burst (``cat``) then paced runs, memory vs disk, alternating; best wall and median CPU are reported."""
    with tempfile.TemporaryDirectory() as tmp:
        burst_file, paced_file = Path(tmp) / "burst.txt", Path(tmp) / "paced.txt"
        write_lines(burst_file, records)
        write_lines(paced_file, paced_records)
        for lines_file, n, pace in ((burst_file, records, None), (paced_file, paced_records, rate)):
            runs: dict[str, list[dict[str, Any]]] = {"memory": [], "disk": []}
            for i in range(repeat):
                for buffer, got in runs.items():
                    got.append(run_pipeline(buffer, lines_file, n, Path(tmp) / f"{lines_file.stem}-{i}", pace))
            best: dict[str, dict[str, Any]] = {}
            for buffer, rs in runs.items():
                best[buffer] = max(rs, key=lambda r: r["records_per_s"])
                best[buffer]["cpu_us_per_record"] = statistics.median(r["cpu_us_per_record"] for r in rs)
                print(json.dumps(best[buffer]))
            mem, disk = best["memory"], best["disk"]
            print(
                json.dumps(
                    {
                        "pipeline": f"{mem['mode']}: disk vs memory",
                        "throughput_cost_pct": round((1 - disk["records_per_s"] / mem["records_per_s"]) * 100, 1),
                        "cpu_cost_pct": round((disk["cpu_us_per_record"] / mem["cpu_us_per_record"] - 1) * 100, 1),
                    }
                )
            )


def _better(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Of two runs of a scenario: the faster one (wall), or for ``parts`` the one with less CPU in all."""
    if "records_per_s" in new:
        return bool(new["records_per_s"] > old["records_per_s"])

    def cpu(f: dict[str, Any]) -> float:
        return float(sum(v for k, v in f.items() if k.endswith("_cpu_us_per_record")))

    return cpu(new) < cpu(old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--pipeline", action="store_true", help="also run forwarder run, memory vs disk")
    parser.add_argument("--paced-records", type=int, default=200_000, help="lines of the paced pipeline run")
    parser.add_argument("--rate", type=float, default=50_000, help="lines/s of the paced pipeline run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario (best wall, median CPU)")
    parser.add_argument("--pipeline-only", action="store_true", help="skip the buffer-level scenarios")
    parser.add_argument("--parts", action="store_true", help="also run the store-level parts scenario")
    parser.add_argument("--only", choices=(*SCENARIOS, "parts-0", "parts-1"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.only:  # one scenario, in this process: print its figures as JSON
        with tempfile.TemporaryDirectory() as tmp:
            if args.only.startswith("parts-"):
                print(json.dumps(run_parts(args.records, Path(tmp), int(args.only[-1]))))
            else:
                print(json.dumps(trio.run(run_scenario, args.only, args.records, Path(tmp))))
        return

    results: dict[str, dict[str, Any]] = {}
    for name in () if args.pipeline_only else (*SCENARIOS, *(("parts-0", "parts-1") if args.parts else ())):
        for _ in range(args.repeat):
            out = subprocess.run(
                [sys.executable, __file__, "--only", name, "--records", str(args.records)],
                capture_output=True,
                text=True,
                check=True,
            )
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            if name not in results or _better(figures, results[name]):
                results[name] = figures
        print(json.dumps(results[name]))
    if results:
        mem, spool = results["memory"], results["spool"]
        extra = round(spool["cpu_us_per_record"] - mem["cpu_us_per_record"], 3)
        print(json.dumps({"buffer_level": "spool vs memory", "extra_cpu_us_per_record": extra}))
    if args.pipeline or args.pipeline_only:
        pipeline(args.records, args.repeat, args.paced_records, args.rate)


if __name__ == "__main__":
    main()
