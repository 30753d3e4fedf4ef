"""The campaign requests already accepted, by this instance or any other (``sms.ingress-requests``).

At start the whole compacted topic is read from the beginning up to its high watermark (no
consumer group: every instance needs every entry), then followed, so that a request retried to
another instance is recognised. Memory stays bounded: an entry keeps counts, not bodies, and
entries older than the retention are forgotten (the sender still deduplicates on message ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.ingress import metrics
from shared.events import IngressRequestAccepted, SchemaError, decode
from shared.topics import INGRESS_REQUESTS

log = logging.getLogger(__name__)

_POLL_TIMEOUT_MS = 500
_MAX_RECORDS_PER_POLL = 10_000
_STALL_WARNING_S = 10.0


def ledger_key(tenant: str, request_key: str) -> str:
    """sms.ingress-requests key."""
    return f"{tenant}:{request_key}"


@dataclass(frozen=True)
class LedgerEntry:
    accepted: int
    rejected: list[dict[str, Any]]
    accepted_at: float  # Unix seconds


class RequestLedger:
    """Requests known to be on Kafka, oldest first; forgets them after ``retention_s``."""

    def __init__(self, retention_s: float, clock: Callable[[], float] = time.time) -> None:
        self.retention_s = retention_s
        self._clock = clock
        self._entries: OrderedDict[str, LedgerEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> LedgerEntry | None:
        entry = self._entries.get(key)
        if entry is None or self._expired(entry):
            return None
        return entry

    def remember(self, key: str, event: IngressRequestAccepted) -> None:
        entry = LedgerEntry(event.accepted, list(event.rejected), event.at.timestamp())
        if self._expired(entry):
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        self.expire()

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """One record of sms.ingress-requests; a null value (tombstone) forgets the key."""
        if key is None:
            log.warning("%s: record without a key skipped", INGRESS_REQUESTS.name)
            return
        text_key = key.decode("utf-8", errors="replace")
        if value is None:
            self.forget(text_key)
            return
        try:
            event = decode(IngressRequestAccepted, value)
        except SchemaError as exc:
            log.warning("%s: undecodable record skipped: %s", INGRESS_REQUESTS.name, exc)
            return
        self.remember(text_key, event)

    def expire(self) -> None:
        """Drop entries past the retention, oldest first (entries arrive roughly in time order)."""
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if not self._expired(oldest):
                break
            self._entries.popitem(last=False)
        metrics.LEDGER_ENTRIES.set(len(self._entries))

    def _expired(self, entry: LedgerEntry) -> bool:
        return entry.accepted_at < self._clock() - self.retention_s


class LedgerFollower:
    """Reads sms.ingress-requests into a RequestLedger: up to the high watermark, then onwards."""

    def __init__(self, consumer: AIOKafkaConsumer, ledger: RequestLedger) -> None:
        self.consumer = consumer
        self.ledger = ledger
        self.caught_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self._task = asyncio.create_task(self._follow(), name="ingress-ledger")

    async def wait_caught_up(self) -> None:
        """Return once every entry that existed at start is known; raise if following failed."""
        assert self._task is not None, "start() first"
        caught_up = asyncio.create_task(self.caught_up.wait())
        try:
            await asyncio.wait({caught_up, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            caught_up.cancel()
        if not self.caught_up.is_set():
            await self._task  # raises what ended it
            raise RuntimeError("ledger follower ended before catching up")

    async def wait(self) -> None:
        """Return (or raise) only if following ends on its own."""
        assert self._task is not None, "start() first"
        await self._task

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # An error that ended the task was already raised by wait().
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        try:
            await self.consumer.stop()
        except asyncio.CancelledError:
            # aiokafka re-raises the cancellation of its own fetch tasks when the broker is gone;
            # only a cancellation of this task itself must propagate.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # stop() gave up before closing the client (aiokafka 0.14); close it ourselves.
            await self.consumer._client.close()
            log.warning("%s: consumer stopped while Kafka was unreachable", INGRESS_REQUESTS.name)

    async def _follow(self) -> None:
        partitions = [
            TopicPartition(INGRESS_REQUESTS.name, p)
            for p in sorted(
                self.consumer.partitions_for_topic(INGRESS_REQUESTS.name)
                or range(INGRESS_REQUESTS.partitions)
            )
        ]
        self.consumer.assign(partitions)
        await self.consumer.seek_to_beginning(*partitions)
        started = last_warning = time.monotonic()
        loaded = 0
        while True:
            batches = await self.consumer.getmany(
                timeout_ms=_POLL_TIMEOUT_MS, max_records=_MAX_RECORDS_PER_POLL
            )
            for records in batches.values():
                for record in records:
                    self.ledger.apply(record.key, record.value)
                loaded += len(records)
            if not self.caught_up.is_set():
                if await self._at_high_watermark(partitions):
                    self.caught_up.set()
                    log.info(
                        "%s: caught up with %d records (%d requests kept) in %.2fs",
                        INGRESS_REQUESTS.name,
                        loaded,
                        len(self.ledger),
                        time.monotonic() - started,
                    )
                elif time.monotonic() - last_warning > _STALL_WARNING_S:
                    last_warning = time.monotonic()
                    # Campaign requests get 503 meanwhile; a missing topic would stall us here.
                    log.warning(
                        "%s: still catching up after %.0fs (%d records read)",
                        INGRESS_REQUESTS.name,
                        last_warning - started,
                        loaded,
                    )
            self.ledger.expire()

    async def _at_high_watermark(self, partitions: list[TopicPartition]) -> bool:
        # Tansu cannot answer ListOffsets for the latest offset: the watermark comes from fetches.
        for tp in partitions:
            highwater = self.consumer.highwater(tp)
            if highwater is None or await self.consumer.position(tp) < highwater:
                return False
        return True
