"""The sender under the operator's campaign controls, and for dry-run tenants.

The sender's handler runs with scripted providers, a recording publisher and a dict standing in
for the control table (a test changes it and calls ``controls_changed``, as the table's hook
does), so every decision can be checked exactly: what is held, released, cancelled, never sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import TopicPartition
from prometheus_client import REGISTRY

from services.sender.handler import SenderHandler
from shared.contract import topics
from shared.contract.campaign_controls import control_key
from shared.contract.events import (
    CampaignControl,
    ControlAction,
    DispatchRecord,
    MessageContext,
    ProviderEvent,
    RecipientMessage,
    StateChange,
)
from shared.contract.statuses import SubStatus
from shared.kafka.clients import OutRecord
from shared.providers import dryrun
from tests.support import TENANT
from tests.unit.test_sender_handler import (
    NOW,
    PRIMARY,
    BulkProvider,
    Harness,
    RecordingPublisher,
    accept,
    fail_503,
    in_turn,
)

SALE, NEWS = "spring-sale", "newsletter"


def message(
    index: int,
    campaign: str = SALE,
    *,
    tenant: str = TENANT,
    scheduled_at: float | None = None,
    accepted_at: float = NOW,
) -> RecipientMessage:
    number = f"+4477009{index:05d}"
    return RecipientMessage(
        context=MessageContext(
            tenant=tenant,
            message_id=f"m-{index}",
            batch_id="b-1",
            campaign_id=campaign,
            mobile_number=number.lstrip("+"),
            metadata_json=f'{{"campaignId": "{campaign}"}}',
        ),
        destination=number,
        text="hello",
        sender_id="SHOP",
        scheduled_at=datetime.fromtimestamp(scheduled_at, UTC) if scheduled_at else None,
        accepted_at=datetime.fromtimestamp(accepted_at, UTC),
    )


class Controls(dict[str, dict[str, Any]]):
    """The control table as the sender reads it; ``set`` is what the admin API publishes
    plus the table's change hook."""

    def __init__(self) -> None:
        super().__init__()
        self.dispatchers: list[SenderHandler] = []

    def set(self, action: ControlAction, campaign: str | None = SALE, *, reason: str = "") -> None:
        control = CampaignControl(
            tenant=TENANT, campaign_id=campaign, action=action, reason=reason, requested_by="ops"
        )
        key = control_key(TENANT, campaign)
        self[key] = control.model_dump(mode="json")
        for dispatcher in self.dispatchers:
            dispatcher.controls_changed([key])


def harness_with(controls: Controls, **options: Any) -> Harness:
    harness = Harness(controls=controls, **options)
    controls.dispatchers.append(harness.dispatcher)
    return harness


def sent_ids(harness: Harness) -> list[str]:
    return [sms.message_id for call in harness.calls() for sms in call]


def dispatches_of(harness: Harness, message_id: str) -> list[DispatchRecord]:
    return [d for d in harness.publisher.dispatches() if d.context.message_id == message_id]


def control_count(effect: str) -> float:
    value = REGISTRY.get_sample_value("smsbridge_sender_campaign_control_total", {"effect": effect})
    return value or 0.0


async def release(harness: Harness) -> int:
    """What the timer task does after a control change: look, then start the released work."""
    await harness.dispatcher.timers.rescan()
    return await harness.fire_timers(harness.wall.now)


# -- pause and resume ----------------------------------------------------------------------------


async def test_a_paused_campaign_is_held_while_other_campaigns_are_sent() -> None:
    controls = Controls()
    harness = harness_with(controls)
    held_before = control_count("held")
    controls.set("pause")

    await harness.dispatcher.process(0, message(1))
    await harness.dispatcher.process(0, message(2, NEWS))

    assert sent_ids(harness) == ["m-2"]
    assert [d.context.message_id for d in harness.publisher.dispatches()] == ["m-2"]
    held = harness.entry("m-1")
    assert held is not None and (held.phase, held.park_reason) == ("parked", "held")
    assert harness.parked("held") == 1
    # Held on Kafka, not only here: the changelog has it, with a marker naming the campaign.
    [marker] = [r for r in harness.publisher.on(topics.SENDER_STATE) if r.key == "parked:held:m-1"]
    assert isinstance(marker.value, StateChange)
    assert marker.value.value == {"tenant": TENANT, "campaign_id": SALE}
    # Due when its validity ends (a day by default): then it is reported expired.
    entry = harness.dispatcher.store.get_entry(0, "m-1")
    assert entry is not None and entry.due_at is not None
    assert entry.due_at > NOW + 24 * 3600.0
    assert control_count("held") == held_before + 1
    # The timer does not touch it meanwhile.
    assert await harness.fire_timers(NOW + 3600) == 0
    assert sent_ids(harness) == ["m-2"]


