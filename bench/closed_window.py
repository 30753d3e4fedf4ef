"""The fairness benchmark's second scenario: the clock moved through a closed send window.

In process, with the clocks injected as the sender's tests do (no broker, no waiting for the real
hours): a campaign accepted while its window is closed is parked; the clock steps through the
closed hour and the timer runs at each step; nothing may be sent inside the window, everything
parked must go out once it opens, and what expires first is reported ``OutsideSendWindow``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.sender.handler import SenderHandler
from shared.config import Settings
from shared.contract.events import DispatchRecord, MessageContext, RecipientMessage
from shared.contract.statuses import SubStatus
from shared.kafka.clients import OutRecord, Publisher
from shared.providers.base import OutboundSms, SendResult
from shared.providers.dryrun import DryRun

# Friday 15 January 2027, 08:00 in London (UTC in winter); the window opens at 09:00.
CLOSED_AT = datetime(2027, 1, 15, 8, 0, tzinfo=UTC).timestamp()
OPENS_AT = CLOSED_AT + 3600
STEP_S = 300.0
ACCOUNT = "window-bench"
TENANT = "window"
SHORT_LIVED = "short"  # a tenant whose messages expire at 08:30, inside the closed hour


@dataclass
class ClosedWindow:
    parked: int
    sent_while_closed: int
    sent_after: int
    expired: int
    messages: int
    short_lived: int

    @property
    def ok(self) -> bool:
        return (
            self.sent_while_closed == 0
            and self.sent_after == self.messages
            and self.expired == self.short_lived
        )


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class _Provider(DryRun):
    """Accepts every message and notes the (injected) time of each send."""

    def __init__(self, settings: Any, clock: _Clock) -> None:
        super().__init__(ACCOUNT, settings)
        self.clock = clock
        self.sent_at: list[float] = []

    async def send(self, batch: list[OutboundSms]) -> list[SendResult]:
        self.sent_at.extend(self.clock() for _ in batch)
        return await super().send(batch)


class _Recorder(Publisher):
    def __init__(self) -> None:  # no producer: nothing leaves the process
        self.dispatches: list[DispatchRecord] = []

    async def publish(self, records: Iterable[OutRecord]) -> None:
        self.dispatches.extend(r.value for r in records if isinstance(r.value, DispatchRecord))


def _settings(base: Settings) -> Settings:
    tenant = next(iter(base.tenants.values()))
    window = {"hours": {"fri": ["09:00-17:00"]}}
    account = {
        "kind": "otpiq",
        "base_url": "http://127.0.0.1:9",
        "api_key": "k",
        "callback_token": "t",
    }
    data = base.model_dump(mode="python")
    data["providers"] = {ACCOUNT: account}
    common = {**tenant.model_dump(mode="python"), "routes": [{"provider": ACCOUNT}]}
    data["tenants"] = {
        TENANT: {**common, "send_window": window},
        SHORT_LIVED: {**common, "send_window": window, "validity_s": 1800.0},
    }
    return Settings.model_validate(data)


def _message(tenant: str, index: int) -> RecipientMessage:
    return RecipientMessage(
        context=MessageContext(
            tenant=tenant,
            message_id=f"{tenant}-{index}",
            batch_id="b",
            campaign_id="night",
            mobile_number=f"44770090{index:04d}",
            metadata_json="{}",
        ),
        destination=f"+44770090{index:04d}",
        text="Offer",
        sender_id="SHOP",
        accepted_at=datetime.fromtimestamp(CLOSED_AT, UTC),
    )


async def closed_window(
    base: Settings, messages: int = 1_000, short_lived: int = 50
) -> ClosedWindow:
    settings = _settings(base)
    wall, monotonic = _Clock(CLOSED_AT), _Clock(1_000.0)
    provider = _Provider(settings.providers[ACCOUNT], wall)
    publisher = _Recorder()
    handler = SenderHandler(
        settings,
        providers={ACCOUNT: provider},
        opt_outs={},
        last_inbound={},
        controls={},
        clock=wall,
        monotonic=monotonic,
    )
    handler.attach(publisher)
    handler.store.load(0, [])
    try:
        batch = [_message(TENANT, i) for i in range(messages)]
        batch += [_message(SHORT_LIVED, i) for i in range(short_lived)]
        await asyncio.gather(*(handler.process(0, m) for m in batch))
        parked = handler.store.count_prefix(0, "parked:window:")
        while wall.now < OPENS_AT + STEP_S:
            wall.now += STEP_S
            monotonic.now += STEP_S
            tasks = handler.timers.fire(wall.now)
            if tasks:
                await asyncio.wait(tasks)
    finally:
        handler.store.close()
    expired = sum(1 for d in publisher.dispatches if d.sub_status == SubStatus.OUTSIDE_SEND_WINDOW)
    return ClosedWindow(
        parked=parked,
        sent_while_closed=sum(1 for at in provider.sent_at if at < OPENS_AT),
        sent_after=sum(1 for at in provider.sent_at if at >= OPENS_AT),
        expired=expired,
        messages=messages,
        short_lived=short_lived,
    )
