"""The one retry policy: exponential ceilings, full jitter, a longer Retry-After winning."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from shared.retry import RetryPolicy, retry, retry_after_of


class Flaky(Exception):
    def __init__(self, retry_after_s: float | None = None) -> None:
        super().__init__("flaky")
        self.retry_after_s = retry_after_s


def fails_then_returns(
    failures: list[BaseException], value: str = "done"
) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """An operation raising ``failures`` one per call, then returning ``value``; and its calls."""
    calls: list[int] = []

    async def operation() -> str:
        calls.append(len(calls) + 1)
        if failures:
            raise failures.pop(0)
        return value

    return operation, calls


def test_the_ceiling_doubles_from_the_base_up_to_the_cap() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=3.0)
    assert [policy.ceiling(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert policy.ceiling(0) == 0.5  # attempts count from 1


def test_a_delay_is_drawn_under_the_ceiling() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=60.0)
    delays = [policy.delay(4) for _ in range(200)]
    assert all(0.0 <= delay <= 8.0 for delay in delays)
    assert len(set(delays)) > 100  # jittered: never the same wait for everyone
    assert policy.delay(4, jitter=lambda ceiling: ceiling) == 8.0


def test_a_longer_retry_after_wins_a_shorter_one_does_not() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=60.0)
    whole = lambda ceiling: ceiling  # noqa: E731
    assert policy.delay(2, retry_after_s=45.0, jitter=whole) == 45.0
    assert policy.delay(2, retry_after_s=0.5, jitter=whole) == 2.0


def test_may_retry_counts_attempts_or_never_gives_up() -> None:
    assert [RetryPolicy(max_attempts=3).may_retry(n) for n in (1, 2, 3)] == [True, True, False]
    assert RetryPolicy().may_retry(10_000)


def test_retry_after_of_reads_only_numbers() -> None:
    assert retry_after_of(Flaky(7)) == 7.0
    assert retry_after_of(Flaky(None)) is None
    assert retry_after_of(ValueError("no attribute")) is None


async def test_retry_awaits_again_until_the_operation_returns() -> None:
    operation, calls = fails_then_returns([Flaky(), Flaky()])
    seen: list[tuple[int, float]] = []
    policy = RetryPolicy(base_s=0.01, cap_s=0.02)

    result = await retry(operation, policy, on_retry=lambda n, exc, wait: seen.append((n, wait)))

    assert result == "done"
    assert calls == [1, 2, 3]
    assert [n for n, _ in seen] == [1, 2]
    assert all(0.0 <= wait <= policy.ceiling(n) for n, wait in seen)


async def test_retry_gives_up_after_max_attempts_with_the_last_error() -> None:
    last = Flaky()
    operation, calls = fails_then_returns([Flaky(), Flaky(), last, Flaky()])

    with pytest.raises(Flaky) as raised:
        await retry(operation, RetryPolicy(base_s=0.001, cap_s=0.001, max_attempts=3))

    assert raised.value is last
    assert calls == [1, 2, 3]


async def test_retry_stops_at_once_when_told_to_give_up_or_on_other_errors() -> None:
    operation, calls = fails_then_returns([Flaky(), KeyError("bad")])
    with pytest.raises(KeyError):
        await retry(operation, RetryPolicy(base_s=0.001), give_up=lambda e: isinstance(e, KeyError))
    assert calls == [1, 2]

    operation, calls = fails_then_returns([KeyError("not retried")])
    with pytest.raises(KeyError):
        await retry(operation, RetryPolicy(base_s=0.001), on=Flaky)
    assert calls == [1]


async def test_retry_waits_at_least_what_the_error_asks_for() -> None:
    operation, _ = fails_then_returns([Flaky(retry_after_s=0.2)])
    waits: list[float] = []
    loop = asyncio.get_running_loop()
    started = loop.time()

    await retry(
        operation,
        RetryPolicy(base_s=0.001, cap_s=0.001),
        on_retry=lambda n, exc, wait: waits.append(wait),
    )

    assert waits == [0.2]
    assert loop.time() - started >= 0.19
