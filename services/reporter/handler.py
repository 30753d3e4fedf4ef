"""The reporter's record handler: status events become delivery reports, replies are batched.

When is an offset committed? Once the record's report was accepted by Optimove, dead-lettered, or
durably parked: its entry in the compacted ``sms.reporter-state`` acknowledged by Kafka (acks=all).
This is the retry-topic pattern: a parked report is retried by the timer of whichever instance
owns its partition (restored from the changelog after a rebalance or a crash), so nothing is lost.
A crash repeats at most the reports taken but not committed, which the reporter's runner bounds
by ``runner.max_in_flight`` (``hold_slots_until_committed``), plus the retries of parked reports
under way (``parked_max_in_flight``).

One record:

1. Unknown tenant: dead letter.
2. A delivery report for a message that already has parked reports queues behind them (parked
   too): the order per message holds across retries and restarts.
3. Otherwise it is tried in memory for up to ``inline_retry_s`` while its tenant's circuit lets
   requests through (``circuit.py``). Accepted: done. Refused (4xx but 429) or older than
   ``give_up_after_s``: dead letter with status code, response excerpt and attempts. Still
   failing, or the circuit is open: parked, ``due_at`` = its next attempt.

The timer looks at due entries every ``parked_poll_interval_s``. Heads whose tenant's circuit lets
a request through are sent (at most ``parked_max_in_flight`` at once; due replies of one tenant in
one request); the others are moved to a later turn, or dead-lettered once too old. A tenant whose
Optimove fails thus costs one request at a time, and the other tenants' reports flow at full speed.
When its circuit closes again, the tenant's parked reports are swept: retried at once, as places
free up, not at the turns the outage spread over up to ``max_backoff_s``.

Every request Optimove accepts is counted on ``sms.report-outcomes`` (``ReportOutcome``: messages
per campaign id, for the campaigns service), published with the outputs of the record or of the
parked entry's change it concludes, so before their offsets can be committed.

Records of ``sms.statuses`` are keyed by message id and the runner runs one key's records in
order; records of ``sms.inbound`` (keyed by tenant) run unchained so that several wait in one
batch, and ``InboundBatcher`` sends one tenant's batches one after another. Replies are separate
messages: those parked during an outage reach Optimove after newer ones that were not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiokafka import TopicPartition
from pydantic import ValidationError

from services.reporter.batching import InboundBatcher
from services.reporter.circuit import Circuits, Permit, TenantCircuit
from services.reporter.delivery import (
    Action,
    AttemptObserver,
    AttemptResult,
    Decision,
    DeliveryOutcome,
    ReportSender,
    RetryPolicy,
)
from services.reporter.metrics import (
    ATTEMPT_FAILURES,
    KIND_DELIVERY,
    KIND_INCOMING,
    KINDS,
    OPTIMOVE_UNAUTHORIZED,
    REPORT_REQUEST_DURATION,
    REPORTS,
    RESULT_ACCEPTED,
    RESULT_DEAD_LETTERED,
    RESULT_PARKED,
    STATUS_REPLY,
)
from services.reporter.parking import (
    ParkedCounts,
    ParkedEntry,
    ParkedKind,
    ParkedReport,
    deferred_due_at,
    delivery_key,
    incoming_key,
    key_prefix,
    record_source,
)
from shared import metrics
from shared.config import Settings, TenantSettings
from shared.events import (
    DeadLetter,
    E,
    InboundMessage,
    ReportKind,
    ReportOutcome,
    SchemaError,
    StatusEvent,
    decode,
)
from shared.kafka import KafkaUnavailable, OutRecord, Publisher
from shared.logs import mask_number
from shared.optimove import OptimoveContract
from shared.runner import PoisonRecord, Record
from shared.store import ChangelogStore, Entry, KeyLocks, PartitionNotReady
from shared.timers import fire_partitions, run_timer_passes
from shared.topics import DEAD_LETTERS, INBOUND, REPORT_OUTCOMES, REPORTER_STATE, STATUSES

log = logging.getLogger(__name__)

STAGE = "reporter"
INPUT_TOPICS = (STATUSES, INBOUND)
# Metric label for records naming a tenant we do not know: bounded, unlike the name itself.
UNKNOWN_TENANT_LABEL = "(unknown)"
# Due entries read per query of a timer pass.
_DUE_BATCH = 500
# With every retry place taken, the next pass waits for one to end, then this long for others.
_BACKLOG_PAUSE_S = 0.05


@dataclass(frozen=True)
class _Change:
    """One entry's next state, with the one it replaces (to undo it if publishing fails)."""

    key: str
    previous: Entry | None
    entry: ParkedEntry | None
    due_at: float | None
    dead_letters: Sequence[OutRecord] = ()
    # Metrics and logs, run once Kafka acknowledged the change.
    observe: Callable[[], None] | None = None


