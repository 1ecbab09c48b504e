"""The one retry loop every destination uses: tenacity, exponential backoff with full jitter, Retry-After honoured.

A sink's ``send()`` makes one attempt and returns a :class:`~forwarder.sinks._protocol.Verdict`; :func:`deliver`
repeats it while the verdict is ``RETRY`` (without limit: the data is held in the spool, and shutdown cancels the
wait at once) and returns the first verdict that is not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import tenacity
import trio

from forwarder.sinks._protocol import Outcome, Verdict

DEFAULT_INITIAL_BACKOFF_S: Final = 0.5
MAX_RETRY_AFTER_S: Final = 3600.0
"""Upper bound on a destination's requested wait, seconds (a broken header must not park a destination forever)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff settings, seconds: the wait before attempt ``n`` is uniform in ``[0, min(max, initial * 2**n)]``
    (full jitter), and never less than the destination's ``Retry-After``."""

    initial_s: float = DEFAULT_INITIAL_BACKOFF_S
    max_s: float = 30.0


class _VerdictWait(tenacity.wait.wait_base):
    """Full-jitter exponential backoff, raised to the verdict's ``after`` (Retry-After) when larger."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._jitter = tenacity.wait_random_exponential(multiplier=policy.initial_s, max=policy.max_s)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        backoff = float(self._jitter(retry_state))
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed:
            verdict = outcome.result()
            if isinstance(verdict, Verdict) and verdict.after is not None:
                return max(backoff, min(verdict.after, MAX_RETRY_AFTER_S))
        return backoff


def _is_retry(verdict: Verdict) -> bool:
    return verdict.outcome is Outcome.RETRY


async def deliver(
    attempt: Callable[[], Awaitable[Verdict]],
    policy: RetryPolicy,
    *,
    on_retry: Callable[[Verdict, float], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = trio.sleep,
) -> Verdict:
    """Call ``attempt`` until its verdict is not ``RETRY``; return that verdict.

    Args:
        attempt: one try; returns a verdict and does not raise for delivery errors.
        policy: backoff bounds.
        on_retry: called with the ``RETRY`` verdict and the chosen wait (seconds) before each sleep.
        sleep: the sleep function (tests pass a recorder; default ``trio.sleep``, so trio's clock applies).

    Cancellation (shutdown deadline) propagates at once, from an attempt or a sleep.

    The first attempt runs before any retry machinery is built: most deliveries settle at once, and tenacity's
    retryer and its call state refer to each other, so building one per delivery left ~20 objects in a cycle for
    the garbage collector every time. Tenacity takes over from the first ``RETRY`` (it is handed that verdict, so
    the attempt is not repeated, and its wait honours the verdict's Retry-After).
    """
    first = await attempt()
    if first.outcome is not Outcome.RETRY:
        return first
    held: list[Verdict] = [first]

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None and state.next_action is not None:
            on_retry(state.outcome.result(), state.next_action.sleep)

    retryer = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_result(_is_retry),
        wait=_VerdictWait(policy),
        stop=tenacity.stop_never,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )

    async def once() -> Verdict:
        if held:  # tenacity's first call: the attempt already made above
            return held.pop()
        return await attempt()

    result: Verdict = await retryer(once)
    return result
