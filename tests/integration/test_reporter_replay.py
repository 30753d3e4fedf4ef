"""Replaying the reporter, as an operator does after an outage: stop it, move its group's offsets
back to the beginning, start it. Optimove gets each report it acknowledged once, and the reports
it never acknowledged (5xx until after the stop: dead-lettered) are posted by the replay.

The offsets are moved with a plain consumer of the group (what ``smsbridge replay --execute``
commits), and the second reporter is a new instance with a new disk: what it knows comes from
``sms.reporter-state``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition

from services.reporter.app import build
from shared.config import Settings
from shared.contract.events import DeadLetter, Event
from shared.contract.topics import DEAD_LETTERS, INBOUND, STATUSES, Topic
from shared.kafka.broker import EmbeddedBroker, free_port
from shared.kafka.clients import make_consumer
from shared.kafka.service import ConsumerService
from simulators.optimove import FailureMode
from tests.integration.test_reporter import (
    FAST_RETRIES,
    OTHER,
    accepted,
    campaign,
    metric,
    publish,
    reply,
    settings_for,
    simulator_on,
)
from tests.support import TENANT, read_topic, running, wait_for

pytestmark = pytest.mark.integration

REPORTER_GROUP = "smsbridge-reporter"
MESSAGES = 300  # a Sent and a Delivered report each
REPLIES = 120
SKIPPED = "smsbridge_reports_already_acknowledged_total"


async def reset_to_beginning(settings: Settings, group: str, topic: Topic) -> None:
    """Commit the group's offsets of ``topic`` at the start of every partition."""
    consumer = make_consumer(settings.kafka, group, role="test-replay")
    await consumer.start()
    try:
        partitions = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        consumer.assign(partitions)
        starts = await consumer.beginning_offsets(partitions)
        await consumer.commit(dict(starts))
    finally:
        await consumer.stop()


def inputs(topic: Topic) -> tuple[list[tuple[Topic, str, Event]], str, int]:
    """The records of a campaign (acme, all acknowledged) and one record for beta, whose
    Optimove fails until after the stop; the endpoint and how many messages acme gets."""
    if topic == STATUSES:
        events = campaign("m", MESSAGES)
        never = campaign("x", 1, tenant=OTHER)[0]
        records: list[tuple[Topic, str, Event]] = [
            (STATUSES, e.context.message_id, e) for e in events
        ]
        records.append((STATUSES, never.context.message_id, never))
        return records, "delivery-report", len(events)
    replies = [(INBOUND, TENANT, reply(i)) for i in range(REPLIES)]
    return [*replies, (INBOUND, OTHER, reply(0, OTHER))], "incoming-message", REPLIES


def messages(simulator_bodies: Sequence[Any], endpoint: str) -> list[str]:
    """What Optimove accepted, one entry per message (a reply batch counts each reply)."""
    if endpoint == "delivery-report":
        return [f"{b['messageId']}/{b['type']['status']}" for b in simulator_bodies]
    return [m["message"] for b in simulator_bodies for m in b["messages"]]


@pytest.mark.parametrize("topic", [STATUSES, INBOUND], ids=["statuses", "inbound"])
async def test_a_replay_posts_only_what_optimove_never_acknowledged(
    kafka: EmbeddedBroker, topic: Topic
) -> None:
    port = free_port()
    # beta's report is given up on (dead-lettered) within the first run.
    settings = settings_for(port, {**FAST_RETRIES, "give_up_after_s": 2.0})
    simulator = simulator_on(port)
    simulator.set_mode(FailureMode(status=503), tenant=OTHER)
    records, endpoint, expected = inputs(topic)
    kind = "delivery" if topic == STATUSES else "incoming"
    skipped_before = metric(SKIPPED, tenant=TENANT, kind=kind)

    def acknowledged(tenant: str) -> list[str]:
        return messages(accepted(simulator, endpoint, tenant), endpoint)

    await simulator.start()
    try:
        first = build(settings)
        assert isinstance(first, ConsumerService)
        async with running(first):
            await publish(settings, records)
            await wait_for(
                lambda: len(acknowledged(TENANT)) >= expected,
                timeout_s=60,
                what="the campaign's reports at Optimove",
            )
            (_, letter), *_ = await read_topic(settings, DEAD_LETTERS, DeadLetter, expect=1)
            assert letter.source_topic == topic.name
            # Stopped once every record is done, as after a campaign (not mid-request, where
            # a report Optimove took may not be recorded yet: the documented HTTP window).
            await wait_for(
                lambda: first.runner.finished_records >= len(records),
                what="every record done",
            )
        first_run = acknowledged(TENANT)
        assert len(first_run) == len(set(first_run)) == expected
        assert acknowledged(OTHER) == []

        # The operator's replay: the reporter is stopped, its group moved to the beginning.
        await reset_to_beginning(settings, REPORTER_GROUP, topic)
        simulator.clear_modes(OTHER)  # beta's Optimove is back

        service = build(settings)
        assert isinstance(service, ConsumerService)
        async with running(service):
            await wait_for(
                lambda: service.runner.finished_records >= len(records),
                timeout_s=60,
                what="the replayed records to be read again",
            )
            await wait_for(lambda: len(acknowledged(OTHER)) == 1, what="beta's report")
            await asyncio.sleep(1.0)  # a report posted twice would reach Optimove now
    finally:
        await simulator.stop()

    # Each report acme's Optimove acknowledged reached it once; beta's, never acknowledged,
    # was posted by the replay.
    assert sorted(acknowledged(TENANT)) == sorted(first_run)
    assert len(acknowledged(OTHER)) == 1
    assert metric(SKIPPED, tenant=TENANT, kind=kind) - skipped_before == expected
