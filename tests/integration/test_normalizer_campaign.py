"""The normalizer alone at campaign scale, replaced by a new instance in the middle of it.

3,000 messages with their OTPIQ delivery reports, as a campaign would bring them: reports before
their dispatch records (held across the restart), repeated reports (some repeated after the
restart), dispatch records replayed, delivered before sent, a report after a failure, and
messages that never get a final report (expired by the DLR timeout). The first instance is
stopped with part of its records unhandled and the rest of the campaign still to come; a new one,
with an empty state directory, takes over from Kafka alone. At the end every message has exactly
one ``sent`` and exactly one final status on ``sms.statuses``, in that order: nothing lost,
nothing reported twice.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pytest
from prometheus_client import REGISTRY

from services.callbacks.app import provider_events
from services.normalizer.app import build
from services.normalizer.handler import NormalizerHandler
from shared.config import Settings
from shared.contract.events import (
    DeadLetter,
    DispatchRecord,
    MessageContext,
    ProviderEvent,
    StatusEvent,
    utcnow,
)
from shared.contract.topics import DEAD_LETTERS, DISPATCHES, PROVIDER_EVENTS, STATUSES
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import OutRecord, Publisher, make_producer
from shared.providers.otpiq import FIXTURES, Otpiq
from tests.support import TENANT, make_settings, read_topic, running, wait_for

pytestmark = pytest.mark.integration

ACCOUNT = "otpiq-main"
MESSAGES = 3_000
DLR_TIMEOUT_S = 600.0  # instead of 72 h; silent messages were dispatched longer ago than that
CHUNK = 500
# Tansu numbers the first generation 0, for which aiokafka sends no LeaveGroup: the second
# instance waits for the first one's session to expire, so keep that short.
QUICK_GROUP = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 500}

# What happens to message i, by i % 10, and the final status it must end with.
SILENT, SENT_ONLY, EARLY, REPEATED, DELIVERED_THEN_SENT, FAILED, FAILED_THEN_DELIVERED = range(7)
EXPIRED = ("failed", "Expired")
DELIVERED = ("delivered", "Delivered")
_FAILED_REPORT = Otpiq.canonical(FIXTURES["callback_failed"]["status"])
assert _FAILED_REPORT is not None
UNDELIVERABLE: tuple[str, str] = _FAILED_REPORT
FINAL_BY_CASE = {
    SILENT: EXPIRED,
    SENT_ONLY: EXPIRED,
    FAILED: UNDELIVERABLE,
    FAILED_THEN_DELIVERED: UNDELIVERABLE,
}


def campaign_settings(state_dir: Path) -> Settings:
    return make_settings(
        overrides={
            "normalizer": {
                "state_dir": str(state_dir),
                "dlr_timeout_s": DLR_TIMEOUT_S,
                "runner": QUICK_GROUP,
            }
        }
    )


def sms_id(index: int) -> str:
    return f"sms-{index:024x}"


def message_id(index: int) -> str:
    return f"m-campaign-{index:05d}"


def dispatch(index: int, dispatched_at: datetime) -> DispatchRecord:
    return DispatchRecord(
        context=MessageContext(
            tenant=TENANT,
            message_id=message_id(index),
            batch_id="batch-campaign",
            mobile_number=f"4477009{index:05d}",
            metadata_json="{}",
        ),
        correlation_key=Otpiq.correlation_key(ACCOUNT, sms_id(index), ""),
        outcome="accepted",
        sub_status="Sent",
        provider_kind="otpiq",
        provider_account=ACCOUNT,
        provider_message_id=sms_id(index),
        destination=f"+4477009{index:05d}",
        dispatched_at=dispatched_at,
    )


def report(fixture: str, index: int) -> ProviderEvent:
    """The event the callbacks service stores for this OTPIQ callback (same body, same id)."""
    body = orjson.dumps({**FIXTURES[fixture], "smsId": sms_id(index)})
    [event] = provider_events(
        Otpiq, ACCOUNT, body, Otpiq.parse_callback(body, "application/json"), utcnow()
    )
    return event


Records = list[DispatchRecord | ProviderEvent]


def campaign() -> tuple[Records, Records]:
    """Every record of the campaign in the order they reach Kafka: before and after the restart.

    All early reports come first and their dispatch records last, after the restart.
    """
    now = utcnow()
    long_ago = now - timedelta(seconds=2 * DLR_TIMEOUT_S)
    early_reports: Records = []
    stream: Records = []
    late_dispatches: Records = []
    for index in range(MESSAGES):
        case = index % 10
        if case == EARLY:
            early_reports.append(report("callback_delivered", index))
            late_dispatches.append(dispatch(index, now))
            continue
        silent = case in (SILENT, SENT_ONLY)
        stream.append(dispatch(index, long_ago if silent else now))
        sent, delivered, failed = (
            report("callback_sent", index),
            report("callback_delivered", index),
            report("callback_failed", index),
        )
        stream.extend(
            {
                SILENT: [],
                SENT_ONLY: [sent],
                REPEATED: [sent, delivered, delivered, sent],
                DELIVERED_THEN_SENT: [delivered, sent],
                FAILED: [sent, failed],
                FAILED_THEN_DELIVERED: [failed, failed, delivered],
            }.get(case, [sent, delivered])
        )
    half = len(stream) // 2
    while isinstance(stream[half], ProviderEvent):  # one message's records stay together
        half += 1
    before, after = early_reports + stream[:half], stream[half:] + late_dispatches
    # After its restart, the sender re-publishes some dispatch records and a provider retries
    # some callbacks the first instance already handled.
    replayed = [item for item in before if isinstance(item, DispatchRecord)][::7]
    retried = [item for item in before if isinstance(item, ProviderEvent)][::5]
    return before, replayed + after + retried


async def publish_in_chunks(publisher: Publisher, records: Records) -> None:
    for start in range(0, len(records), CHUNK):
        await publisher.publish(
            OutRecord(
                DISPATCHES if isinstance(item, DispatchRecord) else PROVIDER_EVENTS,
                item.correlation_key,
                item,
            )
            for item in records[start : start + CHUNK]
        )


def statuses_emitted() -> float:
    return sum(
        REGISTRY.get_sample_value("smsbridge_status_changes_total", {"status": status}) or 0.0
        for status in ("sent", "delivered", "failed")
    )


@pytest.fixture
async def publisher(kafka: EmbeddedBroker) -> AsyncIterator[Publisher]:
    producer = make_producer(make_settings().kafka, "test")
    await producer.start()
    try:
        yield Publisher(producer, 30.0)
    finally:
        await producer.stop()


@pytest.mark.timeout(600)
async def test_a_campaign_survives_a_new_normalizer_midway_with_nothing_lost_or_repeated(
    kafka: EmbeddedBroker, publisher: Publisher, tmp_path: Path
) -> None:
    before_restart, after_restart = campaign()
    first = campaign_settings(tmp_path / "first")
    second = campaign_settings(tmp_path / "second")
    emitted_before = statuses_emitted()
    # Every message dispatched before the restart ends with two statuses.
    due_before_restart = 2 * sum(isinstance(item, DispatchRecord) for item in before_restart)

    await publish_in_chunks(publisher, before_restart)
    async with running(build(first)):
        await wait_for(
            lambda: statuses_emitted() - emitted_before >= MESSAGES // 3,
            timeout_s=180,
            what="the first instance to be well into the campaign",
        )
    handed_over = statuses_emitted() - emitted_before
    assert handed_over < due_before_restart, "the first instance finished: no restart tested"
    # The rest of the campaign arrives while no normalizer runs.
    await publish_in_chunks(publisher, after_restart)

    async with running(build(second)):
        found = await read_topic(
            second, STATUSES, StatusEvent, expect=2 * MESSAGES, timeout_s=300, settle_s=3.0
        )
        letters = await read_topic(second, DEAD_LETTERS, DeadLetter, settle_s=1.0)

    by_message: dict[str, list[StatusEvent]] = defaultdict(list)
    for key, status in found:
        assert key == status.context.message_id
        by_message[status.context.message_id].append(status)
    assert len(by_message) == MESSAGES
    outcomes: Counter[tuple[str, str]] = Counter()
    for index in range(MESSAGES):
        history = by_message[message_id(index)]
        moves = [(s.status, s.sub_status) for s in history]
        expected_final = FINAL_BY_CASE.get(index % 10, DELIVERED)
        assert moves == [("sent", "Sent"), expected_final], (index, moves)
        assert len({s.event_id for s in history}) == 2
        outcomes[expected_final] += 1
    assert len(found) == 2 * MESSAGES  # nothing reported twice, even under another event id
    assert outcomes == {EXPIRED: 600, UNDELIVERABLE: 600, DELIVERED: 1800}
    assert letters == []


@pytest.mark.timeout(300)
async def test_deadlines_handed_over_fire_in_the_new_instance(
    kafka: EmbeddedBroker, publisher: Publisher, tmp_path: Path
) -> None:
    """The DLR timeout at scale, across a restart: the deadline lives in the restored state."""
    silent = 1_000
    first = campaign_settings(tmp_path / "first")
    second = campaign_settings(tmp_path / "second")
    await publish_in_chunks(publisher, [dispatch(index, utcnow()) for index in range(silent)])

    async with running(build(first)):
        joined = await read_topic(first, STATUSES, StatusEvent, expect=silent, settle_s=1.0)
    # Nothing was due yet: the first instance only reported them sent.
    assert Counter(s.status for _, s in joined) == {"sent": silent}

    # The new instance knows these messages only from sms.normalizer-state; its clock has
    # moved past their deadline.
    later = NormalizerHandler(second, clock=lambda: time.time() + DLR_TIMEOUT_S + 1)
    async with running(build(second, later)):
        found = await read_topic(
            second, STATUSES, StatusEvent, expect=2 * silent, timeout_s=180, settle_s=2.0
        )

    finals = [s for _, s in found if s.status != "sent"]
    assert len(found) == 2 * silent
    assert sorted(s.context.message_id for s in finals) == [message_id(i) for i in range(silent)]
    assert {(s.status, s.sub_status) for s in finals} == {EXPIRED}
