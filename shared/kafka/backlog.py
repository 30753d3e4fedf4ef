"""Records a handler lets wait, remembered by offset and read back from Kafka when there is room.

A ``Paced`` handler names a lane for each record (the sender: a campaign) and how many records
of a lane may be in progress at once. The runner keeps reading past a lane that is full: such a
record is not held in memory but remembered by its offset (8 bytes), and no commit passes it.
When its lane has room, ``Backlog.read_back`` fetches it again with a consumer of its own and the
runner processes it like any record. The log is the waiting room: memory stays flat however long
the backlog, reading ahead costs no write, and a restart or a rebalance loses nothing (the next
owner reads from the committed offset and lets the same records wait again). A lane's records
are taken in offset order within each partition. docs/architecture.md, "The consumer runner".
"""

from __future__ import annotations

import asyncio
import logging
import math
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from typing import Protocol, TypeAlias, runtime_checkable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from shared import metrics
from shared.kafka.lag import PartitionProgress

log = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord[bytes, bytes]
# A lane still at work is read back once this share of its limit is free: every read back opens
# a reader, and a record at a time (as each one finished) cost the sender a fifth of its CPU.
READ_BACK_SHARE = 0.5
# How long one read back may wait for the broker before it is tried again later.
FETCH_TIMEOUT_MS = 2_000
# Each read back uses a reader of its own: a long-lived aiokafka consumer seeking back and forth
# held ever more memory (the sender reached 1.4 GB over a 20,000-message backlog, 5 GB over
# 200,000; renewing it every second did not help), a fresh one stays flat for the cost of a
# connection per read back (tests/integration/test_backlog.py, bench/fairness.py's RSS check).


@runtime_checkable
class Paced(Protocol):
    """A handler whose records wait, by lane, while their lane is full (optional ability)."""

    def lane_of(self, record: Record) -> Hashable | None:
        """The record's lane; None: it never waits."""
        ...

    def lane_limit(self, lane: Hashable) -> int:
        """How many records of ``lane`` may be in progress at once, now."""
        ...

    @property
    def read_ahead_limit(self) -> int:
        """How many records may wait here at most; the runner reads no further until fewer do."""
        ...


class OffsetQueue:
    """Offsets in arrival order, 8 bytes each."""

    def __init__(self) -> None:
        self._offsets = array("q")
        self._head = 0

    def __len__(self) -> int:
        return len(self._offsets) - self._head

    def append(self, offset: int) -> None:
        self._offsets.append(offset)

    def first(self) -> int:
        return self._offsets[self._head]

    def peek(self, count: int) -> list[int]:
        return self._offsets[self._head : self._head + count].tolist()

    def drop(self, count: int) -> None:
        self._head += count
        if self._head > 4096 and self._head * 2 > len(self._offsets):
            del self._offsets[: self._head]
            self._head = 0


