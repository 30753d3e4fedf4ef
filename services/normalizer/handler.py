"""The normalizer's record handler: joins dispatch records with provider events into statuses.

Reads ``sms.dispatches`` and ``sms.provider-events`` (co-partitioned by correlation key) and
writes ``sms.statuses``; replies and STOPs become ``sms.inbound``, ``sms.last-inbound`` and
``sms.opt-outs`` records. The join is ``join.Joiner``, reply routing ``replies.ReplyRouter``, the
records a change puts on Kafka ``outputs.py``. The state per correlation key lives on
``sms.normalizer-state``; every change is published with its outputs, under its key's lock,
before the offset may be committed. Explained once in ``docs/normalizer.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from functools import partial

from aiokafka import TopicPartition

from services.normalizer import metrics
from services.normalizer.join import Joiner, JoinPolicy, JoinResult, JoinState
from services.normalizer.outputs import (
    NAME,
    Change,
    Reply,
    number_format_output,
    observe,
    reply_outputs,
    result_outputs,
)
from services.normalizer.replies import (
    NumberDirectory,
    ReplyRouter,
    UnroutableReply,
    tenants_by_account,
)
from shared.config import Settings
from shared.contract.events import (
    DispatchRecord,
    ProviderEvent,
)
from shared.contract.topics import (
    DISPATCHES,
    NORMALIZER_STATE,
    NUMBER_FORMATS,
    PROVIDER_EVENTS,
)
from shared.kafka.clients import KafkaUnavailable, Publisher
from shared.kafka.outbox import Outbox
from shared.kafka.runner import PoisonRecord, Record, SelfPublishing, decode_or_poison
from shared.kafka.store import ChangelogStore, Entry, GlobalTable, KeyLocks
from shared.kafka.timers import fire_partitions, run_timer_passes
from shared.kafka.unit_of_work import UnitOfWork
from shared.live_config import on_reload

log = logging.getLogger(__name__)

INPUT_TOPICS = (DISPATCHES, PROVIDER_EVENTS)
# Store keys of forwarded replies' event ids. Correlation keys start with a provider account
# name or "message:", so these never meet a join entry.
SEEN_REPLY_PREFIX = "seen-reply#"


class NormalizerHandler(SelfPublishing):
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
                keep_finished_s=settings.normalizer.keep_finished_s,
                number_window_s=settings.normalizer.match_by_number_window_s,
                max_messages_per_number=settings.normalizer.match_by_number_max_messages,
            )
        )
        self.store = ChangelogStore(
            settings.kafka, NORMALIZER_STATE, state_dir=settings.normalizer.state_dir, name=NAME
        )
        self.number_formats = GlobalTable(
            settings.kafka, NUMBER_FORMATS, name=f"{NAME}-number-formats"
        )
        self.directory = NumberDirectory(
            self.number_formats.get,
            refresh_s=settings.normalizer.number_format_refresh_s,
            tenants_by_account=tenants_by_account(settings.tenants),
        )
        self.replies = ReplyRouter.from_settings(settings, self.directory)
        on_reload(self.tenants_changed)
        self.inbound_dedupe_s = settings.normalizer.inbound_dedupe_s
        self.locks = KeyLocks()
        self.timer_interval_s = timer_interval_s
        self.timer_batch = timer_batch
        self.clock = clock
        self._outbox: Outbox | None = None
        self._timer_task: asyncio.Task[None] | None = None
        # Held by a timer pass; a revoke waits for it so that no timer writes a lost partition.
        self._timer_pass = asyncio.Lock()

    # -- lifecycle (ConsumerService) -----------------------------------------------------------

    def tenants_changed(self, settings: Settings) -> None:
        """A live reload (shared/live_config.py): replies route by the tenants in force."""
        self.directory.tenants_by_account = dict(tenants_by_account(settings.tenants))
        self.replies = ReplyRouter.from_settings(settings, self.directory)

    async def start(self, publisher: Publisher) -> None:
        self._outbox = Outbox(publisher, name=NAME)
        # Replies need the directory caught up, or their ``from`` would fall back to digits.
        await self.number_formats.start()
        self._timer_task = asyncio.create_task(self._run_timers(), name=f"{NAME}-timers")

    async def stop(self) -> None:
        if self._timer_task is not None:
            # A pass under way finishes first: cancelled between two sends, it could leave a
            # status on Kafka without the changelog record saying it was emitted.
            async with self._timer_pass:
                self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
        await self.number_formats.stop()
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

    async def handle(self, record: Record) -> None:
        if record.key is None:
            raise PoisonRecord("record without a key (a correlation key is expected)")
        key = record.key.decode("utf-8", "replace")
        if record.topic == DISPATCHES.name:
            dispatch = decode_or_poison(DispatchRecord, record.value)
            await self._change(
                record.partition,
                key,
                lambda state, now: self.joiner.on_dispatch(state, dispatch, now),
                joins=dispatch,
            )
        elif record.topic == PROVIDER_EVENTS.name:
            await self._provider_event(
                record.partition, key, decode_or_poison(ProviderEvent, record.value)
            )
        else:
            raise PoisonRecord(f"{NAME} does not read {record.topic}")

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
            await self._reply(partition, key, event)

    async def _change(
        self,
        partition: int,
        key: str,
        step: Callable[[JoinState | None, float], JoinResult],
        received: ProviderEvent | None = None,
        joins: DispatchRecord | None = None,
    ) -> None:
        if not self.store.is_ready(partition):
            await self.store.restore({partition})
        async with self.locks.hold(partition, key):
            previous = self.store.get_entry(partition, key)
            state = JoinState.from_value(previous.value) if previous is not None else None
            now = self.clock()
            result = step(state, now)
            number_format = None
            if joins is not None and (state is None or state.dispatch is None):
                number_format = self.directory.update_for(joins, datetime.fromtimestamp(now, UTC))
            replies = self._released(partition, result)
            await self._publish(
                partition, [Change(key, previous, result, received, number_format, replies)]
            )

    # -- replies -------------------------------------------------------------------------------

    async def _reply(self, partition: int, key: str, event: ProviderEvent) -> None:
        """Forward a reply (and its opt-out change) once per provider event id."""
        if not self.store.is_ready(partition):
            await self.store.restore({partition})
        async with self.locks.hold(partition, key):
            previous = self.store.get_entry(partition, key)
            state = JoinState.from_value(previous.value) if previous is not None else None
            if self._forwarded(partition, event) or (
                state is not None and event.event_id in state.seen_event_ids
            ):
                metrics.INBOUND_DUPLICATES.labels(event.provider_kind).inc()
                return
            dispatch = state.dispatch if state is not None else None
            try:
                routed = self.replies.route(event, dispatch)
            except UnroutableReply as exc:
                if dispatch is None and event.provider_message_id:
                    # Its message's dispatch record may still be on its way: it names the tenant.
                    held = self.joiner.hold_reply(state, event, self.clock())
                    await self._publish(partition, [Change(key, previous, held)])
                    metrics.INBOUND_HELD.labels(event.provider_kind).inc()
                    log.info(
                        "%s held for its dispatch record",
                        event.kind,
                        extra={"provider_account": event.provider_account},
                    )
                    return
                # Not marked as forwarded: a re-driven copy gets another chance.
                metrics.INBOUND_UNROUTABLE.labels(event.provider_kind).inc()
                raise PoisonRecord(f"{event.kind}: {exc}") from None
            unchanged = JoinResult(state)
            await self._publish(
                partition, [Change(key, previous, unchanged, replies=(Reply(event, routed),))]
            )

    def _forwarded(self, partition: int, event: ProviderEvent) -> bool:
        return self.store.get_entry(partition, SEEN_REPLY_PREFIX + event.event_id) is not None

    def _released(self, partition: int, result: JoinResult) -> tuple[Reply, ...]:
        """Route the replies a dispatch record released, with that dispatch."""
        dispatch = result.state.dispatch if result.state is not None else None
        replies: list[Reply] = []
        for event in result.released_replies:
            if self._forwarded(partition, event):
                metrics.INBOUND_DUPLICATES.labels(event.provider_kind).inc()
                continue
            try:
                replies.append(Reply(event, routed=self.replies.route(event, dispatch)))
            except UnroutableReply as exc:
                replies.append(Reply(event, unroutable=f"{event.kind}: {exc}"))
        return tuple(replies)

    # -- timers --------------------------------------------------------------------------------

    async def fire_timers(self, now: float) -> int:
        """Run every timer due at ``now`` on the partitions held here; returns how many ran."""
        async with self._timer_pass:
            return await fire_partitions(
                self.store.partitions(),
                lambda partition: self._fire_partition(partition, now),
                name=NAME,
            )

    async def _fire_partition(self, partition: int, now: float) -> int:
        fired = 0
        while self.store.is_ready(partition):
            due = self.store.due(partition, now, limit=self.timer_batch)
            # A key held by a record handler fires on the next pass, with its newer state.
            keys = [key for key, _ in due if not self.locks.is_held(partition, key)]
            if not keys:
                break
            async with self.locks.hold_all(partition, keys):
                changes = []
                for key in keys:
                    entry = self.store.get_entry(partition, key)
                    if entry is None or entry.due_at is None or entry.due_at > now:
                        continue
                    changes.append(Change(key, entry, self._on_timer(key, entry, now)))
                await self._publish(partition, changes)
            fired += len(changes)
            if len(due) < self.timer_batch:
                break
        return fired

    def _on_timer(self, key: str, entry: Entry, now: float) -> JoinResult:
        if key.startswith(SEEN_REPLY_PREFIX):
            return JoinResult(None, changed=True)  # a repeat this late is a new reply
        return self.joiner.on_timer(JoinState.from_value(entry.value), now)

    async def _run_timers(self) -> None:
        await run_timer_passes(
            lambda: self.fire_timers(self.clock()),
            lambda: asyncio.sleep(self.timer_interval_s),
            name=NAME,
        )

    # -- outputs -------------------------------------------------------------------------------

    async def _publish(self, partition: int, changes: Sequence[Change]) -> None:
        """Store and publish the changes (statuses, replies, dead letters, number formats,
        changelog) together, or undo them."""
        if self._outbox is None:
            raise RuntimeError(f"{NAME} handler used before start()")
        work = UnitOfWork(self.store, partition)
        now = self.clock()
        for change in changes:
            for reply in change.replies:
                work.add(reply_outputs(reply))
                if reply.routed:
                    # Remembered for ``inbound_dedupe_s``; undone with the rest if not published.
                    work.put(
                        SEEN_REPLY_PREFIX + reply.event.event_id,
                        {"provider_event_id": reply.event.event_id, "forwarded_at": now},
                        now + self.inbound_dedupe_s,
                    )
            work.add(result_outputs(change))
            result = change.result
            if result.changed:
                value = result.state.to_value() if result.state is not None else None
                due_at = self.joiner.due_at(result.state)
                work.put(change.key, value, due_at, previous=change.previous)
            if change.number_format is not None:
                work.add([number_format_output(change.number_format)])
                work.on_undo(partial(self.directory.withdraw, change.number_format))
            work.on_commit(partial(observe, change, self.joiner.classify))
        await work.commit(self._outbox.publish)


def _state_partitions(partitions: Iterable[TopicPartition]) -> set[int]:
    return {tp.partition for tp in partitions if tp.topic in {topic.name for topic in INPUT_TOPICS}}
