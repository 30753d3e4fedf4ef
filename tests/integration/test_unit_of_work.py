"""A unit of work on a real broker: what it committed is what a new owner restores."""

from __future__ import annotations

import pytest

from shared.config import Settings
from shared.contract.topics import NORMALIZER_STATE
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import Publisher, make_producer
from shared.kafka.store import ChangelogStore, Entry
from shared.kafka.unit_of_work import UnitOfWork

pytestmark = pytest.mark.integration

PARTITION = 1


async def test_committed_state_is_what_the_next_owner_restores(kafka: EmbeddedBroker) -> None:
    settings = Settings()
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    publisher = Publisher(producer, 10)
    owner = ChangelogStore(settings.kafka, NORMALIZER_STATE, name="owner")
    successor = ChangelogStore(settings.kafka, NORMALIZER_STATE, name="successor")
    try:
        await owner.restore({PARTITION})
        first = UnitOfWork(owner, PARTITION)
        first.put("kept", {"v": 1}, due_at=100.0)
        first.put("deleted", {"v": 2})
        await first.commit(publisher.publish)
        second = UnitOfWork(owner, PARTITION)
        second.put("kept", {"v": 3}, due_at=200.0)
        second.put("deleted", None)
        await second.commit(publisher.publish)

        await successor.restore({PARTITION})

        assert successor.get_entry(PARTITION, "kept") == Entry({"v": 3}, 200.0)
        assert successor.get(PARTITION, "deleted") is None
        assert successor.count(PARTITION) == owner.count(PARTITION) == 1
        assert [key for key, _ in successor.due(PARTITION, now=250.0)] == ["kept"]
    finally:
        owner.close()
        successor.close()
        await producer.stop()
