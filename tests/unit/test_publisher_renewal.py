"""A publisher made for a service replaces a broken producer once, and only a broken one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import cast

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError, OutOfOrderSequenceNumber

from shared.kafka.clients import Publisher, producer_broken


class StubProducer:
    """What ``producer_broken`` and ``renew_if_broken`` look at: the sender task, start, stop."""

    def __init__(self, sender_task: asyncio.Task[None] | None = None) -> None:
        self._sender = SimpleNamespace(sender_task=sender_task)
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True


def as_producer(stub: StubProducer) -> AIOKafkaProducer:
    return cast(AIOKafkaProducer, stub)


class Maker:
    def __init__(self) -> None:
        self.made: list[StubProducer] = []

    def __call__(self) -> AIOKafkaProducer:
        self.made.append(StubProducer())
        return as_producer(self.made[-1])


@pytest.fixture
async def sender_task() -> AsyncIterator[asyncio.Task[None]]:
    """A sender task that lives on, as aiokafka's does when the broker answers an error."""
    task = asyncio.create_task(asyncio.sleep(60))
    yield task
    task.cancel()


async def test_a_sequence_gap_gets_a_new_started_producer_once_for_concurrent_failures(
    sender_task: asyncio.Task[None],
) -> None:
    broken = StubProducer(sender_task)
    maker = Maker()
    publisher = Publisher(as_producer(broken), 1.0, remake=maker)
    gap = OutOfOrderSequenceNumber()
    await asyncio.gather(*(publisher.renew_if_broken(as_producer(broken), gap) for _ in range(5)))
    assert len(maker.made) == 1 and maker.made[0].started
    assert publisher.producer is as_producer(maker.made[0])
    await asyncio.sleep(0.05)
    assert broken.stopped  # retired in the background


async def test_a_producer_whose_sender_task_ended_is_replaced_whatever_the_error() -> None:
    async def fail() -> None:
        raise OutOfOrderSequenceNumber()

    ended = asyncio.create_task(fail())
    await asyncio.wait([ended])
    dead = StubProducer(ended)
    assert producer_broken(as_producer(dead))
    maker = Maker()
    publisher = Publisher(as_producer(dead), 1.0, remake=maker)
    await publisher.renew_if_broken(as_producer(dead), KafkaTimeoutError())
    assert len(maker.made) == 1


async def test_a_timeout_on_a_live_producer_or_no_maker_changes_nothing(
    sender_task: asyncio.Task[None],
) -> None:
    live = StubProducer(sender_task)
    maker = Maker()
    publisher = Publisher(as_producer(live), 1.0, remake=maker)
    await publisher.renew_if_broken(as_producer(live), KafkaTimeoutError())
    assert maker.made == [] and publisher.producer is as_producer(live)
    without_maker = Publisher(as_producer(live), 1.0)
    await without_maker.renew_if_broken(as_producer(live), OutOfOrderSequenceNumber())
    assert without_maker.producer is as_producer(live)
