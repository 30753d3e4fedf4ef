"""A publisher made for a service replaces a producer aiokafka has declared dead, and only then."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from aiokafka import AIOKafkaProducer
from aiokafka.errors import OutOfOrderSequenceNumber

from shared.kafka import Publisher, producer_dead


class StubProducer:
    """What ``producer_dead`` and ``renew_if_dead`` look at: the sender task, start and stop."""

    def __init__(self, sender_task: asyncio.Task[None] | None) -> None:
        self._sender = SimpleNamespace(sender_task=sender_task)
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True


async def ended_with(error: BaseException) -> asyncio.Task[None]:
    async def fail() -> None:
        raise error

    task = asyncio.create_task(fail())
    await asyncio.wait([task])
    return task


async def running() -> asyncio.Task[None]:
    return asyncio.create_task(asyncio.sleep(60))


def as_producer(stub: StubProducer) -> AIOKafkaProducer:
    return cast(AIOKafkaProducer, stub)


async def test_a_dead_producer_is_replaced_by_a_started_new_one() -> None:
    dead = StubProducer(await ended_with(OutOfOrderSequenceNumber()))
    made: list[StubProducer] = []

    def remake() -> AIOKafkaProducer:
        made.append(StubProducer(None))
        return as_producer(made[-1])

    publisher = Publisher(as_producer(dead), 1.0, remake=remake)
    assert producer_dead(as_producer(dead))
    await publisher.renew_if_dead()
    assert [cast(Any, publisher.producer)] == made and made[0].started
    await asyncio.sleep(0.05)
    assert dead.stopped  # retired in the background
    await publisher.renew_if_dead()  # the new one is alive: nothing more happens
    assert len(made) == 1


async def test_a_live_producer_or_one_without_a_maker_stays() -> None:
    alive_task = await running()
    try:
        alive = StubProducer(alive_task)
        publisher = Publisher(
            as_producer(alive), 1.0, remake=lambda: as_producer(StubProducer(None))
        )
        await publisher.renew_if_dead()
        assert publisher.producer is as_producer(alive)
    finally:
        alive_task.cancel()
    dead = StubProducer(await ended_with(OutOfOrderSequenceNumber()))
    without_maker = Publisher(as_producer(dead), 1.0)
    await without_maker.renew_if_dead()
    assert without_maker.producer is as_producer(dead)
