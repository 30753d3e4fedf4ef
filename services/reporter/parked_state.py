"""The reporter's state on ``sms.reporter-state``: restore, park, queue behind, change with
outputs, undo.

It holds the parked entries and what Optimove acknowledged (``acknowledged.py``). A change is
stored, then published with its outputs (a ``UnitOfWork``); if publishing fails it is undone, so
a retry finds the state it started from. ``ParkedCounts`` follows every change (the parked gauge).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import Any

from services.reporter.acknowledged import Remembered, already_acknowledged, remember
from services.reporter.metrics import KIND_DELIVERY, KINDS, REPORTS, RESULT_PARKED
from services.reporter.outcomes import STAGE, Change, readable
from services.reporter.parking import (
    PARKED_DELIVERIES,
    ParkedCounts,
    ParkedEntry,
    ParkedReport,
    key_prefix,
)
from shared.kafka.clients import KafkaUnavailable, OutRecord
from shared.kafka.outbox import Outbox
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
        self.publisher: Outbox | None = None

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

    async def queue_behind(
        self,
        partition: int,
        key: str,
        report: Callable[[], ParkedReport],
        status: str,
        extra: dict[str, Any],
    ) -> bool:
        """Park a delivery report behind its message's parked reports, if it has any (``report``
        copies the record: only then)."""
        if self.store.count_prefix(partition, PARKED_DELIVERIES) == 0:
            # Nothing parked in the partition (a running count): no lock, no lookup. A report of
            # this message parked by an earlier record would count: records of one message run
            # one after another.
            return False
        async with self.locks.hold(partition, key):
            previous = self.store.get_entry(partition, key)
            if previous is None:
                return False
            queued = report()
            parked = ParkedEntry.from_value(previous.value)
            if parked.holds(queued.source):
                return True  # read again after a crash: already queued
            slug = parked.tenant

            def observe() -> None:
                REPORTS.labels(slug, KIND_DELIVERY, status, RESULT_PARKED).inc()
                log.debug("delivery report queued behind parked ones", extra=extra)

            change = Change(key, previous, parked.queued(queued), previous.due_at, observe=observe)
            await self.write(partition, [change])
            return True

    async def park(
        self,
        partition: int,
        key: str,
        parked: ParkedEntry,
        due_at: float,
        status: str,
        extra: dict[str, Any],
    ) -> None:
        """Park a report until ``due_at``; a replayed record finds its entry and changes nothing,
        a message with parked reports gets this one queued behind them."""
        async with self.locks.hold(partition, key):
            previous = self.store.get_entry(partition, key)
            entry: ParkedEntry = parked
            due: float | None = due_at
            if previous is not None:
                # Only a replayed record finds one; the stored entry and its turn stand.
                existing = ParkedEntry.from_value(previous.value)
                if existing.holds(parked.head.source):
                    return
                entry, due = existing.queued(parked.head), previous.due_at

            def observe() -> None:
                REPORTS.labels(parked.tenant, parked.kind, status, RESULT_PARKED).inc()
                log.debug(
                    "%s report parked until %.0f (%s)",
                    parked.kind,
                    due or 0.0,
                    parked.head.last_result().describe(),
                    extra=extra,
                )

            await self.write(partition, [Change(key, previous, entry, due, observe=observe)])

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

    def _publisher(self) -> Outbox:
        if self.publisher is None:
            raise RuntimeError(f"{STAGE} handler used before start()")
        return self.publisher
