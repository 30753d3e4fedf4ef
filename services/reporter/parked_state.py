"""The reporter's parked entries on ``sms.reporter-state``: restore, change with outputs, undo.

A change is stored, then published with its outputs (a ``UnitOfWork``); if publishing fails it
is undone, so a retry finds the state it started from. ``ParkedCounts`` follows every change
(the parked gauge).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence

from services.reporter.metrics import KINDS
from services.reporter.outcomes import STAGE, Change, readable
from services.reporter.parking import ParkedCounts, ParkedEntry, key_prefix
from shared.kafka.clients import KafkaUnavailable, OutRecord, Publisher
from shared.kafka.store import ChangelogStore, Entry, KeyLocks
from shared.kafka.unit_of_work import UnitOfWork
from shared.retry import RetryPolicy, retry

log = logging.getLogger(__name__)

# Waits between publishes of report outcomes while Kafka is away.
KAFKA_WAIT = RetryPolicy(base_s=1.0, cap_s=30.0)


class ParkedState:
    """The store of parked entries, its per-key locks and its counts."""

    def __init__(self, store: ChangelogStore, tenants: Collection[str]) -> None:
        self.store = store
        self.tenants = tenants
        self.locks = KeyLocks()
        self.parked = ParkedCounts()
        self.publisher: Publisher | None = None

    async def ensure_ready(self, partitions: set[int]) -> None:
        missing = {p for p in partitions if not self.store.is_ready(p)}
        if not missing:
            return
        await self.store.restore(missing)
        for partition in missing:
            if self.store.is_ready(partition):
                self.parked.reset(
                    partition,
                    {
                        (slug, kind): self.store.count_prefix(partition, key_prefix(kind, slug))
                        for slug in self.tenants
                        for kind in KINDS
                    },
                )

    def drop(self, partitions: set[int]) -> None:
        self.store.drop(partitions)
        self.parked.drop(partitions)

    def close(self) -> None:
        self.parked.drop(self.store.partitions())
        self.store.close()

    async def write(
        self, partition: int, changes: Sequence[Change], also: Sequence[OutRecord] = ()
    ) -> None:
        """Store and publish the changes (entries, dead letters) and ``also``, or undo them."""
        if not changes and not also:
            return
        work = UnitOfWork(self.store, partition)
        work.add(also)
        for change in changes:
            work.add(change.dead_letters)
            value = change.entry.to_value() if change.entry is not None else None
            work.put(change.key, value, change.due_at, previous=change.previous)
            self._count(partition, change.previous, change.entry, +1)
            work.on_undo(self._uncount(partition, change))
            if change.observe is not None:
                work.on_commit(change.observe)
        await work.commit(self._publisher().publish)

    def _uncount(self, partition: int, change: Change) -> Callable[[], None]:
        def undo() -> None:
            if self.store.is_ready(partition):  # dropped meanwhile: its counts went with it
                self._count(partition, change.previous, change.entry, -1)

        return undo

    def _count(
        self, partition: int, previous: Entry | None, entry: ParkedEntry | None, sign: int
    ) -> None:
        if (previous is None) == (entry is None):
            return
        parked = entry if entry is not None else readable(previous)
        if parked is None:
            return
        delta = 1 if entry is not None else -1
        self.parked.change(partition, parked.tenant, parked.kind, sign * delta)

    async def publish_until_acknowledged(self, records: Sequence[OutRecord]) -> None:
        """Publish ``records``, waiting for Kafka as long as it takes (as the runner does)."""
        publisher = self._publisher()
        await retry(
            lambda: publisher.publish(records),
            KAFKA_WAIT,
            on=KafkaUnavailable,
            on_retry=lambda _attempt, exc, _wait: log.warning(
                "%s: report outcome not published (%s); retrying", STAGE, exc
            ),
        )

    def _publisher(self) -> Publisher:
        if self.publisher is None:
            raise RuntimeError(f"{STAGE} handler used before start()")
        return self.publisher