async def test_resume_releases_held_messages_which_are_sent_exactly_once() -> None:
    controls = Controls()
    harness = harness_with(controls)
    controls.set("pause")
    for index in range(1, 4):
        await harness.dispatcher.process(0, message(index))
    assert sent_ids(harness) == []
    released_before = control_count("released")

    controls.set("resume")
    assert await release(harness) == 3

    assert sorted(sent_ids(harness)) == ["m-1", "m-2", "m-3"]
    assert harness.parked("held") == 0
    assert control_count("released") == released_before + 3
    # Another change, or a redelivered record, sends nothing again.
    controls.set("resume")
    assert await release(harness) == 0
    await harness.dispatcher.process(0, message(1))
    assert len(sent_ids(harness)) == 3
    assert {d.outcome for d in harness.publisher.dispatches()} == {"accepted"}


async def test_a_tenant_wide_pause_holds_every_campaign_and_auto_replies() -> None:
    controls = Controls()
    harness = harness_with(controls)
    controls.set("pause", None)
    await harness.dispatcher.process(0, message(1))
    await harness.dispatcher.process(0, message(2, ""))  # an auto reply: no campaign id
    assert sent_ids(harness) == []
    assert harness.parked("held") == 2

    controls.set("resume", None)
    assert await release(harness) == 2
    assert sorted(sent_ids(harness)) == ["m-1", "m-2"]


async def test_a_scheduled_message_that_falls_due_while_paused_is_held_not_sent() -> None:
    controls = Controls()
    harness = harness_with(controls)
    due = NOW + 600
    await harness.dispatcher.process(0, message(1, scheduled_at=due))
    controls.set("pause")
    assert await release(harness) == 0  # a pause does not wake a scheduled message

    harness.wall.now = due
    assert await harness.fire_timers(due) == 1
    assert sent_ids(harness) == []
    assert harness.parked("held") == 1 and harness.parked("scheduled") == 0

    controls.set("resume")
    assert await release(harness) == 1
    assert sent_ids(harness) == ["m-1"]


async def test_a_retry_that_falls_due_while_paused_is_held() -> None:
    controls = Controls()
    harness = harness_with(controls, scripts={PRIMARY: in_turn(fail_503, accept(PRIMARY))})
    await harness.dispatcher.process(0, message(1))
    entry = harness.dispatcher.store.get_entry(0, "m-1")
    assert entry is not None and entry.due_at is not None
    controls.set("pause")

    harness.wall.now = entry.due_at
    await harness.fire_timers(entry.due_at)
    assert len(harness.calls()) == 1  # the first, failed attempt only
    held = harness.entry("m-1")
    assert held is not None and (held.park_reason, held.attempt) == ("held", 1)

    controls.set("resume")
    await release(harness)
    assert len(harness.calls()) == 2
    assert harness.only_dispatch().outcome == "accepted"


async def test_a_held_message_still_ends_at_its_validity() -> None:
    controls = Controls()
    harness = harness_with(controls)
    controls.set("pause")
    await harness.dispatcher.process(0, message(1))
    entry = harness.dispatcher.store.get_entry(0, "m-1")
    assert entry is not None and entry.due_at is not None

    harness.wall.now = entry.due_at
    assert await harness.fire_timers(entry.due_at) == 1
    assert harness.calls() == []
    assert harness.only_dispatch().sub_status == SubStatus.EXPIRED


# -- the last look before the call ---------------------------------------------------------------


