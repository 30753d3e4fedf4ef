"""Where each assigned partition stands, and its lag as the runner exports it.

``PartitionProgress`` holds the offsets taken from a partition and not yet known to be done (the
commit position is the first unfinished one). ``LagExporter`` turns it into the lag gauges, in
messages and seconds; how each is computed, and the Tansu fallback's variant:
docs/architecture.md, "The consumer runner". Besides ``consumer`` (the service's name) the gauges
carry ``consumergroup``, the group's name on the broker (``[kafka] group_prefix`` included), under
the label name kafka-exporter uses: alerts and dashboards join the two on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError

from shared import metrics

log = logging.getLogger(__name__)

# How often every assigned partition's lag gauges are recomputed.
LAG_EXPORT_INTERVAL_S = 1.0
# A high watermark older than this (no fetch response since) is confirmed with ListOffsets.
HIGHWATER_STALE_AFTER_S = 5.0
# How long a ListOffsets round trip may take (in the lag task, never holding up polling).
END_OFFSETS_TIMEOUT_S = 5.0
# How many rises of the high watermark are remembered to age records not yet taken.
HIGHWATER_HISTORY = 256


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


class LagExporter:
    """Exports the lag of the partitions ``consumer`` holds, from the runner's ``progress``."""

    def __init__(
        self,
        name: str,
        consumer: AIOKafkaConsumer,
        progress: dict[TopicPartition, PartitionProgress],
        *,
        tansu: bool = False,
    ) -> None:
        """``tansu``: the Tansu fallback's workaround (end offsets from fetch responses)."""
        self.name = name
        self.consumer = consumer
        self.progress = progress
        self.tansu = tansu
        self.group = consumer_group(consumer)

    async def run_forever(self) -> None:
        """Export every ``LAG_EXPORT_INTERVAL_S``, whether records arrive or not."""
        while True:
            try:
                await self.export()
            except Exception:
                log.exception("%s: lag export failed", self.name)
            await asyncio.sleep(LAG_EXPORT_INTERVAL_S)

    async def export(self) -> dict[TopicPartition, PartitionLag]:
        """Recompute and export the lag of every assigned partition; returns what it exported."""
        unknown = [
            tp
            for tp in self.consumer.assignment()
            if self.progress.setdefault(tp, PartitionProgress()).next_offset is None
        ]
        if unknown:
            # Nothing taken yet from these: start from where the consumer will fetch.
            positions = await asyncio.gather(
                *(asyncio.wait_for(self.consumer.position(tp), 1.0) for tp in unknown),
                return_exceptions=True,
            )
            for tp, position in zip(unknown, positions, strict=True):
                progress = self.progress.get(tp)
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
        if self.tansu:
            highwaters = await self._highwaters(assignment)
        else:
            highwaters = await self._end_offsets(assignment)
        now_s = time.time()
        exported: dict[TopicPartition, PartitionLag] = {}
        # No await from here on: a partition revoked meanwhile is not in this assignment.
        for tp in self.consumer.assignment():
            progress = self.progress.get(tp)
            if progress is None:
                continue
            highwater = highwaters.get(tp)
            if highwater is not None:
                progress.observe_highwater(highwater, now_s)
            lag = progress.lag(highwater, now_s, from_committed=not self.tansu)
            labels = self._labels(tp)
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

    def _labels(self, tp: TopicPartition) -> tuple[str, str, str, str]:
        return (self.name, self.group, tp.topic, str(tp.partition))

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop the gauges of partitions no longer held here: their new owner reports them."""
        for tp in list(partitions):
            labels = self._labels(tp)
            for gauge in (metrics.CONSUMER_LAG, metrics.CONSUMER_LAG_SECONDS):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)


def consumer_group(consumer: AIOKafkaConsumer) -> str:
    """The group ``consumer`` joins, as the broker names it ("" for a consumer without a group).

    aiokafka keeps the ``group_id`` it was given (``make_consumer`` adds the prefix) only as a
    private attribute; reading it here spares every caller passing the name a second time.
    """
    group = getattr(consumer, "_group_id", None)
    return group if isinstance(group, str) else ""
