"""The normalizer: joins dispatch records with provider events and emits canonical statuses.

Reads ``sms.dispatches`` and ``sms.provider-events`` (co-partitioned by correlation key, so the
Range assignor puts partition N of both on one member) and writes ``sms.statuses``. The join logic
is ``join.Joiner``; the state per correlation key lives in a ``ChangelogStore`` backed by
``sms.normalizer-state``, so a restarted or rebalanced instance picks up where the last one was.

Every change of a key's state is published together with the statuses and dead letters it caused,
under that key's lock, before the input offset may be committed (the handler publishes itself and
returns nothing to the runner): a record handler and the timers never reorder one key's changelog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from aiokafka import TopicPartition

from services.normalizer import metrics
from services.normalizer.join import Joiner, JoinPolicy, JoinResult, JoinState
from shared.config import Settings
from shared.events import DispatchRecord, E, ProviderEvent, SchemaError, decode
from shared.kafka import KafkaUnavailable, OutRecord, Publisher
from shared.runner import PoisonRecord, Record
from shared.service import ConsumerService, Service, run_service
from shared.store import ChangelogStore, Entry, KeyLocks, PartitionNotReady
from shared.topics import DEAD_LETTERS, DISPATCHES, NORMALIZER_STATE, PROVIDER_EVENTS, STATUSES

log = logging.getLogger(__name__)

NAME = "normalizer"
INPUT_TOPICS = (DISPATCHES.name, PROVIDER_EVENTS.name)


@dataclass(frozen=True)
class _Change:
    """One key's join result, with the entry it replaces (to undo it if publishing fails)."""

    key: str
    previous: Entry | None
    result: JoinResult
    received: ProviderEvent | None = None


