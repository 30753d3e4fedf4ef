"""The normalizer: joins dispatch records with provider events and emits canonical statuses.

Reads ``sms.dispatches`` and ``sms.provider-events`` (co-partitioned by correlation key, so the
Range assignor puts partition N of both on one member) and writes ``sms.statuses``. The join logic
is ``join.Joiner``; the state per correlation key lives in a ``ChangelogStore`` backed by
``sms.normalizer-state``, so a restarted or rebalanced instance picks up where the last one was.

Replies and STOP callbacks (``replies.ReplyRouter``) become ``sms.inbound`` messages for Optimove
(a STOP or START on a shared provider account: one per tenant it concerns), ``sms.last-inbound``
records of when the customer wrote (after which the sender lets an auto reply through to an
opted-out customer) and, for keywords and STOPs, ``sms.opt-outs`` changes. They are forwarded at
once, joined or not (a reply to nothing we sent is still a reply), and deduplicated by provider
event id through an entry of the same store that expires after ``inbound_dedupe_s``; only a reply
that names its message but finds no tenant without that message's dispatch record waits for it,
like an early status. Joining an accepted dispatch records how Optimove wrote the number on
``sms.number-formats``, which replies read back. A reply runs under its correlation key's lock,
like the join, so a dispatch releasing a held reply and a repeat of that reply never race.

Every change of a key's state is published together with the statuses and dead letters it caused,
under that key's lock, before the input offset may be committed (the handler publishes itself and
returns nothing to the runner): a record handler and the timers never reorder one key's changelog.
They go through an ``Outbox``: the outputs of every record handled in one turn of the event loop
share one publish, each handler still waiting for the acknowledgement of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import TopicPartition

from services.normalizer import metrics
from services.normalizer.join import Joiner, JoinPolicy, JoinResult, JoinState
from services.normalizer.replies import (
    NumberDirectory,
    ReplyRouter,
    RoutedReply,
    UnroutableReply,
    tenant_number_key,
    tenants_by_account,
)
from shared.config import Settings
from shared.events import (
    DeadLetter,
    DispatchRecord,
    E,
    NumberFormat,
    ProviderEvent,
    SchemaError,
    decode,
)
from shared.kafka import KafkaUnavailable, OutRecord, Publisher
from shared.logs import mask_number
from shared.outbox import Outbox
from shared.runner import PoisonRecord, Record
from shared.service import ConsumerService, Service, run_service
from shared.store import ChangelogStore, Entry, GlobalTable, KeyLocks, PartitionNotReady
from shared.timers import fire_partitions, run_timer_passes
from shared.topics import (
    DEAD_LETTERS,
    DISPATCHES,
    INBOUND,
    LAST_INBOUND,
    NORMALIZER_STATE,
    NUMBER_FORMATS,
    OPT_OUTS,
    PROVIDER_EVENTS,
    STATUSES,
)

log = logging.getLogger(__name__)

NAME = "normalizer"
INPUT_TOPICS = (DISPATCHES, PROVIDER_EVENTS)
# Store keys of forwarded replies' event ids. Correlation keys start with a provider account
# name or "message:", so these never meet a join entry.
SEEN_REPLY_PREFIX = "seen-reply#"


@dataclass(frozen=True)
class _Reply:
    """A reply to forward (to each tenant in ``routed``) or to dead-letter (``unroutable``)."""

    event: ProviderEvent
    routed: tuple[RoutedReply, ...] = ()
    unroutable: str = ""


@dataclass(frozen=True)
class _Change:
    """One key's join result, with the entry it replaces (to undo it if publishing fails)."""

    key: str
    previous: Entry | None
    result: JoinResult
    received: ProviderEvent | None = None
    # How Optimove wrote the number of a dispatch joined by this change, if worth recording.
    number_format: NumberFormat | None = None
    replies: tuple[_Reply, ...] = ()


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
                joins=dispatch,
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
                partition, [_Change(key, previous, result, received, number_format, replies)]
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
                    await self._publish(partition, [_Change(key, previous, held)])
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
                partition, [_Change(key, previous, unchanged, replies=(_Reply(event, routed),))]
            )

    def _forwarded(self, partition: int, event: ProviderEvent) -> bool:
        return self.store.get_entry(partition, SEEN_REPLY_PREFIX + event.event_id) is not None

    def _released(self, partition: int, result: JoinResult) -> tuple[_Reply, ...]:
        """Route the replies a dispatch record released, with that dispatch."""
        dispatch = result.state.dispatch if result.state is not None else None
        replies: list[_Reply] = []
        for event in result.released_replies:
            if self._forwarded(partition, event):
                metrics.INBOUND_DUPLICATES.labels(event.provider_kind).inc()
                continue
            try:
                replies.append(_Reply(event, routed=self.replies.route(event, dispatch)))
            except UnroutableReply as exc:
                replies.append(_Reply(event, unroutable=f"{event.kind}: {exc}"))
        return tuple(replies)

    def _reply_outputs(self, partition: int, reply: _Reply, now: float) -> list[OutRecord]:
        event, routed = reply.event, reply.routed
        if not routed:
            dead = DeadLetter(
                source_topic=PROVIDER_EVENTS.name,
                stage=NAME,
                reason=reply.unroutable,
                key=event.correlation_key,
                payload=event.to_bytes().decode("utf-8"),
                attempts=1,
                redrive_topic=PROVIDER_EVENTS.name,
            )
            return [OutRecord(DEAD_LETTERS, event.correlation_key, dead)]
        outputs = []
        for each in routed:
            key = tenant_number_key(each.tenant, each.number)
            outputs.append(OutRecord(INBOUND, each.tenant, each.inbound))
            if each.opt_out_change is not None:
                outputs.append(OutRecord(OPT_OUTS, key, each.opt_out_change))
            outputs.append(OutRecord(LAST_INBOUND, key, each.last_inbound))
        outputs.append(
            self.store.put(
                partition,
                SEEN_REPLY_PREFIX + event.event_id,
                {"provider_event_id": event.event_id, "forwarded_at": now},
                now + self.inbound_dedupe_s,
            )
        )
        return outputs

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
            async with contextlib.AsyncExitStack() as held:
                for key in keys:
                    await held.enter_async_context(self.locks.hold(partition, key))
                changes = []
                for key in keys:
                    entry = self.store.get_entry(partition, key)
                    if entry is None or entry.due_at is None or entry.due_at > now:
                        continue
                    changes.append(_Change(key, entry, self._on_timer(key, entry, now)))
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

    async def _publish(self, partition: int, changes: Sequence[_Change]) -> None:
        """Store and publish the changes (statuses, replies, dead letters, number formats,
        changelog) together, or undo them."""
        if self._outbox is None:
            raise RuntimeError(f"{NAME} handler used before start()")
        outputs: list[OutRecord] = []
        written: list[_Change] = []
        now = self.clock()
        for change in changes:
            result = change.result
            for reply in change.replies:
                outputs.extend(self._reply_outputs(partition, reply, now))
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
            if change.number_format is not None:
                record = change.number_format
                outputs.append(
                    OutRecord(
                        NUMBER_FORMATS, tenant_number_key(record.tenant, record.number), record
                    )
                )
        try:
            await self._outbox.publish(outputs)
        except BaseException:
            self._undo(partition, written)
            for change in changes:
                if change.number_format is not None:
                    self.directory.withdraw(change.number_format)
                self._unmark(partition, change.replies)
            raise
        for change in changes:
            if change.number_format is not None:
                metrics.NUMBER_FORMATS_WRITTEN.inc()
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
        for provider in result.unmatched_reply_providers:
            metrics.INBOUND_UNROUTABLE.labels(provider).inc()
            log.warning(
                "%s reply dead-lettered: no tenant and no dispatch record in time", provider
            )
        for reply in change.replies:
            if reply.routed:
                for routed in reply.routed:
                    _observe_reply(reply.event, routed)
            else:
                metrics.INBOUND_UNROUTABLE.labels(reply.event.provider_kind).inc()
                log.warning("reply dead-lettered: %s", reply.unroutable)

    def _unmark(self, partition: int, replies: Iterable[_Reply]) -> None:
        """Forget that these replies were forwarded: their publication failed."""
        with contextlib.suppress(PartitionNotReady):
            for reply in replies:
                if reply.routed:
                    self.store.put(partition, SEEN_REPLY_PREFIX + reply.event.event_id, None)

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


