"""Records handed to the producer in batches: one open ``BatchBuilder`` per partition, for every
publish (``Publisher.publish_batches``).

``producer.send()`` once per record (a future, a partitioner call and an accumulator lookup each)
cost ingress more Python time than everything else it did for a recipient. Here records are
appended to one open batch per partition, shared by every caller in flight, and handed to the
producer with ``send_batch``. A keyed record without a partition goes where aiokafka's default
partitioner puts it (murmur2 of the key, as the Java client), so a key's records land where any
other producer would put them.

The producer takes a partition's next batch only once the one before it is on its way, so one
task per partition hands its batches over, oldest first, and callers arriving meanwhile add to
the open one (and aiokafka is never asked to queue several batches for one partition: its wait for
that gives up early, in 0.14, subtracting the time waited so far again on every turn). A
partition's records reach Kafka in the order they were appended.

A small publish lingers (``linger_s``) and every partition's lingering batch is handed over at
once, so they leave in one produce request per broker. aiokafka's own linger times each
partition's batch apart and sends each when its time is up: at 1,600 callbacks a second over
twelve partitions, about one produce request per record (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

_MURMUR_SEED: Final = 0x9747B28C
_MURMUR_M: Final = 0x5BD1E995
_MASK_32: Final = 0xFFFFFFFF
_WORDS: Final = struct.Struct("<I")


def murmur2(data: bytes) -> int:
    """aiokafka's (and Kafka's Java client's) murmur2, in about half the Python operations."""
    length = len(data)
    h = _MURMUR_SEED ^ length
    whole = length & ~3
    for (k,) in _WORDS.iter_unpack(data[:whole]):
        k = (k * _MURMUR_M) & _MASK_32
        k ^= k >> 24
        k = (k * _MURMUR_M) & _MASK_32
        h = ((h * _MURMUR_M) & _MASK_32) ^ k
    remainder = length - whole
    if remainder >= 3:
        h ^= data[whole + 2] << 16
    if remainder >= 2:
        h ^= data[whole + 1] << 8
    if remainder >= 1:
        h ^= data[whole]
        h = (h * _MURMUR_M) & _MASK_32
    h ^= h >> 13
    h = (h * _MURMUR_M) & _MASK_32
    h ^= h >> 15
    return h


def partition_for(key: bytes, partitions: Sequence[int]) -> int:
    """The partition aiokafka's DefaultPartitioner gives ``key`` (``partitions`` sorted)."""
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]


class _Batch:
    """One batch for one partition: open to appends until its partition's task hands it over."""

    def __init__(self, builder: Any) -> None:
        self.builder = builder
        self.opened_at = time.monotonic()
        self.delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A request that gave up no longer awaits it: do not report its failure as unretrieved.
        self.delivered.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class _Partition:
    def __init__(self) -> None:
        self.batches: deque[_Batch] = deque()  # oldest first; the last one may be open
        self.open: _Batch | None = None
        self.handing_over: asyncio.Task[None] | None = None


# One record to append: key and value (None: a tombstone).
Pair = tuple[bytes, bytes | None]