class NormalizerHandler:
    """The runner's handler: partition-aware (state restore/drop), with a timer task."""

    def __init__(
        self,
        settings: Settings,
        *,
        timer_interval_s: float = 1.0,
        timer_batch: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.joiner = Joiner(
            JoinPolicy(
                unmatched_after_s=settings.normalizer.unmatched_after_s,
                dlr_timeout_s=settings.normalizer.dlr_timeout_s,
            )
        )
        self.store = ChangelogStore(
            settings.kafka, NORMALIZER_STATE, state_dir=settings.normalizer.state_dir, name=NAME
        )
        self.locks = KeyLocks()
        self.timer_interval_s = timer_interval_s
        self.timer_batch = timer_batch
        self.clock = clock
        self._publisher: Publisher | None = None
        self._timer_task: asyncio.Task[None] | None = None
        # Held by a timer pass; a revoke waits for it so that no timer writes a lost partition.
        self._timer_pass = asyncio.Lock()

    # -- lifecycle (ConsumerService) -----------------------------------------------------------

    async def start(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._timer_task = asyncio.create_task(self._run_timers(), name=f"{NAME}-timers")

    async def stop(self) -> None:
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
        self.store.close()

    async def on_assigned(self, partitions: set[TopicPartition]) -> None:
        numbers = _state_partitions(partitions)
        try:
            await self.store.restore(numbers)
        except KafkaUnavailable as exc:
            # Not fatal: ``handle`` restores a partition before touching it and retries.
            log.warning("%s: restoring state failed (%s); will retry on first use", NAME, exc)

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        async with self._timer_pass:
            self.store.drop(_state_partitions(partitions))

    # -- records -------------------------------------------------------------------------------

    async def handle(self, record: Record) -> Sequence[OutRecord]:
        if record.key is None:
            raise PoisonRecord("record without a key (a correlation key is expected)")
        key = record.key.decode("utf-8", "replace")
        if record.topic == DISPATCHES.name:
            dispatch = _decode(DispatchRecord, record.value)
            await self._change(
                record.partition,
                key,
                lambda state, now: self.joiner.on_dispatch(state, dispatch, now),
            )
        elif record.topic == PROVIDER_EVENTS.name:
            await self._provider_event(record.partition, key, _decode(ProviderEvent, record.value))
        else:
            raise PoisonRecord(f"{NAME} does not read {record.topic}")
        return []

    async def _provider_event(self, partition: int, key: str, event: ProviderEvent) -> None:
        """The one place that routes provider events by kind."""
        if event.kind == "status":
            await self._change(
                partition,
                key,
                lambda state, now: self.joiner.on_status_event(state, event, now),
                received=event,
            )
        else:
            # Replies and STOP need their own stage (opt-out list, Optimove incoming messages).
            raise PoisonRecord(f"{event.kind}: inbound handling not yet built")

    async def _change(
        self,
        partition: int,
        key: str,
        step: Callable[[JoinState | None, float], JoinResult],
        received: ProviderEvent | None = None,
    ) -> None:
        if not self.store.is_ready(partition):
            await self.store.restore({partition})
        async with self.locks.hold(partition, key):
            previous = self.store.get_entry(partition, key)
            state = JoinState.from_value(previous.value) if previous is not None else None
            result = step(state, self.clock())
            await self._publish(partition, [_Change(key, previous, result, received)])

    # -- timers --------------------------------------------------------------------------------

    async def fire_timers(self, now: float) -> int:
        """Run every timer due at ``now`` on the partitions held here; returns how many ran."""
        fired = 0
        async with self._timer_pass:
            for partition in self.store.partitions():
                try:
                    fired += await self._fire_partition(partition, now)
                except KafkaUnavailable:
                    raise
                except Exception:
                    # One partition's bad entry must not stop the timers of the others.
                    log.exception("%s: timers of partition %d failed", NAME, partition)
        return fired

    async def _fire_partition(self, partition: int, now: float) -> int:
        fired = 0
        while self.store.is_ready(partition):
            due = self.store.due(partition, now, limit=self.timer_batch)
            # A key held by a record handler fires on the next pass, with its newer state.
            keys = [key for key, _ in due if not self.locks.is_held(partition, key)]
            if not keys:
                break
            async with contextlib.AsyncExitStack() as held:
                for key in keys:
                    await held.enter_async_context(self.locks.hold(partition, key))
                changes = []
                for key in keys:
                    entry = self.store.get_entry(partition, key)
                    if entry is None or entry.due_at is None or entry.due_at > now:
                        continue
                    state = JoinState.from_value(entry.value)
                    changes.append(_Change(key, entry, self.joiner.on_timer(state, now)))
                await self._publish(partition, changes)
            fired += len(changes)
            if len(due) < self.timer_batch:
                break
        return fired

    async def _run_timers(self) -> None:
        while True:
            await asyncio.sleep(self.timer_interval_s)
            try:
                await self.fire_timers(self.clock())
            except KafkaUnavailable as exc:
                log.warning("%s: timers could not publish (%s); next pass retries", NAME, exc)
            except Exception:
                log.exception("%s: timer pass failed", NAME)

    # -- outputs -------------------------------------------------------------------------------

    async def _publish(self, partition: int, changes: Sequence[_Change]) -> None:
        """Store and publish the changes (statuses, dead letters, changelog) or undo them."""
        if self._publisher is None:
            raise RuntimeError(f"{NAME} handler used before start()")
        outputs: list[OutRecord] = []
        written: list[_Change] = []
        for change in changes:
            result = change.result
            outputs.extend(OutRecord(STATUSES, s.context.message_id, s) for s in result.statuses)
            outputs.extend(
                OutRecord(DEAD_LETTERS, dead.key or change.key, dead)
                for dead in result.dead_letters
            )
            if result.changed:
                value = result.state.to_value() if result.state is not None else None
                due_at = self.joiner.due_at(result.state)
                outputs.append(self.store.put(partition, change.key, value, due_at))
                written.append(change)
        try:
            await self._publisher.publish(outputs)
        except BaseException:
            self._undo(partition, written)
            raise
        for change in changes:
            self._observe(change)

    def _observe(self, change: _Change) -> None:
        """Metrics and logs of a change that Kafka acknowledged."""
        result = change.result
        event = change.received
        if event is not None:
            mapped = self.joiner.classify(event)
            metrics.DLR_RECEIVED.labels(
                event.provider_kind, mapped[0] if mapped else "unknown"
            ).inc()
            if mapped is None:
                log.warning(
                    "unknown %s status ignored",
                    event.provider_kind,
                    extra={
                        "provider_account": event.provider_account,
                        "provider_message_id": event.provider_message_id,
                        "provider_status": event.provider_status[:40],
                    },
                )
        for status in result.statuses:
            metrics.STATUS_CHANGES.labels(status.status).inc()
            log.debug(
                "status %s/%s",
                status.status,
                status.sub_status,
                extra={"message_id": status.context.message_id},
            )
        for reason in result.dropped:
            metrics.STATUS_DROPPED.labels(reason).inc()
        for provider in result.unmatched_providers:
            metrics.DLR_UNMATCHED.labels(provider).inc()
            log.warning("%s provider event dead-lettered: no dispatch record in time", provider)

    def _undo(self, partition: int, written: Iterable[_Change]) -> None:
        """Put back what was stored, so a retry recomputes (and republishes) the same outputs."""
        with contextlib.suppress(PartitionNotReady):  # dropped meanwhile: nothing to undo
            for change in written:
                previous = change.previous
                self.store.put(
                    partition,
                    change.key,
                    previous.value if previous is not None else None,
                    previous.due_at if previous is not None else None,
                )


def _state_partitions(partitions: Iterable[TopicPartition]) -> set[int]:
    return {tp.partition for tp in partitions if tp.topic in INPUT_TOPICS}


def _decode(model: type[E], raw: bytes | None) -> E:
    try:
        return decode(model, raw)
    except SchemaError as exc:
        raise PoisonRecord(str(exc)) from None


def build(settings: Settings) -> Service:
    return ConsumerService(
        name=NAME,
        settings=settings,
        runner_settings=settings.normalizer.runner,
        topics=INPUT_TOPICS,
        handler=NormalizerHandler(settings),
    )


async def main(settings: Settings) -> None:
    await run_service(build(settings), settings.normalizer.metrics_listen)
