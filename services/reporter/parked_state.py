"""The reporter's state on ``sms.reporter-state``: restore, change with outputs, undo.

It holds the parked entries and what Optimove acknowledged (``acknowledged.py``). A change is
stored, then published with its outputs (a ``UnitOfWork``); if publishing fails it is undone, so
a retry finds the state it started from. ``ParkedCounts`` follows every change (the parked gauge).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence

from services.reporter.acknowledged import Remembered, already_acknowledged, remember
from services.reporter.metrics import KINDS
from services.reporter.outcomes import STAGE, Change, readable
from services.reporter.parking import ParkedCounts, ParkedEntry, key_prefix
from shared.kafka.clients import KafkaUnavailable, OutRecord, Publisher
from shared.kafka.store import ChangelogStore, Entry, KeyLocks, PartitionNotReady
from shared.kafka.unit_of_work import UnitOfWork
from shared.retry import RetryPolicy, retry

log = logging.getLogger(__name__)

# Waits between publishes of report outcomes while Kafka is away.
KAFKA_WAIT = RetryPolicy(base_s=1.0, cap_s=30.0)


class ParkedState:
    """The store of parked entries, its per-key locks and its counts."""

    def __init__(
        self,
        store: ChangelogStore,
        tenants: Callable[[], Collection[str]],
        *,
        remember_s: float = 0.0,
    ) -> None:
        self.store = store
        self.tenants = tenants  # asked each time: tenants change live (shared/live_config.py)
        # How long an acknowledgement is remembered ([reporter] remember_acknowledged_s).
        self.remember_s = remember_s
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
                        for slug in self.tenants()
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
        self,
        partition: int,
        changes: Sequence[Change],
        also: Sequence[OutRecord] = (),
        *,
        remembered: Sequence[Remembered] = (),
    ) -> None:
        """Store and publish the changes (entries, dead letters), the acknowledgements
        ``remembered`` and ``also``, or undo them all."""
        if not changes and not also and not remembered:
            return
        work = UnitOfWork(self.store, partition)
        work.add(also)
        for write in remembered:
            work.put(write.key, write.value, write.due_at)
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

    def acknowledged(self, partition: int, key: str, now: float) -> bool:
        """Whether Optimove accepted the report ``key`` (``acknowledged.py``) and it is still
        remembered: a replayed record that must not be posted again."""
        return already_acknowledged(self.store.get_entry(partition, key), now)

    async def remember(
        self, partition: int, keys: Sequence[str], now: float, also: Sequence[OutRecord] = ()
    ) -> None:
        """Store that Optimove accepted the reports ``keys``, published with ``also``; on Kafka
        when this returns, so before the input offset can be committed.

        Kafka being away is waited for here: giving up would make the runner handle the record
        again and post it a second time. A partition taken away meanwhile is not waited for (its
        next owner reads the record again: the documented window of a repeated post).
        """
        writes = remember(keys, now, self.remember_s)
        if not writes and not also:
            return
        async with self.locks.hold_all(partition, keys):
            await retry(
                lambda: self.write(partition, [], also, remembered=writes),
                KAFKA_WAIT,
                on=KafkaUnavailable,
                give_up=lambda exc: isinstance(exc, PartitionNotReady),
                on_retry=lambda _attempt, exc, _wait: log.warning(
                    "%s: acknowledgement not stored (%s); retrying", STAGE, exc
                ),
            )

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