async def test_a_pause_seen_while_a_call_gathers_keeps_the_message_out_of_it() -> None:
    controls = Controls()
    harness = harness_with(
        controls, provider_class=BulkProvider, overrides={"sender": {"batch_window_s": 0.05}}
    )
    sending = [
        asyncio.create_task(harness.dispatcher.process(0, message(1))),
        asyncio.create_task(harness.dispatcher.process(0, message(2, NEWS))),
    ]
    await asyncio.sleep(0.01)  # both wait in the gathering window
    controls.set("pause")
    await asyncio.gather(*sending)

    assert sent_ids(harness) == ["m-2"]
    # No intent was written for the withheld message: nothing to mistake for a lost send.
    assert [s.phase for s in harness.publisher.states("m-1")] == ["parked"]
    held = harness.entry("m-1")
    assert held is not None and (held.park_reason, held.attempts) == ("held", 0)


class ControllingPublisher(RecordingPublisher):
    """The control reaches the table while the intent of ``message_id`` is being acknowledged
    (the first time)."""

    def __init__(self, controls: Controls, message_id: str, action: ControlAction) -> None:
        super().__init__()
        self.controls = controls
        self.message_id = message_id
        self.action = action

    async def publish(self, records: Iterable[OutRecord]) -> None:
        batch = list(records)
        await super().publish(batch)
        if any(
            r.key == self.message_id
            and isinstance(r.value, StateChange)
            and r.value.value["phase"] == "sending"
            for r in batch
        ):
            self.message_id = ""  # once
            self.controls.set(self.action)


@pytest.mark.parametrize("action", ["pause", "cancel"])
async def test_a_control_seen_after_the_intent_stops_the_call(action: ControlAction) -> None:
    controls = Controls()
    harness = harness_with(controls)
    harness.publisher = ControllingPublisher(controls, "m-1", action)
    harness.dispatcher.attach(harness.publisher)

    await harness.dispatcher.process(0, message(1))

    assert harness.calls() == []
    # The intent is on Kafka, and the state after it says: not sent.
    stored = harness.entry("m-1")
    assert stored is not None
    if action == "pause":
        assert [s.phase for s in harness.publisher.states("m-1")] == ["sending", "parked"]
        assert (stored.park_reason, stored.attempt, stored.attempts) == ("held", 0, 0)
        assert harness.publisher.dispatches() == []
        controls.set("resume")
        await release(harness)
        assert sent_ids(harness) == ["m-1"]
        assert harness.only_dispatch().outcome == "accepted"
    else:
        [dispatch] = harness.publisher.dispatches()
        assert (dispatch.outcome, dispatch.sub_status) == ("failed", SubStatus.CANCELLED)
        assert [s.phase for s in harness.publisher.states("m-1")] == ["sending", "done"]
        assert stored.dispatch == dispatch


# -- cancel --------------------------------------------------------------------------------------


async def test_cancel_reports_parked_and_new_messages_cancelled_once_and_sends_none() -> None:
    controls = Controls()
    harness = harness_with(controls)
    cancelled_before = control_count("cancelled")
    controls.set("pause")
    await harness.dispatcher.process(0, message(1))  # held
    await harness.dispatcher.process(0, message(2, scheduled_at=NOW + 3600))  # scheduled

    controls.set("cancel", reason="wrong text")
    assert await release(harness) == 2  # at once, not when the schedule comes
    await harness.dispatcher.process(0, message(3))  # arrives after the cancel
    await harness.dispatcher.process(0, message(4, NEWS))  # another campaign

    assert sent_ids(harness) == ["m-4"]
    for message_id in ("m-1", "m-2", "m-3"):
        [dispatch] = dispatches_of(harness, message_id)
        assert (dispatch.outcome, dispatch.sub_status) == ("failed", SubStatus.CANCELLED)
        assert dispatch.correlation_key == f"message:{message_id}"
        assert dispatch.detail == "campaign cancelled by ops: wrong text"
    assert harness.parked("held") == harness.parked("scheduled") == 0
    assert control_count("cancelled") == cancelled_before + 3

    # Cancelled stays cancelled: a resume does not bring them back, a redelivery republishes
    # the same record (one status downstream), and the timer finds nothing to do.
    controls.set("resume")
    assert await release(harness) == 0
    await harness.dispatcher.process(0, message(1))
    assert dispatches_of(harness, "m-1") == [dispatches_of(harness, "m-1")[0]] * 2
    harness.wall.now = NOW + 3600
    await harness.fire_timers(harness.wall.now)
    assert sent_ids(harness) == ["m-4"]


