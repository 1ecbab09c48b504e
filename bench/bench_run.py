"""Benchmark: how much does `forwarder run` slow down a child that writes as fast as it can?

The child writes N lines (~175 bytes, 60% LiveKit-style JSON, 40% text, seeded) to stdout and records its own
elapsed time. It runs once with stdout to /dev/null and once under ``forwarder run`` (forwarder's own stdout to
/dev/null, the embedded file sink as destination). Reported: the child's slowdown ratio (its best time under the
forwarder over its best time into /dev/null, over ``--repeat`` rounds), the same ratio per round (each round runs
the three cases back to back, so a burst of load from elsewhere on the machine shows as one odd round), the
forwarder's total time until every record was in the sink, and whether all N lines arrived in order.

Usage: ``python bench/bench_run.py [--lines 500000] [--repeat 5] [--buffer disk|memory]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, random, sys, time
n = int(sys.argv[1]); out_path = sys.argv[2]; mode = sys.argv[3]
rng = random.Random(42)
words = "agent room track audio video session participant connect publish subscribe latency".split()
picks = [" ".join(rng.choices(words, k=6)) for _ in range(64)]
dumps = json.dumps
write = sys.stdout.write
pre = []
if mode == "prebuilt":  # worst case: the lines exist already, the loop only writes
    for i in range(n):
        pre.append(f"2026-11-21 13:52:21,767 - INFO livekit.agents - {picks[i % 64]} #{i}\n")
start = time.perf_counter()
if mode == "prebuilt":
    for line in pre:
        write(line)
else:  # a logger's work: format each record (60% JSON, 40% text), then write it
    for i in range(n):
        if i % 5 < 3:
            write(dumps({"message": f"{picks[i % 64]} #{i}", "level": "INFO", "name": "livekit.agents",
                         "pid": 4242, "job_id": "AJ_abc123", "timestamp": "2026-11-21T13:52:58.043707+00:00"}) + "\n")
        else:
            write(f"2026-11-21 13:52:21,767 - INFO livekit.agents - {picks[i % 64]} {picks[(i * 7) % 64]} #{i}\n")
sys.stdout.flush()
elapsed = time.perf_counter() - start
with open(out_path, "w") as fh:
    fh.write(str(elapsed))
"""


def run_child(n: int, under: str, buffer: str, workdir: Path, mode: str) -> dict[str, float | int | bool]:
    """One run; returns the child's elapsed seconds, total wall seconds and delivery completeness."""
    timing = workdir / "child-time.txt"
    state = workdir / "state"
    child = [sys.executable, "-c", CHILD, str(n), str(timing), mode]
    env = dict(
        os.environ,
        FORWARDER_STATE_DIR=str(state),
        FORWARDER_BUFFER=buffer,
        FORWARDER_HTTP_ADDR="off",
        FORWARDER_LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    started = time.perf_counter()
    with Path(os.devnull).open("wb") as devnull:
        if under == "forwarder":
            cmd = [sys.executable, "-m", "forwarder", "run", "--", *child]
            subprocess.run(cmd, stdout=devnull, stderr=subprocess.DEVNULL, env=env, check=True)
        elif under == "cat":  # the floor: the cheapest possible pipe reader
            producer = subprocess.Popen(child, stdout=subprocess.PIPE, env=env)
            subprocess.run(["cat"], stdin=producer.stdout, stdout=devnull, check=True)
            producer.wait()
        else:
            subprocess.run(child, stdout=devnull, env=env, check=True)
    total = time.perf_counter() - started
    result: dict[str, float | int | bool] = {"child_s": float(timing.read_text()), "total_s": total}
    if under == "forwarder":
        sink = state / "records.ndjson"
        count = 0
        in_order = True
        expected = 0
        with sink.open("rb") as fh:
            for raw in fh:
                msg = json.loads(raw)["message"]
                count += 1
                if not msg.endswith(f"#{expected}"):
                    in_order = False
                expected += 1
        result["delivered"] = count
        result["in_order"] = in_order
        sink.unlink()
    return result


def main() -> int:
    """Run the comparison and print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--buffer", choices=("disk", "memory"), default="disk")
    parser.add_argument(
        "--child",
        choices=("logger", "prebuilt"),
        default="logger",
        help="logger: formats each line then writes it (default); prebuilt: only writes",
    )
    args = parser.parse_args()
    base: list[float] = []
    cat: list[float] = []
    fwd: list[dict[str, float | int | bool]] = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            base.append(float(run_child(args.lines, "devnull", args.buffer, Path(tmp), args.child)["child_s"]))
        with tempfile.TemporaryDirectory() as tmp:
            cat.append(float(run_child(args.lines, "cat", args.buffer, Path(tmp), args.child)["child_s"]))
        with tempfile.TemporaryDirectory() as tmp:
            fwd.append(run_child(args.lines, "forwarder", args.buffer, Path(tmp), args.child))
    best_base = min(base)
    best_fwd = min(float(r["child_s"]) for r in fwd)
    summary = {
        "lines": args.lines,
        "buffer": args.buffer,
        "child": args.child,
        "child_devnull_s": round(best_base, 3),
        "child_into_cat_s": round(min(cat), 3),
        "child_under_forwarder_s": round(best_fwd, 3),
        "slowdown": round(best_fwd / best_base, 3),
        "slowdown_per_round": [round(float(r["child_s"]) / b, 3) for r, b in zip(fwd, base, strict=True)],
        "slowdown_cat_floor": round(min(cat) / best_base, 3),
        "forwarder_total_s": round(min(float(r["total_s"]) for r in fwd), 3),
        "all_delivered_in_order": all(r["delivered"] == args.lines and r["in_order"] for r in fwd),
    }
    print(json.dumps(summary, indent=2))
    return 0 if summary["all_delivered_in_order"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
