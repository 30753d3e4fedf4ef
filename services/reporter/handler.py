"""The reporter's record handler: status events become delivery reports, replies are batched.

An offset is committed once its report was accepted by Optimove (and that acknowledgement
stored, ``acknowledged.py``: a replay posts nothing twice), dead-lettered, or durably parked on
the compacted ``sms.reporter-state`` (acks=all); parked reports are retried by the timer of
whichever instance owns the partition (``retries.py``). What becomes of each report is decided
in ``outcomes.py``; stored in ``parked_state.py``. The guarantees, the circuit per tenant and the
order of reports are explained once in ``docs/reporter.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiokafka import TopicPartition

from services.reporter.acknowledged import delivery_identity, incoming_identity
from services.reporter.batching import InboundBatcher
from services.reporter.delivery import Action, DeliveryOutcome, ReportSender, RetryPolicy
from services.reporter.metrics import (
    KIND_DELIVERY,
    KIND_INCOMING,
    REPORTS,
    RESULT_ACCEPTED,
    RESULT_DEAD_LETTERED,
    STATUS_REPLY,
)
from services.reporter.outcomes import (
    STAGE,
    acknowledged,
    dead_letter,
    log_not_delivered,
    merge_acknowledged,
    observer,
    skipped_as_acknowledged,
    unknown_tenant,
)
from services.reporter.parked_state import ParkedState
from services.reporter.parking import (
    PARKED_DELIVERIES,
    ParkedEntry,
    ParkedKind,
    ParkedReport,
    delivery_key,
    incoming_key,
    record_source,
)
from services.reporter.retries import ParkedRetries
from services.reporter.tenant_circuits import TenantCircuits
from shared import metrics
from shared.config import Settings, TenantSettings
from shared.contract.events import InboundMessage, StatusEvent
from shared.contract.optimove import OptimoveContract
from shared.contract.topics import INBOUND, REPORTER_STATE, STATUSES
from shared.http_client import HttpClient
from shared.kafka.clients import KafkaUnavailable, OutRecord, Publisher
from shared.kafka.outbox import Outbox
from shared.kafka.runner import PoisonRecord, Record, decode_or_poison
from shared.kafka.store import ChangelogStore
from shared.logs import mask_number

__all__ = ["INPUT_TOPICS", "STAGE", "ReporterHandler"]

log = logging.getLogger(__name__)

INPUT_TOPICS = (STATUSES, INBOUND)


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
        self.circuits = TenantCircuits(
            failure_threshold=self.options.circuit_failure_threshold,
            policy=self.policy,
            clock=clock,
            jitter=jitter,
        )
        store = ChangelogStore(
            settings.kafka,
            REPORTER_STATE,
            state_dir=self.options.state_dir,
            name=STAGE,
            counted_prefixes=(PARKED_DELIVERIES,),
        )
        self.state = ParkedState(
            store, lambda: settings.tenants, remember_s=self.options.remember_acknowledged_s
        )
        self.retries = ParkedRetries(
            settings, self.state, self.circuits, lambda: self.sender, clock=clock, jitter=jitter
        )
        self.batcher = InboundBatcher(
            self._deliver_incoming,
            max_size=self.options.inbound_batch_size,
            max_delay_s=self.options.inbound_batch_delay_s,
        )
        self._session: HttpClient | None = None
        self._sender: ReportSender | None = None
        self._assigned: set[TopicPartition] = set()
        self._timer_task: asyncio.Task[None] | None = None

    @property
    def store(self) -> ChangelogStore:
        return self.state.store

    # -- lifecycle (called by ConsumerService) ---------------------------------------------------

    async def start(self, publisher: Publisher) -> None:
        # Acknowledgements of one event-loop turn share a publish, their counts one record.
        self.state.publisher = Outbox(publisher, name=STAGE, merge=merge_acknowledged)
        self._session = HttpClient(
            timeout_s=self.options.request_timeout_s,
            limit=self.options.runner.max_in_flight + self.options.parked_max_in_flight,
        )
        self._sender = ReportSender(
            self._session,
            self.policy,
            self.options.request_timeout_s,
            clock=self.clock,
            jitter=self.jitter,
        )
        self._timer_task = asyncio.create_task(self.retries.run(), name=f"{STAGE}-timers")

    async def stop(self) -> None:
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
            self._timer_task = None
        await self.retries.cancel()
        await self.batcher.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
            self._sender = None
        self.state.close()

    async def on_assigned(self, partitions: set[TopicPartition]) -> None:
        self._assigned |= partitions
        try:
            await self.state.ensure_ready(_state_partitions(partitions))
        except KafkaUnavailable as exc:
            # Not fatal: ``handle`` restores a partition before touching it, and retries.
            log.warning("%s: restoring parked reports failed (%s); will retry", STAGE, exc)

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        self._assigned -= partitions
        # sms.statuses and sms.inbound share the state partitions: keep one still assigned.
        gone = _state_partitions(partitions) - _state_partitions(self._assigned)
        async with self.retries.timer_pass:
            await self.retries.cancel(gone)
            self.state.drop(gone)

    @property
    def retrying(self) -> int:
        """Parked entries whose retry is under way now."""
        return len(self.retries.retrying)

    @property
    def sender(self) -> ReportSender:
        if self._sender is None:
            raise RuntimeError("ReporterHandler used before start()")
        return self._sender

    async def fire_due(self, now: float) -> int:
        """One timer pass at ``now`` (``ParkedRetries.fire_due``)."""
        return await self.retries.fire_due(now)

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
        event = decode_or_poison(StatusEvent, record.value)
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
            return [unknown_tenant(record, slug, KIND_DELIVERY, extra)]
        await self.state.ensure_ready({record.partition})
        identity = delivery_identity(event)
        if self.state.acknowledged(record.partition, identity, self.clock()):
            skipped_as_acknowledged(slug, KIND_DELIVERY, extra)
            return []
        key = delivery_key(slug, context.message_id)
        since = self.clock()
        if await self.state.queue_behind(
            record.partition,
            key,
            lambda: ParkedReport.from_record(record, since),
            event.status,
            extra,
        ):
            return []
        outcome = await self.sender.deliver(
            self.contract.delivery_report(tenant, event),
            observer(slug, KIND_DELIVERY, 1, extra),
            gate=self.circuits.get(slug),
            budget_s=self.options.inline_retry_s,
            first_attempt_at=since,
        )
        if outcome.accepted:
            counted = acknowledged(slug, KIND_DELIVERY, {context.campaign_id: 1})
            await self.state.remember(record.partition, [identity], self.clock(), [counted])
        return await self._conclude(
            record, key, KIND_DELIVERY, slug, event.status, since, outcome, extra
        )

    # -- incoming messages -----------------------------------------------------------------------

    async def _report_inbound(self, record: Record) -> Sequence[OutRecord]:
        event = decode_or_poison(InboundMessage, record.value)
        slug = event.tenant
        extra: dict[str, Any] = {"tenant": slug, "event_id": event.event_id}
        if slug not in self.settings.tenants:
            return [unknown_tenant(record, slug, KIND_INCOMING, extra)]
        await self.state.ensure_ready({record.partition})
        key = incoming_key(slug, event.event_id)
        if self.store.get_entry(record.partition, key) is not None:
            return []  # read again after a crash: already parked
        identity = incoming_identity(event)
        if self.state.acknowledged(record.partition, identity, self.clock()):
            skipped_as_acknowledged(slug, KIND_INCOMING, extra)
            return []
        since = self.clock()
        outcome = await self.batcher.submit(slug, event)
        if outcome.accepted:
            await self.state.remember(record.partition, [identity], self.clock())
        return await self._conclude(
            record, key, KIND_INCOMING, slug, STATUS_REPLY, since, outcome, extra
        )

    async def _deliver_incoming(self, slug: str, messages: list[InboundMessage]) -> DeliveryOutcome:
        tenant: TenantSettings = self.settings.tenants[slug]
        extra: dict[str, Any] = {"tenant": slug, "messages": len(messages)}
        outcome = await self.sender.deliver(
            self.contract.incoming_messages(tenant, messages),
            observer(slug, KIND_INCOMING, len(messages), extra),
            gate=self.circuits.get(slug),
            budget_s=self.options.inline_retry_s,
        )
        if outcome.accepted:
            log.debug("incoming messages accepted", extra={**extra, "attempts": outcome.attempts})
            # On Kafka before any of the batch's records is done, so before their commit.
            await self.state.publish_until_acknowledged(
                [acknowledged(slug, KIND_INCOMING, {"": len(messages)})]
            )
        elif outcome.decision.action is not Action.RETRY:
            # Logged once for the batch; each record dead-letters itself.
            log_not_delivered(KIND_INCOMING, outcome.decision, outcome.attempts, extra)
        return outcome

    # -- the end of an in-memory delivery --------------------------------------------------------

    async def _conclude(
        self,
        record: Record,
        key: str,
        kind: ParkedKind,
        slug: str,
        status: str,
        since: float,
        outcome: DeliveryOutcome,
        extra: dict[str, Any],
    ) -> Sequence[OutRecord]:
        action = outcome.decision.action
        if action is Action.ACCEPTED:
            REPORTS.labels(slug, kind, status, RESULT_ACCEPTED).inc()
            return []
        # Made only now: an accepted report (nearly all) never needs its copy of the record.
        report = ParkedReport.from_record(record, since)
        if action is Action.RETRY:
            parked = ParkedEntry(
                kind=kind, tenant=slug, reports=[report.after(outcome.attempts, outcome.last)]
            )
            due_at = max(
                self.clock() + outcome.decision.delay_s,
                self.circuits.get(slug).next_attempt_at(),
            )
            await self.state.park(record.partition, key, parked, due_at, status, extra)
            return []
        if kind == KIND_DELIVERY:
            log_not_delivered(kind, outcome.decision, outcome.attempts, extra)
        REPORTS.labels(slug, kind, status, RESULT_DEAD_LETTERED).inc()
        metrics.DEAD_LETTERS.labels(STAGE, record.topic).inc()
        return [
            dead_letter(
                source_topic=record.topic,
                key=report.key,
                fallback_key=record_source(record),
                payload=report.payload,
                reason=outcome.decision.reason,
                attempts=outcome.attempts,
                result=outcome.last,
            )
        ]


def _state_partitions(partitions: Iterable[TopicPartition]) -> set[int]:
    return {tp.partition for tp in partitions if tp.topic in {topic.name for topic in INPUT_TOPICS}}
