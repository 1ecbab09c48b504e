"""Benchmark: what the forwarder costs at the steady rates an agent logs at, not at full speed.

``forwarder tail`` follows a file (telemetry endpoint on, as by default; spool on disk unless ``--buffer memory``)
with Datadog enabled against ``bench/_intake.py``. A writer appends the lines of ``run_all.py`` (seeded, 60%
LiveKit-style JSON / 40% text) at each rate for ``--seconds``, in 100 writes a second; rate 0 is the idle
forwarder. Reported per rate: the forwarder's CPU as a percentage of one core (user and sys from
``/proc/PID/stat``, over the measured window only, after start-up), CPU microseconds per line, requests per second
at the intake and the forwarder's RSS at the end. Every line must have arrived before the next rate starts.

At low rates the cost is per flush, not per line: a chunk is sealed ``FORWARDER_FLUSH_INTERVAL`` (0.2 s) after its
first record, so a destination gets about 5 requests a second whatever the rate, each with its spool write and
acknowledgement.

Usage: ``python bench/bench_rates.py [--rates 0,100,2000,20000] [--seconds 15] [--buffer disk|memory]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import run_all  # bench/, on sys.path as the script's directory

START_UP_S = 3.0
"""Seconds the forwarder gets to start before the measured window (its start-up CPU is not counted)."""
WRITES_PER_S = 100
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> tuple[float, float]:
    """(user, sys) CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS_PER_S, int(fields[12]) / TICKS_PER_S


def _wait_for_count(intake: run_all.Intake, expected: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        count = int(intake.stats()["counts"]["datadog"])
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def measure(work: Path, rates: list[int], seconds: float, buffer: str) -> list[dict[str, Any]]:
    """One forwarder, the rates one after the other; a row per rate."""
    intake = run_all.Intake(work)
    log = work / "agent.log"
    log.write_bytes(b"")
    env = run_all.env_for(intake, work / "state", buffer, ("datadog",))
    env["FORWARDER_HTTP_ADDR"] = "127.0.0.1:0"  # telemetry on, as by default (on a free port)
    proc = subprocess.Popen([run_all.PY, "-m", "forwarder", "tail", str(log)], env=env)
    rows: list[dict[str, Any]] = []
    sent = 0
    try:
        time.sleep(START_UP_S)
        for rate in rates:
            n = int(rate * seconds)
            lines = run_all.make_lines(n, seed=rate) if n else []
            requests_before = int(intake.stats()["requests"])
            user0, sys0 = _cpu_s(proc.pid)
            started = time.monotonic()
            per_write = max(1, rate // WRITES_PER_S)
            with log.open("ab", buffering=0) as out:
                if not n:
                    time.sleep(seconds)
                for i in range(0, n, per_write):
                    out.write(b"".join(lines[i : i + per_write]))
                    delay = started + (i + per_write) / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
            elapsed = time.monotonic() - started
            user1, sys1 = _cpu_s(proc.pid)
            sent += n
            arrived = _wait_for_count(intake, sent, timeout_s=30.0) if n else sent
            cpu = user1 - user0 + sys1 - sys0
            rows.append(
                {
                    "rate": rate,
                    "seconds": round(elapsed, 2),
                    "cpu_pct_of_core": round(100 * cpu / elapsed, 2),
                    "user_ms_per_s": round(1000 * (user1 - user0) / elapsed, 1),
                    "sys_ms_per_s": round(1000 * (sys1 - sys0) / elapsed, 1),
                    "cpu_us_per_line": round(1e6 * cpu / n, 1) if n else None,
                    "requests_per_s": round((int(intake.stats()["requests"]) - requests_before) / elapsed, 1),
                    "rss_mib": round(run_all._vm_rss_kib(proc.pid) / 1024, 1),
                    "complete": arrived == sent,
                }
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        intake.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--rates", default="0,100,2000,20000", help="lines/s, comma-separated (0: idle)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per rate")
    parser.add_argument("--buffer", choices=("disk", "memory"), default="disk")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="fwd-rates-") as tmp:
        rows = measure(Path(tmp), rates, args.seconds, args.buffer)
    print(f"{'lines/s':>8} {'% core':>7} {'user ms/s':>9} {'sys ms/s':>8} {'us/line':>8} {'req/s':>6} {'RSS MiB':>8}")
    for row in rows:
        per_line = "-" if row["cpu_us_per_line"] is None else f"{row['cpu_us_per_line']:.1f}"
        print(
            f"{row['rate']:>8,} {row['cpu_pct_of_core']:>7.2f} {row['user_ms_per_s']:>9.1f} {row['sys_ms_per_s']:>8.1f}"
            f" {per_line:>8} {row['requests_per_s']:>6.1f} {row['rss_mib']:>8.1f}"
            + ("" if row["complete"] else "  INCOMPLETE")
        )
    return 0 if all(row["complete"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
