"""The one retry policy: exponential waits with full jitter, capped, a server's Retry-After winning.

``RetryPolicy.delay`` computes the next wait (for code that parks work and cannot block);
``retry`` awaits an operation again until it succeeds or gives up (for code that can wait).
Both run on the ``backoff`` library's exponential generator and full jitter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import backoff

T = TypeVar("T")

Jitter = Callable[[float], float]


@dataclass(frozen=True)
class RetryPolicy:
    """Waits after failed attempts: the ceiling doubles from ``base_s`` up to ``cap_s``; each wait
    is drawn in [0, ceiling] (full jitter). ``max_attempts`` None: never give up."""

    base_s: float = 0.5
    cap_s: float = 30.0
    max_attempts: int | None = None

    def ceiling(self, attempt: int) -> float:
        """The longest wait after failed attempt number ``attempt`` (1-based)."""
        waits = backoff.expo(base=2, factor=self.base_s, max_value=self.cap_s)
        next(waits)  # backoff's generators are primed by one next()
        wait = 0.0
        for _ in range(max(1, attempt)):
            wait = float(next(waits))
            if wait >= self.cap_s:
                break  # capped from here on: a long outage's attempt numbers cost nothing
        return wait

    def delay(
        self,
        attempt: int,
        retry_after_s: float | None = None,
        jitter: Jitter = backoff.full_jitter,
    ) -> float:
        """How long to wait after failed attempt ``attempt``; a longer Retry-After wins."""
        wait = float(jitter(self.ceiling(attempt)))
        if retry_after_s is not None:
            wait = max(wait, retry_after_s)
        return wait

    def may_retry(self, attempt: int) -> bool:
        """Whether failed attempt ``attempt`` may be followed by another."""
        return self.max_attempts is None or attempt < self.max_attempts


def retry_after_of(exc: BaseException) -> float | None:
    """The wait an exception asks for: its ``retry_after_s`` attribute, if it has a number."""
    value = getattr(exc, "retry_after_s", None)
    return float(value) if isinstance(value, int | float) else None


async def retry(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    on: type[Exception] | tuple[type[Exception], ...] = Exception,
    give_up: Callable[[Exception], bool] = lambda exc: False,
    on_retry: Callable[[int, Exception, float], None] | None = None,
    jitter: Jitter = backoff.full_jitter,
    first_failure: Exception | None = None,
) -> T:
    """Await ``operation()`` until it returns; retry the exceptions ``on`` with ``policy``'s waits.

    Raises the last exception when ``give_up(exc)`` is true or ``policy.max_attempts`` are used.
    ``on_retry(attempt, exc, wait_s)`` runs before each wait (to log it). An exception carrying
    ``retry_after_s`` waits at least that long. ``first_failure``: the caller made the first
    attempt itself (on a path too hot for this function's set-up) and it raised this.
    """

    def next_wait(attempt: int, exc: Exception) -> float:
        wait = policy.delay(attempt, retry_after_of(exc), jitter)
        if on_retry is not None:
            on_retry(attempt, exc, wait)
        return wait

    try:
        # The first attempt runs bare: most succeed, and backoff's set-up costs tens of µs.
        if first_failure is not None:
            raise first_failure
        return await operation()
    except on as exc:
        if give_up(exc) or not policy.may_retry(1):
            raise
        await asyncio.sleep(next_wait(1, exc))

    def waits() -> Generator[float, Any, None]:
        attempt = 1
        exc = yield 0.0  # primed by backoff
        while True:
            attempt += 1
            exc = yield next_wait(attempt, exc)

    async def call() -> T:
        return await operation()

    # From the second attempt on, backoff drives the loop.
    retrying = backoff.on_exception(
        waits,
        on,
        max_tries=None if policy.max_attempts is None else policy.max_attempts - 1,
        giveup=give_up,
        jitter=None,  # applied by ``policy.delay``, before a Retry-After is compared
        logger=None,
    )(call)
    return await retrying()


__all__ = ["Jitter", "RetryPolicy", "retry", "retry_after_of"]
