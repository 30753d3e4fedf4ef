"""Whose turn it is on a shared provider account (services/sender/fairness.py): priority before
bulk, tenants by weight, a tenant's campaigns equally unless weighted, newcomers at once."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime

import pytest

from services.campaigns.pace import fresh_statuses, pace_of
from services.sender.fairness import FairQueue, Flow, flow_of, turn_window
from services.sender.status import WindowWaits, status_of
from shared.config import ProviderSettings
from shared.contract.events import CampaignPace, MessageContext, RecipientMessage, SenderStatus
from tests.support import TENANT, make_settings


def bulk(tenant: str, campaign: str = "c-1") -> Flow:
    return Flow(tenant, campaign, priority=False)


REPLY = Flow("a", "", priority=True)


def message_for(tenant: str, campaign: str) -> RecipientMessage:
    context = MessageContext(
        tenant=tenant,
        message_id="m",
        batch_id="b",
        campaign_id=campaign,
        mobile_number="447700900123",
        metadata_json="{}",
    )
    return RecipientMessage(context=context, destination="+447700900123", text="x", sender_id="S")


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


async def test_the_status_shows_each_campaigns_share_and_its_window_waits() -> None:
    turns = Turns(weights={"a": 3.0})
    turns.add(bulk("a"), 30)
    turns.add(bulk("b"), 10)
    await turns.settle()
    waits = WindowWaits()
    parked = message_for("b", "c-1")
    waits.parked(0, parked)
    waits.parked(1, parked)
    waits.parked(1, message_for("c", "late"))
    waits.left(1, parked)

    status = status_of("sender-1", {"otpiq-main": turns.queue}, waits)
    paces = {(p.tenant, p.campaign): p for p in status.campaigns}
    assert paces["a", "c-1"].share == pytest.approx(0.75)
    assert paces["b", "c-1"].share == pytest.approx(0.25)
    assert paces["a", "c-1"].account == "otpiq-main"
    assert paces["b", "c-1"].waiting_for_window == 1
    assert paces["c", "late"].waiting_for_window == 1  # waits, sends nothing yet
    waits.drop([0])
    assert waits.totals() == {("c", "late"): 1}


def test_the_campaign_status_sums_the_instances_that_reported_lately() -> None:
    now = 1_800_000_000.0

    def report(instance: str, age_s: float, *paces: CampaignPace) -> dict[str, object]:
        at = datetime.fromtimestamp(now - age_s, UTC)
        return SenderStatus(instance=instance, at=at, campaigns=list(paces)).model_dump(mode="json")

    def pace(campaign: str, rate: float, waiting: int = 0) -> CampaignPace:
        return CampaignPace(
            tenant="a",
            campaign=campaign,
            account="acc",
            sends_per_s=rate,
            waiting_for_window=waiting,
        )

    statuses = fresh_statuses(
        [
            report("one", 2, pace("big", 150), pace("small", 100, waiting=7)),
            report("two", 4, pace("big", 100), pace("small", 150)),
            report("gone", 300, pace("big", 1000)),  # stopped long ago without a tombstone
            {"instance": "odd", "campaigns": "not a list"},
        ],
        now,
    )
    assert pace_of("a", "small", statuses) == {
        "share": 0.5,
        "sends_per_s": 250.0,
        "waiting_for_window": 7,
    }
    assert pace_of("a", "idle", statuses)["share"] is None
