"""The benchmark suite: every scenario of issue 12, one table, one JSON file.

Usage::

    python bench/run_all.py [--quick] [--only a,b,c,d,e] [--buffer disk|memory] [--out bench/results/latest.json]

Scenarios (input: seeded, 60% LiveKit-style JSON lines / 40% text, ~175 bytes a line):

a. ``forwarder tail --read-from head FILE`` (1,000,000 lines) into a Datadog-format intake, spool on.
b. the same with Datadog, New Relic, Sentry and CloudWatch Logs enabled, all against ``bench/_intake.py``
   (CloudWatch: a minimal PutLogEvents endpoint of the intake speaking the AWS JSON 1.1 protocol; moto stores and
   validates every event and does not keep up at these rates).
c. ``forwarder run -- CHILD``: a child writing 1,000,000 lines as fast as it can; its own elapsed time versus
   writing to /dev/null (the child of ``bench/bench_run.py``), and the floor: the same child writing into ``cat``.
d. latency: a child writes 2,000 lines/s for 10 s, each embedding its send time; the intake records arrival
   time - send time; p50/p99 with the default flush settings.
e. outage: ``tail`` of a file written at 10,000 lines/s for 60 s (``--quick``: 15 s) while the only destination
   answers 503; RSS and spool size sampled; then the intake recovers and every record must arrive.

Measured per run: wall time from spawning the forwarder until the intake counted the last record (lines/s, MiB/s of
input), CPU seconds (user + sys of the forwarder process tree, from ``wait4``), peak RSS (``ru_maxrss`` and the
highest sampled ``VmRSS``), records counted at the intake per destination, and the intake's own CPU seconds; for
(a) and (b) also the seconds until the first record arrived, the rate between 10% and 90% of the records, and the
seconds for the last 10%.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import bench_run  # noqa: E402 - the run-mode child lives there

PY = sys.executable
MIB = 1024 * 1024

WORDS = [
    "agent",
    "room",
    "track",
    "audio",
    "video",
    "session",
    "participant",
    "connect",
    "publish",
    "subscribe",
    "latency",
    "worker",
    "job",
    "dispatch",
    "transcript",
    "speech",
    "llm",
    "tts",
    "stt",
    "turn",
    "detection",
    "interrupt",
    "playout",
    "buffer",
    "frame",
    "codec",
    "opus",
]


# --- input -------------------------------------------------------------------------------------------------------


def make_lines(n: int, seed: int = 42) -> list[bytes]:
    """``n`` deterministic lines: 60% LiveKit-style JSON (stdout framework logs), 40% text, ~175 bytes each."""
    rng = random.Random(seed)
    # The JSON lines' own timestamps are in the current UTC hour (Datadog accepts event times up to 18 h old; an
    # old fixed date would send every record down the encoder's slow path for stale times). All else is seeded.
    hour = time.strftime("%Y-%m-%dT%H", time.gmtime())
    phrases = [" ".join(rng.choices(WORDS, k=rng.randint(4, 9))) for _ in range(256)]
    levels = ["INFO"] * 8 + ["WARNING", "ERROR"]
    out: list[bytes] = []
    for i in range(n):
        phrase = phrases[rng.randrange(256)]
        level = levels[rng.randrange(10)]
        if i % 5 < 3:
            line = json.dumps(
                {
                    "message": f"{phrase} #{i}",
                    "level": level,
                    "name": "livekit.agents",
                    "pid": 4242 + i % 7,
                    "job_id": f"AJ_{i % 97:08x}",
                    "timestamp": f"{hour}:{i % 60:02d}:{i % 60:02d}.{i % 1000000:06d}+00:00",
                },
                separators=(",", ":"),
            )
        else:
            stamp = f"2026-11-21 13:52:{i % 60:02d},{i % 1000:03d}"
            line = f"{stamp} - {level} livekit.agents - {phrase} {phrases[i % 256]} #{i}"
        out.append(line.encode() + b"\n")
    return out


def write_input(path: Path, n: int) -> int:
    """Write the input in a child process, so this process stays small (its children are forked from it)."""
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import run_all; run_all._write({str(path)!r}, {n})"
    subprocess.run([PY, "-c", code], check=True)
    return path.stat().st_size


def _write(path: str, n: int) -> None:
    Path(path).write_bytes(b"".join(make_lines(n)))


# --- intake ------------------------------------------------------------------------------------------------------


class Intake:
    """``bench/_intake.py`` in its own process."""

    def __init__(self, workdir: Path, parse: bool = False, delay_ms: float = 0.0) -> None:
        port_file = workdir / f"intake-port-{time.monotonic_ns()}"
        args = [PY, str(HERE / "_intake.py"), str(port_file)] + (["--parse"] if parse else [])
        if delay_ms:
            args += ["--delay-ms", str(delay_ms)]
        self.proc = subprocess.Popen(args)
        deadline = time.monotonic() + 10
        while not port_file.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("intake did not start")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        self.base = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.base + "/_stats", timeout=10) as resp:
            stats: dict[str, Any] = json.loads(resp.read())
            return stats

    def set_status(self, code: int) -> None:
        req = urllib.request.Request(f"{self.base}/_status/{code}", data=b"", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def env_for(intake: Intake, state: Path, buffer: str, destinations: tuple[str, ...]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATADOG_", "AWS_", "SENTRY_", "NEW_RELIC_"))}
    env.update(
        FORWARDER_STATE_DIR=str(state),
        FORWARDER_BUFFER=buffer,
        FORWARDER_HTTP_ADDR="off",
        FORWARDER_LOG_LEVEL="WARNING",
        FORWARDER_FILE_SINK="off",
        FORWARDER_HOST="bench-host",
        FORWARDER_SOURCE="bench",
        PYTHONPATH=str(ROOT),
        NO_PROXY="*",
    )
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(key, None)
    if "datadog" in destinations:
        env.update(DATADOG_TOKEN="fake-api-key", FORWARDER_DATADOG_URL=intake.base)
    if "newrelic" in destinations:
        env.update(
            NEW_RELIC_LICENSE_KEY="0123456789abcdef0123456789abcdef0123NRAL",
            FORWARDER_NEW_RELIC_URL=intake.base + "/nr/log/v1",
        )
    if "sentry" in destinations:
        env.update(SENTRY_DSN=f"http://0123456789abcdef0123456789abcdef@127.0.0.1:{intake.port}/1")
    if "cloudwatch" in destinations:
        env.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_REGION="us-west-2",
            AWS_ENDPOINT_URL_CLOUDWATCH_LOGS=intake.base,
            CLOUDWATCH_LOG_GROUP="bench",
            CLOUDWATCH_LOG_STREAM="bench",
        )
    return env


# --- one forwarder run -------------------------------------------------------------------------------------------


def _vm_rss_kib(pid: int, field: str = "VmRSS:") -> int:
    try:
        with Path(f"/proc/{pid}/status").open() as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _dir_bytes(path: Path) -> int:
    total = 0
    for f in path.rglob("*"):
        with contextlib.suppress(OSError):
            total += f.stat().st_size
    return total


def run_forwarder(
    cmd: list[str],
    env: dict[str, str],
    intake: Intake,
    expect: dict[str, int],
    *,
    timeout_s: float,
    stop: bool,
    during: Any = None,
    sample_every_s: float = 0.05,
    state: Path | None = None,
    on_start: Any = None,
) -> dict[str, Any]:
    """Spawn ``cmd``; wait until the intake counted ``expect`` records per destination (or ``timeout_s``); SIGTERM
    it if ``stop``; reap it with ``wait4`` for its CPU time and peak RSS."""
    before = intake.stats()
    base_counts = before["counts"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(ROOT))
    if on_start is not None:
        on_start(proc.pid)
    peak_rss = 0
    samples: list[tuple[float, int, int]] = []
    done_at: float | None = None
    counts: dict[str, int] = {}
    last_sample = 0.0
    progress: list[tuple[float, int]] = []  # (seconds since spawn, records counted by the slowest destination)
    while True:
        now = time.perf_counter()
        # VmHWM: the kernel's high-water mark of this process image (since exec). wait4's ru_maxrss is not used:
        # it counts the pre-exec copy of this (large) benchmark process.
        peak_rss = max(peak_rss, _vm_rss_kib(proc.pid, "VmHWM:"))
        st = intake.stats()
        counts = {k: st["counts"][k] - base_counts[k] for k in expect}
        progress.append((now - started, min(counts.values(), default=0)))
        if state is not None and now - last_sample >= 1.0:
            samples.append((round(now - started, 2), _vm_rss_kib(proc.pid), _dir_bytes(state)))
            last_sample = now
        if during is not None:
            during(now - started, counts)
        if all(counts[k] >= n for k, n in expect.items()):
            done_at = now
            break
        if proc.poll() is not None and not stop:
            done_at = now
            break
        if now - started > timeout_s:
            break
        time.sleep(sample_every_s)
    if stop and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, status, ru = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    after = intake.stats()
    counts = {k: after["counts"][k] - base_counts[k] for k in expect}
    wall = (done_at or time.perf_counter()) - started
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
        "user_s": round(ru.ru_utime, 3),
        "sys_s": round(ru.ru_stime, 3),
        "peak_rss_mib": round(peak_rss / 1024, 1),
        "counts": counts,
        "complete": all(counts[k] == n for k, n in expect.items()),
        "timed_out": done_at is None,
        "exit_status": os.waitstatus_to_exitcode(status),
        "intake_cpu_s": round(after["cpu_s"] - before["cpu_s"], 3),
        "intake_requests": after["requests"] - before["requests"],
        "samples": samples,
        **_phases(progress, min(expect.values(), default=0)),
        "stderr_tail": stderr[-1500:] if (done_at is None or any(counts[k] != n for k, n in expect.items())) else "",
    }


def _phases(progress: list[tuple[float, int]], total: int) -> dict[str, Any]:
    """Where the wall time went: seconds until the first record arrived (start-up: imports, the spool, the first
    chunk's round trip), the rate between 10% and 90% of the records (the pipeline itself), and seconds from 90% to
    the last one (the last chunks wait for ``FORWARDER_FLUSH_INTERVAL``, as a tail cannot know the file is done)."""

    def reached(count: float) -> tuple[float, int] | None:
        return next(((t, n) for t, n in progress if n >= count), None)

    first, lo, hi, last = reached(1), reached(total * 0.1), reached(total * 0.9), reached(total)
    out: dict[str, Any] = {"first_record_s": None if first is None else round(first[0], 2)}
    if lo is not None and hi is not None and hi[0] > lo[0]:
        out["steady_lines_per_s"] = round((hi[1] - lo[1]) / (hi[0] - lo[0]))
    if hi is not None and last is not None:
        out["last_10pct_s"] = round(last[0] - hi[0], 2)
    return out


def _rates(res: dict[str, Any], lines: int, nbytes: int) -> dict[str, Any]:
    res["lines"] = lines
    res["lines_per_s"] = round(lines / res["wall_s"]) if res["wall_s"] else 0
    res["mib_per_s"] = round(nbytes / MIB / res["wall_s"], 1) if res["wall_s"] else 0
    res["cpu_s_per_m_lines"] = round(res["cpu_s"] / lines * 1e6, 2)
    return res


# --- scenarios ---------------------------------------------------------------------------------------------------


def scenario_tail(
    work: Path, n: int, buffer: str, destinations: tuple[str, ...], rtt_ms: float = 0.0
) -> dict[str, Any]:
    data = work / f"input-{n}.log"
    if not data.exists():
        write_input(data, n)
    nbytes = data.stat().st_size
    intake = Intake(work, delay_ms=rtt_ms)
    state = work / f"state-{'-'.join(destinations)}"
    shutil.rmtree(state, ignore_errors=True)
    try:
        cmd = [PY, "-m", "forwarder", "tail", "--read-from", "head", str(data)]
        res = run_forwarder(
            cmd,
            env_for(intake, state, buffer, destinations),
            intake,
            dict.fromkeys(destinations, n),
            timeout_s=120 + n / 5000,
            stop=True,
        )
    finally:
        intake.close()
    res["destinations"] = list(destinations)
    res["buffer"] = buffer
    res["rtt_ms"] = rtt_ms
    return _rates(res, n, nbytes)


def scenario_run_child(work: Path, n: int, buffer: str) -> dict[str, Any]:
    out: dict[str, Any] = {"lines": n, "buffer": buffer, "child": "logger"}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        out["child_devnull_s"] = round(
            float(bench_run.run_child(n, "devnull", buffer, Path(tmp), "logger")["child_s"]), 3
        )
    with tempfile.TemporaryDirectory(dir=work) as tmp:  # the floor: the cheapest pipe reader there is
        out["child_into_cat_s"] = round(float(bench_run.run_child(n, "cat", buffer, Path(tmp), "logger")["child_s"]), 3)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        t0 = time.perf_counter()
        before = resource_children()
        r = bench_run.run_child(n, "forwarder", buffer, Path(tmp), "logger")
        after = resource_children()
        out["child_under_forwarder_s"] = round(float(r["child_s"]), 3)
        out["forwarder_total_s"] = round(time.perf_counter() - t0, 3)
        out["delivered"] = r["delivered"]
        out["complete"] = r["delivered"] == n and bool(r["in_order"])
        # RUSAGE_CHILDREN covers the forwarder and its child (the writer); the writer's own CPU is about its
        # /dev/null time, so the difference is an upper bound of the forwarder's share.
        out["tree_cpu_s"] = round(after[0] - before[0], 3)
    out["slowdown"] = round(out["child_under_forwarder_s"] / out["child_devnull_s"], 3)
    out["slowdown_cat_floor"] = round(out["child_into_cat_s"] / out["child_devnull_s"], 3)
    out["forwarder_cpu_s_per_m_lines_approx"] = round((out["tree_cpu_s"] - out["child_devnull_s"]) / n * 1e6, 2)
    return out


def resource_children() -> tuple[float, int]:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime, 0


PACED_WRITER = r"""
import json, sys, time
rate = int(sys.argv[1]); seconds = float(sys.argv[2]); target = sys.argv[3]
out = sys.stdout if target == "-" else open(target, "a", buffering=1)
total = int(rate * seconds); tick = 0.01; per_tick = max(1, int(rate * tick))
start = time.time(); i = 0
while i < total:
    for _ in range(min(per_tick, total - i)):
        now = time.time()
        if i % 5 < 3:
            out.write(json.dumps({"message": f"paced line sent_at={now:.6f} #{i}", "level": "INFO",
                                  "name": "livekit.agents", "pid": 4242, "job_id": "AJ_abc123",
                                  "timestamp": "2026-11-21T13:52:58.043707+00:00"}) + "\n")
        else:
            out.write(f"2026-11-21 13:52:21,767 - INFO livekit.agents - paced text line sent_at={now:.6f} #{i}\n")
        i += 1
    out.flush()
    delay = start + (i / rate) - time.time()
    if delay > 0:
        time.sleep(delay)
"""


LONE_WRITER = r"""
import json, sys, time
count = int(sys.argv[1])
for i in range(count):
    time.sleep(0.5)
    now = time.time()
    if i % 2:
        print(json.dumps({"message": f"lone line sent_at={now:.6f} #{i}", "level": "INFO"}), flush=True)
    else:
        print(f"2026-11-21 13:52:21,767 - INFO livekit.agents - lone text line sent_at={now:.6f} #{i}", flush=True)
"""
LONE_LINES = 8
"""Lines of the lone-line part of (d): one every 0.5 s, text and JSON in turn."""


def scenario_latency(work: Path, rate: int, seconds: float, buffer: str) -> dict[str, Any]:
    """(d): write-to-arrival latency at a steady ``rate``, then of lone lines (an agent that logs now and then:
    each line is the last of its burst, and a text line waits ``FORWARDER_MULTILINE_TIMEOUT`` for a continuation)."""
    n = int(rate * seconds)
    steady, res = _latency_run(work, "steady", [PACED_WRITER, str(rate), str(seconds), "-"], n, seconds, buffer)
    lone, lone_res = _latency_run(work, "lone", [LONE_WRITER, str(LONE_LINES)], LONE_LINES, LONE_LINES, buffer)
    return {
        "lines": n,
        "rate": rate,
        "buffer": buffer,
        "complete": res["complete"] and lone_res["complete"],
        "counts": res["counts"],
        "p50_s": round(steady.get("latency_p50_s", -1), 3),
        "p99_s": round(steady.get("latency_p99_s", -1), 3),
        "max_s": round(steady.get("latency_max_s", -1), 3),
        "lone_lines": LONE_LINES,
        "lone_p50_s": round(lone.get("latency_p50_s", -1), 3),
        "lone_max_s": round(lone.get("latency_max_s", -1), 3),
        "cpu_s": res["cpu_s"],
        "peak_rss_mib": res["peak_rss_mib"],
        "stderr_tail": res["stderr_tail"] or lone_res["stderr_tail"],
    }


def _latency_run(
    work: Path, name: str, writer: list[str], n: int, seconds: float, buffer: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``forwarder run`` of a writer whose lines carry ``sent_at=``; the intake's latency stats and the run's."""
    intake = Intake(work, parse=True)
    state = work / f"state-latency-{name}"
    shutil.rmtree(state, ignore_errors=True)
    try:
        env = env_for(intake, state, buffer, ("datadog",))
        cmd = [PY, "-m", "forwarder", "run", "--", PY, "-c", *writer]
        res = run_forwarder(cmd, env, intake, {"datadog": n}, timeout_s=seconds + 60, stop=False)
        return intake.stats(), res
    finally:
        intake.close()


def scenario_outage(work: Path, rate: int, seconds: float, buffer: str) -> dict[str, Any]:
    intake = Intake(work)
    state = work / "state-outage"
    shutil.rmtree(state, ignore_errors=True)
    target = work / "outage.log"
    target.write_bytes(b"")
    n = int(rate * seconds)
    intake.set_status(503)
    writer = subprocess.Popen([PY, "-c", PACED_WRITER, str(rate), str(seconds), str(target)])
    phase: dict[str, float | None] = {"recovered_at": None}

    def during(elapsed: float, counts: dict[str, int]) -> None:
        if phase["recovered_at"] is None and writer.poll() is not None:
            intake.set_status(200)
            phase["recovered_at"] = elapsed

    try:
        env = env_for(intake, state, buffer, ("datadog",))
        # Compressed time: backoff capped at 2 s instead of 30 s so recovery is seen within seconds.
        env["FORWARDER_RETRY_MAX_BACKOFF"] = "2"
        cmd = [PY, "-m", "forwarder", "tail", "--read-from", "head", str(target)]
        res = run_forwarder(
            cmd,
            env,
            intake,
            {"datadog": n},
            timeout_s=seconds + 120,
            stop=True,
            during=during,
            sample_every_s=0.2,
            state=state,
        )
    finally:
        writer.wait()
        intake.close()
    samples = res.pop("samples")
    outage_samples = [s for s in samples if phase["recovered_at"] is None or s[0] <= phase["recovered_at"]]
    return {
        "lines": n,
        "rate": rate,
        "outage_s": seconds,
        "buffer": buffer,
        "complete": res["complete"],
        "counts": res["counts"],
        "peak_rss_mib": res["peak_rss_mib"],
        "rss_mib_samples_during_outage": [round(s[1] / 1024, 1) for s in outage_samples][
            :: max(1, len(outage_samples) // 12)
        ],
        "spool_mib_samples": [round(s[2] / MIB, 1) for s in outage_samples][:: max(1, len(outage_samples) // 12)],
        "recovered_at_s": phase["recovered_at"],
        "drained_after_recovery_s": round(res["wall_s"] - (phase["recovered_at"] or 0), 2),
        "cpu_s": res["cpu_s"],
        "stderr_tail": res["stderr_tail"],
    }


# --- main --------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description="forwarder benchmark suite (issue 12)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (200k lines, 15 s outage)")
    parser.add_argument("--only", default="a,b,c,d,e", help="comma-separated scenarios")
    parser.add_argument("--buffer", choices=("disk", "memory"), default="disk")
    parser.add_argument("--lines", type=int, default=None, help="lines for a/b/c (default 1,000,000; quick 200,000)")
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=0.0,
        help="(a), (b): the intake holds each request this long, as a remote intake's round trip would",
    )
    parser.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    args = parser.parse_args()
    only = set(args.only.split(","))
    n = args.lines or (200_000 if args.quick else 1_000_000)
    outage_s = 15.0 if args.quick else 60.0
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "buffer": args.buffer,
        "rtt_ms": args.rtt_ms,
        "request_concurrency": os.environ.get("FORWARDER_REQUEST_CONCURRENCY", "default"),
        "scenarios": {},
    }
    targets = {
        "a": "≥270k lines/s, ≤4.0 CPU-s/M, RSS <80 MiB",
        "b": "≥120k lines/s, all 4 complete",
        "c": "slowdown ≤1.15x",
        "d": "p99 <1.5 s",
        "e": "RSS ≤100 MiB, nothing lost",
    }
    # Byte-compile the package first, as installing it does (pip, the Docker image): from a checkout, with
    # PYTHONDONTWRITEBYTECODE set (some sandboxes and images set it) or after an edit, every forwarder process would
    # otherwise compile its modules from source at start, ~50 ms of CPU per run that a deployment never pays.
    compileall.compile_dir(str(ROOT / "forwarder"), quiet=1)
    with tempfile.TemporaryDirectory(prefix="fwd-bench-") as tmp:
        work = Path(tmp)
        sc = results["scenarios"]
        if "a" in only:
            sc["a"] = scenario_tail(work, n, args.buffer, ("datadog",), args.rtt_ms)
            _print_row("a", sc["a"])
        if "b" in only:
            sc["b"] = scenario_tail(work, n, args.buffer, ("datadog", "newrelic", "sentry", "cloudwatch"), args.rtt_ms)
            _print_row("b", sc["b"])
        if "c" in only:
            sc["c"] = scenario_run_child(work, n, args.buffer)
            _print_row("c", sc["c"])
        if "d" in only:
            sc["d"] = scenario_latency(work, 2000, 5.0 if args.quick else 10.0, args.buffer)
            _print_row("d", sc["d"])
        if "e" in only:
            sc["e"] = scenario_outage(work, 10_000, outage_s, args.buffer)
            _print_row("e", sc["e"])
    results["loadavg_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print()
    print(f"{'':3}{'target':42} result")
    for key, res in results["scenarios"].items():
        print(f"{key:3}{targets[key]:42} {_summary(key, res)}")
    print(f"\nresults: {out}")
    return 0


def _summary(key: str, r: dict[str, Any]) -> str:
    if key in ("a", "b"):
        return (
            f"{r['lines_per_s']:>9,} lines/s {r['mib_per_s']:6.1f} MiB/s {r['cpu_s_per_m_lines']:5.2f} CPU-s/M "
            f"RSS {r['peak_rss_mib']:5.1f} MiB complete={r['complete']} {r['counts']} "
            f"(intake CPU {r['intake_cpu_s']} s; first record after {r.get('first_record_s')} s, "
            f"{r.get('steady_lines_per_s', 0):,} lines/s from 10% to 90%)"
        )
    if key == "c":
        return (
            f"slowdown {r['slowdown']}x (devnull {r['child_devnull_s']} s, under forwarder "
            f"{r['child_under_forwarder_s']} s; all delivered {r['forwarder_total_s']} s) complete={r['complete']}; "
            f"the floor, into cat: {r['slowdown_cat_floor']}x"
        )
    if key == "d":
        return (
            f"p50 {r['p50_s']} s p99 {r['p99_s']} s max {r['max_s']} s complete={r['complete']}; "
            f"{r['lone_lines']} lone lines: p50 {r['lone_p50_s']} s max {r['lone_max_s']} s"
        )
    return (
        f"peak RSS {r['peak_rss_mib']} MiB, spool up to {max(r['spool_mib_samples'] or [0])} MiB, drained "
        f"{r['drained_after_recovery_s']} s after recovery, complete={r['complete']} {r['counts']}"
    )


def _print_row(key: str, res: dict[str, Any]) -> None:
    print(f"[{key}] {_summary(key, res)}", flush=True)
    if res.get("stderr_tail"):
        print(res["stderr_tail"], file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
