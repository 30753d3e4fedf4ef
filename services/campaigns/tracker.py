"""Live counts per campaign, kept by a consumer of the pipeline's topics; rebuilt from Kafka,
exact under restarts and rebalances, bounded.

What is counted, from which topic, is ``counts.py``. This module keeps the counters.

**State.** One set of counters per (tenant, campaign group, input partition), holding the offset
of the last record of that partition it counted. Each set is a record of the compacted
``sms.campaign-counts`` (``CampaignCounts``, key ``tenant|campaign|topic|partition``): the state
grows with campaigns times the input partitions they touch (at most one per partition of the five
input topics), never with messages. A campaign none of whose counters changed for
``campaigns.expire_after_s`` (30 days) is deleted (tombstones), and input records older than that
are not counted, so a replay cannot bring an expired campaign back.

**Exact under restarts.** A counters record includes every record of its input partition up to
its ``offset`` and none after it; a record read again at or below that offset is skipped (per
campaign: a report outcome can count several). A record is applied to the counters in memory
synchronously, then its handler waits until a write that covers it is acknowledged by Kafka
(acks=all): only then does the runner count it finished, and the runner commits an input offset
only over finished records. So every committed offset is covered by written counters, and every
written counter says how far it counted: a crash between a write and a commit replays records the
counters skip; a crash before the write replays records they still need.

**Writes are coalesced.** Changed counters are written in batches, one at a time (each batch
waits ``flush_linger_s`` for company): every record applied while batch *n* is being written goes
into batch *n+1* and waits for it. A failed batch puts its counters back; the next one includes
them, and the records wait for that one. Nothing is skipped, nothing is written twice over.

**Order.** The runner runs one partition's records concurrently and keeps order only per key.
This handler asks for no ordering (``ordering_key`` returns None) and applies a record before its
first ``await``: the runner starts records in offset order, so they are applied in offset order,
which is what "everything up to ``offset``" needs. Records that arrive while their partition's
counters are still being loaded are queued and applied, in order, the moment they are.

**Rebalances.** Every instance mirrors the whole of ``sms.campaign-counts`` (``CountsMirror``, a
``GlobalTable``; the admin API reads it too). An assigned partition resumes from the counters in
the mirror once the mirror is known to hold every write acknowledged before the assignment
(``CountsMirror.sync``): the previous owner's last batch was acknowledged before it committed and
gave the partition up. A revoked partition's counters are dropped after the batch being written
(if any) ends, and no later batch writes them. No co-partitioning is needed: a counter belongs
to one input partition, so its writer is that partition's owner, whichever topic it is; and
the counts topic is read whole by everyone, so how its keys spread over its partitions does not
matter.
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
from shared.kafka import KafkaUnavailable, OutRecord, Publisher
from shared.runner import Record
from shared.store import PartitionNotReady
from shared.topics import CAMPAIGN_COUNTS

log = logging.getLogger(__name__)

NAME = "campaigns"
# How often campaigns are checked for expiry (and the tracked gauge refreshed).
HOUSEKEEPING_INTERVAL_S = 10.0
# How long a rebalance callback waits for the assigned partitions' counters; records wait longer.
ASSIGN_WAIT_S = 30.0

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
        attempt = 0
        while True:
            try:
                await self.mirror.sync(self.publisher)
                break
            except KafkaUnavailable as exc:
                attempt += 1
                log.warning("%s: counters not loaded yet (%s); retrying", NAME, exc)
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
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
        failures = 0
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.options.flush_linger_s)
            try:
                await self.flush()
                failures = 0
            except Exception as exc:
                # Never give up: every record applied waits for a write that covers it.
                failures += 1
                if isinstance(exc, KafkaUnavailable):
                    log.warning("%s: counters not written (%s); retrying", NAME, exc)
                else:
                    log.exception("%s: writing counters failed; retrying", NAME)
                await asyncio.sleep(min(5.0, 0.1 * 2 ** min(failures, 6)))

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
