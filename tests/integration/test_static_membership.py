"""Static membership ([kafka] group_instance_id, from the pod's name in Kubernetes): a consumer
restarted within its session timeout takes its partitions back and no other member's assignment
moves, so a crash-looping pod does not stop the whole group for a rebalance each time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from shared.config import Settings
from shared.contract.topics import Topic
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import make_consumer
from tests.support import create_topic, make_settings, wait_for

pytestmark = pytest.mark.integration

TOPIC = Topic("ops.static-members", partitions=4)
GROUP = "static-members"
# Long enough for a restart on a loaded machine; the broker's minimum is 6 s.
SESSION_TIMEOUT_MS = 30_000


@pytest.fixture(autouse=True)
def apache_kafka(broker: EmbeddedBroker) -> EmbeddedBroker:
    if broker.kind != "kafka":
        pytest.skip("static membership (KIP-345) is an Apache Kafka feature; Tansu lacks it")
    return broker


class Assignments(ConsumerRebalanceListener):  # type: ignore[misc]
    """Every revocation and assignment one member saw, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, frozenset[int]]] = []

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:  # aiokafka also calls it, with nothing, before a member's first join
            self.events.append(("revoked", frozenset(tp.partition for tp in revoked)))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.events.append(("assigned", frozenset(tp.partition for tp in assigned)))

    @property
    def current(self) -> frozenset[int] | None:
        assigned = [partitions for kind, partitions in self.events if kind == "assigned"]
        return assigned[-1] if assigned else None


def static_settings(instance_id: str) -> Settings:
    return make_settings(overrides={"kafka": {"group_instance_id": instance_id}})


@contextlib.asynccontextmanager
async def member(settings: Settings, listener: Assignments) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer of the group, polling as the runner does, until the block ends (``stop`` sends
    no LeaveGroup for a static member: as after a crash, the broker keeps its place)."""
    consumer = make_consumer(
        settings.kafka,
        GROUP,
        role="static-test",
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=1_000,
    )
    consumer.subscribe([TOPIC.name], listener=listener)
    await consumer.start()

    async def poll() -> None:
        while True:
            await consumer.getmany(timeout_ms=200)

    polling = asyncio.create_task(poll())
    try:
        yield consumer
    finally:
        polling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await polling
        await consumer.stop()


async def test_a_member_restarted_within_the_session_timeout_moves_no_partition() -> None:
    await create_topic(make_settings(), TOPIC)
    first, second = Assignments(), Assignments()
    async with member(static_settings("sender-0"), first):
        async with member(static_settings("sender-1"), second):
            await wait_for(
                lambda: (
                    first.current is not None
                    and second.current is not None
                    and len(first.current) == len(second.current) == 2
                ),
                timeout_s=60,
                what=lambda: f"two members of 2 partitions each: {first.events} {second.events}",
            )
            assert first.current is not None
            assert second.current is not None
            kept, owned = first.current, second.current
            assert kept | owned == frozenset(range(TOPIC.partitions))
            seen_by_first = len(first.events)

        # sender-1 is gone (a crash: no LeaveGroup) and comes back under the same id.
        again = Assignments()
        async with member(static_settings("sender-1"), again):
            await wait_for(lambda: again.current is not None, timeout_s=30, what="the rejoin")
            assert again.current == owned  # its old partitions, back
            # Long enough for a rebalance the rejoin would have started to reach the first.
            await asyncio.sleep(5)
            assert first.events[seen_by_first:] == []  # no revocation, no new assignment
            assert first.current == kept
            assert again.events == [("assigned", owned)]
