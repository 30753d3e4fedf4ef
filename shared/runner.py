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

Lag, per assigned partition, refreshed every ``LAG_EXPORT_INTERVAL_S`` whether records arrive or
not (an idle partition reads 0 messages / 0 s, never its last busy value):

- messages: as KEDA, Burrow and kafka-exporter compute it, the partition's end offset (ListOffsets)
  minus the group's committed offset. On the Tansu fallback, whose ListOffsets(latest) is wrong,
  the end offset is the high watermark of the latest fetch response instead (confirmed by
  ListOffsets when stale: aiokafka stops fetching a partition whose records it still buffers), and
  the position is the first unfinished offset.
- seconds: the age of the oldest unfinished record. A record taken but not started (waiting for a
  slot or for its key's predecessor) is pending with its timestamp; records not taken yet (still
  in aiokafka's buffer or on the broker) are aged by when the high watermark was first seen past
  the position, a lower bound that keeps growing while nothing moves.

Shutdown (``stop``): intake stops at once; in-flight records get the drain budget to finish, the
rest are cancelled and handed back (their offsets stay uncommitted, so the next owner of the
partition reprocesses them); then the finished prefix of every partition is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError
from aiokafka.structs import ConsumerRecord

from shared import metrics
from shared.config import RunnerSettings
from shared.events import DeadLetter
from shared.kafka import KafkaUnavailable, OutRecord, Publisher
from shared.outbox import Outbox
from shared.topics import DEAD_LETTERS

log = logging.getLogger(__name__)

# How often every assigned partition's lag gauges are recomputed.
LAG_EXPORT_INTERVAL_S = 1.0
# A high watermark older than this (no fetch response since) is confirmed with ListOffsets.
HIGHWATER_STALE_AFTER_S = 5.0
# How long a ListOffsets round trip may take (in the lag task, never holding up polling).
END_OFFSETS_TIMEOUT_S = 5.0
# How many rises of the high watermark are remembered to age records not yet taken.
HIGHWATER_HISTORY = 256

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
class PartitionProgress:
    """Offsets taken from one partition that are not yet known to be done, in offset order."""

    pending: OrderedDict[int, bool] = field(default_factory=OrderedDict)
    timestamps: dict[int, int] = field(default_factory=dict)
    next_offset: int | None = None  # first offset not yet taken
    committed: int | None = None
    # (high watermark, unix time it was first seen), rising; only marks past the position.
    highwater_seen: deque[tuple[int, float]] = field(default_factory=deque)

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

    def observe_highwater(self, highwater: int, now_s: float) -> None:
        if not self.highwater_seen or highwater > self.highwater_seen[-1][0]:
            self.highwater_seen.append((highwater, now_s))
            if len(self.highwater_seen) > HIGHWATER_HISTORY:
                # The first mark dates the oldest record not taken: keep it, thin the rest.
                del self.highwater_seen[1]
        position = self.commit_position()
        if position is None:
            return
        while self.highwater_seen and self.highwater_seen[0][0] <= position:
            self.highwater_seen.popleft()

    def lag(
        self, highwater: int | None, now_s: float, *, from_committed: bool = False
    ) -> PartitionLag:
        """Messages behind ``highwater`` and age of the oldest unfinished record at ``now_s``.

        ``from_committed``: count from the committed offset, as the broker's own tools do.
        """
        position = self.commit_position()
        if from_committed and self.committed is not None:
            position = self.committed
        messages = 0
        if highwater is not None and position is not None:
            messages = max(0, highwater - position)
        oldest_ms = self.oldest_pending_timestamp_ms()
        if oldest_ms is not None:
            seconds = now_s - oldest_ms / 1000
        elif messages and self.highwater_seen:
            # Not taken yet: it existed when the watermark was first seen past the position.
            seconds = now_s - self.highwater_seen[0][1]
        else:
            seconds = 0.0
        return PartitionLag(messages, max(0.0, seconds))


@dataclass(frozen=True)
class PartitionLag:
    messages: int
    seconds: float


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
        tansu_lag: bool = False,
    ) -> None:
        """``tansu_lag``: the Tansu fallback's lag workaround (module docstring)."""
        self.name = name
        self.consumer = consumer
        self.topics = list(topics)
        self.handler = handler
        # The outputs of every record finished in one turn of the event loop share a publish.
        self._outputs = Outbox(publisher, name=f"{name}-outputs")
        self.settings = settings
        self.partition_listener = partition_listener
        self.max_handler_attempts = max_handler_attempts
        self._tansu_lag = tansu_lag
        self._progress: dict[TopicPartition, PartitionProgress] = {}
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._key_tails: dict[tuple[TopicPartition, bytes | None], asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(max(1, settings.max_in_flight))
        # With ``hold_slots_until_committed``: finished offsets whose slot waits for a commit.
        self._held: dict[TopicPartition, list[int]] = {}
        self._stopping = asyncio.Event()
        self._assigned = asyncio.Event()
        self._last_commit = time.monotonic()
        self._last_lag_export = 0.0
        self._drain_s = settings.shutdown_deadline_s
        # Records whose handler finished and whose outputs Kafka acknowledged, since start.
        self.finished_records = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._assigned.is_set() and not self._stopping.is_set()

    def stop(self, drain_s: float | None = None) -> None:
        """Take no more records; in-flight ones get ``drain_s`` (default: the deadline) to end."""
        if drain_s is not None:
            self._drain_s = max(0.0, drain_s)
        self._stopping.set()

    async def run(self) -> None:
        self.consumer.subscribe(self.topics, listener=_Listener(self))
        # Its own task: a slow position or end-offsets lookup must never hold up polling.
        lag_task = asyncio.create_task(self._export_lag_forever(), name=f"{self.name}-lag")
        try:
            while not self._stopping.is_set():
                await self._poll_once()
                await self._maybe_commit()
        finally:
            lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag_task
            await self._drain(set(self._tasks), self._drain_s)
            await self._commit(force=True)
            self._forget_lag(self._progress)

    # -- polling -----------------------------------------------------------------------------

    async def _poll_once(self) -> None:
        free = self._free_slots()
        if free == 0:
            await asyncio.sleep(0.01)
            return
        batches = await self.consumer.getmany(
            timeout_ms=200, max_records=min(free, self.settings.max_poll_records)
        )
        for tp, records in batches.items():
            progress = self._progress.setdefault(tp, PartitionProgress())
            # Pending from now on: a record waiting for its key's predecessor ages in the lag.
            for record in records:
                progress.add(record.offset, record.timestamp)
            for record in records:
                await self._slots.acquire()
                self._start(tp, record)

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
        held = False
        try:
            if previous is not None:
                await asyncio.wait([previous])
            outputs = await self._handle_with_retries(record)
            await self._publish_with_retries(outputs)
            metrics.RECORDS_PROCESSED.labels(self.name, tp.topic).inc()
            metrics.LAST_PROCESSED.labels(self.name, tp.topic).set(time.time())
            self.finished_records += 1
            progress = self._progress.get(tp)
            if progress is not None:
                progress.finish(record.offset)
                if self.settings.hold_slots_until_committed:
                    # Released by the commit that covers it (or by the revoke).
                    self._held.setdefault(tp, []).append(record.offset)
                    held = True
        finally:
            if not held:
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
                await self._outputs.publish(outputs)
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
            self._release_held(tp, below=position)

    def _release_held(self, tp: TopicPartition, below: int | None = None) -> None:
        """Free the slots of finished records of ``tp`` before ``below`` (None: all of them)."""
        held = self._held.pop(tp, [])
        keep = [offset for offset in held if below is not None and offset >= below]
        for _ in range(len(held) - len(keep)):
            self._slots.release()
        if keep:
            self._held[tp] = keep

    async def _export_lag_forever(self) -> None:
        while True:
            try:
                await self.export_lag()
            except Exception:
                log.exception("%s: lag export failed", self.name)
            await asyncio.sleep(LAG_EXPORT_INTERVAL_S)

    async def export_lag(self) -> dict[TopicPartition, PartitionLag]:
        """Recompute and export the lag of every assigned partition; returns what it exported."""
        unknown = [
            tp
            for tp in self.consumer.assignment()
            if self._progress.setdefault(tp, PartitionProgress()).next_offset is None
        ]
        if unknown:
            # Nothing taken yet from these: start from where the consumer will fetch.
            positions = await asyncio.gather(
                *(asyncio.wait_for(self.consumer.position(tp), 1.0) for tp in unknown),
                return_exceptions=True,
            )
            for tp, position in zip(unknown, positions, strict=True):
                progress = self._progress.get(tp)
                if (
                    isinstance(position, int)
                    and progress is not None
                    and progress.next_offset is None
                ):
                    # A new assignment starts at the group's committed offset (or the reset one).
                    progress.next_offset = position
                    if progress.committed is None:
                        progress.committed = position
        assignment = self.consumer.assignment()
        if self._tansu_lag:
            highwaters = await self._highwaters(assignment)
        else:
            highwaters = await self._end_offsets(assignment)
        now_s = time.time()
        exported: dict[TopicPartition, PartitionLag] = {}
        # No await from here on: a partition revoked meanwhile is not in this assignment.
        for tp in self.consumer.assignment():
            progress = self._progress.get(tp)
            if progress is None:
                continue
            highwater = highwaters.get(tp)
            if highwater is not None:
                progress.observe_highwater(highwater, now_s)
            lag = progress.lag(highwater, now_s, from_committed=not self._tansu_lag)
            labels = (self.name, tp.topic, str(tp.partition))
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(*labels).set(lag.messages)
            metrics.CONSUMER_LAG_SECONDS.labels(*labels).set(lag.seconds)
            exported[tp] = lag
        return exported

    async def _end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Each partition's end offset, from the broker (ListOffsets latest)."""
        wanted = list(partitions)
        if not wanted:
            return {}
        try:
            ends = await asyncio.wait_for(self.consumer.end_offsets(wanted), END_OFFSETS_TIMEOUT_S)
        except Exception as exc:
            log.debug("%s: end offsets unavailable (%s)", self.name, exc)
            return {}
        return {tp: end for tp, end in ends.items() if end is not None}

    async def _highwaters(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Each partition's end offset: the fetched high watermark, confirmed if it is stale."""
        result: dict[TopicPartition, int] = {}
        stale: list[TopicPartition] = []
        now_ms = time.time() * 1000
        for tp in partitions:
            try:
                highwater = self.consumer.highwater(tp)
                last_fetch_ms = self.consumer.last_poll_timestamp(tp)
            except (AssertionError, IllegalStateError):  # revoked since the assignment was read
                continue
            if highwater is None:
                continue
            result[tp] = highwater
            if last_fetch_ms is None or now_ms - last_fetch_ms > HIGHWATER_STALE_AFTER_S * 1000:
                stale.append(tp)
        if stale:
            # Stale means aiokafka holds unread records of the partition, so it is not empty:
            # any answer, even a broker's wrong one, is at most the true end, never past it.
            try:
                ends = await asyncio.wait_for(self.consumer.end_offsets(stale), 2.0)
            except Exception as exc:
                log.debug("%s: end offsets unavailable (%s)", self.name, exc)
            else:
                for tp, end in ends.items():
                    if end is not None and tp in result:
                        result[tp] = max(result[tp], end)
        return result

    def _forget_lag(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop the gauges of partitions no longer held here: their new owner reports them."""
        for tp in list(partitions):
            labels = (self.name, tp.topic, str(tp.partition))
            for gauge in (metrics.CONSUMER_LAG, metrics.CONSUMER_LAG_SECONDS):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)

    async def _drain(self, partitions: set[TopicPartition], deadline_s: float) -> None:
        """Let in-flight records of ``partitions`` finish within ``deadline_s``; cancel the rest.

        A cancelled record stays pending, so its offset (and every later one of its partition)
        is not committed: it is handed back to whoever owns the partition next.
        """
        tasks = [t for tp in partitions for t in self._tasks.get(tp, set())]
        if not tasks:
            return
        _, unfinished = await asyncio.wait(tasks, timeout=deadline_s)
        if unfinished:
            log.warning(
                "%s: %d records unfinished after %.1fs; handed back uncommitted",
                self.name,
                len(unfinished),
                deadline_s,
            )
            for task in unfinished:
                task.cancel()
            await asyncio.wait(unfinished, timeout=1.0)

    # -- rebalance -----------------------------------------------------------------------------

    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._drain(revoked, self._drain_s)
        await self._commit(force=True, only=revoked)
        self._forget_lag(revoked)
        for tp in revoked:
            self._release_held(tp)
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
        async with _inner_cancellation_tolerated(self.runner.name, "partitions revoked"):
            await self.runner.partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        async with _inner_cancellation_tolerated(self.runner.name, "partitions assigned"):
            await self.runner.partitions_assigned(set(assigned))


@contextlib.asynccontextmanager
async def _inner_cancellation_tolerated(name: str, what: str) -> AsyncIterator[None]:
    """Absorb a CancelledError raised by work the listener awaited, not aimed at this task.

    A handler stopped while a rebalance callback waits on it (a state restore it cancels)
    raises CancelledError into aiokafka's coordinator, which would then die and leave the
    consumer unable to close. A cancellation of this task itself still goes through.
    """
    try:
        yield
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.warning("%s: %s callback interrupted (stopping)", name, what)
