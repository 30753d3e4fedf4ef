"""The sender's saturation counters (the autoscaler's input, deploy/k8s/sender.yaml): slot time
spent waiting for rate-limit budget is told apart from slot time spent working."""

from __future__ import annotations

import asyncio
from typing import cast

from prometheus_client import REGISTRY

from services.sender import metrics
from services.sender.accounts import AccountSender, SendJob
from services.sender.ratelimit import SlidingWindowLimiter
from shared.circuit import CircuitBreaker
from shared.kafka.clients import OutRecord
from shared.kafka.unit_of_work import UnitOfWork
from shared.providers.base import (
    OutboundSms,
    ParsedCallback,
    Provider,
    SendAccepted,
    SendResult,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_slot_time_integrates_each_state_and_counts_calls_still_going_on() -> None:
    clock = Clock()
    times = metrics.SlotTime(clock)
    times.move(None, metrics.SLOT_BUSY)
    times.move(None, metrics.SLOT_BUSY)
    clock.now += 2.0  # two busy slots for 2 s
    times.move(metrics.SLOT_BUSY, metrics.SLOT_RATE_LIMITED)
    clock.now += 3.0  # one busy, one rate-limited, for 3 s
    assert times.seconds() == {metrics.SLOT_BUSY: 7.0, metrics.SLOT_RATE_LIMITED: 3.0}
    times.move(metrics.SLOT_RATE_LIMITED, None)
    times.move(metrics.SLOT_BUSY, None)
    clock.now += 10.0  # nothing held: nothing more counted
    assert times.seconds() == {metrics.SLOT_BUSY: 7.0, metrics.SLOT_RATE_LIMITED: 3.0}


class _NoIntent:
    records: list[OutRecord] = []

    def undo(self) -> None:
        pass


class SlowProvider(Provider):
    """Accepts every message after ``delay_s``."""

    kind = "slow"

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    async def send(self, batch: list[OutboundSms]) -> list[SendResult]:
        await asyncio.sleep(self.delay_s)
        return [SendAccepted(sms.message_id, f"p-{sms.message_id}", "k") for sms in batch]

    @classmethod
    def parse_callback(cls, body: bytes, content_type: str) -> list[ParsedCallback]:
        return []


async def _send_all(account: str, count: int, provider: Provider, limit: float | None) -> None:
    async def publish(records: object) -> None:
        pass

    limiter = SlidingWindowLimiter(limit, window_s=1.0) if limit else None
    sender = AccountSender(
        account,
        provider,
        max_in_flight=4,
        publish=publish,
        breaker=CircuitBreaker(),
        limiter=limiter,
        dry_run=provider,
        intent_lead_s=0.0,
    )
    jobs = [
        SendJob(
            sms=OutboundSms(f"m{index}", "+33600000000", "hello", "Shop"),
            cost=1.0,
            prepare_intent=lambda ids: cast(UnitOfWork, _NoIntent()),
            alone=True,
        )
        for index in range(count)
    ]

    async def one(job: SendJob) -> None:
        await sender.send(job)
        job.outcome_recorded()

    await asyncio.gather(*(one(job) for job in jobs))


def slot_seconds(account: str, state: str) -> float:
    value = REGISTRY.get_sample_value(
        "smsbridge_sender_slot_seconds_total", {"provider": account, "state": state}
    )
    assert value is not None
    return value


async def test_a_rate_limited_account_shows_its_slots_waiting_not_busy() -> None:
    # 12 sends at 20/s take ~0.5 s of waiting; the provider answers at once.
    await _send_all("saturation-limited", 12, SlowProvider(0.0), limit=20.0)
    waiting = slot_seconds("saturation-limited", metrics.SLOT_RATE_LIMITED)
    busy = slot_seconds("saturation-limited", metrics.SLOT_BUSY)
    assert waiting > 0.5
    assert busy < waiting / 4
    capacity = REGISTRY.get_sample_value(
        "smsbridge_sender_call_slots", {"provider": "saturation-limited"}
    )
    assert capacity == 4


async def test_a_slow_unlimited_account_shows_its_slots_busy() -> None:
    # 8 calls of 0.1 s through 4 slots: ~0.8 slot-seconds of work, no rate-limit wait.
    await _send_all("saturation-slow", 8, SlowProvider(0.1), limit=None)
    assert slot_seconds("saturation-slow", metrics.SLOT_BUSY) >= 0.75
    assert slot_seconds("saturation-slow", metrics.SLOT_RATE_LIMITED) == 0.0