def _observe_reply(event: ProviderEvent, routed: RoutedReply) -> None:
    """Metrics and log of a reply that Kafka acknowledged."""
    metrics.INBOUND_MESSAGES.labels(event.provider_kind, event.kind).inc()
    change = routed.opt_out_change
    source = routed.opt_out_source
    if source is not None:
        metrics.OPT_OUTS.labels(source).inc()
    elif change is not None:
        metrics.OPT_INS.inc()
    log.info(
        "reply forwarded%s",
        "" if change is None else (" (opt-out)" if change.opted_out else " (opt-in)"),
        extra={
            "tenant": routed.tenant,
            "number": mask_number(routed.number),
            "provider_account": event.provider_account,
            **({"message_id": routed.message_id} if routed.message_id else {}),
        },
    )


def _state_partitions(partitions: Iterable[TopicPartition]) -> set[int]:
    return {tp.partition for tp in partitions if tp.topic in {topic.name for topic in INPUT_TOPICS}}


def _decode(model: type[E], raw: bytes | None) -> E:
    try:
        return decode(model, raw)
    except SchemaError as exc:
        raise PoisonRecord(str(exc)) from None


def build(settings: Settings, handler: NormalizerHandler | None = None) -> Service:
    """The normalizer service; ``handler`` lets a test give it another clock."""
    return ConsumerService(
        name=NAME,
        settings=settings,
        runner_settings=settings.normalizer.runner,
        topics=[topic.name for topic in INPUT_TOPICS],
        handler=handler or NormalizerHandler(settings),
    )


async def main(settings: Settings) -> None:
    await run_service(build(settings), settings.normalizer.metrics_listen)
