"""The sender's logic: one ``RecipientMessage`` in, exactly one ``DispatchRecord`` out.

Every message ends in a dispatch record keyed by its correlation key: ``accepted`` with the
provider's message id, or ``failed`` with a sub-status (``NoRoute``, ``Expired``, the provider's
terminal error, or ``ProviderError`` once retries are exhausted). Nothing is dropped.

A scheduled message is held inside its own handler task until it is due; the runner processes
other keys concurrently, so one held message never delays another's send.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
import backoff

from services.sender import metrics
from shared import topics
from shared.config import Route, Settings, TenantSettings
from shared.events import DispatchRecord, RecipientMessage, SchemaError, decode, utcnow
from shared.ids import unsent_correlation_key
from shared.kafka import OutRecord, Publisher
from shared.logs import mask_number
from shared.providers import PROVIDER_KINDS, callback_url, provider_class
from shared.providers.base import OutboundSms, Provider, SendAccepted, SendError, SendResult
from shared.runner import PoisonRecord, Record
from shared.segments import count_segments
from shared.statuses import SubStatus

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]

# Re-read the wall clock at least this often while holding a scheduled message.
_SCHEDULE_RECHECK_S = 60.0
# A provider's error text may echo the number; long digit runs are masked before logging.
_DIGIT_RUN = re.compile(r"\+?\d{7,}")


def scrub(text: str) -> str:
    return _DIGIT_RUN.sub(lambda match: mask_number(match.group()), text)


def routes_for(tenant: TenantSettings, destination: str) -> list[Route]:
    """The tenant's routes that serve ``destination``, best first.

    A route with prefixes serves only destinations whose E.164 digits start with one of them.
    Lower ``priority`` comes first; equal priorities keep their configured order.
    """
    digits = destination.lstrip("+")
    serving = [
        route
        for route in tenant.routes
        if not route.prefixes or any(digits.startswith(prefix) for prefix in route.prefixes)
    ]
    return sorted(serving, key=lambda route: route.priority)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def due_at(message: RecipientMessage) -> datetime:
    """When the message may be sent: its scheduled time, else when it was accepted."""
    return _aware(message.scheduled_at or message.accepted_at)


def is_expired(message: RecipientMessage, validity_s: float, now: datetime) -> bool:
    return now - due_at(message) > timedelta(seconds=validity_s)


@dataclass(frozen=True)
class RetryPolicy:
    """In-handler retries of one route (a later phase moves them to retry topics)."""

    max_attempts: int = 3
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    # A provider asking for a longer pause than this is not waited for while holding the record:
    # the send fails now (and a later phase's retry topic or failover takes over).
    max_wait_s: float = 300.0

    def delays(self) -> Iterator[float]:
        """Exponential, capped, full-jitter waits between attempts."""
        waits = backoff.expo(base=2, factor=self.base_delay_s, max_value=self.max_delay_s)
        next(waits)  # backoff's generators are primed by one next()
        for wait in waits:
            yield float(backoff.full_jitter(wait))


async def send_once(provider: Provider, sms: OutboundSms) -> SendResult:
    """One send call, measured. The provider turns network failures into retryable errors."""
    started = time.perf_counter()
    try:
        results = await provider.send([sms])
    finally:
        metrics.PROVIDER_SEND_DURATION.labels(provider.account).observe(
            time.perf_counter() - started
        )
    if len(results) != 1:
        raise RuntimeError(f"{provider.kind}.send returned {len(results)} results for 1 message")
    result = results[0]
    if isinstance(result, SendAccepted):
        outcome = "accepted"
    else:
        outcome = "retryable" if result.retryable else "rejected"
    metrics.PROVIDER_SENDS.labels(provider.account, outcome).inc()
    return result


async def send_with_retries(
    provider: Provider, sms: OutboundSms, policy: RetryPolicy, sleep: Sleep = asyncio.sleep
) -> tuple[SendResult, int]:
    """Send until accepted, a terminal error, or ``policy.max_attempts``; (result, attempts)."""
    delays = policy.delays()
    attempt = 0
    while True:
        attempt += 1
        result = await send_once(provider, sms)
        if isinstance(result, SendAccepted) or not result.retryable:
            return result, attempt
        if attempt >= policy.max_attempts:
            return result, attempt
        delay = next(delays)
        if result.retry_after_s is not None:
            if result.retry_after_s > policy.max_wait_s:
                return result, attempt
            delay = max(delay, result.retry_after_s)
        log.info(
            "send to %s failed (%s); retrying in %.2fs",
            provider.account,
            scrub(result.detail),
            delay,
            extra={"message_id": sms.message_id, "attempt": attempt},
        )
        await sleep(delay)


class Dispatcher:
    """The sender's handler: ``start``/``stop`` own the HTTP session, ``handle`` one record."""

    def __init__(
        self,
        settings: Settings,
        *,
        retry_policy: RetryPolicy | None = None,
        clock: Clock = utcnow,
        sleep: Sleep = asyncio.sleep,
        providers: Mapping[str, Provider] | None = None,
    ) -> None:
        """``providers``: ready provider clients by account; the others are built on first use."""
        self.settings = settings
        self.retry_policy = retry_policy or RetryPolicy(
            max_attempts=max(1, settings.sender.max_attempts_per_route)
        )
        self.clock = clock
        self.sleep = sleep
        self.publisher: Publisher | None = None
        self._session: aiohttp.ClientSession | None = None
        self._given_providers = dict(providers or {})
        self._providers: dict[str, Provider] = dict(self._given_providers)

    async def start(self, publisher: Publisher) -> None:
        self.publisher = publisher
        timeout = aiohttp.ClientTimeout(total=self.settings.sender.request_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)
        for account, provider in self.settings.providers.items():
            if provider.kind not in PROVIDER_KINDS:
                log.error("provider account %s: kind %s is not supported", account, provider.kind)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = None
        # Clients built on the closed session are unusable now; given ones are their owner's.
        self._providers = dict(self._given_providers)

    async def handle(self, record: Record) -> list[OutRecord]:
        try:
            message = decode(RecipientMessage, record.value)
        except SchemaError as exc:
            raise PoisonRecord(str(exc)) from None
        dispatch = await self.dispatch(message)
        return [OutRecord(topics.DISPATCHES, dispatch.correlation_key, dispatch)]

    async def dispatch(self, message: RecipientMessage) -> DispatchRecord:
        context = message.context
        tenant = self.settings.tenants.get(context.tenant)
        if tenant is None:
            return self._failed(message, SubStatus.NO_ROUTE, f"unknown tenant {context.tenant!r}")
        routes = routes_for(tenant, message.destination)
        if not routes:
            return self._failed(message, SubStatus.NO_ROUTE, "no route serves this destination")
        if not await self._wait_until_due(message, tenant):
            return self._failed(
                message, SubStatus.EXPIRED, f"older than the validity of {tenant.validity_s:g}s"
            )
        return await self._send(message, tenant, routes[0])

    async def _wait_until_due(self, message: RecipientMessage, tenant: TenantSettings) -> bool:
        """Hold a scheduled message until it is due; False when it is already past validity."""
        due = due_at(message)
        if is_expired(message, tenant.validity_s, self.clock()):
            return False
        remaining = (due - self.clock()).total_seconds()
        if remaining <= 0:
            return True
        log.info(
            "holding message until %s",
            due.isoformat(),
            extra={"message_id": message.context.message_id},
        )
        metrics.SCHEDULED_WAITING.inc()
        try:
            while remaining > 0:
                await self.sleep(min(remaining, _SCHEDULE_RECHECK_S))
                remaining = (due - self.clock()).total_seconds()
        finally:
            metrics.SCHEDULED_WAITING.dec()
        return True

    def _provider(self, account: str) -> Provider:
        provider = self._providers.get(account)
        if provider is None:
            if self._session is None:
                raise RuntimeError("Dispatcher.start() was not called")
            provider_settings = self.settings.providers[account]
            provider = provider_class(provider_settings.kind)(
                account,
                provider_settings,
                self._session,
                callback_url(self.settings, account),
            )
            self._providers[account] = provider
        return provider

    async def _send(
        self, message: RecipientMessage, tenant: TenantSettings, route: Route
    ) -> DispatchRecord:
        account = route.provider
        kind = self.settings.providers[account].kind
        if kind not in PROVIDER_KINDS:
            return self._failed(
                message, SubStatus.NO_ROUTE, f"provider kind {kind!r} is not supported", account
            )
        provider = self._provider(account)
        sms = OutboundSms(
            message_id=message.context.message_id,
            destination=message.destination,
            text=message.text,
            sender_id=message.sender_id or tenant.default_sender_id,
        )
        result, attempts = await send_with_retries(provider, sms, self.retry_policy, self.sleep)
        if isinstance(result, SendAccepted):
            return self._accepted(message, provider, result)
        return self._send_failed(message, account, result, attempts)

    def _accepted(
        self, message: RecipientMessage, provider: Provider, accepted: SendAccepted
    ) -> DispatchRecord:
        segments = count_segments(message.text)
        metrics.SEGMENTS.labels(segments.encoding).inc(segments.segments)
        metrics.DISPATCHES.labels("accepted", SubStatus.SENT).inc()
        log.info(
            "sent %s via %s as %s",
            mask_number(message.destination),
            provider.account,
            accepted.provider_message_id,
            extra={"message_id": message.context.message_id, "segments": segments.segments},
        )
        return DispatchRecord(
            context=message.context,
            correlation_key=accepted.correlation_key,
            outcome="accepted",
            sub_status=SubStatus.SENT,
            provider_kind=provider.kind,
            provider_account=provider.account,
            provider_message_id=accepted.provider_message_id,
            destination=message.destination,
            segments=segments.segments,
            dispatched_at=self.clock(),
        )

    def _send_failed(
        self, message: RecipientMessage, account: str, error: SendError, attempts: int
    ) -> DispatchRecord:
        if error.retryable:
            # Gave up on a failure that might have passed: the provider is at fault, not the
            # message, whatever the error's own guess at a sub-status.
            return self._failed(
                message,
                SubStatus.PROVIDER_ERROR,
                f"{error.detail} (gave up after {attempts} attempt(s))",
                account,
            )
        return self._failed(message, error.sub_status, error.detail, account)

    def _failed(
        self, message: RecipientMessage, sub_status: str, detail: str, account: str = ""
    ) -> DispatchRecord:
        metrics.DISPATCHES.labels("failed", sub_status).inc()
        log.warning(
            "not sent to %s: %s (%s)",
            mask_number(message.destination),
            sub_status,
            scrub(detail),
            extra={"message_id": message.context.message_id, "tenant": message.context.tenant},
        )
        provider = self.settings.providers.get(account) if account else None
        return DispatchRecord(
            context=message.context,
            correlation_key=unsent_correlation_key(message.context.message_id),
            outcome="failed",
            sub_status=sub_status,
            provider_kind=provider.kind if provider is not None else "",
            provider_account=account,
            destination=message.destination,
            detail=detail,
            dispatched_at=self.clock(),
        )
