"""The one poll/process/commit loop every consumer service uses.

At-least-once: a record's offset is committed only after its handler returned and every output it
produced was acknowledged by Kafka. Records run concurrently (``max_in_flight``), one after another
per key. ``PoisonRecord`` dead-letters a record at once; any other failure is retried
(``HANDLER_RETRY``) and dead-lettered after ``max_handler_attempts``; Kafka being unavailable is
waited for. A handler returns its outputs (``Handler``) or declares that it publishes them itself
(``SelfPublishing``); ``OrderedBy``, ``PartitionAware`` and ``Paced`` (records that wait in the
log by lane, ``backlog.py``) are optional abilities found by type.
Commits, lag and shutdown: docs/architecture.md, "The consumer runner".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Hashable, Sequence
from typing import Protocol, TypeAlias, runtime_checkable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from shared import metrics
from shared.config import RunnerSettings
from shared.contract.events import DeadLetter, E, SchemaError, decode
from shared.contract.topics import DEAD_LETTERS
from shared.kafka.backlog import Backlog
from shared.kafka.clients import KafkaUnavailable, OutRecord, Publisher
from shared.kafka.lag import LagExporter, PartitionProgress
from shared.kafka.outbox import Outbox
from shared.retry import RetryPolicy, retry
from shared.tasks import finish_or_cancel

log = logging.getLogger(__name__)

# A failing handler is retried with these waits (a record's attempts are counted across failures).
HANDLER_RETRY = RetryPolicy(base_s=0.4, cap_s=30.0)
# Outputs Kafka did not take are published again with these waits, for as long as it takes.
PUBLISH_RETRY = RetryPolicy(base_s=1.0, cap_s=30.0)

Record: TypeAlias = ConsumerRecord[bytes, bytes]


class PoisonRecord(Exception):
    """This record can never be processed; dead-letter it with this reason."""


def decode_or_poison(model: type[E], raw: bytes | None) -> E:
    """``raw`` decoded as ``model``; a record that cannot be is poison (dead-lettered)."""
    try:
        return decode(model, raw)
    except SchemaError as exc:
        raise PoisonRecord(str(exc)) from None


class Handler(Protocol):
    """A handler whose outputs the runner publishes (before the record's offset is committed)."""

    async def handle(self, record: Record) -> Sequence[OutRecord]:
        """Process one record and return what to publish before its offset may be committed."""
        ...


class SelfPublishing(ABC):
    """A handler that publishes its own outputs (through the publisher its ``start`` got), all
    acknowledged by Kafka before ``handle`` returns: the runner has nothing left to publish."""

    @abstractmethod
    async def handle(self, record: Record) -> None: ...


# What a consumer service runs: one of the two, declared by type.
RecordHandler: TypeAlias = Handler | SelfPublishing


@runtime_checkable
class OrderedBy(Protocol):
    """Optional on a handler: which records must run one after another.

    Without it, records with the same Kafka key (per partition) are chained. ``ordering_key``
    returns the chain to join, or None when the record needs no ordering at all (for example,
    records the handler batches itself and orders on its own).
    """

    def ordering_key(self, record: Record) -> bytes | None: ...


@runtime_checkable
class PartitionAware(Protocol):
    """Optional on a handler: told of the partitions it gains and loses (to restore state)."""

    async def on_assigned(self, partitions: set[TopicPartition]) -> None: ...

    async def on_revoked(self, partitions: set[TopicPartition]) -> None: ...


class ConsumerRunner:
    """Polls ``topics``, runs ``handler`` on each record, publishes, commits (module docstring)."""

    def __init__(
        self,
        *,
        name: str,
        consumer: AIOKafkaConsumer,
        topics: Sequence[str],
        handler: RecordHandler,
        publisher: Publisher,
        settings: RunnerSettings,
        partition_listener: PartitionAware | None = None,
        max_handler_attempts: int = 5,
        tansu_lag: bool = False,
        backlog: Backlog | None = None,
    ) -> None:
        """``tansu_lag``: the Tansu fallback's lag workaround (``shared/kafka/lag.py``);
        ``backlog``: where a ``Paced`` handler's records wait (``shared/kafka/backlog.py``)."""
        self.name = name
        self.consumer = consumer
        self.topics = list(topics)
        self.handler = handler
        self._ordered_by = handler if isinstance(handler, OrderedBy) else None
        # The outputs of every record finished in one turn of the event loop share a publish.
        self._outputs = Outbox(publisher, name=f"{name}-outputs")
        self.settings = settings
        self.partition_listener = partition_listener
        self.max_handler_attempts = max_handler_attempts
        self._progress: dict[TopicPartition, PartitionProgress] = {}
        # Reads ``_progress`` (shared, never replaced) to export each partition's lag.
        self._lag = LagExporter(name, consumer, self._progress, tansu=tansu_lag)
        self._backlog = backlog
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._key_tails: dict[tuple[TopicPartition, bytes | None], asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(max(1, settings.max_in_flight))
        # With ``hold_slots_until_committed``: finished offsets whose slot waits for a commit.
        self._held: dict[TopicPartition, list[int]] = {}
        self._stopping = asyncio.Event()
        self._assigned = asyncio.Event()
        self._last_commit = time.monotonic()
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
        lag_task = asyncio.create_task(self._lag.run_forever(), name=f"{self.name}-lag")
        helpers = [lag_task]
        if self._backlog is not None:
            feeding = self._backlog.feed(self._free_slots, self._start_read_back)
            helpers.append(asyncio.create_task(feeding, name=f"{self.name}-backlog"))
        try:
            while not self._stopping.is_set():
                await self._poll_once()
                await self._maybe_commit()
        finally:
            for helper in helpers:
                helper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
            await self._drain(set(self._tasks), self._drain_s)
            await self._commit(force=True)
            self._lag.forget(self._progress)

    # -- polling -----------------------------------------------------------------------------

    async def _poll_once(self) -> None:
        free = self._free_slots()
        if free == 0 or (self._backlog is not None and self._backlog.full()):
            await asyncio.sleep(0.01)
            return
        batches = await self.consumer.getmany(
            timeout_ms=200, max_records=min(free, self.settings.max_poll_records)
        )
        for tp, records in batches.items():
            progress = self._progress.setdefault(tp, PartitionProgress())
            # Pending from now on: a record waiting for its key's predecessor ages in the lag.
            if self._backlog is not None:
                taken = self._backlog.take_or_wait(tp, records, progress)
            else:
                taken = [(record, None) for record in records]
                for record in records:
                    progress.add(record.offset, record.timestamp)
            for record, lane in taken:
                await self._slots.acquire()
                self._start(tp, record, lane)

    def _free_slots(self) -> int:
        return self._slots._value

    async def _start_read_back(self, tp: TopicPartition, record: Record, lane: Hashable) -> bool:
        """Start a record the backlog read back; False if ``tp`` was revoked meanwhile."""
        if tp not in self._progress:
            return False
        await self._slots.acquire()
        self._start(tp, record, lane, taken=True)
        return True

    def _start(
        self, tp: TopicPartition, record: Record, lane: Hashable = None, taken: bool = False
    ) -> None:
        """``taken``: read back from the backlog (its progress is the backlog's)."""
        ordered_by = self._ordered_by
        key = ordered_by.ordering_key(record) if ordered_by is not None else record.key
        unordered = ordered_by is not None and key is None
        chain_key = (tp, key)
        previous = None if unordered else self._key_tails.get(chain_key)
        task = asyncio.create_task(self._process(tp, record, previous, lane, taken))
        if not unordered:
            self._key_tails[chain_key] = task
        self._tasks.setdefault(tp, set()).add(task)

        def _done(finished: asyncio.Task[None]) -> None:
            self._tasks.get(tp, set()).discard(finished)
            if self._key_tails.get(chain_key) is finished:
                del self._key_tails[chain_key]

        task.add_done_callback(_done)

    async def _process(
        self,
        tp: TopicPartition,
        record: Record,
        previous: asyncio.Task[None] | None,
        lane: Hashable = None,
        taken: bool = False,
    ) -> None:
        held = False
        finished = False
        try:
            if previous is not None and not previous.done():
                await _finished(previous)
            outputs = await self._handle_with_retries(record)
            await self._publish_with_retries(outputs)
            metrics.RECORDS_PROCESSED.labels(self.name, tp.topic).inc()
            metrics.LAST_PROCESSED.labels(self.name, tp.topic).set(time.time())
            self.finished_records += 1
            finished = True
            progress = self._progress.get(tp)
            if taken:
                pass  # its offset is the backlog's: released below
            elif progress is not None:
                progress.finish(record.offset)
                if self.settings.hold_slots_until_committed:
                    # Released by the commit that covers it (or by the revoke).
                    self._held.setdefault(tp, []).append(record.offset)
                    held = True
        finally:
            if self._backlog is not None:
                # An unfinished record read back stays taken: it holds the commit back.
                self._backlog.finished(tp, record.offset, lane, taken=taken and finished)
            if not held:
                self._slots.release()

    async def _handle_with_retries(self, record: Record) -> Sequence[OutRecord]:
        """The record's outputs, or its dead letter: poison at once, any other failure after
        ``max_handler_attempts`` (Kafka being unavailable is waited for as long as it takes)."""
        try:  # most records pass at once, and need none of the retry set-up below
            return await self._handle_once(record)
        except Exception as exc:
            first_failure = exc
        attempts = 1

        async def attempt() -> Sequence[OutRecord]:
            nonlocal attempts
            attempts += 1
            return await self._handle_once(record)

        def give_up(exc: Exception) -> bool:
            if isinstance(exc, PoisonRecord):
                return True
            return not isinstance(exc, KafkaUnavailable) and attempts >= self.max_handler_attempts

        def log_retry(attempt: int, exc: Exception, wait_s: float) -> None:
            if isinstance(exc, KafkaUnavailable):
                # Infrastructure, not the record.
                log.warning("%s: kafka unavailable (%s); retrying", self.name, exc)
                return
            log.warning(
                "%s: handler failed on %s@%s (attempt %d): %s",
                self.name,
                record.topic,
                record.offset,
                attempts,
                exc,
            )

        try:
            return await retry(
                attempt,
                HANDLER_RETRY,
                give_up=give_up,
                on_retry=log_retry,
                first_failure=first_failure,
            )
        except PoisonRecord as exc:
            return [dead_letter(self.name, record, str(exc), attempts)]
        except Exception as exc:
            log.exception("%s: giving up on %s@%s", self.name, record.topic, record.offset)
            return [dead_letter(self.name, record, f"{type(exc).__name__}: {exc}", attempts)]

    async def _handle_once(self, record: Record) -> Sequence[OutRecord]:
        if isinstance(self.handler, SelfPublishing):
            await self.handler.handle(record)
            return ()
        return await self.handler.handle(record)

    async def _publish_with_retries(self, outputs: Sequence[OutRecord]) -> None:
        if not outputs:
            return
        try:
            return await self._outputs.publish(outputs)
        except KafkaUnavailable as exc:
            first_failure = exc

        def log_retry(attempt: int, exc: Exception, wait_s: float) -> None:
            log.warning("%s: publish failed (%s); retrying", self.name, exc)

        await retry(
            lambda: self._outputs.publish(outputs),
            PUBLISH_RETRY,
            on=KafkaUnavailable,
            on_retry=log_retry,
            first_failure=first_failure,
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
            waiting = self._backlog.first_offset(tp) if self._backlog is not None else None
            if waiting is not None and position is not None:
                position = min(position, waiting)
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

    async def _drain(self, partitions: set[TopicPartition], deadline_s: float) -> None:
        """Let in-flight records of ``partitions`` finish within ``deadline_s``; cancel the rest.

        A cancelled record stays pending, so its offset (and every later one of its partition)
        is not committed: it is handed back to whoever owns the partition next.
        """
        tasks = [t for tp in partitions for t in self._tasks.get(tp, set())]
        if cancelled := await finish_or_cancel(tasks, deadline_s):
            log.warning(
                "%s: %d records unfinished after %.1fs; handed back uncommitted",
                self.name,
                cancelled,
                deadline_s,
            )

    # -- rebalance -----------------------------------------------------------------------------

    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._drain(revoked, self._drain_s)
        await self._commit(force=True, only=revoked)
        self._lag.forget(revoked)
        for tp in revoked:
            self._release_held(tp)
            self._progress.pop(tp, None)
            self._tasks.pop(tp, None)
        if self._backlog is not None:
            self._backlog.drop(revoked)
        if self.partition_listener is not None:
            await self.partition_listener.on_revoked(revoked)

    async def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self.partition_listener is not None:
            await self.partition_listener.on_assigned(assigned)
        self._assigned.set()


def dead_letter(stage: str, record: Record, reason: str, attempts: int) -> OutRecord:
    """The dead letter of ``record``, which ``stage`` gave up on (``reason``), to re-drive later."""
    metrics.DEAD_LETTERS.labels(stage, record.topic).inc()
    key = record.key.decode("utf-8", "replace") if record.key is not None else None
    value = record.value or b""
    return OutRecord(
        DEAD_LETTERS,
        key or f"{record.topic}:{record.partition}:{record.offset}",
        DeadLetter(
            source_topic=record.topic,
            stage=stage,
            reason=reason,
            key=key,
            payload=value.decode("utf-8", "replace"),
            attempts=attempts,
            redrive_topic=record.topic,
        ),
    )


def _finished(task: asyncio.Task[None]) -> asyncio.Future[None]:
    """A future done when ``task`` is, whatever its end; cancelling it leaves ``task`` alone.
    ``asyncio.wait([task])`` does the same at several times the cost, once per keyed record."""
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def settle(_: asyncio.Task[None]) -> None:
        if not finished.done():
            finished.set_result(None)

    task.add_done_callback(settle)
    return finished


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