class _HeldPermit:
    """A circuit permit handed to a retry task: returned exactly once, however the task ends.

    A probe permit never returned would keep its tenant's circuit from ever probing again.
    """

    def __init__(self, circuit: TenantCircuit, permit: Permit) -> None:
        self.circuit = circuit
        self.permit = permit
        self._released = False

    def release(self, result: AttemptResult | None) -> None:
        if not self._released:
            self._released = True
            self.circuit.release(self.permit, result)


class ReporterHandler:
    """Consumes ``sms.statuses`` and ``sms.inbound`` and reports them to each tenant's Optimove."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.options = settings.reporter
        self.contract = OptimoveContract(settings.optimove)
        self.policy = RetryPolicy.from_settings(settings.reporter)
        self.clock = clock
        self.jitter = jitter
        self.circuits = Circuits(
            failure_threshold=self.options.circuit_failure_threshold,
            policy=self.policy,
            clock=clock,
            jitter=jitter,
        )
        self.store = ChangelogStore(
            settings.kafka, REPORTER_STATE, state_dir=self.options.state_dir, name=STAGE
        )
        self.locks = KeyLocks()
        self.parked = ParkedCounts()
        self.batcher = InboundBatcher(
            self._deliver_incoming,
            max_size=self.options.inbound_batch_size,
            max_delay_s=self.options.inbound_batch_delay_s,
        )
        self._session: aiohttp.ClientSession | None = None
        self._sender: ReportSender | None = None
        self._publisher: Publisher | None = None
        self._assigned: set[TopicPartition] = set()
        self._timer_task: asyncio.Task[None] | None = None
        # Held by a timer pass; a revoke waits for it so that no pass writes a lost partition.
        self._timer_pass = asyncio.Lock()
        # (partition, key) of parked entries being retried now, and the task retrying them.
        self._retrying: dict[tuple[int, str], asyncio.Task[None]] = {}
        # Circuit recoveries per tenant already acted on, and the sweeps they started: per
        # (partition, kind, tenant), the last key of the sweep's progress.
        self._recoveries_seen: dict[str, int] = {}
        self._sweeps: dict[tuple[int, str, str], str] = {}

    # -- lifecycle (called by ConsumerService) ---------------------------------------------------

    async def start(self, publisher: Publisher) -> None:
        self._publisher = publisher
        connector = aiohttp.TCPConnector(
            limit=self.options.runner.max_in_flight + self.options.parked_max_in_flight
        )
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar()
        )
        self._sender = ReportSender(
            self._session,
            self.policy,
            self.options.request_timeout_s,
            clock=self.clock,
            jitter=self.jitter,
        )
        self._timer_task = asyncio.create_task(self._run_timers(), name=f"{STAGE}-timers")

    async def stop(self) -> None:
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
            self._timer_task = None
        await self._cancel_retries(set(self._retrying.values()))
        await self.batcher.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
            self._sender = None
        self.parked.drop(self.store.partitions())
        self.store.close()

    async def on_assigned(self, partitions: set[TopicPartition]) -> None:
        self._assigned |= partitions
        try:
            await self._ensure_ready(_state_partitions(partitions))
        except KafkaUnavailable as exc:
            # Not fatal: ``handle`` restores a partition before touching it, and retries.
            log.warning("%s: restoring parked reports failed (%s); will retry", STAGE, exc)

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        self._assigned -= partitions
        # sms.statuses and sms.inbound share the state partitions: keep one still assigned.
        gone = _state_partitions(partitions) - _state_partitions(self._assigned)
        async with self._timer_pass:
            await self._cancel_retries(
                {task for (partition, _), task in self._retrying.items() if partition in gone}
            )
            self.store.drop(gone)
            self.parked.drop(gone)

    @property
    def retrying(self) -> int:
        """Parked entries whose retry is under way now."""
        return len(self._retrying)

    @property
    def sender(self) -> ReportSender:
        if self._sender is None:
            raise RuntimeError("ReporterHandler used before start()")
        return self._sender

    # -- runner hooks ----------------------------------------------------------------------------

    def ordering_key(self, record: Record) -> bytes | None:
        if record.topic == INBOUND.name:
            return None  # ordered by InboundBatcher instead
        key: bytes | None = record.key
        return key

    async def handle(self, record: Record) -> Sequence[OutRecord]:
        if record.topic == STATUSES.name:
            return await self._report_status(record)
        if record.topic == INBOUND.name:
            return await self._report_inbound(record)
        raise PoisonRecord(f"{STAGE} does not consume {record.topic}")

    # -- delivery reports ------------------------------------------------------------------------

    async def _report_status(self, record: Record) -> Sequence[OutRecord]:
        event = _decode(StatusEvent, record)
        context = event.context
        slug = context.tenant
        extra: dict[str, Any] = {
            "message_id": context.message_id,
            "tenant": slug,
            "status": event.status,
            "sub_status": event.sub_status,
            "number": mask_number(context.mobile_number),
        }
        tenant = self.settings.tenants.get(slug)
        if tenant is None:
            return [self._unknown_tenant(record, slug, KIND_DELIVERY, extra)]
        await self._ensure_ready({record.partition})
        key = delivery_key(slug, context.message_id)
        report = ParkedReport.from_record(record, since=self.clock())
        if await self._queue_behind(record.partition, key, report, event.status, extra):
            return []
        outcome = await self.sender.deliver(
            self.contract.delivery_report(tenant, event),
            self._observer(slug, KIND_DELIVERY, 1, extra),
            gate=self.circuits.get(slug),
            budget_s=self.options.inline_retry_s,
            first_attempt_at=report.since,
        )
        outputs = await self._conclude(
            record, key, KIND_DELIVERY, slug, event.status, report, outcome, extra
        )
        if outcome.accepted:
            return [*outputs, acknowledged(slug, KIND_DELIVERY, {context.campaign_id: 1})]
        return outputs

    async def _queue_behind(
        self, partition: int, key: str, report: ParkedReport, status: str, extra: dict[str, Any]
    ) -> bool:
        """Park ``report`` behind the message's parked reports, if it has any."""
        async with self.locks.hold(partition, key):
            previous = self.store.get_entry(partition, key)
            if previous is None:
                return False
            parked = ParkedEntry.from_value(previous.value)
            if parked.holds(report.source):
                return True  # read again after a crash: already queued
            slug = parked.tenant

            def observe() -> None:
                REPORTS.labels(slug, KIND_DELIVERY, status, RESULT_PARKED).inc()
                log.debug("delivery report queued behind parked ones", extra=extra)

            await self._write(
                partition,
                [_Change(key, previous, parked.queued(report), previous.due_at, observe=observe)],
            )
            return True

    # -- incoming messages -----------------------------------------------------------------------

    async def _report_inbound(self, record: Record) -> Sequence[OutRecord]:
        event = _decode(InboundMessage, record)
        slug = event.tenant
        extra: dict[str, Any] = {"tenant": slug, "event_id": event.event_id}
        if slug not in self.settings.tenants:
            return [self._unknown_tenant(record, slug, KIND_INCOMING, extra)]
        await self._ensure_ready({record.partition})
        key = incoming_key(slug, event.event_id)
        if self.store.get_entry(record.partition, key) is not None:
            return []  # read again after a crash: already parked
        report = ParkedReport.from_record(record, since=self.clock())
        outcome = await self.batcher.submit(slug, event)
        return await self._conclude(
            record, key, KIND_INCOMING, slug, STATUS_REPLY, report, outcome, extra
        )

    async def _deliver_incoming(self, slug: str, messages: list[InboundMessage]) -> DeliveryOutcome:
        tenant: TenantSettings = self.settings.tenants[slug]
        extra: dict[str, Any] = {"tenant": slug, "messages": len(messages)}
        outcome = await self.sender.deliver(
            self.contract.incoming_messages(tenant, messages),
            self._observer(slug, KIND_INCOMING, len(messages), extra),
            gate=self.circuits.get(slug),
            budget_s=self.options.inline_retry_s,
        )
        if outcome.accepted:
            log.debug("incoming messages accepted", extra={**extra, "attempts": outcome.attempts})
            # On Kafka before any of the batch's records is done, so before their commit.
            await self._publish_until_acknowledged(
                [acknowledged(slug, KIND_INCOMING, {"": len(messages)})]
            )
        elif outcome.decision.action is not Action.RETRY:
            # Logged once for the batch; each record dead-letters itself.
            self._log_not_delivered(KIND_INCOMING, outcome.decision, outcome.attempts, extra)
        return outcome

    # -- the end of an in-memory delivery --------------------------------------------------------

    async def _conclude(
        self,
        record: Record,
        key: str,
        kind: ParkedKind,
        slug: str,
        status: str,
        report: ParkedReport,
        outcome: DeliveryOutcome,
        extra: dict[str, Any],
    ) -> Sequence[OutRecord]:
        action = outcome.decision.action
        if action is Action.ACCEPTED:
            REPORTS.labels(slug, kind, status, RESULT_ACCEPTED).inc()
            return []
        if action is Action.RETRY:
            parked = ParkedEntry(
                kind=kind, tenant=slug, reports=[report.after(outcome.attempts, outcome.last)]
            )
            due_at = max(
                self.clock() + outcome.decision.delay_s,
                self.circuits.get(slug).next_attempt_at(),
            )
            await self._park(record.partition, key, parked, due_at, status, extra)
            return []
        if kind == KIND_DELIVERY:
            self._log_not_delivered(kind, outcome.decision, outcome.attempts, extra)
        REPORTS.labels(slug, kind, status, RESULT_DEAD_LETTERED).inc()
        metrics.DEAD_LETTERS.labels(STAGE, record.topic).inc()
        return [
            _dead_letter(
                source_topic=record.topic,
                key=report.key,
                fallback_key=record_source(record),
                payload=report.payload,
                reason=outcome.decision.reason,
                attempts=outcome.attempts,
                result=outcome.last,
            )
        ]

    async def _park(
        self,
        partition: int,
        key: str,
        parked: ParkedEntry,
        due_at: float,
        status: str,
        extra: dict[str, Any],
    ) -> None:
        async with self.locks.hold(partition, key):
            previous = self.store.get_entry(partition, key)
            entry: ParkedEntry = parked
            due: float | None = due_at
            if previous is not None:
                # Only a replayed record finds one; the stored entry and its turn stand.
                existing = ParkedEntry.from_value(previous.value)
                if existing.holds(parked.head.source):
                    return
                entry, due = existing.queued(parked.head), previous.due_at

            def observe() -> None:
                REPORTS.labels(parked.tenant, parked.kind, status, RESULT_PARKED).inc()
                log.debug(
                    "%s report parked until %.0f (%s)",
                    parked.kind,
                    due or 0.0,
                    parked.head.last_result().describe(),
                    extra=extra,
                )

            await self._write(partition, [_Change(key, previous, entry, due, observe=observe)])

    # -- timers: retrying parked reports ---------------------------------------------------------

    async def _run_timers(self) -> None:
        await run_timer_passes(lambda: self.fire_due(self.clock()), self._next_turn, name=STAGE)

    async def _next_turn(self) -> None:
        """Sleep until the next pass: the interval, or less when retries wait for a free place."""
        interval = self.options.parked_poll_interval_s
        running = set(self._retrying.values())
        if running and self._retry_capacity() <= 0:
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
        async with self._timer_pass:
            self._note_recoveries()
            return await fire_partitions(
                self.store.partitions(),
                lambda partition: self._fire_partition(partition, now),
                name=STAGE,
            )

    async def _fire_partition(self, partition: int, now: float) -> int:
        touched = 0
        while self.store.is_ready(partition) and self._retry_capacity() > 0:
            due = self.store.due(partition, now, limit=_DUE_BATCH)
            later: list[str] = []  # rescheduled or dead-lettered by this pass itself
            replies: dict[str, list[str]] = {}
            started = 0
            for key, value in due:
                if (partition, key) in self._retrying or self.locks.is_held(partition, key):
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
                elif self._retry_capacity() > 0:
                    if self._start_retry(partition, [key], parked.tenant, self._retry_delivery):
                        started += 1
                    else:
                        later.append(key)
            for slug, keys in replies.items():
                size = max(1, self.options.inbound_batch_size)
                for chunk in (keys[i : i + size] for i in range(0, len(keys), size)):
                    if self._retry_capacity() == 0:
                        break
                    if self._start_retry(partition, chunk, slug, self._retry_incoming):
                        started += 1
                    else:
                        later.extend(chunk)
            rescheduled = await self._reschedule(partition, later, now)
            touched += started + rescheduled
            if len(due) < _DUE_BATCH or started + rescheduled == 0:
                break
        return touched + self._sweep(partition)

    def _note_recoveries(self) -> None:
        """A sweep of every held partition for each tenant whose circuit closed since the last
        pass; sweeps of partitions no longer held are forgotten."""
        held = set(self.store.partitions())
        for stale in [sweep for sweep in self._sweeps if sweep[0] not in held]:
            del self._sweeps[stale]
        for tenant, recoveries in self.circuits.recoveries().items():
            if self._recoveries_seen.get(tenant, 0) == recoveries:
                continue
            self._recoveries_seen[tenant] = recoveries
            for partition in held:
                for kind in (KIND_DELIVERY, KIND_INCOMING):
                    self._sweeps[(partition, kind, tenant)] = ""

    def _sweep(self, partition: int) -> int:
        """Retry now the parked reports of tenants whose Optimove answers again, whatever their
        turn: during an outage their turns spread out up to ``max_backoff_s`` ahead, and Optimove
        wants reports in real time once it is back. Each sweep pages through the tenant's entries
        once, as retry places free up; returns how many retries it started."""
        started = 0
        for sweep, after in list(self._sweeps.items()):
            swept, kind, tenant = sweep
            if swept != partition or not self.store.is_ready(partition):
                continue
            page = self.store.scan_prefix(
                partition, key_prefix(kind, tenant), after=after, limit=_DUE_BATCH
            )
            keys = [
                key
                for key, value in page
                if (partition, key) not in self._retrying
                and not self.locks.is_held(partition, key)
                and _readable(Entry(value, None)) is not None
            ]
            incoming = kind == KIND_INCOMING
            size = max(1, self.options.inbound_batch_size) if incoming else 1
            retry = self._retry_incoming if incoming else self._retry_delivery
            cursor, finished = after, len(page) < _DUE_BATCH
            for chunk in (keys[i : i + size] for i in range(0, len(keys), size)):
                if self._retry_capacity() <= 0:
                    finished = False  # the next pass goes on after the last chunk started
                    break
                if not self._start_retry(partition, chunk, tenant, retry):
                    finished = True  # failing again: its next recovery sweeps again
                    break
                started += 1
                cursor = chunk[-1]
            else:
                cursor = page[-1][0] if page else after
            if finished:
                del self._sweeps[sweep]
            else:
                self._sweeps[sweep] = cursor
        return started

    def _retry_capacity(self) -> int:
        return self.options.parked_max_in_flight - len(set(self._retrying.values()))

    def _start_retry(
        self,
        partition: int,
        keys: list[str],
        slug: str,
        retry: Callable[[int, list[str], _HeldPermit], Coroutine[Any, Any, None]],
    ) -> bool:
        """Start retrying ``keys`` if the tenant's circuit lets a request go now."""
        circuit = self.circuits.get(slug)
        permit = circuit.acquire()
        if permit is None:
            return False
        held = _HeldPermit(circuit, permit)
        task = asyncio.create_task(self._guarded(retry(partition, keys, held)))
        for key in keys:
            self._retrying[(partition, key)] = task

        def _done(finished: asyncio.Task[None]) -> None:
            held.release(None)  # if the task ended before its request did
            for key in keys:
                if self._retrying.get((partition, key)) is finished:
                    del self._retrying[(partition, key)]

        task.add_done_callback(_done)
        return True

    @staticmethod
    async def _guarded(retry: Coroutine[Any, Any, None]) -> None:
        try:
            await retry
        except (KafkaUnavailable, PartitionNotReady) as exc:
            # The entry keeps its turn (or its partition moved on): a later pass sees to it.
            log.warning("%s: retry of a parked report not recorded (%s)", STAGE, exc)
        except Exception:
            log.exception("%s: retry of a parked report failed", STAGE)

    async def _cancel_retries(self, tasks: Iterable[asyncio.Task[None]]) -> None:
        waiting = list(tasks)
        for task in waiting:
            task.cancel()
        if waiting:
            await asyncio.gather(*waiting, return_exceptions=True)

    async def _retry_delivery(self, partition: int, keys: list[str], permit: _HeldPermit) -> None:
        """Send the head of one message's parked reports, then record what came of it."""
        (key,) = keys
        entry = self.store.get_entry(partition, key)
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
        extra = _delivery_extra(event)
        result = await self.sender.attempt(self.contract.delivery_report(tenant, event))
        permit.release(result)
        now = self.clock()
        attempts = head.attempts + 1
        decision = self.policy.decide(result, attempts, now - head.since, self.jitter)
        self._observer(parked.tenant, KIND_DELIVERY, 1, extra)(result, decision)
        outcomes = (
            [acknowledged(parked.tenant, KIND_DELIVERY, {event.context.campaign_id: 1})]
            if result.accepted
            else []
        )
        await self._settle(
            partition,
            {key: (head.after(attempts, result), decision)},
            now,
            event.status,
            extra,
            also=outcomes,
        )

    async def _retry_incoming(self, partition: int, keys: list[str], permit: _HeldPermit) -> None:
        """Send due replies of one tenant in one request, then record what came of it."""
        slug = key_tenant(keys[0])
        heads: dict[str, ParkedReport] = {}
        messages: list[InboundMessage] = []
        unreadable: dict[str, tuple[ParkedReport, Decision]] = {}
        for key in keys:
            entry = self.store.get_entry(partition, key)
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
        result = await self.sender.attempt(request)
        permit.release(result)
        now = self.clock()
        settled: dict[str, tuple[ParkedReport, Decision]] = {}
        for key, head in heads.items():
            attempts = head.attempts + 1
            decision = self.policy.decide(result, attempts, now - head.since, self.jitter)
            settled[key] = (head.after(attempts, result), decision)
        _, first = next(iter(settled.values()))
        self._observer(slug, KIND_INCOMING, len(messages), extra)(result, first)
        outcomes = []
        if result.accepted:
            outcomes.append(acknowledged(slug, KIND_INCOMING, {"": len(messages)}))
        await self._settle(partition, settled, now, STATUS_REPLY, extra, also=outcomes)

    async def _settle(
        self,
        partition: int,
        settled: dict[str, tuple[ParkedReport, Decision]],
        now: float,
        status: str,
        extra: dict[str, Any] | None = None,
        also: Sequence[OutRecord] = (),
    ) -> None:
        """Record what one attempt decided for the heads of these entries (their newer state),
        publishing ``also`` with it."""
        async with contextlib.AsyncExitStack() as held:
            for key in sorted(settled):
                await held.enter_async_context(self.locks.hold(partition, key))
            changes: list[_Change] = []
            for key, (head, decision) in settled.items():
                previous = self.store.get_entry(partition, key)
                if previous is None:
                    continue
                parked = ParkedEntry.from_value(previous.value)
                if parked.head.source != head.source:
                    continue  # settled already
                if decision.action in (Action.REFUSED, Action.GIVE_UP):
                    self._log_not_delivered(
                        parked.kind, decision, head.attempts, {**(extra or {}), "key": key}
                    )
                changes.append(self._settled(key, previous, parked, head, decision, now, status))
            await self._write(partition, changes, also)

    def _settled(
        self,
        key: str,
        previous: Entry,
        parked: ParkedEntry,
        head: ParkedReport,
        decision: Decision,
        now: float,
        status: str,
    ) -> _Change:
        slug, kind = parked.tenant, parked.kind
        if decision.action is Action.RETRY:
            retry_at = max(now + decision.delay_s, self.circuits.get(slug).next_attempt_at())
            return _Change(key, previous, parked.with_head(head), retry_at)
        rest = parked.without_head()
        # The next report of the message goes on the next pass.
        due_at = now if rest is not None else None
        if decision.action is Action.ACCEPTED:

            def accepted() -> None:
                REPORTS.labels(slug, kind, status, RESULT_ACCEPTED).inc()

            return _Change(key, previous, rest, due_at, observe=accepted)
        letter = _dead_letter(
            source_topic=head.topic,
            key=head.key,
            fallback_key=head.source,
            payload=head.payload,
            reason=decision.reason,
            attempts=head.attempts,
            result=head.last_result(),
        )

        def dead_lettered() -> None:
            REPORTS.labels(slug, kind, status, RESULT_DEAD_LETTERED).inc()
            metrics.DEAD_LETTERS.labels(STAGE, head.topic).inc()

        return _Change(key, previous, rest, due_at, [letter], dead_lettered)

    async def _reschedule(self, partition: int, keys: list[str], now: float) -> int:
        """Move due entries that cannot be sent now to a later turn, or dead-letter them.

        Dead-lettered here: reports past the give-up age, reports of tenants no longer
        configured, and entries that cannot be read.
        """
        if not keys:
            return 0
        async with contextlib.AsyncExitStack() as held:
            for key in sorted(keys):
                await held.enter_async_context(self.locks.hold(partition, key))
            changes: list[_Change] = []
            for key in keys:
                previous = self.store.get_entry(partition, key)
                if previous is None or previous.due_at is None or previous.due_at > now:
                    continue  # changed while we waited for its lock
                changes.append(self._rescheduled(key, previous, now))
            await self._write(partition, changes)
        return len(changes)

    def _rescheduled(self, key: str, previous: Entry, now: float) -> _Change:
        try:
            parked = ParkedEntry.from_value(previous.value)
        except ValidationError as exc:
            log.error("%s: unreadable parked entry %s dead-lettered: %s", STAGE, key, exc)
            letter = _dead_letter(
                source_topic=REPORTER_STATE.name,
                key=key,
                fallback_key=key,
                payload=_json_text(previous.value),
                reason=f"unreadable parked entry: {exc}",
                attempts=0,
                result=None,
            )
            return _Change(key, previous, None, None, [letter])
        head = parked.head
        status = _status_of(head)
        if parked.tenant not in self.settings.tenants:
            reason = f"unknown tenant {parked.tenant!r}: no longer in this deployment's config"
            decision = Decision(Action.REFUSED, reason=reason)
            return self._settled(key, previous, parked, head, decision, now, status)
        decision = self.policy.decide(
            head.last_result(), head.attempts, now - head.since, self.jitter
        )
        if decision.action is Action.GIVE_UP:
            log.error(
                "%s report dead-lettered: %s",
                parked.kind,
                decision.reason,
                extra={"tenant": parked.tenant, "attempts": head.attempts},
            )
            return self._settled(key, previous, parked, head, decision, now, status)
        due_at = deferred_due_at(
            head,
            now=now,
            not_before=self.circuits.get(parked.tenant).next_attempt_at(),
            policy=self.policy,
            jitter=self.jitter,
        )
        return _Change(key, previous, parked.with_head(head.waited()), due_at)

    # -- state -----------------------------------------------------------------------------------

    async def _ensure_ready(self, partitions: set[int]) -> None:
        missing = {p for p in partitions if not self.store.is_ready(p)}
        if not missing:
            return
        await self.store.restore(missing)
        for partition in missing:
            if self.store.is_ready(partition):
                self.parked.reset(
                    partition,
                    {
                        (slug, kind): self.store.count_prefix(partition, key_prefix(kind, slug))
                        for slug in self.settings.tenants
                        for kind in KINDS
                    },
                )

    async def _write(
        self, partition: int, changes: Sequence[_Change], also: Sequence[OutRecord] = ()
    ) -> None:
        """Store and publish the changes (entries, dead letters) and ``also``, or undo them."""
        if not changes and not also:
            return
        if self._publisher is None:
            raise RuntimeError(f"{STAGE} handler used before start()")
        outputs: list[OutRecord] = list(also)
        for change in changes:
            outputs.extend(change.dead_letters)
            value = change.entry.to_value() if change.entry is not None else None
            outputs.append(self.store.put(partition, change.key, value, change.due_at))
            self._count(partition, change.previous, change.entry, +1)
        try:
            await self._publisher.publish(outputs)
        except BaseException:
            self._undo(partition, changes)
            raise
        for change in changes:
            if change.observe is not None:
                change.observe()

    def _undo(self, partition: int, changes: Sequence[_Change]) -> None:
        """Put back what was stored, so that a retry finds the state it started from."""
        with contextlib.suppress(PartitionNotReady):  # dropped meanwhile: nothing to undo
            for change in changes:
                previous = change.previous
                self.store.put(
                    partition,
                    change.key,
                    previous.value if previous is not None else None,
                    previous.due_at if previous is not None else None,
                )
                self._count(partition, change.previous, change.entry, -1)

    def _count(
        self, partition: int, previous: Entry | None, entry: ParkedEntry | None, sign: int
    ) -> None:
        if (previous is None) == (entry is None):
            return
        parked = entry if entry is not None else _readable(previous)
        if parked is None:
            return
        delta = 1 if entry is not None else -1
        self.parked.change(partition, parked.tenant, parked.kind, sign * delta)

    async def _publish_until_acknowledged(self, records: Sequence[OutRecord]) -> None:
        """Publish ``records``, waiting for Kafka as long as it takes (as the runner does)."""
        if self._publisher is None:
            raise RuntimeError(f"{STAGE} handler used before start()")
        attempt = 0
        while True:
            try:
                await self._publisher.publish(records)
                return
            except KafkaUnavailable as exc:
                attempt += 1
                log.warning("%s: report outcome not published (%s); retrying", STAGE, exc)
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(attempt, 6)))

    # -- shared ----------------------------------------------------------------------------------

    def _observer(
        self, slug: str, kind: str, messages: int, extra: dict[str, Any]
    ) -> AttemptObserver:
        def observe(result: AttemptResult, decision: Decision) -> None:
            REPORT_REQUEST_DURATION.labels(slug, kind).observe(result.duration_s)
            if result.accepted:
                return
            ATTEMPT_FAILURES.labels(slug, kind, result.failure_code).inc()
            if result.status_code == 401:
                OPTIMOVE_UNAUTHORIZED.labels(slug).inc()
                log.error(
                    "Optimove answered 401 for tenant %s (%s report): check the tenant's "
                    "api_token and secret_key",
                    slug,
                    kind,
                    extra=extra,
                )
            elif decision.action is Action.RETRY:
                # The circuit logs a failing tenant once; every report's retry is detail.
                log.debug(
                    "%s report of %d message(s) not accepted (%s); next attempt in %.1fs",
                    kind,
                    messages,
                    result.describe(),
                    decision.delay_s,
                    extra=extra,
                )

        return observe

    @staticmethod
    def _log_not_delivered(
        kind: str, decision: Decision, attempts: int, extra: dict[str, Any]
    ) -> None:
        log.error(
            "%s report dead-lettered: %s",
            kind,
            decision.reason,
            extra={**extra, "attempts": attempts},
        )

    def _unknown_tenant(
        self, record: Record, slug: str, kind: str, extra: dict[str, Any]
    ) -> OutRecord:
        reason = f"unknown tenant {slug!r}: not in this deployment's configuration"
        log.error("%s report dead-lettered: %s", kind, reason, extra=extra)
        REPORTS.labels(UNKNOWN_TENANT_LABEL, kind, "unknown", RESULT_DEAD_LETTERED).inc()
        metrics.DEAD_LETTERS.labels(STAGE, record.topic).inc()
        key = record.key.decode("utf-8", "replace") if record.key is not None else None
        return _dead_letter(
            source_topic=record.topic,
            key=key,
            fallback_key=record_source(record),
            payload=(record.value or b"").decode("utf-8", "replace"),
            reason=reason,
            attempts=0,
            result=None,
        )


