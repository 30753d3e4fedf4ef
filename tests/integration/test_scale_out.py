"""Two instances of a consumer service (normalizer, reporter, sender) share its group; one stops
mid-campaign and the other takes its partitions over, with nothing lost and nothing done twice."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
from aiokafka import TopicPartition

from services.normalizer.app import build as build_normalizer
from services.normalizer.handler import INPUT_TOPICS
from services.reporter.app import build as build_reporter
from services.sender.app import build as build_sender
from shared.config import Settings
from shared.contract.events import DispatchRecord, StatusEvent
from shared.contract.topics import (
    DEFAULT_PARTITIONS,
    DISPATCHES,
    PRIORITY_RECIPIENTS,
    RECIPIENTS,
    STATUSES,
)
from shared.kafka.broker import EmbeddedBroker, free_port
from shared.kafka.clients import OutRecord
from shared.kafka.service import ConsumerService, Service
from simulators.optimove import FailureMode, OptimoveSimulator
from simulators.providers import ProviderSimulator
from tests.support import (
    TENANT,
    TENANT_API_TOKEN,
    TENANT_SECRET,
    make_settings,
    running,
    wait_for,
)
from tests.support.ops import (
    QUICK_GROUP,
    TopicTail,
    accepted_dispatch,
    delivered_callback,
    dispatch_records,
    publisher,
    recipient,
    status_event,
    status_records,
)

pytestmark = pytest.mark.integration


def consumer_service(service: Service) -> ConsumerService:
    assert isinstance(service, ConsumerService)
    return service


def assigned(service: ConsumerService) -> set[TopicPartition]:
    return set(service.consumer.assignment())


async def start_pair(first: ConsumerService, second: ConsumerService, partitions: int) -> None:
    """Start both and wait until they split the group's partitions between them."""
    await first.start()
    await second.start()
    await wait_for(
        lambda: (
            bool(assigned(first))
            and bool(assigned(second))
            and len(assigned(first) | assigned(second)) == partitions
            and not assigned(first) & assigned(second)
        ),
        timeout_s=60,
        what="both instances to share the partitions",
    )


async def holds_every_partition(survivor: ConsumerService, partitions: int) -> None:
    await wait_for(
        lambda: len(assigned(survivor)) == partitions,
        what="the survivor to hold every partition",
    )


async def publish_in_chunks(settings: Settings, records: Sequence[OutRecord], chunk: int) -> None:
    async with publisher(settings) as out:
        for start in range(0, len(records), chunk):
            await out.publish(records[start : start + chunk])
            await asyncio.sleep(0.1)


