"""Live counts per campaign, kept by a consumer of the pipeline's topics; rebuilt from Kafka,
exact under restarts and rebalances, bounded.

What is counted, from which topic, is ``counts.py``; this module keeps the counters: one set per
(tenant, campaign group, input partition) on the compacted ``sms.campaign-counts``, each with the
input offset it counts up to. A record is applied in memory at once (in offset order), and its
handler waits until a coalesced write that covers it is acknowledged, so every committed offset
is covered by written counters. Why that is exact, how writes batch, and what a rebalance does:
``docs/campaigns.md``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition

from services.campaigns.counts import (
    INPUT_TOPICS,
    Campaign,
    Counts,
    contributions,
    counts_key,
    expired,
    last_activity,
    read_counts,
    to_event,
)
from services.campaigns.metrics import (
    CAMPAIGNS_TRACKED,
    COUNTS_FLUSHES,
    INPUTS_ALREADY_COUNTED,
    INPUTS_TOO_OLD,
)
from services.campaigns.mirror import CountsMirror
from shared.config import Settings
from shared.contract.topics import CAMPAIGN_COUNTS
from shared.kafka.clients import KafkaUnavailable, OutRecord, Publisher
from shared.kafka.runner import Record
from shared.kafka.store import PartitionNotReady
from shared.retry import RetryPolicy, retry

log = logging.getLogger(__name__)

NAME = "campaigns"
# How often campaigns are checked for expiry (and the tracked gauge refreshed).
HOUSEKEEPING_INTERVAL_S = 10.0
# How long a rebalance callback waits for the assigned partitions' counters; records wait longer.
ASSIGN_WAIT_S = 30.0
# Waits before writing counters again after a failed batch, and before loading them again.
FLUSH_RETRY = RetryPolicy(base_s=0.2, cap_s=5.0)
LOAD_RETRY = RetryPolicy(base_s=0.4, cap_s=5.0)

_Dirty = tuple[TopicPartition, str, str]


@dataclass
class SourceCounters:
    """One campaign's counters of one input partition, up to and including ``offset``."""

    offset: int
    counts: Counts


@dataclass
class _Deferred:
    offset: int
    at: float
    value: bytes | None
    applied: asyncio.Future[int | None]


