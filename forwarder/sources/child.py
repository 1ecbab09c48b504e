"""``forwarder run -- CMD``: spawn the agent with its own stdout/stderr pipes, drain both at once, mirror them to
our stdout/stderr, pass signals on, and report the child's exit status.

* ``PYTHONUNBUFFERED=1`` is set in the child's environment unless the user set it, so a Python agent's lines
  arrive as they are printed (and are not lost in a block buffer on a crash).
* The pipes are enlarged to 1 MiB and drained by one OS thread each
  (:mod:`forwarder.sources._pipe_thread`), so a bursty writer never waits on our Python work.
* SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 received by the forwarder are sent on to the child.
* Exit status: the child's, or ``128 + N`` when it died of signal N; a command that cannot start gives 127 (not
  found) or 126 (not executable).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Final

import structlog
import trio

from forwarder.record import STDERR, STDOUT
from forwarder.sources._pipe_thread import MAX_SPILL_BYTES, PipeActivity, SpillBudget, pump_pipe
from forwarder.sources._pump import LineConsumer

FORWARDED_SIGNALS: Final = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
PIPE_GRACE_S: Final = 2.0
"""After the child exits, how long a pipe may stay idle before we stop waiting for its EOF (a grandchild may still
hold it); a pipe that is still delivering data is always read to its end."""
PIPE_POLL_S: Final = 0.05
"""How often the idle check looks at the readers' progress, seconds."""

_log = structlog.get_logger("forwarder")


class CommandNotStartedError(Exception):
    """The command could not be started. ``exit_code`` is 127 (not found) or 126 (not executable)."""

    def __init__(self, command: str, reason: str, exit_code: int) -> None:
        super().__init__(f"cannot start {command!r}: {reason}")
        self.exit_code = exit_code


def exit_status(returncode: int) -> int:
    """Our exit status for the child's ``returncode``: itself, or ``128 + N`` for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` plus ``PYTHONUNBUFFERED=1`` unless the user set ``PYTHONUNBUFFERED`` (to any value)."""
    out = dict(env)
    out.setdefault("PYTHONUNBUFFERED", "1")
    return out


async def run_child(
    command: Sequence[str],
    consumer: LineConsumer,
    *,
    env: Mapping[str, str],
    max_line_bytes: int,
    mirror: bool = True,
    on_signal: Callable[[int], None] | None = None,
    on_started: Callable[[int], None] | None = None,
    spill_dir: Path | None = None,
    spill_max_bytes: int = MAX_SPILL_BYTES,
) -> int:
    """Run ``command`` to completion, forwarding its output to ``consumer``; return our exit status for it.

    Args:
        command: argv of the agent.
        consumer: receives framed lines of ``stdout`` and ``stderr``.
        env: the child's environment (``PYTHONUNBUFFERED`` added, see :func:`child_environment`).
        max_line_bytes: framing limit.
        mirror: write the child's bytes unchanged to our own stdout/stderr.
        on_signal: told about each signal passed on (after it was sent).
        on_started: told the child's pid.
        spill_dir: where a backlog of unframed output goes when the agent writes faster than we shape (see
            :mod:`forwarder.sources._pipe_thread`); ``None`` keeps it in memory.
        spill_max_bytes: the most the spill files of the child's two pipes hold together, bytes.

    Raises:
        CommandNotStartedError: the command does not exist or is not executable.
    """
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        process = await trio.lowlevel.open_process(
            list(command), stdin=None, stdout=out_write, stderr=err_write, env=child_environment(env)
        )
    except OSError as exc:
        os.close(out_read)
        os.close(err_read)
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        raise CommandNotStartedError(command[0], exc.strerror or str(exc), code) from None
    finally:
        os.close(out_write)
        os.close(err_write)
    if on_started is not None:
        on_started(process.pid)

    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(*FORWARDED_SIGNALS) as signals:

            async def relay_signals() -> None:
                async for signum in signals:
                    if process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            process.send_signal(signum)
                    if on_signal is not None:
                        on_signal(signum)

            nursery.start_soon(relay_signals)
            activities = (PipeActivity(), PipeActivity())
            budget = SpillBudget(spill_max_bytes)
            async with trio.open_nursery() as readers:
                for read_fd, stream, mirror_fd, activity in (
                    (out_read, STDOUT, 1, activities[0]),
                    (err_read, STDERR, 2, activities[1]),
                ):
                    readers.start_soon(
                        partial(
                            pump_pipe,
                            read_fd,
                            stream,
                            consumer,
                            max_line_bytes=max_line_bytes,
                            mirror_fd=mirror_fd if mirror else None,
                            activity=activity,
                            spill_dir=spill_dir,
                            spill_budget=budget,
                        )
                    )
                returncode = await process.wait()
                # The child is gone: its pipes reach EOF at once unless a grandchild still holds them. Give up on
                # a pipe only after it has been idle (nothing read, nothing waiting to be shaped) for the grace.
                if await _wait_until_idle(readers, activities):
                    _log.warning(
                        "pipes_still_open",
                        grace_s=PIPE_GRACE_S,
                        hint="a grandchild process still holds the agent's stdout/stderr",
                    )
                    readers.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    return exit_status(returncode)


async def _wait_until_idle(readers: trio.Nursery, activities: Sequence[PipeActivity]) -> bool:
    """Wait until the readers are done (``False``) or have been idle for :data:`PIPE_GRACE_S` (``True``)."""
    last = -1
    idle_since = trio.current_time()
    while readers.child_tasks:
        ticks = sum(a.ticks for a in activities)
        if ticks != last or any(a.busy() for a in activities):
            last = ticks
            idle_since = trio.current_time()
        elif trio.current_time() - idle_since >= PIPE_GRACE_S:
            return True
        await trio.sleep(PIPE_POLL_S)
    return False
