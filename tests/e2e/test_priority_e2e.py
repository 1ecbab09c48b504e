"""The forwarder's own CPU priority (:mod:`forwarder._priority`, ``FORWARDER_NICE``): its threads yield the CPU to
the agent, the agent keeps the priority the forwarder was started with. Checked in child processes (renicing the
test process itself could not be undone), with the kernel's own per-thread values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import file_records, forwarder_cmd, run_forwarder

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice values are Linux's")

BASE = os.getpriority(os.PRIO_PROCESS, 0)
"""The nice value the test process runs at: what the forwarder starts with, and what the agent must keep."""
INCREMENT = 4
DEADLINE_S = 30.0

PROBE = r"""
import json, os, sys, threading
from forwarder._priority import lower_priority
def nice():
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
seen = {}
started, done = threading.Event(), threading.Event()
def older():
    started.set()
    done.wait()
    seen["older"] = nice()
thread = threading.Thread(target=older)
thread.start()
started.wait()
seen["returned"] = lower_priority(int(sys.argv[1]))
seen["main"] = nice()
newer = threading.Thread(target=lambda: seen.__setitem__("newer", nice()))
newer.start()
newer.join()
done.set()
thread.join()
print(json.dumps(seen))
"""


def probe(increment: int) -> dict[str, int | None]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(increment)], capture_output=True, text=True, check=True)
    result: dict[str, int | None] = json.loads(out.stdout)
    return result


def test_every_thread_and_every_later_thread_is_lowered() -> None:
    want = min(19, BASE + INCREMENT)
    assert probe(INCREMENT) == {"returned": want, "main": want, "older": want, "newer": want}


def test_increment_zero_changes_nothing_and_large_increments_stop_at_19() -> None:
    assert probe(0) == {"returned": None, "main": BASE, "older": BASE, "newer": BASE}
    assert probe(50) == {"returned": 19, "main": 19, "older": 19, "newer": 19}


# The agent waits (up to a deadline) until its parent, the forwarder, has lowered its priority, then reports both.
AGENT = r"""
import os, time
end = time.monotonic() + float(os.environ["WAIT_S"])
parent = os.getpriority(os.PRIO_PROCESS, os.getppid())
while parent == int(os.environ["BASE"]) and time.monotonic() < end:
    time.sleep(0.01)
    parent = os.getpriority(os.PRIO_PROCESS, os.getppid())
print(f"agent={os.getpriority(os.PRIO_PROCESS, 0)} forwarder={parent}")
"""


@pytest.mark.skipif(BASE + INCREMENT > 19, reason="the test process already runs at the lowest priority")
@pytest.mark.parametrize(("setting", "lowered"), [(str(INCREMENT), BASE + INCREMENT), ("0", BASE)])
def test_run_mode_lowers_the_forwarder_but_not_the_agent(base_env: dict[str, str], setting: str, lowered: int) -> None:
    base_env.update(FORWARDER_NICE=setting, BASE=str(BASE), WAIT_S=str(DEADLINE_S if setting != "0" else 0))
    result = run_forwarder(["run", "--", sys.executable, "-c", AGENT], base_env)
    assert result.returncode == 0, result.stderr.decode()
    [record] = file_records(base_env)
    assert record["message"] == f"agent={BASE} forwarder={lowered}"


@pytest.mark.skipif(BASE + INCREMENT > 19, reason="the test process already runs at the lowest priority")
def test_tail_mode_lowers_the_forwarder(base_env: dict[str, str]) -> None:
    base_env["FORWARDER_NICE"] = str(INCREMENT)
    proc = subprocess.Popen(forwarder_cmd("tail", "-"), env=base_env, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + DEADLINE_S
        nice = os.getpriority(os.PRIO_PROCESS, proc.pid)
        while nice != BASE + INCREMENT and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.01)
            nice = os.getpriority(os.PRIO_PROCESS, proc.pid)
        assert nice == BASE + INCREMENT
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=DEADLINE_S) == 0