async def test_a_normalizer_takes_over_when_the_other_stops_mid_campaign(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    def settings_for(instance: str) -> Settings:
        return make_settings(
            overrides={"normalizer": {"state_dir": str(tmp_path / instance), "runner": QUICK_GROUP}}
        )

    settings = settings_for("a")
    first = consumer_service(build_normalizer(settings))
    second = consumer_service(build_normalizer(settings_for("b")))
    message_ids = [f"m-{i:04d}" for i in range(600)]
    # Each message's dispatch, then its delivery report (same key: same partition number).
    inputs = dispatch_records(
        item
        for m in message_ids
        for item in (accepted_dispatch(m, f"sms-{m}"), delivered_callback(f"sms-{m}"))
    )
    every_partition = len(INPUT_TOPICS) * DEFAULT_PARTITIONS

    async with TopicTail(settings, STATUSES, StatusEvent) as statuses:
        await start_pair(first, second, every_partition)
        try:
            stream = asyncio.create_task(publish_in_chunks(settings, inputs, chunk=40))
            await statuses.wait_count(len(message_ids) // 3)
            await first.stop()
            stopped_at = len(statuses.records)
            await holds_every_partition(second, every_partition)
            await stream
            await statuses.wait_count(2 * len(message_ids))
            await statuses.settle()
        finally:
            await second.stop()

    assert stopped_at < 2 * len(message_ids)  # stopped mid-campaign
    assert first.runner.finished_records > 0 and second.runner.finished_records > 0
    assert first.runner.finished_records + second.runner.finished_records >= len(inputs)
    sequences: dict[str, list[str]] = defaultdict(list)
    for key, status in statuses.records:
        assert key == status.context.message_id
        sequences[status.context.message_id].append(status.status)
    assert sequences == {m: ["sent", "delivered"] for m in message_ids}


async def test_a_reporter_takes_over_when_the_other_stops_mid_campaign(
    kafka: EmbeddedBroker,
) -> None:
    port = free_port()
    simulator = OptimoveSimulator("127.0.0.1", port, {TENANT: (TENANT_API_TOKEN, TENANT_SECRET)})
    # Slow answers and few slots, so that the campaign is still going when one instance stops.
    simulator.set_mode(FailureMode(delay_ms=40))
    settings = make_settings(
        optimove_url=f"http://127.0.0.1:{port}",
        overrides={"reporter": {"runner": {"max_in_flight": 4, **QUICK_GROUP}}},
    )
    first = consumer_service(build_reporter(settings))
    second = consumer_service(build_reporter(settings))
    message_ids = [f"m-{i:04d}" for i in range(200)]
    events = [status_event(m, "sent", "Sent") for m in message_ids] + [
        status_event(m, "delivered", "Delivered") for m in message_ids
    ]

    def final_reports() -> int:
        final: int = simulator.tally(TENANT)[TENANT]["final"]
        return final

    every_partition = len(first.topics) * DEFAULT_PARTITIONS
    await simulator.start()
    try:
        await start_pair(first, second, every_partition)
        try:
            async with publisher(settings) as out:
                await out.publish(status_records(events))
            await wait_for(lambda: final_reports() >= len(message_ids) // 4, timeout_s=60)
            await first.stop()
            stopped_at = final_reports()
            await holds_every_partition(second, every_partition)
            await wait_for(
                lambda: final_reports() == len(message_ids),
                timeout_s=90,
                what="every final report",
            )
            await asyncio.sleep(1.0)  # a report sent twice would arrive now
        finally:
            await second.stop()
        reports = [
            orjson.loads(r["body"])
            for r in simulator.received(endpoint="delivery-report", tenant=TENANT)
            if not r["rejected"]
        ]
        tally = simulator.tally(TENANT)[TENANT]
    finally:
        await simulator.stop()

    assert stopped_at < len(message_ids)  # stopped mid-campaign
    assert first.runner.finished_records > 0 and second.runner.finished_records > 0
    assert tally["duplicates"] == 0
    sequences: dict[str, list[str]] = defaultdict(list)
    for body in reports:
        sequences[body["messageId"]].append(body["type"]["status"])
    # Every message reported once per status, in the order of the topic.
    assert sequences == {m: ["Sent", "Delivered"] for m in message_ids}


async def test_a_sender_takes_over_when_the_other_stops_mid_campaign(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    # Slow provider answers and few calls in flight, so that the campaign is still going when
    # one instance stops.
    provider = ProviderSimulator(
        "127.0.0.1", free_port(), latency_ms=20, callback_delay_ms=600_000, callback_attempts=1
    )

    def settings_for(instance: str) -> Settings:
        return make_settings(
            provider_url=provider.url,
            overrides={
                # Few records taken at a time: the stopping instance hands most of them back.
                "sender": {
                    "state_dir": str(tmp_path / instance),
                    "runner": {**QUICK_GROUP, "max_in_flight": 20},
                },
                "providers": {"otpiq-main": {"max_in_flight": 8}},
            },
        )

    settings = settings_for("a")
    first = consumer_service(build_sender(settings))
    second = consumer_service(build_sender(settings_for("b")))
    messages = [recipient(i, f"+4477009{i:05d}") for i in range(600)]
    records = [
        OutRecord(RECIPIENTS, f"{TENANT}:{m.destination}", m) for m in messages
    ]  # the key ingress gives: a number's messages stay in order on one partition

    async with running(provider), TopicTail(settings, DISPATCHES, DispatchRecord) as dispatched:
        # The sender reads sms.recipients and sms.recipients-priority.
        await start_pair(first, second, RECIPIENTS.partitions + PRIORITY_RECIPIENTS.partitions)
        try:
            stream = asyncio.create_task(publish_in_chunks(settings, records, chunk=50))
            await dispatched.wait_count(len(messages) // 3)
            await first.stop()
            stopped_at = len(dispatched.records)
            await holds_every_partition(
                second, RECIPIENTS.partitions + PRIORITY_RECIPIENTS.partitions
            )
            await stream
            await dispatched.wait_count(len(messages))
            await asyncio.sleep(1.0)  # a message sent twice would arrive now
            await dispatched.settle()
        finally:
            await second.stop()

    assert stopped_at < len(messages)  # stopped mid-campaign
    assert first.runner.finished_records > 0 and second.runner.finished_records > 0
    # Each message went to the provider once, and has one dispatch record: accepted, with the
    # provider's id for it.
    assert Counter(send.phone for send in provider.sends) == {
        m.destination.lstrip("+"): 1 for m in messages
    }
    by_message = Counter(record.context.message_id for _, record in dispatched.records)
    assert by_message == {m.context.message_id: 1 for m in messages}
    assert {record.outcome for _, record in dispatched.records} == {"accepted"}
    assert {record.provider_message_id for _, record in dispatched.records} == {
        send.provider_message_id for send in provider.sends
    }
