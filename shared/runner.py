"""The one poll/process/commit loop every consumer service uses.

Guarantee: at-least-once. A record's offset is committed only after its handler returned and every
output record it produced was acknowledged by Kafka (acks=all). Records are processed concurrently
(up to ``max_in_flight``) but records with the same key run one after another, in offset order, so
the ordering Kafka gives per key survives the concurrency. Commits move a partition's position only
over a contiguous run of finished records.

A handler signals a record it can never process by raising ``PoisonRecord``: the record goes to the
dead-letter topic with the reason and the partition moves on. Any other exception is retried with
backoff; after ``max_handler_attempts`` the record is dead-lettered too, so one bad record can never
stall a partition for good nor vanish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from shared import metrics
from shared.config import RunnerSettings
from shared.events import DeadLetter
from shared.kafka import KafkaUnavailable, OutRecord, Publisher
from shared.topics import DEAD_LETTERS

log = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord[bytes, bytes]


class PoisonRecord(Exception):
    """This record can never be processed; dead-letter it with this reason."""


class Handler(Protocol):
    async def handle(self, record: Record) -> Sequence[OutRecord]:
        """Process one record and return what to publish before its offset may be committed."""
        ...


class OrderedBy(Protocol):
    """Optional on a handler: which records must run one after another.

    Without it, records with the same Kafka key (per partition) are chained. ``ordering_key``
    returns the chain to join, or None when the record needs no ordering at all (for example,
    records the handler batches itself and orders on its own).
    """

    def ordering_key(self, record: Record) -> bytes | None: ...


class PartitionAware(Protocol):
    async def on_assigned(self, partitions: set[TopicPartition]) -> None: ...

    async def on_revoked(self, partitions: set[TopicPartition]) -> None: ...


@dataclass
class _PartitionProgress:
    """Offsets taken from one partition that are not yet known to be done, in offset order."""

    pending: OrderedDict[int, bool] = field(default_factory=OrderedDict)
    timestamps: dict[int, int] = field(default_factory=dict)
    next_offset: int | None = None  # first offset not yet fetched
    committed: int | None = None

    def add(self, offset: int, timestamp_ms: int) -> None:
        self.pending[offset] = False
        self.timestamps[offset] = timestamp_ms
        self.next_offset = offset + 1

    def finish(self, offset: int) -> None:
        if offset in self.pending:
            self.pending[offset] = True
        while self.pending:
            first, done = next(iter(self.pending.items()))
            if not done:
                break
            self.pending.popitem(last=False)
            self.timestamps.pop(first, None)

    def commit_position(self) -> int | None:
        if self.pending:
            return next(iter(self.pending))
        return self.next_offset

    def oldest_pending_timestamp_ms(self) -> int | None:
        if not self.pending:
            return None
        return self.timestamps.get(next(iter(self.pending)))


class ConsumerRunner:
    def __init__(
        self,
        *,
        name: str,
        consumer: AIOKafkaConsumer,
        topics: Sequence[str],
        handler: Handler,
        publisher: Publisher,
        settings: RunnerSettings,
        partition_listener: PartitionAware | None = None,
        max_handler_attempts: int = 5,
    ) -> None:
        self.name = name
        self.consumer = consumer
        self.topics = list(topics)
        self.handler = handler
        self.publisher = publisher
        self.settings = settings
        self.partition_listener = partition_listener
        self.max_handler_attempts = max_handler_attempts
        self._progress: dict[TopicPartition, _PartitionProgress] = {}
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._key_tails: dict[tuple[TopicPartition, bytes | None], asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(max(1, settings.max_in_flight))
        self._stopping = asyncio.Event()
        self._assigned = asyncio.Event()
        self._last_commit = time.monotonic()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._assigned.is_set() and not self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        self.consumer.subscribe(self.topics, listener=_Listener(self))
        try:
            while not self._stopping.is_set():
                await self._poll_once()
                await self._maybe_commit()
        finally:
            await self._drain(set(self._tasks), self.settings.shutdown_deadline_s)
            await self._commit(force=True)

    # -- polling -----------------------------------------------------------------------------

    async def _poll_once(self) -> None:
        free = self._free_slots()
        if free == 0:
            await asyncio.sleep(0.01)
            return
        batches = await self.consumer.getmany(
            timeout_ms=200, max_records=min(free, self.settings.max_poll_records)
        )
        now_ms = int(time.time() * 1000)
        for tp, records in batches.items():
            progress = self._progress.setdefault(tp, _PartitionProgress())
            for record in records:
                await self._slots.acquire()
                progress.add(record.offset, record.timestamp)
                self._start(tp, record)
            self._export_lag(tp, progress, now_ms)

    def _free_slots(self) -> int:
        return self._slots._value

    def _start(self, tp: TopicPartition, record: Record) -> None:
        ordering_key = getattr(self.handler, "ordering_key", None)
        key = ordering_key(record) if callable(ordering_key) else record.key
        unordered = callable(ordering_key) and key is None
        chain_key = (tp, key)
        previous = None if unordered else self._key_tails.get(chain_key)
        task = asyncio.create_task(self._process(tp, record, previous))
        if not unordered:
            self._key_tails[chain_key] = task
        self._tasks.setdefault(tp, set()).add(task)

        def _done(finished: asyncio.Task[None]) -> None:
            self._tasks.get(tp, set()).discard(finished)
            if self._key_tails.get(chain_key) is finished:
                del self._key_tails[chain_key]

        task.add_done_callback(_done)

    async def _process(
        self, tp: TopicPartition, record: Record, previous: asyncio.Task[None] | None
    ) -> None:
        try:
            if previous is not None:
                await asyncio.wait([previous])
            outputs = await self._handle_with_retries(record)
            await self._publish_with_retries(outputs)
            metrics.RECORDS_PROCESSED.labels(self.name, tp.topic).inc()
            metrics.LAST_PROCESSED.labels(self.name, tp.topic).set(time.time())
            progress = self._progress.get(tp)
            if progress is not None:
                progress.finish(record.offset)
        finally:
            self._slots.release()

    async def _handle_with_retries(self, record: Record) -> Sequence[OutRecord]:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.handler.handle(record)
            except PoisonRecord as exc:
                return [self._dead_letter(record, str(exc), attempt)]
            except KafkaUnavailable as exc:
                # Infrastructure, not the record: wait for Kafka for as long as it takes.
                log.warning("%s: kafka unavailable (%s); retrying", self.name, exc)
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(attempt, 6)))
            except Exception as exc:
                if attempt >= self.max_handler_attempts:
                    log.exception("%s: giving up on %s@%s", self.name, record.topic, record.offset)
                    return [self._dead_letter(record, f"{type(exc).__name__}: {exc}", attempt)]
                log.warning(
                    "%s: handler failed on %s@%s (attempt %d): %s",
                    self.name,
                    record.topic,
                    record.offset,
                    attempt,
                    exc,
                )
                await asyncio.sleep(min(10.0, 0.2 * 2**attempt))

    async def _publish_with_retries(self, outputs: Sequence[OutRecord]) -> None:
        attempt = 0
        while outputs:
            attempt += 1
            try:
                await self.publisher.publish(outputs)
                return
            except KafkaUnavailable as exc:
                log.warning("%s: publish failed (%s); retrying", self.name, exc)
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(attempt, 6)))

    def _dead_letter(self, record: Record, reason: str, attempts: int) -> OutRecord:
        metrics.DEAD_LETTERS.labels(self.name, record.topic).inc()
        key = record.key.decode("utf-8", "replace") if record.key is not None else None
        value = record.value or b""
        return OutRecord(
            DEAD_LETTERS,
            key or f"{record.topic}:{record.partition}:{record.offset}",
            DeadLetter(
                source_topic=record.topic,
                stage=self.name,
                reason=reason,
                key=key,
                payload=value.decode("utf-8", "replace"),
                attempts=attempts,
                redrive_topic=record.topic,
            ),
        )

    # -- commits, lag --------------------------------------------------------------------------

    async def _maybe_commit(self) -> None:
        if time.monotonic() - self._last_commit >= self.settings.commit_interval_s:
            await self._commit()

    async def _commit(self, force: bool = False, only: set[TopicPartition] | None = None) -> None:
        self._last_commit = time.monotonic()
        offsets: dict[TopicPartition, int] = {}
        for tp, progress in self._progress.items():
            if only is not None and tp not in only:
                continue
            position = progress.commit_position()
            if position is not None and position != progress.committed:
                offsets[tp] = position
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except Exception as exc:  # rebalance in progress, coordinator moved: next time
            log.warning("%s: commit failed (%s)", self.name, exc)
            if force:
                log.warning("%s: uncommitted work will be redelivered", self.name)
            return
        for tp, position in offsets.items():
            self._progress[tp].committed = position

    def _export_lag(self, tp: TopicPartition, progress: _PartitionProgress, now_ms: int) -> None:
        highwater = self.consumer.highwater(tp)
        position = progress.commit_position()
        if highwater is not None and position is not None:
            metrics.CONSUMER_LAG.labels(self.name, tp.topic, str(tp.partition)).set(
                max(0, highwater - position)
            )
        oldest = progress.oldest_pending_timestamp_ms()
        age = 0.0 if oldest is None else max(0.0, (now_ms - oldest) / 1000)
        metrics.CONSUMER_LAG_SECONDS.labels(self.name, tp.topic, str(tp.partition)).set(age)

    async def _drain(self, partitions: set[TopicPartition], deadline_s: float) -> None:
        tasks = [t for tp in partitions for t in self._tasks.get(tp, set())]
        if tasks:
            _, unfinished = await asyncio.wait(tasks, timeout=deadline_s)
            for task in unfinished:
                task.cancel()

    # -- rebalance -----------------------------------------------------------------------------

    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._drain(revoked, self.settings.shutdown_deadline_s)
        await self._commit(force=True, only=revoked)
        for tp in revoked:
            self._progress.pop(tp, None)
            self._tasks.pop(tp, None)
        if self.partition_listener is not None:
            await self.partition_listener.on_revoked(revoked)

    async def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self.partition_listener is not None:
            await self.partition_listener.on_assigned(assigned)
        self._assigned.set()


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: ConsumerRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.runner.partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.runner.partitions_assigned(set(assigned))
