"""Consumer lag on the embedded broker, as Prometheus scrapes it from the runner's gauges."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY

from shared.config import RunnerSettings
from shared.contract.topics import Topic
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import OutRecord, bootstrap, group_name, make_admin
from shared.kafka.runner import Record
from shared.kafka.service import ConsumerService
from tests.support import create_topic, make_settings, running, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.smoke]

LAG_TOPIC = Topic("ops.lag-test", partitions=2)
CONSUMER = "lag-test"


def group() -> str:
    """The group's whole name on the broker: the test's group prefix is part of it."""
    return group_name(make_settings().kafka, f"smsbridge-{CONSUMER}")


class Gate:
    """A handler that holds every record until the gate opens."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.started = 0

    async def handle(self, record: Record) -> Sequence[OutRecord]:
        self.started += 1
        await self.open.wait()
        return []


def gauge(name: str, partition: int) -> float | None:
    # ``consumergroup`` as kafka-exporter labels the same group's lag: the two join on it.
    labels = {
        "consumer": CONSUMER,
        "consumergroup": group(),
        "topic": LAG_TOPIC.name,
        "partition": str(partition),
    }
    return REGISTRY.get_sample_value(name, labels)


def lag_messages(partition: int) -> float | None:
    return gauge("smsbridge_consumer_lag_messages", partition)


def lag_seconds(partition: int) -> float | None:
    return gauge("smsbridge_consumer_lag_seconds", partition)


async def broker_groups() -> set[str]:
    """The name of every group the broker knows (ListGroups, as kafka-exporter lists them)."""
    admin = make_admin(make_settings().kafka)
    await admin.start()
    try:
        return {str(group[0]) for group in await admin.list_consumer_groups()}
    finally:
        await admin.close()


async def produce(count: int, partition: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(make_settings().kafka), acks="all")
    await producer.start()
    try:
        for index in range(count):
            await producer.send_and_wait(
                LAG_TOPIC.name, b"x", key=f"k{index}".encode(), partition=partition
            )
    finally:
        await producer.stop()


async def test_lag_grows_while_stuck_and_reads_zero_once_idle(kafka: EmbeddedBroker) -> None:
    await create_topic(make_settings(), LAG_TOPIC)
    gate = Gate()
    # Two slots: most records wait in aiokafka's buffer or on the broker, not in the runner.
    service = ConsumerService(
        name=CONSUMER,
        settings=make_settings(),
        runner_settings=RunnerSettings(max_in_flight=2, max_poll_records=2),
        topics=[LAG_TOPIC.name],
        handler=gate,
    )
    async with running(service):
        await wait_for(lambda: lag_messages(1) == 0.0, what="the idle partition to read 0")
        if kafka.kind == "kafka":  # Tansu's ListGroups answers nothing
            assert group() in await broker_groups()  # the label: the group's name on the broker
        await produce(20, partition=0)
        await wait_for(lambda: lag_messages(0) == 20.0, what="20 records of lag")
        assert gate.started == 2  # the rest is not taken: the slots are full
        first_age = lag_seconds(0) or 0.0
        await wait_for(
            lambda: (lag_seconds(0) or 0.0) >= first_age + 2.0,
            what="the age to grow while nothing finishes",
        )

        # More input while stuck: the gauge follows the end, though the saturated consumer has
        # stopped fetching this partition (its buffer is full).
        await produce(10, partition=0)
        await wait_for(lambda: lag_messages(0) == 30.0, timeout_s=30, what="30 records of lag")
        assert lag_messages(1) == 0.0 and lag_seconds(1) == 0.0

        gate.open.set()
        await wait_for(
            lambda: lag_messages(0) == 0.0 and lag_seconds(0) == 0.0,
            what="the lag to drain to zero",
        )
        assert service.runner.finished_records == 30
        await asyncio.sleep(2.5)  # several export rounds with nothing arriving: still zero
        assert lag_messages(0) == 0.0 and lag_seconds(0) == 0.0

    # Stopped: this instance no longer speaks for the partitions.
    assert lag_messages(0) is None and lag_seconds(1) is None