async def test_a_wait_ended_by_a_cancel_taken_back_at_once_goes_on_waiting() -> None:
    controls = Controls()
    harness = harness_with(controls, scripts={PRIMARY: in_turn(fail_503, accept(PRIMARY))})
    await harness.dispatcher.process(0, message(1))  # parked for a retry after a 503
    entry = harness.dispatcher.store.get_entry(0, "m-1")
    assert entry is not None and entry.due_at is not None and entry.due_at > NOW
    controls.set("cancel")
    await harness.dispatcher.timers.rescan()  # queued to be cancelled...
    controls.set("resume")  # ...but resumed before the timer came to it
    await harness.fire_timers(NOW)

    assert harness.publisher.dispatches() == []
    assert len(harness.calls()) == 1  # the retry keeps its back-off
    assert harness.parked("retry") == 1
    harness.wall.now = entry.due_at
    await harness.fire_timers(entry.due_at)
    assert len(harness.calls()) == 2
    assert harness.only_dispatch().outcome == "accepted"


async def test_cancel_outranks_pause_from_either_scope() -> None:
    controls = Controls()
    harness = harness_with(controls)
    controls.set("pause", None)  # the whole tenant
    controls.set("cancel")  # one campaign
    await harness.dispatcher.process(0, message(1))
    await harness.dispatcher.process(0, message(2, NEWS))

    assert harness.calls() == []
    assert dispatches_of(harness, "m-1")[0].sub_status == SubStatus.CANCELLED
    assert dispatches_of(harness, "m-2") == []  # held by the tenant's pause
    assert harness.parked("held") == 1


async def test_held_messages_restored_elsewhere_are_released_by_a_resume_missed_meanwhile() -> None:
    controls = Controls()
    first = harness_with(controls)
    controls.set("pause")
    for index in range(1, 3):
        await first.dispatcher.process(0, message(index))
    changelog = [r.encoded for r in first.publisher.on(topics.SENDER_STATE)]
    assert first.calls() == []

    # The instance is gone; the campaign is resumed; another instance restores the partition.
    controls.set("resume")
    second = Harness(controls=controls)
    second.dispatcher.store.load(0, changelog)
    await second.dispatcher.on_assigned({TopicPartition(topics.RECIPIENTS.name, 0)})
    await release(second)

    assert sorted(sent_ids(second)) == ["m-1", "m-2"]


# -- dry run -------------------------------------------------------------------------------------


async def test_a_dry_run_tenant_is_not_sent_and_gets_a_deterministic_report() -> None:
    mix = {"Delivered": 0.5, "Undeliverable": 0.5}
    harness = Harness(
        overrides={"tenants": {TENANT: {"dry_run": True, "dry_run_outcomes": mix}}},
    )
    for index in range(1, 5):
        await harness.dispatcher.process(0, message(index))

    assert harness.calls() == []  # the provider was never called
    events = {
        r.key: r.value
        for r in harness.publisher.on(topics.PROVIDER_EVENTS)
        if isinstance(r.value, ProviderEvent)
    }
    for dispatch in harness.publisher.dispatches():
        message_id = dispatch.context.message_id
        assert (dispatch.outcome, dispatch.sub_status) == ("accepted", "DryRun:Sent")
        assert dispatch.provider_kind == "dryrun"
        assert dispatch.provider_account == PRIMARY  # the route's account, and its rate limit
        assert dispatch.provider_message_id == dryrun.provider_message_id(message_id)
        assert dispatch.correlation_key == f"{PRIMARY}:{dispatch.provider_message_id}"
        report = events[dispatch.correlation_key]
        assert report.provider_status == dryrun.outcome_for(message_id, mix)
        assert report.provider_kind == "dryrun"
    assert len(events) == 4

    # A redelivered record republishes the same pair: the normalizer recognises both.
    first = dispatches_of(harness, "m-1")[0]
    await harness.dispatcher.process(0, message(1))
    assert dispatches_of(harness, "m-1") == [first, first]
    reports = [
        r.value
        for r in harness.publisher.on(topics.PROVIDER_EVENTS)
        if r.key == first.correlation_key
    ]
    assert reports == [events[first.correlation_key]] * 2
