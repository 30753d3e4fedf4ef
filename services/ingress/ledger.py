"""The campaign requests already accepted, by this instance or any other (``sms.ingress-requests``).

At start the whole compacted topic is read up to its high watermark (no consumer group: every
instance needs every entry), then followed, so that a request retried to another instance is
recognised. A request with ids is known by them for ``ledger_retention_s``; one without ids (auto
replies) by its content key for ``idless_dedupe_s`` only. Its entry holds the request key its
message ids derive from, written first as a *pending* claim, so that a retry after a failure
reuses those ids; when two instances claim the same content, the claim first in the topic wins
on every instance (``RequestLedger.claimed``). An entry keeps counts and rejections, not bodies,
and is forgotten after its retention (the sender still deduplicates on message ids).
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
from shared.contract.events import IngressRequestAccepted, SchemaError, decode
from shared.contract.ids import CONTENT_PREFIX
from shared.contract.topics import INGRESS_REQUESTS

log = logging.getLogger(__name__)

_POLL_TIMEOUT_MS = 500
_MAX_RECORDS_PER_POLL = 10_000
_STALL_WARNING_S = 10.0


def ledger_key(tenant: str, identity: str) -> str:
    """sms.ingress-requests key: the tenant and the request's ids or content key."""
    return f"{tenant}:{identity}"


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    accepted: int
    rejected: list[dict[str, Any]]
    accepted_at: float  # Unix seconds; of the first acceptance for an id-less request
    request_key: str = ""
    pending: bool = False
    ambiguous: tuple[int, ...] = ()
    ambiguous_read_as: str = ""

    @classmethod
    def of(cls, event: IngressRequestAccepted) -> LedgerEntry:
        return cls(
            accepted=event.accepted,
            rejected=list(event.rejected),
            accepted_at=event.at.timestamp(),
            request_key=event.request_key,
            pending=event.pending,
            ambiguous=tuple(event.ambiguous),
            ambiguous_read_as=event.ambiguous_read_as,
        )

    @property
    def by_content(self) -> bool:
        return self.request_key.startswith(CONTENT_PREFIX)


class RequestLedger:
    """Requests known to be on Kafka (and id-less requests' claims), oldest first per kind."""

    def __init__(
        self,
        retention_s: float,
        content_window_s: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.retention_s = retention_s
        self.content_window_s = content_window_s
        self._clock = clock
        self._by_ids: OrderedDict[str, LedgerEntry] = OrderedDict()
        self._by_content: OrderedDict[str, LedgerEntry] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        return len(self._by_ids) + len(self._by_content)

    def get(self, key: str) -> LedgerEntry | None:
        entry = self._by_ids.get(key) or self._by_content.get(key)
        if entry is None or self._expired(entry):
            return None
        return entry

    def remember(self, key: str, event: IngressRequestAccepted) -> None:
        entry = LedgerEntry.of(event)
        try:
            if entry.by_content:
                current = self._by_content.get(key)
                if (
                    current is not None
                    and current.request_key != entry.request_key
                    and entry.accepted_at < current.accepted_at + self.content_window_s
                ):
                    # A later claim on content claimed within the window: the first in the
                    # topic wins, so every instance settles on the same message ids.
                    return
                table = self._by_content
            else:
                table = self._by_ids
            if self._expired(entry):
                return
            table[key] = entry
            table.move_to_end(key)
            self.expire()
        finally:
            self._wake(key)

    async def claimed(self, key: str, timeout_s: float) -> LedgerEntry | None:
        """The entry of ``key`` once there is one (this instance's claim, or an earlier one read
        from the topic); None if none arrived within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (entry := self.get(key)) is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            arrived: asyncio.Future[None] = loop.create_future()
            waiters = self._waiters.setdefault(key, [])
            waiters.append(arrived)
            try:
                await asyncio.wait_for(arrived, remaining)
            except TimeoutError:
                pass
            finally:
                if arrived in waiters:
                    waiters.remove(arrived)
                if not waiters and self._waiters.get(key) is waiters:
                    del self._waiters[key]
        return entry

    def forget(self, key: str) -> None:
        self._by_ids.pop(key, None)
        self._by_content.pop(key, None)

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
        """Drop entries past their retention, oldest first (they arrive roughly in time order)."""
        for table in (self._by_ids, self._by_content):
            while table:
                oldest = next(iter(table.values()))
                if not self._expired(oldest):
                    break
                table.popitem(last=False)
        metrics.LEDGER_ENTRIES.set(len(self))

    def _expired(self, entry: LedgerEntry) -> bool:
        keep_s = self.content_window_s if entry.by_content else self.retention_s
        return entry.accepted_at < self._clock() - keep_s

    def _wake(self, key: str) -> None:
        for waiter in self._waiters.pop(key, ()):
            if not waiter.done():
                waiter.set_result(None)


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
