"""The timer loop of the reporter, normalizer and sender: what a failed pass or partition does."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from shared.kafka.clients import KafkaUnavailable
from shared.kafka.store import PartitionNotReady
from shared.kafka.timers import fire_partitions, run_timer_passes


def timer_logs(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, bool]]:
    return [
        (record.levelname, record.getMessage(), record.exc_info is not None)
        for record in caplog.records
        if record.name == "shared.kafka.timers"
    ]


async def test_a_failing_partition_is_logged_and_the_others_still_fire(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fired: list[int] = []

    async def fire(partition: int) -> int:
        fired.append(partition)
        if partition == 1:
            raise ValueError("a bad entry")
        return 10 * partition

    assert await fire_partitions([0, 1, 2], fire, name="svc") == 20

    assert fired == [0, 1, 2]
    assert timer_logs(caplog) == [("ERROR", "svc: timers of partition 1 failed", True)]


@pytest.mark.parametrize("error", [KafkaUnavailable("broker down"), PartitionNotReady("dropped")])
async def test_kafka_unavailable_ends_the_pass_for_the_caller_to_see(
    caplog: pytest.LogCaptureFixture, error: KafkaUnavailable
) -> None:
    fired: list[int] = []

    async def fire(partition: int) -> int:
        fired.append(partition)
        if partition == 1:
            raise error
        return 1

    with pytest.raises(type(error)):
        await fire_partitions([0, 1, 2], fire, name="svc")

    assert fired == [0, 1]  # the others could not publish either: the next pass sees to them
    assert timer_logs(caplog) == []


async def test_the_loop_waits_before_each_pass_and_goes_on_after_a_failed_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcomes: list[Exception | None] = [
        None,
        KafkaUnavailable("broker down"),
        ValueError("bug"),
        None,
    ]
    events: list[str] = []
    turns: asyncio.Queue[None] = asyncio.Queue()
    idle = asyncio.Event()

    async def wait() -> None:
        events.append("wait")
        if turns.empty():
            idle.set()
        await turns.get()

    async def timer_pass() -> None:
        events.append("pass")
        outcome = outcomes[events.count("pass") - 1]
        if outcome is not None:
            raise outcome

    for _ in outcomes:
        turns.put_nowait(None)
    loop = asyncio.create_task(run_timer_passes(timer_pass, wait, name="svc"))
    try:
        await asyncio.wait_for(idle.wait(), timeout=10)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop

    assert events == ["wait", "pass"] * len(outcomes) + ["wait"]
    assert timer_logs(caplog) == [
        ("WARNING", "svc: timer pass not published (broker down); next pass retries", False),
        ("ERROR", "svc: timer pass failed", True),
    ]
