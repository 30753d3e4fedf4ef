"""The reporter's record handler: status events become delivery reports, replies are batched.

A record's handler returns only once Optimove accepted its report (the offset may then commit),
or with a dead letter for it (committed once the dead letter is on Kafka). Records of
``sms.statuses`` are keyed by message id, so the runner keeps one message's reports in order.
Records of ``sms.inbound`` are keyed by tenant; they run unchained so that many can wait in one
batch, and ``InboundBatcher`` sends one tenant's batches one after another, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

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
    KIND_DELIVERY,
    KIND_INCOMING,
    OPTIMOVE_UNAUTHORIZED,
    REPORT_REQUEST_DURATION,
    REPORTS,
    RESULT_ACCEPTED,
    RESULT_DEAD_LETTERED,
    RESULT_RETRIED,
)
from shared import metrics
from shared.config import Settings, TenantSettings
from shared.events import DeadLetter, E, InboundMessage, SchemaError, StatusEvent, decode
from shared.kafka import OutRecord, Publisher
from shared.logs import mask_number
from shared.optimove import OptimoveContract
from shared.runner import PoisonRecord, Record
from shared.topics import DEAD_LETTERS, INBOUND, STATUSES

log = logging.getLogger(__name__)

STAGE = "reporter"
# Metric label for records naming a tenant we do not know: bounded, unlike the name itself.
UNKNOWN_TENANT_LABEL = "(unknown)"

DeliverBatch = Callable[[str, list[InboundMessage]], Awaitable[DeliveryOutcome]]


@dataclass
class _OpenBatch:
    result: asyncio.Future[DeliveryOutcome]
    messages: list[InboundMessage] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class InboundBatcher:
    """Collects one tenant's replies into one request; every caller waits for its batch's fate.

    A batch is sealed when it holds ``max_size`` messages or ``max_delay_s`` after its first one,
    whichever comes first. Sealed batches of one tenant are delivered one at a time, oldest
    first, so replies reach Optimove in the order they were read.
    """

    def __init__(self, deliver: DeliverBatch, *, max_size: int, max_delay_s: float) -> None:
        self._deliver = deliver
        self.max_size = max(1, max_size)
        self.max_delay_s = max(0.0, max_delay_s)
        self._open: dict[str, _OpenBatch] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def submit(self, tenant: str, message: InboundMessage) -> DeliveryOutcome:
        loop = asyncio.get_running_loop()
        batch = self._open.get(tenant)
        if batch is None:
            batch = _OpenBatch(result=loop.create_future())
            batch.result.add_done_callback(_consume_exception)
            batch.timer = loop.call_later(self.max_delay_s, self._seal, tenant, batch)
            self._open[tenant] = batch
        batch.messages.append(message)
        if len(batch.messages) >= self.max_size:
            self._seal(tenant, batch)
        # Shielded: one caller being cancelled must not cancel the batch of the others.
        return await asyncio.shield(batch.result)

    def _seal(self, tenant: str, batch: _OpenBatch) -> None:
        if self._open.get(tenant) is not batch:
            return
        del self._open[tenant]
        if batch.timer is not None:
            batch.timer.cancel()
        # Taking the lock's place in line now (not when the task first runs) keeps batch order.
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        task = asyncio.create_task(self._send(tenant, batch, lock), name=f"inbound-{tenant}")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, tenant: str, batch: _OpenBatch, lock: asyncio.Lock) -> None:
        try:
            async with lock:
                outcome = await self._deliver(tenant, batch.messages)
        except asyncio.CancelledError:
            batch.result.cancel()
            raise
        except Exception as exc:
            # A bug, not Optimove's answer: every waiting record fails and the runner retries it.
            batch.result.set_exception(exc)
        else:
            batch.result.set_result(outcome)

    async def close(self) -> None:
        """Abandon what is not delivered yet; its records are not committed and come back."""
        for batch in self._open.values():
            if batch.timer is not None:
                batch.timer.cancel()
            batch.result.cancel()
        self._open.clear()
        sending = list(self._sending)
        for task in sending:
            task.cancel()
        for task in sending:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _consume_exception(future: asyncio.Future[DeliveryOutcome]) -> None:
    # Every waiter may have been cancelled already; the exception is not lost, only unawaited.
    if not future.cancelled():
        future.exception()


class ReporterHandler:
    """Consumes ``sms.statuses`` and ``sms.inbound`` and reports them to each tenant's Optimove."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.contract = OptimoveContract(settings.optimove)
        self.policy = RetryPolicy.from_settings(settings.reporter)
        self.batcher = InboundBatcher(
            self._deliver_incoming,
            max_size=settings.reporter.inbound_batch_size,
            max_delay_s=settings.reporter.inbound_batch_delay_s,
        )
        self._session: aiohttp.ClientSession | None = None
        self._sender: ReportSender | None = None

    # -- lifecycle (called by ConsumerService) ---------------------------------------------------

    async def start(self, publisher: Publisher) -> None:
        # Outputs go back to the runner, which publishes them; the publisher is not needed here.
        del publisher
        connector = aiohttp.TCPConnector(limit=max(10, self.settings.reporter.runner.max_in_flight))
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar()
        )
        self._sender = ReportSender(
            self._session, self.policy, self.settings.reporter.request_timeout_s
        )

    async def stop(self) -> None:
        await self.batcher.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
            self._sender = None

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
        extra: dict[str, Any] = {
            "message_id": context.message_id,
            "tenant": context.tenant,
            "status": event.status,
            "sub_status": event.sub_status,
            "number": mask_number(context.mobile_number),
        }
        tenant = self.settings.tenants.get(context.tenant)
        if tenant is None:
            return [self._unknown_tenant(record, context.tenant, KIND_DELIVERY, extra)]
        request = self.contract.delivery_report(tenant, event)
        outcome = await self.sender.deliver(
            request, self._observer(context.tenant, KIND_DELIVERY, 1, extra)
        )
        if outcome.accepted:
            REPORTS.labels(context.tenant, KIND_DELIVERY, RESULT_ACCEPTED).inc()
            log.debug("delivery report accepted", extra={**extra, "attempts": outcome.attempts})
            return []
        self._log_not_delivered(KIND_DELIVERY, outcome, extra)
        return [self._dead_letter(record, context.tenant, KIND_DELIVERY, outcome)]

    # -- incoming messages -----------------------------------------------------------------------

    async def _report_inbound(self, record: Record) -> Sequence[OutRecord]:
        event = _decode(InboundMessage, record)
        tenant = self.settings.tenants.get(event.tenant)
        if tenant is None:
            extra = {"tenant": event.tenant, "event_id": event.event_id}
            return [self._unknown_tenant(record, event.tenant, KIND_INCOMING, extra)]
        outcome = await self.batcher.submit(event.tenant, event)
        if outcome.accepted:
            REPORTS.labels(event.tenant, KIND_INCOMING, RESULT_ACCEPTED).inc()
            return []
        return [self._dead_letter(record, event.tenant, KIND_INCOMING, outcome)]

    async def _deliver_incoming(self, slug: str, messages: list[InboundMessage]) -> DeliveryOutcome:
        tenant: TenantSettings = self.settings.tenants[slug]
        request = self.contract.incoming_messages(tenant, messages)
        extra: dict[str, Any] = {"tenant": slug, "messages": len(messages)}
        outcome = await self.sender.deliver(
            request, self._observer(slug, KIND_INCOMING, len(messages), extra)
        )
        if outcome.accepted:
            log.debug("incoming messages accepted", extra={**extra, "attempts": outcome.attempts})
        else:
            # Logged once for the batch; each record dead-letters itself.
            self._log_not_delivered(KIND_INCOMING, outcome, extra)
        return outcome

    # -- shared ----------------------------------------------------------------------------------

    def _observer(
        self, slug: str, kind: str, messages: int, extra: dict[str, Any]
    ) -> AttemptObserver:
        def observe(result: AttemptResult, decision: Decision) -> None:
            REPORT_REQUEST_DURATION.labels(kind).observe(result.duration_s)
            if result.status_code == 401:
                OPTIMOVE_UNAUTHORIZED.labels(slug).inc()
                log.error(
                    "Optimove answered 401 for tenant %s (%s report): check the tenant's "
                    "api_token and secret_key",
                    slug,
                    kind,
                    extra=extra,
                )
            if decision.action is Action.RETRY:
                REPORTS.labels(slug, kind, RESULT_RETRIED).inc(messages)
                log.warning(
                    "%s report not accepted (%s); retrying in %.1fs",
                    kind,
                    result.describe(),
                    decision.delay_s,
                    extra=extra,
                )

        return observe

    @staticmethod
    def _log_not_delivered(kind: str, outcome: DeliveryOutcome, extra: dict[str, Any]) -> None:
        log.error(
            "%s report dead-lettered: %s",
            kind,
            outcome.decision.reason,
            extra={**extra, "attempts": outcome.attempts, "status_code": outcome.last.status_code},
        )

    def _unknown_tenant(
        self, record: Record, slug: str, kind: str, extra: dict[str, Any]
    ) -> OutRecord:
        reason = f"unknown tenant {slug!r}: not in this deployment's configuration"
        log.error("%s report dead-lettered: %s", kind, reason, extra=extra)
        REPORTS.labels(UNKNOWN_TENANT_LABEL, kind, RESULT_DEAD_LETTERED).inc()
        return _dead_letter_record(record, reason=reason, attempts=0)

    @staticmethod
    def _dead_letter(record: Record, slug: str, kind: str, outcome: DeliveryOutcome) -> OutRecord:
        REPORTS.labels(slug, kind, RESULT_DEAD_LETTERED).inc()
        return _dead_letter_record(
            record,
            reason=outcome.decision.reason,
            attempts=outcome.attempts,
            status_code=outcome.last.status_code,
            response_excerpt=outcome.last.response_excerpt,
        )


def _decode(model: type[E], record: Record) -> E:
    try:
        return decode(model, record.value)
    except SchemaError as exc:
        raise PoisonRecord(str(exc)) from None


def _dead_letter_record(
    record: Record,
    *,
    reason: str,
    attempts: int,
    status_code: int | None = None,
    response_excerpt: str = "",
) -> OutRecord:
    metrics.DEAD_LETTERS.labels(STAGE, record.topic).inc()
    key = record.key.decode("utf-8", "replace") if record.key is not None else None
    return OutRecord(
        DEAD_LETTERS,
        key or f"{record.topic}:{record.partition}:{record.offset}",
        DeadLetter(
            source_topic=record.topic,
            stage=STAGE,
            reason=reason,
            key=key,
            payload=(record.value or b"").decode("utf-8", "replace"),
            attempts=attempts,
            status_code=status_code,
            response_excerpt=response_excerpt,
            redrive_topic=record.topic,
        ),
    )
