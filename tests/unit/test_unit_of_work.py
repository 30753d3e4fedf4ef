"""One unit of work: state stored, outputs and changelog published together, undone on failure."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import pytest

from shared.config import KafkaSettings
from shared.contract.events import DeadLetter, StateChange, decode
from shared.contract.topics import DEAD_LETTERS, NORMALIZER_STATE
from shared.kafka.clients import KafkaUnavailable, OutRecord
from shared.kafka.store import ChangelogStore, Entry
from shared.kafka.unit_of_work import UnitOfWork

PARTITION = 2


@pytest.fixture
def store() -> Iterator[ChangelogStore]:
    store = ChangelogStore(KafkaSettings(), NORMALIZER_STATE, name="test")
    store.load(PARTITION, [])
    yield store
    store.close()


def letter(reason: str) -> OutRecord:
    return OutRecord(
        DEAD_LETTERS, reason, DeadLetter(source_topic="t", stage="test", reason=reason, payload="")
    )


class Kafka:
    """A publish that records what it was given, or fails as told."""

    def __init__(self, failure: BaseException | None = None) -> None:
        self.failure = failure
        self.published: list[OutRecord] = []

    async def publish(self, records: Sequence[OutRecord]) -> None:
        if self.failure is not None:
            raise self.failure
        self.published.extend(records)


async def test_commit_publishes_everything_in_the_order_it_was_added(
    store: ChangelogStore,
) -> None:
    kafka = Kafka()
    observed: list[str] = []
    work = UnitOfWork(store, PARTITION)
    work.add([letter("first")])
    work.put("k1", {"n": 1}, due_at=50.0)
    work.put("k2", {"n": 2})
    work.add([letter("last")])
    work.on_commit(lambda: observed.append("committed"))
    work.on_undo(lambda: observed.append("undone"))

    await work.commit(kafka.publish)

    assert [(r.topic.name, r.key) for r in kafka.published] == [
        (DEAD_LETTERS.name, "first"),
        (NORMALIZER_STATE.name, "k1"),
        (NORMALIZER_STATE.name, "k2"),
        (DEAD_LETTERS.name, "last"),
    ]
    changelog = kafka.published[1]
    assert changelog.partition == PARTITION
    assert decode(StateChange, changelog.encoded[1]).due_at == 50.0
    assert store.get_entry(PARTITION, "k1") == Entry({"n": 1}, 50.0)
    assert observed == ["committed"]


@pytest.mark.parametrize("failure", [KafkaUnavailable("down"), asyncio.CancelledError()])
async def test_a_failed_publish_puts_the_state_back_and_raises(
    store: ChangelogStore, failure: BaseException
) -> None:
    store.put(PARTITION, "existing", {"v": "old"}, due_at=10.0)
    store.put(PARTITION, "gone", {"v": "kept"})
    observed: list[str] = []
    work = UnitOfWork(store, PARTITION)
    work.put("existing", {"v": "new"}, due_at=99.0)
    work.put("existing", {"v": "newer"})  # twice in one unit: the first value comes back
    work.put("fresh", {"v": "new"})
    work.put("gone", None)
    work.on_commit(lambda: observed.append("committed"))
    work.on_undo(lambda: observed.append("undone"))

    with pytest.raises(type(failure)):
        await work.commit(Kafka(failure).publish)

    assert store.get_entry(PARTITION, "existing") == Entry({"v": "old"}, 10.0)
    assert store.get(PARTITION, "fresh") is None
    assert store.get(PARTITION, "gone") == {"v": "kept"}
    assert store.count(PARTITION) == 2
    assert observed == ["undone"]


async def test_the_previous_entry_given_by_the_caller_is_what_comes_back(
    store: ChangelogStore,
) -> None:
    store.put(PARTITION, "k", {"v": "stored"})
    work = UnitOfWork(store, PARTITION)
    work.put("k", {"v": "new"}, previous=Entry({"v": "read earlier"}, 5.0))

    with pytest.raises(KafkaUnavailable):
        await work.commit(Kafka(KafkaUnavailable("down")).publish)

    assert store.get_entry(PARTITION, "k") == Entry({"v": "read earlier"}, 5.0)


async def test_a_partition_dropped_before_the_undo_is_not_an_error(store: ChangelogStore) -> None:
    undone: list[str] = []
    work = UnitOfWork(store, PARTITION)
    work.put("k", {"v": 1})
    work.on_undo(lambda: undone.append("outside the store"))

    class DropThenFail(Kafka):
        async def publish(self, records: Sequence[OutRecord]) -> None:
            store.drop([PARTITION])  # revoked while Kafka was being waited for
            raise KafkaUnavailable("down")

    with pytest.raises(KafkaUnavailable):
        await work.commit(DropThenFail().publish)

    assert undone == ["outside the store"]
    assert not store.is_ready(PARTITION)


async def test_nothing_to_publish_publishes_nothing(store: ChangelogStore) -> None:
    kafka = Kafka(KafkaUnavailable("never called"))
    work = UnitOfWork(store, PARTITION)
    assert work.empty

    await work.commit(kafka.publish)

    assert kafka.published == []
