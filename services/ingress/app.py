"""Ingress: Optimove's Campaign Transmission webhook, ``POST /optimove/{tenant}/campaigns``.

Checks, in order: ``X-API-Key`` (401; an unknown tenant gets the same answer, in the same time),
readiness (503), body size (413), the bytes being read at once (503), encoding (400),
``x-hub-signature`` (401), JSON (400), schema (400). No body is read before its key was found
right. A valid request becomes one record per recipient on ``sms.recipients`` (a failed
dispatch record on ``sms.dispatches`` for a recipient that cannot be sent), then one entry on
``sms.ingress-requests``; only when Kafka acknowledged all of them is the answer 202. A request
already in that ledger is answered 202 again and publishes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from services.ingress import metrics
from services.ingress.batch import (
    CampaignRecords,
    InvalidJson,
    ParsedCampaign,
    SchemaViolation,
    build_records,
    parse_campaign,
)
from services.ingress.e164 import reader
from services.ingress.ledger import LedgerEntry, LedgerFollower, RequestLedger, ledger_key
from services.ingress.reading import ReadBudget, declared_too_large, read_body, reservation
from shared.config import Settings, TenantSettings
from shared.contract.events import IngressRequestAccepted, utcnow
from shared.contract.ids import content_request_key
from shared.contract.priority import recipients_topic
from shared.contract.signing import (
    SIGNATURE_HEADER,
    SignatureFailure,
    constant_time_equals,
    verify,
)
from shared.contract.statuses import SubStatus
from shared.contract.topics import DISPATCHES, INGRESS_REQUESTS
from shared.kafka.clients import KafkaUnavailable, OutRecord, Publisher, make_consumer
from shared.kafka.service import OpsServer, http_metrics, run_service, serve
from shared.metrics import SIGNATURE_FAILURES

log = logging.getLogger(__name__)

SERVICE = "ingress"
CAMPAIGN_ROUTE = "/optimove/{tenant}/campaigns"
API_KEY_HEADER = "X-API-Key"
RETRY_AFTER_S = 5
SIGNATURE_ENDPOINT = "campaigns"
UNKNOWN_TENANT = "unknown"

_RECIPIENT_RESULTS: Mapping[str, str] = {
    SubStatus.INVALID_NUMBER: "invalid_number",
    SubStatus.EMPTY_MESSAGE: "empty_message",
}


def json_response(
    status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers
    )


def error_response(status: int, error: str, **details: Any) -> web.Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return json_response(status, {"error": error, **details}, headers)


def key_refusal(api_key: str | None) -> tuple[str, web.Response]:
    """The reason and the answer for a wrong ``X-API-Key``, whether or not the tenant exists."""
    reason = "api_key_missing" if not api_key else "api_key_mismatch"
    return reason, error_response(401, "invalid X-API-Key", reason=reason)


def dummy_key(settings: Settings) -> str:
    """A key no request can know, as long as the longest tenant's: comparing against it costs
    what comparing against a real tenant's key costs."""
    longest = max(
        (len(t.aggregator_api_key.get_secret_value()) for t in settings.tenants.values()),
        default=32,
    )
    return secrets.token_hex(longest)[:longest]


