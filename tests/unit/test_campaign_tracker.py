"""The campaigns tracker driven record by record: replays skip what the counters include, an
input offset is done only once the counters covering it are acknowledged, expiry, revokes.

Kafka is replaced by a publisher the test opens and closes; the mirror of sms.campaign-counts is
fed with exactly what that publisher was given (as the real one would read it back).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY

from services.campaigns.counts import Counts, counts_key, to_event
from services.campaigns.tracker import CountsTracker
from shared.contract.campaign_controls import AUTO_REPLIES
from shared.contract.events import (
    CampaignCounts,
    IngressRequestAccepted,
    MessageContext,
    RecipientMessage,
    StatusEvent,
)
from shared.contract.topics import CAMPAIGN_COUNTS, INGRESS_REQUESTS, RECIPIENTS, STATUSES
from shared.kafka.clients import KafkaUnavailable, OutRecord, Publisher
from shared.kafka.runner import Record
from shared.kafka.store import PartitionNotReady
from tests.support import make_settings

NOW = 1_800_000_000.0
DAY = 86_400.0
TP = TopicPartition(STATUSES.name, 4)
OTHER_TP = TopicPartition(STATUSES.name, 5)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class GatedPublisher(Publisher):
    """Acknowledges a batch when the gate is open; can fail the next batch like Kafka would."""

    def __init__(self) -> None:
        self.batches: list[list[OutRecord]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next = False

    async def publish(self, records: Iterable[OutRecord]) -> None:
        batch = list(records)
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise KafkaUnavailable("simulated: not acknowledged")
        self.batches.append(batch)

    def encoded(self) -> list[tuple[bytes, bytes | None]]:
        return [record.encoded for batch in self.batches for record in batch]

    def latest(self, key: str) -> CampaignCounts | None:
        """The last value written for ``key`` (None: a tombstone or never written)."""
        found: CampaignCounts | None = None
        for batch in self.batches:
            for record in batch:
                if record.key == key:
                    assert record.value is None or isinstance(record.value, CampaignCounts)
                    found = record.value
        return found


@pytest.fixture
async def clock() -> Clock:
    return Clock()


@pytest.fixture
async def publisher() -> GatedPublisher:
    return GatedPublisher()


@pytest.fixture
async def tracker(clock: Clock, publisher: GatedPublisher) -> AsyncIterator[CountsTracker]:
    made = new_tracker(clock, publisher)
    yield made
    await made.mirror.stop()


def new_tracker(clock: Clock, publisher: GatedPublisher) -> CountsTracker:
    settings = make_settings(overrides={"campaigns": {"expire_after_s": 30 * DAY}})
    made = CountsTracker(settings, clock=clock)
    made.attach(publisher)
    return made


def record(tp: TopicPartition, offset: int, value: bytes, at: float = NOW - 1) -> Record:
    return ConsumerRecord(
        topic=tp.topic,
        partition=tp.partition,
        offset=offset,
        timestamp=int(at * 1000),
        timestamp_type=0,
        key=b"k",
        value=value,
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=len(value),
        headers=[],
    )


def status(status: str, sub_status: str, campaign: str = "spring") -> bytes:
    return StatusEvent(
        event_id=f"e-{status}",
        context=MessageContext(
            tenant="acme",
            message_id="m",
            batch_id="b",
            campaign_id=campaign,
            mobile_number="447911123456",
            metadata_json="{}",
        ),
        status=status,  # type: ignore[arg-type]
        sub_status=sub_status,
    ).to_bytes()


def counters(tracker: CountsTracker, tp: TopicPartition, campaign: str) -> Counts:
    return tracker.counters(tp)[("acme", campaign)].counts


def already_counted() -> float:
    value = REGISTRY.get_sample_value(
        "smsbridge_campaign_inputs_already_counted_total", {"topic": STATUSES.name}
    )
    return value or 0.0


async def test_a_record_is_done_only_once_the_counters_covering_it_are_acknowledged(
    tracker: CountsTracker, publisher: GatedPublisher
) -> None:
    tracker.install({TP})
    first = asyncio.create_task(tracker.handle(record(TP, 0, status("sent", "Sent"))))
    await asyncio.sleep(0)
    assert not first.done()  # applied, waiting for its batch

    publisher.gate.clear()
    writing = asyncio.create_task(tracker.flush())  # takes batch 0: the first record
    await asyncio.sleep(0)
    second = asyncio.create_task(tracker.handle(record(TP, 1, status("delivered", "Delivered"))))
    await asyncio.sleep(0)
    publisher.gate.set()
    await writing
    await asyncio.sleep(0)
    assert first.done() and await first == []
    assert not second.done()  # applied while batch 0 was being written: waits for batch 1

    publisher.fail_next = True
    with pytest.raises(KafkaUnavailable):
        await tracker.flush()
    await asyncio.sleep(0)
    assert not second.done()  # a batch Kafka did not acknowledge releases nobody

    await tracker.flush()  # the counters went back in: this batch carries them
    await asyncio.wait_for(second, 1)
    written = publisher.latest(counts_key("acme", "spring", TP.topic, TP.partition))
    assert written is not None
    assert (written.offset, written.sent, written.delivered) == (1, 1, 1)
    assert len(publisher.batches) == 2


async def test_records_read_again_are_skipped_up_to_the_offset_the_counters_include(
    clock: Clock, tracker: CountsTracker, publisher: GatedPublisher
) -> None:
    tracker.install({TP})
    original = [
        status("sent", "Sent"),  # 0
        status("sent", "Sent", campaign="autumn"),  # 1
        status("delivered", "Delivered"),  # 2
        status("failed", "Undeliverable", campaign="autumn"),  # 3
        status("failed", "OptedOut"),  # 4
    ]
    for offset, value in enumerate(original):
        tracker.apply(TP, offset, NOW - 1, value)
    await tracker.flush()
    # Records 5 and 6 are applied but their batch never reaches Kafka: the instance crashes.
    later = [status("sent", "Sent", campaign="autumn"), status("delivered", "Delivered")]
    for offset, value in enumerate(later, start=5):
        tracker.apply(TP, offset, NOW - 1, value)

    successor = new_tracker(clock, publisher)
    try:
        successor.mirror.apply(publisher.encoded())
        successor.install({TP})
        before = already_counted()
        # The committed offset was 2: records 2.. are read again.
        for offset, value in enumerate([*original, *later][2:], start=2):
            successor.apply(TP, offset, NOW - 1, value)
        assert already_counted() - before == 3  # 2, 3, 4 were in the counters
        spring, autumn = counters(successor, TP, "spring"), counters(successor, TP, "autumn")
        assert (spring.sent, spring.delivered, spring.failed) == (1, 2, {"OptedOut": 1})
        assert (autumn.sent, autumn.failed) == (2, {"Undeliverable": 1})
        assert successor.counters(TP)[("acme", "spring")].offset == 6
    finally:
        await successor.mirror.stop()


async def test_records_arriving_while_their_partition_loads_are_applied_in_order(
    tracker: CountsTracker,
) -> None:
    tracker.expect({TP})  # assigned, its counters not loaded yet
    waiting = [
        tracker.apply_or_defer(TP, offset, NOW - 1, status("sent", "Sent")) for offset in range(3)
    ]
    assert all(isinstance(w, asyncio.Future) and not w.done() for w in waiting)
    tracker.install({TP})
    results = [w.result() for w in waiting if isinstance(w, asyncio.Future)]
    assert results == [0, 0, 0]  # all in the next batch
    assert counters(tracker, TP, "spring").sent == 3
    assert tracker.counters(TP)[("acme", "spring")].offset == 2
    with pytest.raises(PartitionNotReady):
        tracker.apply_or_defer(TopicPartition(STATUSES.name, 9), 0, NOW, b"{}")


async def test_auto_replies_and_requests_count_under_their_groups(
    tracker: CountsTracker,
) -> None:
    requests = TopicPartition(INGRESS_REQUESTS.name, 0)
    tracker.install({requests, TP})
    auto_reply = IngressRequestAccepted(tenant="acme", request_key="h", accepted=1).to_bytes()
    tracker.apply(requests, 0, NOW - 1, auto_reply)
    tracker.apply(TP, 0, NOW - 1, status("delivered", "Delivered", campaign=""))
    assert counters(tracker, requests, AUTO_REPLIES).accepted == 1
    assert counters(tracker, TP, AUTO_REPLIES).delivered == 1


async def test_a_revoked_partition_is_dropped_and_never_written_again(
    tracker: CountsTracker, publisher: GatedPublisher
) -> None:
    tracker.install({TP, OTHER_TP})
    tracker.apply(TP, 0, NOW - 1, status("sent", "Sent"))
    tracker.apply(OTHER_TP, 0, NOW - 1, status("sent", "Sent"))
    await tracker.on_revoked({TP})
    await tracker.flush()
    keys = {record.key for batch in publisher.batches for record in batch}
    assert keys == {counts_key("acme", "spring", OTHER_TP.topic, OTHER_TP.partition)}
    assert tracker.counters(TP) == {}
    with pytest.raises(PartitionNotReady):
        tracker.apply_or_defer(TP, 1, NOW, status("sent", "Sent"))


async def test_inactive_campaigns_expire_and_their_old_records_are_not_counted_again(
    clock: Clock, tracker: CountsTracker, publisher: GatedPublisher
) -> None:
    tracker.install({TP})
    tracker.apply(TP, 0, NOW - 1, status("sent", "Sent", campaign="old"))
    tracker.apply(TP, 1, NOW - 1, status("sent", "Sent", campaign="busy-elsewhere"))
    await tracker.flush()
    # Another instance counted "busy-elsewhere" in another partition much later.
    elsewhere = to_event(
        "acme",
        "busy-elsewhere",
        OTHER_TP.topic,
        OTHER_TP.partition,
        0,
        Counts(sent=1, first_at=NOW + 29 * DAY, last_at=NOW + 29 * DAY),
    )
    key = counts_key("acme", "busy-elsewhere", OTHER_TP.topic, OTHER_TP.partition)
    tracker.mirror.apply([*publisher.encoded(), (key.encode(), elsewhere.to_bytes())])

    clock.now = NOW + 30 * DAY + 1
    assert tracker.expire(clock.now) == {("acme", "old")}
    await tracker.flush()
    old_key = counts_key("acme", "old", TP.topic, TP.partition)
    assert publisher.batches[-1] == [OutRecord(CAMPAIGN_COUNTS, old_key, None)]  # tombstone
    assert set(tracker.counters(TP)) == {("acme", "busy-elsewhere")}
    # A replay of the expired campaign's records (older than the horizon) counts nothing.
    assert tracker.apply(TP, 0, NOW - 1, status("sent", "Sent", campaign="old")) is None
    assert set(tracker.counters(TP)) == {("acme", "busy-elsewhere")}
    gauge = REGISTRY.get_sample_value("smsbridge_campaigns_tracked")
    assert gauge == 1.0


async def test_held_for_schedule_survives_the_round_trip_through_the_counts_topic(
    clock: Clock, tracker: CountsTracker, publisher: GatedPublisher
) -> None:
    recipients = TopicPartition(RECIPIENTS.name, 0)
    tracker.install({recipients})
    in_an_hour = datetime.fromtimestamp(NOW + 3600, UTC)
    for offset in range(4):
        message = RecipientMessage(
            context=MessageContext(
                tenant="acme",
                message_id=f"m-{offset}",
                batch_id="b",
                campaign_id="later",
                mobile_number="447911123456",
                metadata_json="{}",
            ),
            destination="+447911123456",
            text="hi",
            sender_id="ACME",
            scheduled_at=in_an_hour,
        )
        tracker.apply(recipients, offset, NOW - 1, message.to_bytes())
    await tracker.flush()
    [written] = [orjson.loads(value) for _, value in publisher.encoded() if value is not None]
    assert written["scheduled"] == [[int(NOW) + 3600, 4]]
    successor = new_tracker(clock, publisher)
    try:
        successor.mirror.apply(publisher.encoded())
        successor.install({recipients})
        assert counters(successor, recipients, "later").held(NOW) == 4
        assert counters(successor, recipients, "later").held(NOW + 3600) == 0
    finally:
        await successor.mirror.stop()
