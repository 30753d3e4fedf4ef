"""Publishing whole campaign batches: records appended to one open batch per partition.

``Publisher.publish`` calls ``producer.send`` once per record, which costs more Python time per
record than everything else ingress does for a recipient. Here records are appended to
``BatchBuilder``s, one open batch per partition shared by every request in flight, and handed to
the producer with ``send_batch``; the partition of each key is the one aiokafka's default
partitioner picks (murmur2 of the key, as the Java client), so a number's messages land where any
other producer of that key would put them.

The producer takes a partition's next batch only once the one before it is on its way, so one
task per partition hands its batches over, oldest first, and requests arriving meanwhile add to
the open one: under load many small requests share a produce request instead of each paying for
its own (and aiokafka is never asked to queue several batches for one partition: its wait for
that gives up early, in 0.14, subtracting the time waited so far again on every turn).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from functools import partial
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from shared.contract.topics import Topic
from shared.kafka.clients import KafkaUnavailable, Publisher

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


class BatchPublisher:
    """Publishes keyed records to several topics and waits until Kafka (acks=all) holds them all."""

    def __init__(self, publisher: Publisher, timeout_s: float) -> None:
        # The publisher's producer, read at each use: the publisher replaces a dead one.
        self.publisher = publisher
        self.timeout_s = timeout_s
        self._partitions: dict[tuple[str, int], _Partition] = defaultdict(_Partition)

    @property
    def producer(self) -> AIOKafkaProducer:
        return self.publisher.producer

    async def publish(self, records: Sequence[tuple[Topic, Sequence[tuple[bytes, bytes]]]]) -> None:
        """Raise KafkaUnavailable unless every record is acknowledged within the timeout.

        After a failure some records may still reach Kafka; callers retry the whole batch and
        consumers recognise repeats by their deterministic ids.
        """
        waits: set[asyncio.Future[None]] = set()
        producer = self.producer
        try:
            async with asyncio.timeout(self.timeout_s):
                for topic, items in records:
                    if items:
                        await self._append(topic.name, items, waits)
                # Not gather: giving up must not cancel batches other requests share.
                if waits:  # a request with no recipients left to publish waits for nothing
                    await asyncio.wait(waits)
            for delivered in waits:
                delivered.result()
        except (KafkaError, TimeoutError) as exc:
            await self.publisher.renew_if_broken(producer, exc)
            raise KafkaUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _append(
        self, topic: str, items: Sequence[tuple[bytes, bytes]], waits: set[asyncio.Future[None]]
    ) -> None:
        """Append ``items`` to their partitions' open batches; collect what to wait for."""
        partitions = sorted(await self.producer.partitions_for(topic))
        timestamp_ms = int(time.time() * 1000)
        touched: dict[int, _Partition] = {}
        for key, value in items:
            number = partition_for(key, partitions)
            partition = touched.get(number)
            if partition is None:
                partition = touched[number] = self._partitions[(topic, number)]
            batch = partition.open
            if (
                batch is None
                or batch.builder.append(key=key, value=value, timestamp=timestamp_ms) is None
            ):
                # A fresh batch always takes its first record, however large.
                batch = partition.open = _Batch(self.producer.create_batch())
                partition.batches.append(batch)
                batch.builder.append(key=key, value=value, timestamp=timestamp_ms)
            waits.add(batch.delivered)
        for number, partition in touched.items():
            if partition.handing_over is None:
                partition.handing_over = asyncio.create_task(
                    self._hand_over(topic, number, partition)
                )

    async def _hand_over(self, topic: str, number: int, partition: _Partition) -> None:
        """Give the partition's batches to the producer, oldest first, until none is left."""
        try:
            while partition.batches:
                batch = partition.batches[0]
                if partition.open is batch:
                    partition.open = None  # from here on, new records go to a new batch
                batch.builder.close()
                try:
                    sent = await self.producer.send_batch(batch.builder, topic, partition=number)
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


def _settle(delivered: asyncio.Future[None], sent: asyncio.Future[Any]) -> None:
    if delivered.done():
        return
    if sent.cancelled():
        delivered.set_exception(KafkaError("batch cancelled"))
    elif sent.exception() is not None:
        delivered.set_exception(sent.exception())  # type: ignore[arg-type]
    else:
        delivered.set_result(None)
