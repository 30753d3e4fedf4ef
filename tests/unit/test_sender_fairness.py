"""Whose turn it is on a shared provider account (services/sender/fairness.py): priority before
bulk, tenants by weight, a tenant's campaigns equally unless weighted, newcomers at once."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from services.sender.fairness import FairQueue, Flow, flow_of, turn_window
from shared.config import ProviderSettings
from shared.contract.events import MessageContext, RecipientMessage
from tests.support import TENANT, make_settings


def bulk(tenant: str, campaign: str = "c-1") -> Flow:
    return Flow(tenant, campaign, priority=False)


REPLY = Flow("a", "", priority=True)


class Turns:
    """A queue with one turn out at a time, and the order turns were given in."""

    def __init__(
        self,
        weights: dict[str, float] | None = None,
        campaign_weights: dict[tuple[str, str], float] | None = None,
    ) -> None:
        self.queue = FairQueue(
            window=1,
            tenant_weight=lambda tenant: (weights or {}).get(tenant, 1.0),
            campaign_weight=lambda t, c: (campaign_weights or {}).get((t, c), 1.0),
        )
        self.order: list[Flow] = []
        self.tasks: list[asyncio.Task[None]] = []

    def add(self, flow: Flow, count: int = 1) -> None:
        for _ in range(count):
            self.tasks.append(asyncio.create_task(self._one(flow)))

    async def _one(self, flow: Flow) -> None:
        ticket = await self.queue.turn(flow, 1.0)
        self.order.append(flow)
        await asyncio.sleep(0)
        ticket.release()

    async def settle(self) -> None:
        await asyncio.sleep(0)  # every waiter is queued before the first turn is given back
        await asyncio.gather(*self.tasks)


async def test_priority_goes_before_every_bulk_message_waiting() -> None:
    turns = Turns()
    out = await turns.queue.turn(bulk("a"), 1.0)  # a bulk send holds the one turn
    turns.add(bulk("a"), 50)
    turns.add(bulk("b"), 50)
    await asyncio.sleep(0)
    turns.add(REPLY, 3)
    await asyncio.sleep(0)
    out.release()
    await turns.settle()
    assert turns.order[:3] == [REPLY] * 3


async def test_tenants_share_by_weight_and_a_tenants_campaigns_equally() -> None:
    turns = Turns(weights={"a": 2.0, "b": 1.0})
    turns.add(bulk("a", "c-1"), 200)
    turns.add(bulk("a", "c-2"), 200)
    turns.add(bulk("b"), 200)
    await turns.settle()
    first = Counter(turns.order[:300])
    assert first[bulk("b")] == 100  # a third: weight 1 of 3
    # a's two thirds, halved (within the one turn of a tie)
    assert abs(first[bulk("a", "c-1")] - 100) <= 1
    assert first[bulk("a", "c-1")] + first[bulk("a", "c-2")] == 200


async def test_campaign_weights_split_a_tenants_share() -> None:
    turns = Turns(campaign_weights={("a", "urgent"): 3.0})
    turns.add(bulk("a", "urgent"), 100)
    turns.add(bulk("a", "slow"), 100)
    await turns.settle()
    first = Counter(turns.order[:80])
    assert first[bulk("a", "urgent")] == 60
    assert first[bulk("a", "slow")] == 20


async def test_a_campaign_arriving_behind_a_backlog_gets_its_share_at_once() -> None:
    turns = Turns()
    turns.add(bulk("a"), 1000)
    for _ in range(100):  # a has had 100 turns alone: no credit for b's absence, none held back
        await asyncio.sleep(0)
    turns.add(bulk("b"), 20)
    await turns.settle()
    arrived = turns.order.index(bulk("b"))
    assert arrived <= 60, arrived
    b_turns = [i for i, flow in enumerate(turns.order) if flow == bulk("b")]
    assert b_turns[-1] - b_turns[0] <= 2 * 20  # every other turn until it is done


async def test_a_cancelled_wait_gives_up_its_place_and_no_turn_is_lost() -> None:
    queue = FairQueue(window=1, tenant_weight=lambda _: 1.0, campaign_weight=lambda *_: 1.0)
    first = await queue.turn(bulk("a"), 1.0)
    waiting = asyncio.create_task(queue.turn(bulk("b"), 1.0))
    await asyncio.sleep(0)
    assert queue.waiting() == 1.0
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert queue.waiting() == 0.0
    first.release()
    first.release()  # twice is once
    assert await asyncio.wait_for(queue.turn(bulk("c"), 1.0), timeout=1)


async def test_shares_show_each_flows_part_of_the_recent_turns() -> None:
    turns = Turns(weights={"a": 3.0})
    turns.add(bulk("a"), 30)
    turns.add(bulk("b"), 30)
    await turns.settle()
    shares = turns.queue.shares()
    assert shares[bulk("a")] == pytest.approx(0.5)  # all of both went through
    fair = turns.queue.fair_part(bulk("a"))
    assert fair == pytest.approx(1.0)  # nothing else waits now


def test_auto_replies_and_listed_campaigns_are_priority() -> None:
    tenant = make_settings(
        overrides={"tenants": {TENANT: {"priority_campaigns": ["vip"]}}}
    ).tenants[TENANT]

    def of(batch_id: str, campaign_id: str) -> Flow:
        context = MessageContext(
            tenant=TENANT,
            message_id="m",
            batch_id=batch_id,
            campaign_id=campaign_id,
            mobile_number="447700900123",
            metadata_json="{}",
        )
        message = RecipientMessage(
            context=context, destination="+447700900123", text="x", sender_id="S"
        )
        return flow_of(message, tenant)

    assert of("", "").priority  # an auto reply
    assert of("b-1", "vip").priority
    assert not of("b-1", "c-9").priority


def test_turns_run_about_fifty_milliseconds_ahead_of_the_limit() -> None:
    def account(**values: object) -> ProviderSettings:
        base = {"kind": "otpiq", "base_url": "http://x", "api_key": "k", "callback_token": "t"}
        return ProviderSettings.model_validate({**base, **values})

    assert turn_window(account(rate_limit_per_s=500), max_batch=1) == 25
    assert turn_window(account(rate_limit_per_s=10), max_batch=1) == 4
    assert turn_window(account(rate_limit_per_s=10), max_batch=500) == 500
    assert turn_window(account(max_in_flight=20), max_batch=1) == 20  # unlimited