class CampaignEndpoint:
    """The request handler, with everything it needs passed in."""

    def __init__(
        self,
        *,
        settings: Settings,
        ledger: RequestLedger,
        publisher: Publisher,
        is_ready: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.publisher = publisher
        self.is_ready = is_ready
        self.budget = ReadBudget(settings.ingress.max_reading_bytes)
        # Tenants may change live (shared/live_config.py): what derives from them follows.
        self._tenants_seen: object = None
        self._dummy_key = ""
        self._in_flight: dict[str, asyncio.Event] = {}

    async def handle(self, request: web.Request) -> web.Response:
        slug = request.match_info["tenant"]
        if self.settings.tenants is not self._tenants_seen:
            self._tenants_seen, self._dummy_key = self.settings.tenants, dummy_key(self.settings)
        tenant = self.settings.tenants.get(slug)
        api_key = request.headers.get(API_KEY_HEADER)
        # Compared even for an unknown tenant, so that the time does not tell which exist.
        if tenant is None:
            key_matches = constant_time_equals(api_key, self._dummy_key)
        else:
            key_matches = tenant.aggregator_api_key.matches(
                lambda value: constant_time_equals(api_key, value),
                f"tenants.{slug}.aggregator_api_key",
            )
        if tenant is None or not key_matches:
            reason, response = key_refusal(api_key)
            if tenant is None:
                reason, slug, result = "unknown_tenant", UNKNOWN_TENANT, "unknown_tenant"
            else:
                SIGNATURE_FAILURES.labels(SIGNATURE_ENDPOINT, slug, reason).inc()
                result = "unauthorized"
            self._log_refusal(request, slug, reason)
        else:
            response, result = await self._answer(request, slug, tenant)
        metrics.REQUESTS.labels(slug, result).inc()
        if not request.content.is_eof():
            # The body was never read (or not to its end): no keep-alive after it.
            response.force_close()
        return response

    async def _answer(
        self, request: web.Request, slug: str, tenant: TenantSettings
    ) -> tuple[web.Response, str]:
        if not self.is_ready():
            return error_response(503, "ingress is starting; retry"), "unavailable"
        limit = self.settings.ingress.max_body_bytes
        if declared_too_large(request, limit):
            return error_response(413, "body too large", limit_bytes=limit), "too_large"
        size = reservation(request, limit)
        if not self.budget.reserve(size):
            log.warning(
                "campaign request deferred: %d bytes of bodies being read", self.budget.in_use
            )
            return error_response(503, "too many requests being read; retry"), "busy"
        try:
            return await self._read_and_handle(request, slug, tenant)
        finally:
            self.budget.release(size)

    async def _read_and_handle(
        self, request: web.Request, slug: str, tenant: TenantSettings
    ) -> tuple[web.Response, str]:
        try:
            body = await read_body(request, self.settings.ingress.max_body_bytes)
        except web.RequestPayloadError:
            # Content-Encoding that does not decode (or a broken chunked encoding).
            return error_response(400, "body cannot be decoded"), "invalid_json"
        if body is None:
            limit = self.settings.ingress.max_body_bytes
            return error_response(413, "body too large", limit_bytes=limit), "too_large"

        header = request.headers.get(SIGNATURE_HEADER)
        failures: list[SignatureFailure | None] = []

        def verifies(secret: str) -> bool:
            failures.append(verify(body, header, secret))
            return failures[-1] is None

        if not tenant.secret_key.matches(verifies, f"tenants.{slug}.secret_key"):
            failure = failures[0] or SignatureFailure.MISMATCH
            reason = f"signature_{failure.value}"
            SIGNATURE_FAILURES.labels(SIGNATURE_ENDPOINT, slug, reason).inc()
            self._log_refusal(request, slug, reason)
            return error_response(401, "invalid signature", reason=reason), "unauthorized"

        try:
            campaign = parse_campaign(body)
        except InvalidJson as exc:
            return error_response(400, "body is not valid JSON", detail=str(exc)), "invalid_json"
        except SchemaViolation as exc:
            return (
                error_response(
                    400,
                    "body does not match the campaign request schema",
                    field=exc.field,
                    detail=exc.detail,
                ),
                "invalid_schema",
            )
        recipients_limit = self.settings.ingress.max_recipients
        if len(campaign.recipients) > recipients_limit:
            return (
                error_response(413, "too many recipients", limit_recipients=recipients_limit),
                "too_large",
            )
        try:
            return await self._accept(slug, tenant, campaign)
        except KafkaUnavailable as exc:
            log.warning(
                "campaign request not stored: Kafka unavailable (%s)",
                exc,
                extra={"tenant": slug, "batch_id": campaign.request.batch_id},
            )
            return error_response(503, "Kafka unavailable; retry"), "unavailable"

    async def _accept(
        self, slug: str, tenant: TenantSettings, campaign: ParsedCampaign
    ) -> tuple[web.Response, str]:
        """Publish the request's records unless the ledger knows it; raises KafkaUnavailable."""
        key = ledger_key(slug, campaign.identity)
        campaign_id = campaign.request.metadata.campaign_id or ""
        async with self._exclusive(key):
            known = self.ledger.get(key)
            request_key, first_at = campaign.identity, None
            if campaign.by_content and (known is None or known.pending):
                # Reuse the claim of an attempt that failed, or claim the content now.
                known = known or await self._claim(slug, key, campaign, campaign_id)
                request_key, first_at = known.request_key, known.accepted_at
            if known is not None and not known.pending:
                log.info(
                    "campaign request already accepted",
                    extra={"tenant": slug, "batch_id": campaign.request.batch_id},
                )
                return json_response(202, accepted_body(campaign, known)), "duplicate"
            records = build_records(
                tenant=slug,
                settings=tenant,
                campaign=campaign,
                read=reader(tenant.default_region, tenant.bare_digits),
                accepted_at=utcnow(),
                request_key=request_key,
            )
            entry = await self._publish(slug, key, records, campaign_id, first_at)

        count_recipients(slug, records)
        log.info(
            "campaign request accepted",
            extra={
                "tenant": slug,
                "batch_id": campaign.request.batch_id,
                "accepted": records.accepted,
                "rejected": len(records.rejections),
                "ambiguous": len(records.ambiguous),
            },
        )
        return json_response(202, accepted_body(campaign, entry)), "accepted"

    async def _claim(
        self, slug: str, key: str, campaign: ParsedCampaign, campaign_id: str
    ) -> LedgerEntry:
        """Claim an id-less request's key on the ledger before publishing anything, and return
        the claim that won: ours, or an earlier one another instance wrote for the same content.
        """
        at = utcnow()
        claim = IngressRequestAccepted(
            tenant=slug,
            request_key=content_request_key(campaign.identity, int(at.timestamp() * 1000)),
            campaign_id=campaign_id,
            accepted=0,
            pending=True,
            at=at,
        )
        await self.publisher.publish([OutRecord(INGRESS_REQUESTS, key, claim)])
        # Not remembered here: the follower applies claims in topic order, as on every instance.
        won = await self.ledger.claimed(key, self.settings.kafka.produce_timeout_s)
        if won is None:
            raise KafkaUnavailable(f"{INGRESS_REQUESTS.name}: own claim not read back in time")
        return won

    def _log_refusal(self, request: web.Request, slug: str, reason: str) -> None:
        log.warning(
            "campaign request refused",
            extra={"tenant": slug, "reason": reason, "remote": request.remote},
        )

    async def _publish(
        self,
        slug: str,
        key: str,
        records: CampaignRecords,
        campaign_id: str,
        first_at: float | None,
    ) -> LedgerEntry:
        topic = recipients_topic(records.priority)
        await self.publisher.publish_batches(
            [(topic.name, None, records.recipients), (DISPATCHES.name, None, records.dispatches)]
        )
        # The ledger entry goes last: its presence promises that every record above is on Kafka.
        accepted = IngressRequestAccepted(
            tenant=slug,
            request_key=records.request_key,
            campaign_id=campaign_id,
            accepted=records.accepted,
            rejected=[rejection.as_json() for rejection in records.rejections],
            ambiguous=records.ambiguous,
            ambiguous_read_as=records.ambiguous_read_as if records.ambiguous else "",
            # An id-less request is remembered from its first acceptance (the dedupe window).
            at=datetime.fromtimestamp(first_at, UTC) if first_at is not None else utcnow(),
        )
        await self.publisher.publish([OutRecord(INGRESS_REQUESTS, key, accepted)])
        self.ledger.remember(key, accepted)
        return LedgerEntry.of(accepted)

    @contextlib.asynccontextmanager
    async def _exclusive(self, key: str) -> AsyncIterator[None]:
        """One request per ledger key at a time in this process: a concurrent retry waits."""
        while (busy := self._in_flight.get(key)) is not None:
            await busy.wait()
        done = asyncio.Event()
        self._in_flight[key] = done
        try:
            yield
        finally:
            del self._in_flight[key]
            done.set()


def count_recipients(slug: str, records: CampaignRecords) -> None:
    if records.accepted:
        metrics.RECIPIENTS.labels(slug, "accepted").inc(records.accepted)
    reasons = Counter(rejection.sub_status for rejection in records.rejections)
    for sub_status, count in reasons.items():
        result = _RECIPIENT_RESULTS.get(sub_status, "rejected")
        metrics.RECIPIENTS.labels(slug, result).inc(count)
    if records.ambiguous:
        metrics.AMBIGUOUS_NUMBERS.labels(slug, records.ambiguous_read_as).inc(
            len(records.ambiguous)
        )


def accepted_body(campaign: ParsedCampaign, entry: LedgerEntry) -> dict[str, Any]:
    """The 202 answer; ``ambiguousNumbers`` lists recipients whose bare digits were a valid
    number both ways and says which way they were read (never the number itself)."""
    return {
        "requestId": campaign.request.request_id,
        "batchId": campaign.request.batch_id,
        "accepted": entry.accepted,
        "rejected": entry.rejected,
        "ambiguousNumbers": [
            {"index": index, "readAs": entry.ambiguous_read_as} for index in entry.ambiguous
        ],
    }


class IngressService:
    """HTTP server, producer, and the ledger follower. The public listener serves Optimove's
    route only; ``/metrics``, ``/healthz`` and ``/readyz`` answer on ``[ingress] ops_listen``."""

    name = SERVICE

    def __init__(self, settings: Settings) -> None:
        kafka = settings.kafka
        self.settings = settings
        self.publisher = Publisher.for_service(kafka, SERVICE)
        self.ledger = RequestLedger(
            settings.ingress.ledger_retention_s, settings.ingress.idless_dedupe_s
        )
        self.follower = LedgerFollower(
            make_consumer(kafka, None, role=f"{SERVICE}-ledger"), self.ledger
        )
        self.endpoint = CampaignEndpoint(
            settings=settings,
            ledger=self.ledger,
            publisher=self.publisher,
            is_ready=self.ready,
        )
        # One byte more than our limit, so that a too-large body gets our JSON 413.
        self.app = web.Application(
            client_max_size=settings.ingress.max_body_bytes + 1, middlewares=[http_metrics(SERVICE)]
        )
        self.app.router.add_post(CAMPAIGN_ROUTE, self.endpoint.handle)
        self.ops = OpsServer(settings.ingress.ops_listen, self.ready)
        self._http: web.AppRunner | None = None
        self._producer_started = False
        self._closed = False

    async def start(self) -> None:
        try:
            # Alive (not ready) from the start: a slow Kafka must not look like a hung process.
            await self.ops.start()
            await self.publisher.start()
            self._producer_started = True
            await self.follower.start()
            # Serve (503 for campaigns) while the ledger catches up.
            self._http = await serve(self.app, self.settings.ingress.listen)
            await self.follower.wait_caught_up()
        except BaseException:
            await self.stop()
            raise
        log.info("ingress listening on %s", self.settings.ingress.listen)

    async def wait(self) -> None:
        await self.follower.wait()

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if not self._closed:
            # Also after a failed start: Kafka clients never started are closed too.
            self._closed = True
            self._producer_started = False
            await self.follower.stop()
            await self.publisher.stop("ingress producer")
        await self.ops.stop()

    def ready(self) -> bool:
        return self._producer_started and self.follower.caught_up.is_set() and self.follower.healthy


def build(settings: Settings) -> IngressService:
    return IngressService(settings)


async def main(settings: Settings) -> None:
    await run_service(build(settings))
