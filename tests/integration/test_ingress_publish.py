"""The publisher's batches on a real broker: concurrent requests sharing partitions."""

from __future__ import annotations

import asyncio

import pytest

from bench.stack import count_records
from shared.config import KafkaSettings
from shared.contract.topics import RECIPIENTS
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import Publisher, make_producer
from tests.support import make_settings

pytestmark = pytest.mark.integration


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
