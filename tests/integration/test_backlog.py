"""The runner with a ``Paced`` handler (shared/kafka/backlog.py), on the broker: records over
their lane's limit wait in the log by offset while the records behind them are processed; no
commit passes a waiting record; they are read back, in order, once their lane has room; and a
restart finds them again."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence

import pytest
from aiokafka import AIOKafkaProducer

from shared.config import RunnerSettings
from shared.contract.topics import Topic
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import OutRecord, bootstrap
from shared.kafka.runner import Record
from shared.kafka.service import ConsumerService
from tests.support import create_topic, make_settings, running, wait_for
from tests.support.ops import committed

pytestmark = pytest.mark.integration

TOPIC = Topic("ops.backlog-test", partitions=1)
SLOW, QUICK = 60, 5  # lane "slow" first on the partition, then lane "quick"


class Lanes:
    """Lane = the record's value; lane "slow" may have 2 in progress and is held at a gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.done: list[tuple[str, int]] = []

    def lane_of(self, record: Record) -> Hashable | None:
        return (record.value or b"").decode() or None

    def lane_limit(self, lane: Hashable) -> int:
        return 2 if lane == "slow" else 100

    read_ahead_limit = 1_000

    async def handle(self, record: Record) -> Sequence[OutRecord]:
        lane = (record.value or b"").decode()
        if lane == "slow":
            await self.gate.wait()
        self.done.append((lane, record.offset))
        return []


async def produce() -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(make_settings().kafka), acks="all")
    await producer.start()
    try:
        for lane, count in (("slow", SLOW), ("quick", QUICK)):
            for index in range(count):
                # Keys of their own: records of one key run one after another.
                key = f"{lane}-{index}".encode()
                await producer.send_and_wait(TOPIC.name, lane.encode(), key=key, partition=0)
    finally:
        await producer.stop()


def service(handler: Lanes) -> ConsumerService:
    return ConsumerService(
        name="backlog-test",
        settings=make_settings(),
        runner_settings=RunnerSettings(max_in_flight=10, commit_interval_s=0.1),
        topics=[TOPIC.name],
        handler=handler,
    )


async def test_waiting_records_let_later_lanes_pass_hold_the_commit_and_come_back(
    kafka: EmbeddedBroker,
) -> None:
    await create_topic(make_settings(), TOPIC)
    await produce()
    first = Lanes()
    consumer = service(first)
    async with running(consumer):
        # The quick lane, behind 60 slow records, is done while the slow lane is stuck.
        await wait_for(lambda: len(first.done) == QUICK, 30, "the quick lane")
        assert [lane for lane, _ in first.done] == ["quick"] * QUICK
        assert consumer.backlog is not None and consumer.backlog.waiting() == SLOW - 2
        await asyncio.sleep(0.5)  # a few commit intervals
        position = await committed_position()
        assert position is None or position == 0  # nothing passed the first waiting record
    # Stopped with the slow lane undone: a new member finds all of it again.
    second = Lanes()
    second.gate.set()
    async with running(service(second)):
        await wait_for(lambda: len(second.done) >= SLOW, 30, "the slow lane")

        async def at_the_end() -> bool:
            return await committed_position() == SLOW + QUICK

        await wait_for(at_the_end, 30, "the commit to the end")
    slow = [offset for lane, offset in second.done if lane == "slow"]
    assert slow == list(range(SLOW))  # each once, in the partition's order


async def test_a_full_lane_is_read_back_as_it_gets_room(kafka: EmbeddedBroker) -> None:
    await create_topic(make_settings(), TOPIC)
    await produce()
    lanes = Lanes()
    lanes.gate.set()
    consumer = service(lanes)
    async with running(consumer):
        await wait_for(lambda: len(lanes.done) == SLOW + QUICK, 30, "every record")
    slow = [offset for lane, offset in lanes.done if lane == "slow"]
    assert slow == list(range(SLOW))
    assert consumer.backlog is not None and consumer.backlog.waiting() == 0


async def committed_position() -> int | None:
    [position] = (await committed(make_settings(), "smsbridge-backlog-test", TOPIC)).values()
    return position
