"""The timer that retries parked reports: which due entries go, one request each, what came of it.

Heads whose tenant's circuit lets a request through are sent (at most ``parked_max_in_flight``
at once; due replies of one tenant in one request); the others are moved to a later turn, or
dead-lettered once too old. Acknowledgements whose time came are forgotten (deleted) by the same
passes (``acknowledged.py``). See ``docs/reporter.md``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

from pydantic import ValidationError

from services.reporter.acknowledged import (
    Remembered,
    delivery_identity,
    forgotten,
    incoming_identity,
    is_acknowledgement,
    remember,
)
from services.reporter.delivery import Action, AttemptResult, Decision, ReportSender, RetryPolicy
from services.reporter.metrics import KIND_DELIVERY, KIND_INCOMING, STATUS_REPLY
from services.reporter.outcomes import (
    STAGE,
    Change,
    acknowledged,
    delivery_extra,
    key_tenant,
    log_not_delivered,
    observer,
    readable,
    rescheduled,
    settled,
)
from services.reporter.parked_state import ParkedState
from services.reporter.parking import ParkedEntry, ParkedReport, key_prefix
from services.reporter.sweeps import RecoverySweeps
from services.reporter.tenant_circuits import TenantCircuit, TenantCircuits
from shared.config import Settings
from shared.contract.events import InboundMessage, SchemaError, StatusEvent, decode
from shared.contract.optimove import OptimoveContract
from shared.kafka.clients import KafkaUnavailable, OutRecord
from shared.kafka.store import Entry, PartitionNotReady
from shared.kafka.timers import fire_partitions, run_timer_passes

log = logging.getLogger(__name__)

# Due entries read per query of a timer pass.
_DUE_BATCH = 500
# With every retry place taken, the next pass waits for one to end, then this long for others.
_BACKLOG_PAUSE_S = 0.05

Retry = Callable[[int, list[str], "HeldPermit"], Coroutine[Any, Any, None]]


class HeldPermit:
    """A circuit permit handed to a retry task: returned exactly once, however the task ends.

    A probe permit never returned would keep its tenant's circuit from ever probing again.
    """

    def __init__(self, circuit: TenantCircuit, permit: object) -> None:
        self.circuit = circuit
        self.permit = permit
        self._released = False

    def release(self, result: AttemptResult | None) -> None:
        if not self._released:
            self._released = True
            self.circuit.release(self.permit, result)


class ParkedRetries:
    """Timer passes over the parked entries, and the retry tasks they start."""

    def __init__(
        self,
        settings: Settings,
        state: ParkedState,
        circuits: TenantCircuits,
        sender: Callable[[], ReportSender],
        *,
        clock: Callable[[], float],
        jitter: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.options = settings.reporter
        self.contract = OptimoveContract(settings.optimove)
        self.policy = RetryPolicy.from_settings(settings.reporter)
        self.state = state
        self.circuits = circuits
        self.sender = sender
        self.clock = clock
        self.jitter = jitter
        # Held by a timer pass; a revoke waits for it so that no pass writes a lost partition.
        self.timer_pass = asyncio.Lock()
        # (partition, key) of parked entries being retried now, and the task retrying them.
        self.retrying: dict[tuple[int, str], asyncio.Task[None]] = {}
        self.sweeps = RecoverySweeps()

    async def run(self) -> None:
        await run_timer_passes(lambda: self.fire_due(self.clock()), self._next_turn, name=STAGE)

    async def _next_turn(self) -> None:
        """Sleep until the next pass: the interval, or less when retries wait for a free place."""
        interval = self.options.parked_poll_interval_s
        running = set(self.retrying.values())
        if running and self._capacity() <= 0:
            # A backlog (a tenant back after an outage) drains as fast as retries end.
            await asyncio.wait(running, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(min(interval, _BACKLOG_PAUSE_S))
        else:
            await asyncio.sleep(interval)

    async def fire_due(self, now: float) -> int:
        """Retry or reschedule the parked reports due at ``now``; returns how many were touched.

        Retries run in tasks of their own (this returns before they end); reschedules and dead
        letters of this pass are on Kafka when it returns.
        """
        async with self.timer_pass:
            self.sweeps.note(self.state.store.partitions(), self.circuits.recoveries())
            return await fire_partitions(
                self.state.store.partitions(),
                lambda partition: self._fire_partition(partition, now),
                name=STAGE,
            )

    async def _fire_partition(self, partition: int, now: float) -> int:
        store = self.state.store
        touched = 0
        while store.is_ready(partition) and self._capacity() > 0:
            due = store.due(partition, now, limit=_DUE_BATCH)
            later: list[str] = []  # rescheduled or dead-lettered by this pass itself
            expired: list[str] = []  # acknowledgements to forget
            replies: dict[str, list[str]] = {}
            started = 0
            for key, value in due:
                if self._busy(partition, key):
                    continue
                if is_acknowledgement(key):
                    expired.append(key)
                    continue
                try:
                    parked = ParkedEntry.from_value(value)
                except ValidationError:
                    later.append(key)
                    continue
                if parked.tenant not in self.settings.tenants:
                    later.append(key)
                elif parked.kind == KIND_INCOMING:
                    replies.setdefault(parked.tenant, []).append(key)
                elif self._capacity() > 0:
                    if self._start(partition, [key], parked.tenant, self._retry_delivery):
                        started += 1
                    else:
                        later.append(key)
            for slug, keys in replies.items():
                for chunk in _chunks(keys, max(1, self.options.inbound_batch_size)):
                    if self._capacity() == 0:
                        break
                    if self._start(partition, chunk, slug, self._retry_incoming):
                        started += 1
                    else:
                        later.extend(chunk)
            rescheduled_now = await self._reschedule(partition, later, now)
            rescheduled_now += await self._forget(partition, expired, now)
            touched += started + rescheduled_now
            if len(due) < _DUE_BATCH or started + rescheduled_now == 0:
                break
        return touched + self._sweep(partition)

    def _sweep(self, partition: int) -> int:
        """Retry now the parked reports of tenants whose Optimove answers again, whatever their
        turn (``sweeps.py``); returns how many retries it started."""
        store = self.state.store
        started = 0
        for sweep, after in self.sweeps.of_partition(partition):
            _, kind, tenant = sweep
            if not store.is_ready(partition):
                continue
            page = store.scan_prefix(
                partition, key_prefix(kind, tenant), after=after, limit=_DUE_BATCH
            )
            keys = [
                key
                for key, value in page
                if not self._busy(partition, key) and readable(Entry(value, None)) is not None
            ]
            incoming = kind == KIND_INCOMING
            size = max(1, self.options.inbound_batch_size) if incoming else 1
            retry = self._retry_incoming if incoming else self._retry_delivery
            cursor, finished = after, len(page) < _DUE_BATCH
            for chunk in _chunks(keys, size):
                if self._capacity() <= 0:
                    finished = False  # the next pass goes on after the last chunk started
                    break
                if not self._start(partition, chunk, tenant, retry):
                    finished = True  # failing again: its next recovery sweeps again
                    break
                started += 1
                cursor = chunk[-1]
            else:
                cursor = page[-1][0] if page else after
            self.sweeps.advance(sweep, cursor, finished)
        return started

    def _busy(self, partition: int, key: str) -> bool:
        return (partition, key) in self.retrying or self.state.locks.is_held(partition, key)

    def _capacity(self) -> int:
        return self.options.parked_max_in_flight - len(set(self.retrying.values()))

    def _start(self, partition: int, keys: list[str], slug: str, retry: Retry) -> bool:
        """Start retrying ``keys`` if the tenant's circuit lets a request go now."""
        circuit = self.circuits.get(slug)
        permit = circuit.acquire()
        if permit is None:
            return False
        held = HeldPermit(circuit, permit)
        task = asyncio.create_task(_guarded(retry(partition, keys, held)))
        for key in keys:
            self.retrying[(partition, key)] = task

        def _done(finished: asyncio.Task[None]) -> None:
            held.release(None)  # if the task ended before its request did
            for key in keys:
                if self.retrying.get((partition, key)) is finished:
                    del self.retrying[(partition, key)]

        task.add_done_callback(_done)
        return True

    async def cancel(self, partitions: set[int] | None = None) -> None:
        """Cancel the retries under way (of ``partitions`` only, if given) and wait for them."""
        await _cancel(
            {
                task
                for (partition, _), task in self.retrying.items()
                if partitions is None or partition in partitions
            }
        )

    async def _retry_delivery(self, partition: int, keys: list[str], permit: HeldPermit) -> None:
        """Send the head of one message's parked reports, then record what came of it."""
        (key,) = keys
        entry = self.state.store.get_entry(partition, key)
        if entry is None:
            return
        parked = ParkedEntry.from_value(entry.value)
        head = parked.head
        tenant = self.settings.tenants[parked.tenant]
        try:
            event = decode(StatusEvent, head.payload.encode("utf-8"))
        except SchemaError as exc:
            permit.release(None)
            refusal = Decision(Action.REFUSED, reason=f"unreadable parked report: {exc}")
            await self._settle(partition, {key: (head, refusal)}, self.clock(), "unknown")
            return
        extra = delivery_extra(event)
        identity = delivery_identity(event)
        if self.state.acknowledged(partition, identity, self.clock()):
            # The same report was queued twice (written twice upstream) and the first copy was
            # accepted: this one is done without a request.
            permit.release(None)
            skip = Decision(Action.ACCEPTED)
            await self._settle(partition, {key: (head, skip)}, self.clock(), event.status, extra)
            return
        result = await self.sender().attempt(self.contract.delivery_report(tenant, event))
        permit.release(result)
        now = self.clock()
        attempts = head.attempts + 1
        decision = self.policy.decide(result, attempts, now - head.since, self.jitter)
        observer(parked.tenant, KIND_DELIVERY, 1, extra)(result, decision)
        outcomes, remembered = [], []
        if result.accepted:
            outcomes.append(
                acknowledged(parked.tenant, KIND_DELIVERY, {event.context.campaign_id: 1})
            )
            remembered = remember([identity], now, self.state.remember_s)
        settled_heads = {key: (head.after(attempts, result), decision)}
        await self._settle(partition, settled_heads, now, event.status, extra, outcomes, remembered)

    async def _retry_incoming(self, partition: int, keys: list[str], permit: HeldPermit) -> None:
        """Send due replies of one tenant in one request, then record what came of it."""
        slug = key_tenant(keys[0])
        heads: dict[str, ParkedReport] = {}
        messages: list[InboundMessage] = []
        unreadable: dict[str, tuple[ParkedReport, Decision]] = {}
        for key in keys:
            entry = self.state.store.get_entry(partition, key)
            if entry is None:
                continue
            head = ParkedEntry.from_value(entry.value).head
            try:
                messages.append(decode(InboundMessage, head.payload.encode("utf-8")))
            except SchemaError as exc:
                refusal = Decision(Action.REFUSED, reason=f"unreadable parked reply: {exc}")
                unreadable[key] = (head, refusal)
                continue
            heads[key] = head
        if unreadable:
            await self._settle(partition, unreadable, self.clock(), STATUS_REPLY)
        if not messages:
            return
        extra: dict[str, Any] = {"tenant": slug, "messages": len(messages)}
        request = self.contract.incoming_messages(self.settings.tenants[slug], messages)
        result = await self.sender().attempt(request)
        permit.release(result)
        now = self.clock()
        decided: dict[str, tuple[ParkedReport, Decision]] = {}
        for key, head in heads.items():
            attempts = head.attempts + 1
            decision = self.policy.decide(result, attempts, now - head.since, self.jitter)
            decided[key] = (head.after(attempts, result), decision)
        _, first = next(iter(decided.values()))
        observer(slug, KIND_INCOMING, len(messages), extra)(result, first)
        outcomes, remembered = [], []
        if result.accepted:
            outcomes.append(acknowledged(slug, KIND_INCOMING, {"": len(messages)}))
            identities = [incoming_identity(message) for message in messages]
            remembered = remember(identities, now, self.state.remember_s)
        await self._settle(partition, decided, now, STATUS_REPLY, extra, outcomes, remembered)

    async def _settle(
        self,
        partition: int,
        decided: dict[str, tuple[ParkedReport, Decision]],
        now: float,
        status: str,
        extra: dict[str, Any] | None = None,
        also: Sequence[OutRecord] = (),
        remembered: Sequence[Remembered] = (),
    ) -> None:
        """Record what one attempt decided for the heads of these entries (their newer state),
        publishing ``also`` and storing the acknowledgements ``remembered`` with it."""
        async with self.state.locks.hold_all(
            partition, [*decided, *(write.key for write in remembered)]
        ):
            changes: list[Change] = []
            for key, (head, decision) in decided.items():
                previous = self.state.store.get_entry(partition, key)
                if previous is None:
                    continue
                parked = ParkedEntry.from_value(previous.value)
                if parked.head.source != head.source:
                    continue  # settled already
                if decision.action in (Action.REFUSED, Action.GIVE_UP):
                    log_not_delivered(
                        parked.kind, decision, head.attempts, {**(extra or {}), "key": key}
                    )
                changes.append(
                    settled(key, previous, parked, head, decision, now, status, self._not_before)
                )
            await self.state.write(partition, changes, also, remembered=remembered)

    async def _forget(self, partition: int, keys: list[str], now: float) -> int:
        """Delete the acknowledgements among ``keys`` whose time came (memory stays bounded)."""
        if not keys:
            return 0
        async with self.state.locks.hold_all(partition, keys):
            store = self.state.store
            deletes = forgotten([(key, store.get_entry(partition, key)) for key in keys], now)
            await self.state.write(partition, [], remembered=deletes)
        return len(deletes)

    async def _reschedule(self, partition: int, keys: list[str], now: float) -> int:
        """Move due entries that cannot be sent now to a later turn, or dead-letter them."""
        if not keys:
            return 0
        async with self.state.locks.hold_all(partition, keys):
            changes: list[Change] = []
            for key in keys:
                previous = self.state.store.get_entry(partition, key)
                if previous is None or previous.due_at is None or previous.due_at > now:
                    continue  # changed while we waited for its lock
                changes.append(
                    rescheduled(
                        key,
                        previous,
                        now,
                        tenants=self.settings.tenants,
                        policy=self.policy,
                        jitter=self.jitter,
                        not_before=self._not_before,
                    )
                )
            await self.state.write(partition, changes)
        return len(changes)

    def _not_before(self, slug: str) -> float:
        return self.circuits.get(slug).next_attempt_at()


def _chunks(keys: list[str], size: int) -> Iterable[list[str]]:
    return (keys[i : i + size] for i in range(0, len(keys), size))


async def _guarded(retry: Coroutine[Any, Any, None]) -> None:
    try:
        await retry
    except (KafkaUnavailable, PartitionNotReady) as exc:
        # The entry keeps its turn (or its partition moved on): a later pass sees to it.
        log.warning("%s: retry of a parked report not recorded (%s)", STAGE, exc)
    except Exception:
        log.exception("%s: retry of a parked report failed", STAGE)


async def _cancel(tasks: Iterable[asyncio.Task[None]]) -> None:
    waiting = list(tasks)
    for task in waiting:
        task.cancel()
    if waiting:
        await asyncio.gather(*waiting, return_exceptions=True)