class Backlog:
    """The waiting records of every partition this runner holds, and the lanes' progress."""

    def __init__(
        self, paced: Paced, name: str, open_consumer: Callable[[], AIOKafkaConsumer]
    ) -> None:
        self.paced = paced
        self.name = name
        self._open_consumer = open_consumer
        self._consumer: AIOKafkaConsumer | None = None
        self._waiting: dict[TopicPartition, dict[Hashable, OffsetQueue]] = {}
        # Read back and started, not finished yet: they hold the commit back too.
        self._taken: dict[TopicPartition, set[int]] = {}
        self.in_progress: Counter[Hashable] = Counter()
        self._gauge = metrics.BACKLOG_RECORDS.labels(name)

    # -- the runner's intake -------------------------------------------------------------------

    def must_wait(self, tp: TopicPartition, lane: Hashable | None) -> bool:
        """Whether a record just read must wait: its lane is full, or older records of its lane
        on this partition wait already (a lane keeps its order)."""
        if lane is None:
            return False
        waiting = self._waiting.get(tp, {}).get(lane)
        return bool(waiting) or self.in_progress[lane] >= self.paced.lane_limit(lane)

    def take_or_wait(
        self, tp: TopicPartition, records: Sequence[Record], progress: PartitionProgress
    ) -> list[tuple[Record, Hashable]]:
        """The records to start now, with their lanes, added to ``progress``; the others wait
        here by offset (``progress`` moves past them; ``first_offset`` holds the commit)."""
        taken = []
        for record in records:
            lane = self.paced.lane_of(record)
            if self.must_wait(tp, lane):
                assert lane is not None
                self.wait(tp, lane, record.offset)
                progress.next_offset = record.offset + 1
                continue
            progress.add(record.offset, record.timestamp)
            self.started(lane)
            taken.append((record, lane))
        return taken

    async def feed(
        self,
        free_slots: Callable[[], int],
        start: Callable[[TopicPartition, Record, Hashable], Awaitable[bool]],
    ) -> None:
        """For ever: read back what has room as the runner's slots free up, and ``start`` it
        (False: its partition was revoked meanwhile; its next owner reads it)."""
        while True:
            free = free_slots()
            started = 0
            if free and self.waiting():
                try:
                    found = await self.read_back(free)
                except Exception as exc:  # the broker away: the records wait in the log
                    log.warning("%s: reading the backlog failed (%s); retrying", self.name, exc)
                    found = []
                for tp, record, lane in found:
                    if await start(tp, record, lane):
                        started += 1
                    else:
                        self.finished(tp, record.offset, lane, taken=True)
            await asyncio.sleep(0 if started else 0.02)

    def wait(self, tp: TopicPartition, lane: Hashable, offset: int) -> None:
        self._waiting.setdefault(tp, {}).setdefault(lane, OffsetQueue()).append(offset)
        self._gauge.inc()

    def started(self, lane: Hashable | None) -> None:
        if lane is not None:
            self.in_progress[lane] += 1

    def finished(self, tp: TopicPartition, offset: int, lane: Hashable | None, taken: bool) -> None:
        if lane is not None:
            self.in_progress[lane] -= 1
            if self.in_progress[lane] <= 0:
                del self.in_progress[lane]
        if taken:
            self._taken.get(tp, set()).discard(offset)

    def first_offset(self, tp: TopicPartition) -> int | None:
        """The lowest offset of ``tp`` still waiting or in progress from here, if any."""
        heads = [queue.first() for queue in self._waiting.get(tp, {}).values() if queue]
        heads.extend(self._taken.get(tp, ()))
        return min(heads) if heads else None

    def full(self) -> bool:
        """As many records wait as the handler allows: read no further for now."""
        return self.waiting() >= self.paced.read_ahead_limit

    def waiting(self) -> int:
        return sum(len(q) for lanes in self._waiting.values() for q in lanes.values())

    def drop(self, partitions: set[TopicPartition]) -> None:
        """Forget revoked partitions: their next owner reads them from the committed offset."""
        for tp in partitions:
            lanes = self._waiting.pop(tp, {})
            self._gauge.dec(sum(len(queue) for queue in lanes.values()))
            self._taken.pop(tp, None)

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    # -- reading back ---------------------------------------------------------------------------

    def _picks(self, budget: int) -> Iterator[tuple[TopicPartition, Hashable, int]]:
        """(partition, lane, how many) to read back now: each lane up to its room, partitions
        in turn, ``budget`` records in all."""
        picked: Counter[Hashable] = Counter()
        lanes = {lane for by_lane in self._waiting.values() for lane, q in by_lane.items() if q}
        for lane in lanes:
            limit = self.paced.lane_limit(lane)
            room = limit - self.in_progress[lane]
            holders = [tp for tp, by_lane in self._waiting.items() if by_lane.get(lane) is not None]
            waiting = sum(len(self._waiting[tp][lane]) for tp in holders)
            if self.in_progress[lane] and room < min(math.ceil(limit * READ_BACK_SHARE), waiting):
                continue  # still busy: read back later, in one larger piece
            while room > picked[lane] and budget > 0 and holders:
                for tp in list(holders):
                    queue = self._waiting[tp].get(lane)
                    if not queue:
                        holders.remove(tp)
                        continue
                    share = max(1, (room - picked[lane]) // max(1, len(holders)))
                    count = min(share, len(queue), budget)
                    if count <= 0:
                        break
                    picked[lane] += count
                    budget -= count
                    yield tp, lane, count
                    if len(queue) <= count:
                        holders.remove(tp)
                    if picked[lane] >= room or budget <= 0:
                        break

    async def read_back(self, budget: int) -> list[tuple[TopicPartition, Record, Hashable]]:
        """Waiting records whose lane has room now (at most ``budget``), fetched from Kafka and
        counted as taken; the runner starts each of them."""
        counts: Counter[tuple[TopicPartition, Hashable]] = Counter()
        for tp, lane, count in self._picks(budget):
            counts[tp, lane] += count
        wanted: dict[TopicPartition, dict[int, Hashable]] = {}
        for (tp, lane), count in counts.items():
            for offset in self._waiting[tp][lane].peek(count):
                wanted.setdefault(tp, {})[offset] = lane
        found: list[tuple[TopicPartition, Record, Hashable]] = []
        if not wanted:
            return found
        fetched = await self._fetch({tp: sorted(offsets) for tp, offsets in wanted.items()})
        await self.close()
        for tp, offsets in wanted.items():
            if tp not in self._waiting:
                continue  # revoked meanwhile
            records = fetched.get(tp, [])
            for record in records:
                found.append((tp, record, offsets[record.offset]))
                self._taken.setdefault(tp, set()).add(record.offset)
            self._forget(tp, offsets, {record.offset for record in records})
        for _, _, lane in found:
            self.started(lane)
        return found

    def _forget(self, tp: TopicPartition, offsets: dict[int, Hashable], read: set[int]) -> None:
        """Take the offsets read (and any the log no longer has) off their lanes' queues."""
        by_lane: Counter[Hashable] = Counter(offsets.values())
        last_read = max(read, default=-1)
        for lane, count in by_lane.items():
            queue = self._waiting[tp][lane]
            front = queue.peek(count)
            done = 0
            for offset in front:
                if offset in read:
                    done += 1
                elif offset < last_read:
                    # Gone from the log (retention, truncation): nothing to send.
                    log.warning("%s: %s offset %d is no longer in the log", self.name, tp, offset)
                    done += 1
                else:
                    break
            queue.drop(done)
            self._gauge.dec(done)
            if not queue:
                del self._waiting[tp][lane]

    async def _fetch(
        self, wanted: dict[TopicPartition, list[int]]
    ) -> dict[TopicPartition, list[Record]]:
        """The records at the ``wanted`` offsets (sorted, per partition), in one pass over the
        partitions; fewer where the broker is slow (they are asked again later)."""
        consumer = await self._reader()
        consumer.assign(list(wanted))
        for tp, offsets in wanted.items():
            consumer.seek(tp, offsets[0])
        missing = {tp: set(offsets) for tp, offsets in wanted.items()}
        found: dict[TopicPartition, list[Record]] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FETCH_TIMEOUT_MS / 1000
        while missing and loop.time() < deadline:
            # The span from each first wanted offset to the last: no record past it is unpacked.
            span = sum(wanted[tp][-1] - wanted[tp][0] + 1 for tp in missing)
            batches = await consumer.getmany(*missing, timeout_ms=200, max_records=span)
            for tp, records in batches.items():
                left = missing.get(tp)
                if left is None:
                    continue
                found.setdefault(tp, []).extend(r for r in records if r.offset in left)
                left -= {r.offset for r in records}
                if not left or (records and records[-1].offset >= wanted[tp][-1]):
                    del missing[tp]
        return found

    async def _reader(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = self._open_consumer()
            await consumer.start()
            self._consumer = consumer
        return self._consumer
