"""The publisher's batches on a real broker: concurrent requests sharing partitions."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from bench.stack import count_records
from shared.config import KafkaSettings
from shared.contract.events import Event
from shared.contract.topics import DEAD_LETTERS, RECIPIENTS
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import Publisher, make_producer
from tests.support import make_settings, read_topic

pytestmark = pytest.mark.integration


class Numbered(Event):
    key: str
    sequence: int


async def test_concurrent_requests_for_the_same_partitions_are_all_stored(
    kafka: EmbeddedBroker,
) -> None:
    """Each request hands the producer one batch per partition, and the producer holds a
    partition's next batch until the one before it is sent. With many requests waiting for the
    same partitions, aiokafka's own wait gave up long before its timeout (a 503 for the
    request); they must all get through, in turn, within the publisher's timeout."""
    settings = make_settings()
    # A short producer timeout makes aiokafka's early give-up show at once.
    kafka_settings = KafkaSettings(**{**settings.kafka.model_dump(), "request_timeout_ms": 1500})
    producer = make_producer(kafka_settings, "test")
    await producer.start()
    try:
        publisher = Publisher(producer, 60.0)
        requests = 24
        per_request = 2_400

        async def request(number: int) -> None:
            records: list[tuple[bytes, bytes | None]] = [
                (f"acme:+4474{number:03d}{i:05d}".encode(), b"x" * 600) for i in range(per_request)
            ]
            await publisher.publish_batches([(RECIPIENTS.name, None, records)])

        await asyncio.gather(*(request(n) for n in range(requests)))
    finally:
        await producer.stop()
    assert await count_records(settings, RECIPIENTS.name) == requests * per_request


async def test_small_publishes_of_one_linger_leave_together_in_key_order(
    kafka: EmbeddedBroker,
) -> None:
    """Small publishes wait ``linger_s`` and are handed over together: one batch per partition,
    not one per publish (aiokafka's own linger sent about one request per record). Each key's
    records keep their order, and every caller is acknowledged."""
    settings = make_settings()
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    handed_over: list[int] = []
    send_batch = producer.send_batch

    async def counting_send_batch(*args: Any, **kwargs: Any) -> Any:
        handed_over.append(kwargs["partition"])
        return await send_batch(*args, **kwargs)

    producer.send_batch = counting_send_batch
    try:
        publisher = Publisher(producer, 30.0, linger_s=0.05)
        keys = [f"key-{n}".encode() for n in range(40)]

        async def publish(key: bytes, sequence: int) -> None:
            value = orjson.dumps({"key": key.decode(), "sequence": sequence})
            await publisher.publish_batches([(DEAD_LETTERS.name, None, [(key, value)])])

        for sequence in range(3):  # a key's next record only after its last one is stored
            await asyncio.gather(*(publish(key, sequence) for key in keys))
    finally:
        await producer.stop()
    # Three rounds of 40 publishes over at most 12 partitions: a batch per partition and round.
    assert len(handed_over) <= 3 * DEAD_LETTERS.partitions
    seen: dict[str, list[int]] = {}
    for _, numbered in await read_topic(settings, DEAD_LETTERS, Numbered, expect=3 * len(keys)):
        seen.setdefault(numbered.key, []).append(numbered.sequence)
    assert seen == {key.decode(): [0, 1, 2] for key in keys}