def acknowledged(slug: str, kind: ReportKind, counts: dict[str, int]) -> OutRecord:
    """What the campaigns service counts of a request Optimove accepted (``ReportOutcome``)."""
    return OutRecord(REPORT_OUTCOMES, slug, ReportOutcome(tenant=slug, kind=kind, counts=counts))


def _state_partitions(partitions: Iterable[TopicPartition]) -> set[int]:
    return {tp.partition for tp in partitions if tp.topic in {topic.name for topic in INPUT_TOPICS}}


def key_tenant(key: str) -> str:
    """The tenant named by a parked entry's key (``kind/tenant/id``)."""
    return key.split("/", 2)[1]


def _readable(entry: Entry | None) -> ParkedEntry | None:
    if entry is None:
        return None
    try:
        return ParkedEntry.from_value(entry.value)
    except ValidationError:
        return None


def _status_of(report: ParkedReport) -> str:
    """The metric label of a parked report's status."""
    if report.topic == INBOUND.name:
        return STATUS_REPLY
    try:
        return decode(StatusEvent, report.payload.encode("utf-8")).status
    except SchemaError:
        return "unknown"


def _delivery_extra(event: StatusEvent) -> dict[str, Any]:
    context = event.context
    return {
        "message_id": context.message_id,
        "tenant": context.tenant,
        "status": event.status,
        "sub_status": event.sub_status,
        "number": mask_number(context.mobile_number),
    }


def _json_text(value: dict[str, Any]) -> str:
    return orjson.dumps(value).decode("utf-8")


def _decode(model: type[E], record: Record) -> E:
    try:
        return decode(model, record.value)
    except SchemaError as exc:
        raise PoisonRecord(str(exc)) from None


def _dead_letter(
    *,
    source_topic: str,
    key: str | None,
    fallback_key: str,
    payload: str,
    reason: str,
    attempts: int,
    result: AttemptResult | None,
) -> OutRecord:
    return OutRecord(
        DEAD_LETTERS,
        key or fallback_key,
        DeadLetter(
            source_topic=source_topic,
            stage=STAGE,
            reason=reason,
            key=key,
            payload=payload,
            attempts=attempts,
            status_code=result.status_code if result is not None else None,
            response_excerpt=result.response_excerpt if result is not None else "",
            redrive_topic=source_topic,
        ),
    )