class CountsTracker:
    """The runner's handler (with ``PartitionAware`` and lifecycle hooks); see the docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        mirror: CountsMirror | None = None,
    ) -> None:
        self.settings = settings
        self.options = settings.campaigns
        self.clock = clock
        self.mirror = mirror or CountsMirror(settings.kafka, name=f"{NAME}-counts")
        self._publisher: Publisher | None = None
        self._assigned: set[TopicPartition] = set()
        self._states: dict[TopicPartition, dict[Campaign, SourceCounters]] = {}
        self._loading: dict[TopicPartition, asyncio.Task[None]] = {}
        self._deferred: dict[TopicPartition, list[_Deferred]] = {}
        # Counters changed since the last batch was taken; a missing state writes a tombstone.
        self._dirty: dict[_Dirty, None] = {}
        self._generation = 0  # the number of the next batch to be taken
        self._acknowledged = -1  # every batch up to this one is on Kafka
        self._progress = asyncio.Event()
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle (ConsumerService) -------------------------------------------------------------

    def attach(self, publisher: Publisher) -> None:
        """The publisher counters are written with (``start`` attaches it)."""
        self._publisher = publisher

    async def start(self, publisher: Publisher) -> None:
        self.attach(publisher)
        await self.mirror.start()
        for work, name in ((self._flush_forever, "flush"), (self._housekeep_forever, "expiry")):
            self._spawn(work(), f"{NAME}-{name}")

    async def stop(self) -> None:
        tasks = list(self._tasks) + list(self._loading.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.mirror.stop()

    @property
    def ready(self) -> bool:
        return self.mirror.ready

    # -- runner hooks ----------------------------------------------------------------------------

    def ordering_key(self, record: Record) -> bytes | None:
        return None  # applied in the order the runner starts them: offset order (see docstring)

    async def handle(self, record: Record) -> Sequence[OutRecord]:
        """Nothing for the runner to publish: a batch of counters covering the record is on
        Kafka when this returns (coalesced writes, ``flush``)."""
        tp = TopicPartition(record.topic, record.partition)
        at = record.timestamp / 1000 if record.timestamp and record.timestamp > 0 else self.clock()
        applied = self.apply_or_defer(tp, record.offset, at, record.value)
        generation = await applied if isinstance(applied, asyncio.Future) else applied
        if generation is not None:
            await self.flushed(generation)
        return []

    async def on_assigned(self, partitions: set[TopicPartition]) -> None:
        assigned = {tp for tp in partitions if tp.topic in {topic.name for topic in INPUT_TOPICS}}
        if not assigned:
            return
        self.expect(assigned)
        task = asyncio.create_task(self._load(assigned), name=f"{NAME}-load")
        for tp in assigned:
            self._loading[tp] = task
        await asyncio.wait({task}, timeout=ASSIGN_WAIT_S)

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        self._assigned -= partitions
        for tp in partitions:
            self._loading.pop(tp, None)
            for waiting in self._deferred.pop(tp, []):
                if not waiting.applied.done():
                    waiting.applied.set_exception(PartitionNotReady(f"{tp} revoked"))
                    waiting.applied.exception()  # retrieved: nobody may be waiting any more
        # A batch being written may hold these partitions' counters: let it end, then drop them,
        # so that no write of ours follows the new owner's.
        async with self._flush_lock:
            for tp in partitions:
                self._states.pop(tp, None)
            self._dirty = {item: None for item in self._dirty if item[0] not in partitions}

    # -- counting --------------------------------------------------------------------------------

    def expect(self, partitions: Iterable[TopicPartition]) -> None:
        """``partitions`` are assigned here; their records queue until ``install``."""
        self._assigned |= set(partitions)

    def apply_or_defer(
        self, tp: TopicPartition, offset: int, at: float, value: bytes | None
    ) -> int | asyncio.Future[int | None] | None:
        """Apply the record now (returning the batch to wait for, None if nothing changed), or,
        while its partition's counters are loading, queue it and return a future of that."""
        if tp in self._states:
            return self.apply(tp, offset, at, value)
        if tp not in self._assigned:
            raise PartitionNotReady(f"{tp} is not assigned to this instance")
        applied: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._deferred.setdefault(tp, []).append(_Deferred(offset, at, value, applied))
        return applied

    def apply(self, tp: TopicPartition, offset: int, at: float, value: bytes | None) -> int | None:
        """Add the record at ``offset`` of ``tp`` to its campaigns' counters (synchronously).

        Returns the number of the batch whose acknowledgement the record must wait for, or None
        when it changed nothing (already counted, too old, or nothing to count).
        """
        now = self.clock()
        if at < now - self.options.expire_after_s:
            INPUTS_TOO_OLD.labels(tp.topic).inc()
            return None
        states = self._states[tp]
        changed = already_counted = False
        for contribution in contributions(tp.topic, value, at, now):
            campaign = (contribution.tenant, contribution.campaign)
            state = states.get(campaign)
            if state is not None and offset <= state.offset:
                already_counted = True
                continue
            if state is None:
                state = states[campaign] = SourceCounters(offset, Counts())
            state.counts.add(contribution.counts)
            state.counts.forget_past_schedule(now)
            state.offset = offset
            self._dirty[(tp, *campaign)] = None
            changed = True
        if already_counted:
            INPUTS_ALREADY_COUNTED.labels(tp.topic).inc()
        if not changed:
            return None
        self._wake.set()
        return self._generation

    def counters(self, tp: TopicPartition) -> dict[Campaign, SourceCounters]:
        """The counters of an input partition held here (empty when it is not)."""
        return dict(self._states.get(tp, {}))

    # -- loading ---------------------------------------------------------------------------------

    async def _load(self, partitions: set[TopicPartition]) -> None:
        await retry(
            lambda: self.mirror.sync(self.publisher),
            LOAD_RETRY,
            on=KafkaUnavailable,
            on_retry=lambda _attempt, exc, _wait: log.warning(
                "%s: counters not loaded yet (%s); retrying", NAME, exc
            ),
        )
        me = asyncio.current_task()
        # Only what is still ours by this assignment (not revoked, not reassigned meanwhile).
        self.install({tp for tp in partitions if self._loading.get(tp) is me})

    def install(self, partitions: Iterable[TopicPartition]) -> None:
        """Own ``partitions`` from now on, resuming from their counters in the mirror, and apply
        the records queued for them meanwhile, in order."""
        found: dict[TopicPartition, dict[Campaign, SourceCounters]] = {tp: {} for tp in partitions}
        if not found:
            return
        self._assigned |= set(found)
        for stored in read_counts(self.mirror.values()):
            tp = TopicPartition(stored.source_topic, stored.source_partition)
            if tp in found:
                found[tp][(stored.tenant, stored.campaign)] = SourceCounters(
                    stored.offset, stored.counts
                )
        for tp, states in found.items():
            self._loading.pop(tp, None)
            self._states[tp] = states
            log.info("%s: %s resumed with %d campaigns' counters", NAME, tp, len(states))
            for waiting in self._deferred.pop(tp, []):
                if not waiting.applied.done():
                    waiting.applied.set_result(
                        self.apply(tp, waiting.offset, waiting.at, waiting.value)
                    )

    # -- writing ---------------------------------------------------------------------------------

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            raise RuntimeError(f"{NAME} tracker used before start()")
        return self._publisher

    async def flushed(self, generation: int) -> None:
        """Return once batch ``generation`` (and every one before it) is on Kafka."""
        while self._acknowledged < generation:
            await self._progress.wait()

    async def flush(self) -> None:
        """Write every changed counter in one batch (raises KafkaUnavailable, keeping them)."""
        async with self._flush_lock:
            self._wake.clear()
            if not self._dirty:
                return
            generation = self._generation
            self._generation += 1
            taken, self._dirty = self._dirty, {}
            try:
                await self.publisher.publish([self._record(*item) for item in taken])
            except BaseException:
                COUNTS_FLUSHES.labels("failed").inc()
                # Back in (they are the latest values anyway); the next batch includes them.
                for item in taken:
                    if item[0] in self._states:
                        self._dirty[item] = None
                self._wake.set()
                raise
            COUNTS_FLUSHES.labels("ok").inc()
            self._acknowledged = generation
            progress, self._progress = self._progress, asyncio.Event()
            progress.set()

    def _record(self, tp: TopicPartition, tenant: str, campaign: str) -> OutRecord:
        key = counts_key(tenant, campaign, tp.topic, tp.partition)
        state = self._states.get(tp, {}).get((tenant, campaign))
        if state is None:
            return OutRecord(CAMPAIGN_COUNTS, key, None)  # expired
        event = to_event(tenant, campaign, tp.topic, tp.partition, state.offset, state.counts)
        return OutRecord(CAMPAIGN_COUNTS, key, event)

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            # Never give up: every record applied waits for a write that covers it.
            await retry(self._flush_after_linger, FLUSH_RETRY, on=Exception, on_retry=_flush_failed)

    async def _flush_after_linger(self) -> None:
        await asyncio.sleep(self.options.flush_linger_s)
        await self.flush()

    # -- expiry ----------------------------------------------------------------------------------

    def expire(self, now: float) -> set[Campaign]:
        """Delete the counters this instance owns of campaigns inactive for ``expire_after_s``
        (their last activity anywhere, as the mirror and the counters here know it)."""
        last = last_activity(self.mirror.values())
        for states in self._states.values():
            for campaign, state in states.items():
                if state.counts.last_at is not None:
                    last[campaign] = max(last.get(campaign, 0.0), state.counts.last_at)
        gone = expired(last, now, self.options.expire_after_s)
        for tp, states in self._states.items():
            for campaign in [c for c in states if c in gone]:
                del states[campaign]
                self._dirty[(tp, *campaign)] = None
        if gone:
            self._wake.set()
            log.info("%s: %d campaigns expired", NAME, len(gone))
        CAMPAIGNS_TRACKED.set(len(last) - len(gone))
        return gone

    async def _housekeep_forever(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            try:
                self.expire(self.clock())
            except Exception:
                log.exception("%s: expiry pass failed", NAME)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _flush_failed(_attempt: int, exc: Exception, _wait_s: float) -> None:
    if isinstance(exc, KafkaUnavailable):
        log.warning("%s: counters not written (%s); retrying", NAME, exc)
    else:
        log.error("%s: writing counters failed; retrying", NAME, exc_info=exc)
