"""CPU priority of the forwarder's own threads: they yield the CPU to the agent when both want it.

``forwarder run`` starts the agent first, then raises the nice value of every thread of its own process by
``FORWARDER_NICE`` (threads started later inherit it), so the agent keeps the priority the forwarder was started
with. When the CPUs are not all busy nothing changes; when they are, the scheduler gives the agent the larger share
(at nice +10 a thread's CFS weight is ~1/9 of a nice-0 thread's). Measured with the child of
``bench/bench_run.py`` (500,000 lines written as fast as it can, 2 cores), alternating runs: the child's slowdown
against /dev/null under ``forwarder run`` went from a median of 1.31x (10 runs, 1.23-1.40x) to 1.19x (15 runs,
1.11-1.31x), and the forwarder finished its delivery as early as before. ``SCHED_BATCH`` on top made it worse
(1.22-1.44x). In ``tail`` mode the whole forwarder is lowered at start.

On Linux the nice value belongs to each thread: every thread listed in ``/proc/self/task`` is changed (an
unprivileged process may always lower its own priority). Elsewhere :func:`os.nice` changes the whole process.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Final

import structlog

MAX_NICE: Final = 19
"""The largest nice value (the lowest priority); increments past it stop there."""

_TASKS: Final = Path("/proc/self/task")
_log = structlog.get_logger("forwarder")


def lower_priority(increment: int) -> int | None:
    """Raise the nice value of every thread of this process by ``increment`` (capped at :data:`MAX_NICE`).

    Call it from the thread that starts new threads (the trio thread) after the agent was started: the agent keeps
    the old priority; threads started from then on inherit the new one.

    Returns:
        The calling thread's nice value afterwards, or ``None`` when nothing was changed (``increment`` <= 0, or
        the platform refused). Never raises: a priority is a preference, not a requirement.
    """
    if increment <= 0:
        return None
    try:
        if not _TASKS.is_dir():
            return os.nice(increment)
        for entry in _TASKS.iterdir():
            tid = int(entry.name)
            with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
                now = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, now + increment))
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (OSError, ValueError) as exc:
        _log.debug("priority_unchanged", error=str(exc))
        return None