class PartitionBatches:
    """The open batches of one producer's partitions; ``append`` returns what to wait for."""

    def __init__(
        self,
        producer: Callable[[], AIOKafkaProducer],
        *,
        linger_s: float = 0.005,
        give_up_s: float = 30.0,
    ) -> None:
        # Read at each use: the publisher replaces a broken producer.
        self._producer = producer
        self.linger_s = linger_s
        self.give_up_s = give_up_s
        self._partitions: dict[tuple[str, int], _Partition] = defaultdict(_Partition)
        self._lingering: dict[tuple[str, int], _Partition] = {}
        self._linger_timer: asyncio.TimerHandle | None = None

    async def append(
        self,
        topic: str,
        pairs: Sequence[Pair],
        waits: set[asyncio.Future[None]],
        partition: int | None = None,
        *,
        linger: bool = False,
    ) -> None:
        """Append ``pairs`` to ``partition`` (None: each key's) and add to ``waits`` the futures
        that end once Kafka holds them. Nothing is appended before the one wait (the topic's
        partitions), so a caller cancelled there leaves nothing half done. ``linger``: hand the
        batches over with the others of the next ``linger_s``, not at once."""
        producer = self._producer()
        partitions = sorted(await producer.partitions_for(topic)) if partition is None else []
        timestamp_ms = int(time.time() * 1000)
        touched: dict[int, _Partition] = {}
        for key, value in pairs:
            number = partition_for(key, partitions) if partition is None else partition
            state = touched.get(number)
            if state is None:
                state = touched[number] = self._partitions[(topic, number)]
            batch = state.open
            if (
                batch is None
                or batch.builder.append(key=key, value=value, timestamp=timestamp_ms) is None
            ):
                # A fresh batch always takes its first record, however large.
                batch = state.open = _Batch(producer.create_batch())
                state.batches.append(batch)
                batch.builder.append(key=key, value=value, timestamp=timestamp_ms)
            waits.add(batch.delivered)
        if linger and self.linger_s > 0:
            for number, state in touched.items():
                self._lingering[(topic, number)] = state
            if self._linger_timer is None:
                loop = asyncio.get_running_loop()
                self._linger_timer = loop.call_later(self.linger_s, self._hand_over_lingering)
            return
        for number, state in touched.items():
            self._start_hand_over(topic, number, state)

    def _hand_over_lingering(self) -> None:
        self._linger_timer = None
        lingering, self._lingering = self._lingering, {}
        for (topic, number), state in lingering.items():
            self._start_hand_over(topic, number, state)

    def _start_hand_over(self, topic: str, number: int, state: _Partition) -> None:
        if state.handing_over is None and state.batches:
            state.handing_over = asyncio.create_task(self._hand_over(topic, number, state))

    async def _hand_over(self, topic: str, number: int, partition: _Partition) -> None:
        """Give the partition's batches to the producer, oldest first, until none is left."""
        try:
            while partition.batches:
                batch = partition.batches[0]
                if partition.open is batch:
                    partition.open = None  # from here on, new records go to a new batch
                batch.builder.close()
                try:
                    sent = await self._send_batch(batch, topic, number)
                except (KafkaError, TimeoutError) as exc:
                    if not batch.delivered.done():
                        batch.delivered.set_exception(exc)
                else:
                    sent.add_done_callback(partial(_settle, batch.delivered))
                partition.batches.popleft()
        finally:
            partition.handing_over = None
            # Cancelled (the service stops): whoever still waits gets an answer.
            for batch in partition.batches:
                if not batch.delivered.done():
                    batch.delivered.set_exception(KafkaError("producer stopped"))
            partition.batches.clear()
            partition.open = None

    async def _send_batch(self, batch: _Batch, topic: str, number: int) -> asyncio.Future[Any]:
        """Queue ``batch`` on the producer once the partition's batch before it has left.

        aiokafka gives up waiting for that after ``request_timeout_ms`` less the time waited so
        far, counted again on every turn (0.14): under a heavy load a batch was failed while the
        one before it was still on its way. It is asked again until ``give_up_s`` has passed
        since the batch was opened (by then its callers have given up too)."""
        while True:
            try:
                sent: asyncio.Future[Any] = await self._producer().send_batch(
                    batch.builder, topic, partition=number
                )
                return sent
            except KafkaTimeoutError:
                if time.monotonic() - batch.opened_at >= self.give_up_s:
                    raise


def _settle(delivered: asyncio.Future[None], sent: asyncio.Future[Any]) -> None:
    if delivered.done():
        return
    if sent.cancelled():
        delivered.set_exception(KafkaError("batch cancelled"))
    elif sent.exception() is not None:
        delivered.set_exception(sent.exception())  # type: ignore[arg-type]
    else:
        delivered.set_result(None)
