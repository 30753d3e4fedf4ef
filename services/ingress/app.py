"""Ingress: Optimove's Campaign Transmission webhook, ``POST /optimove/{tenant}/campaigns``.

Checks, in order: tenant (404), body size (413) and encoding (400), ``X-API-Key`` (401),
``x-hub-signature`` (401), JSON (400), schema (400). A valid request becomes one record per
recipient on ``sms.recipients`` (a failed dispatch record on ``sms.dispatches`` for a recipient
that cannot be sent), then one entry on ``sms.ingress-requests``; only when Kafka acknowledged
all of them is the answer 202. A request already in that ledger is answered 202 again and
publishes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from services.ingress import metrics
from services.ingress.campaign import (
    CampaignRecords,
    InvalidJson,
    ParsedCampaign,
    SchemaViolation,
    build_records,
    parse_campaign,
)
from services.ingress.e164 import normaliser
from services.ingress.ledger import LedgerEntry, LedgerFollower, RequestLedger, ledger_key
from services.ingress.produce import BatchPublisher
from shared.config import Settings, TenantSettings
from shared.events import IngressRequestAccepted, utcnow
from shared.kafka import KafkaUnavailable, OutRecord, Publisher, make_consumer
from shared.metrics import SIGNATURE_FAILURES
from shared.service import add_ops_routes, http_metrics, run_service, serve
from shared.signing import SIGNATURE_HEADER, constant_time_equals, verify
from shared.statuses import SubStatus
from shared.topics import DISPATCHES, INGRESS_REQUESTS, RECIPIENTS

log = logging.getLogger(__name__)

SERVICE = "ingress"
CAMPAIGN_ROUTE = "/optimove/{tenant}/campaigns"
API_KEY_HEADER = "X-API-Key"
RETRY_AFTER_S = 5
SIGNATURE_ENDPOINT = "campaigns"

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


class CampaignEndpoint:
    """The request handler, with everything it needs passed in."""

    def __init__(
        self,
        *,
        settings: Settings,
        ledger: RequestLedger,
        batches: BatchPublisher,
        publisher: Publisher,
        is_ready: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.batches = batches
        self.publisher = publisher
        self.is_ready = is_ready
        self._normalisers = {
            slug: normaliser(tenant.default_region) for slug, tenant in settings.tenants.items()
        }
        self._in_flight: dict[str, asyncio.Event] = {}

    async def handle(self, request: web.Request) -> web.Response:
        slug = request.match_info["tenant"]
        tenant = self.settings.tenants.get(slug)
        if tenant is None:
            metrics.REQUESTS.labels("unknown", "unknown_tenant").inc()
            return error_response(404, "unknown tenant")
        response, result = await self._answer(request, slug, tenant)
        metrics.REQUESTS.labels(slug, result).inc()
        return response

    async def _answer(
        self, request: web.Request, slug: str, tenant: TenantSettings
    ) -> tuple[web.Response, str]:
        try:
            body = await self._read_body(request)
        except web.RequestPayloadError:
            # Content-Encoding that does not decode (or a broken chunked encoding).
            return error_response(400, "body cannot be decoded"), "invalid_json"
        if body is None:
            limit = self.settings.ingress.max_body_bytes
            return error_response(413, "body too large", limit_bytes=limit), "too_large"

        refusal = self._authenticate(request, body, slug, tenant)
        if refusal is not None:
            return refusal, "unauthorized"
        if not self.is_ready():
            return error_response(503, "ingress is starting; retry"), "unavailable"

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

        key = ledger_key(slug, campaign.request_key)
        async with self._exclusive(key):
            known = self.ledger.get(key)
            if known is not None:
                log.info(
                    "campaign request already accepted",
                    extra={"tenant": slug, "batch_id": campaign.request.batch_id},
                )
                return json_response(202, _accepted_body(campaign, known)), "duplicate"
            records = build_records(
                tenant=slug,
                settings=tenant,
                campaign=campaign,
                normalise=self._normalisers[slug],
                accepted_at=utcnow(),
            )
            try:
                entry = await self._publish(
                    slug, key, records, campaign.request.metadata.campaign_id or ""
                )
            except KafkaUnavailable as exc:
                log.warning(
                    "campaign request not stored: Kafka unavailable (%s)",
                    exc,
                    extra={"tenant": slug, "batch_id": campaign.request.batch_id},
                )
                return error_response(503, "Kafka unavailable; retry"), "unavailable"

        self._count_recipients(slug, records)
        log.info(
            "campaign request accepted",
            extra={
                "tenant": slug,
                "batch_id": campaign.request.batch_id,
                "accepted": records.accepted,
                "rejected": len(records.rejections),
            },
        )
        return json_response(202, _accepted_body(campaign, entry)), "accepted"

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The raw body, or None when it exceeds the limit."""
        limit = self.settings.ingress.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return None
        try:
            # client_max_size is limit + 1: a body aiohttp lets through may still be one too big.
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return None
        return body if len(body) <= limit else None

    def _authenticate(
        self, request: web.Request, body: bytes, slug: str, tenant: TenantSettings
    ) -> web.Response | None:
        api_key = request.headers.get(API_KEY_HEADER)
        if not constant_time_equals(api_key, tenant.aggregator_api_key.get_secret_value()):
            reason = "api_key_missing" if not api_key else "api_key_mismatch"
            return self._refuse(request, slug, reason, "invalid X-API-Key")
        failure = verify(
            body, request.headers.get(SIGNATURE_HEADER), tenant.secret_key.get_secret_value()
        )
        if failure is not None:
            return self._refuse(request, slug, f"signature_{failure.value}", "invalid signature")
        return None

    def _refuse(self, request: web.Request, slug: str, reason: str, error: str) -> web.Response:
        SIGNATURE_FAILURES.labels(SIGNATURE_ENDPOINT, slug, reason).inc()
        log.warning(
            "campaign request refused",
            extra={"tenant": slug, "reason": reason, "remote": request.remote},
        )
        return error_response(401, error, reason=reason)

    async def _publish(
        self, slug: str, key: str, records: CampaignRecords, campaign_id: str
    ) -> LedgerEntry:
        await self.batches.publish(
            [(RECIPIENTS, records.recipients), (DISPATCHES, records.dispatches)]
        )
        # The ledger entry goes last: its presence promises that every record above is on Kafka.
        accepted = IngressRequestAccepted(
            tenant=slug,
            request_key=records.request_key,
            campaign_id=campaign_id,
            accepted=records.accepted,
            rejected=[rejection.as_json() for rejection in records.rejections],
        )
        await self.publisher.publish([OutRecord(INGRESS_REQUESTS, key, accepted)])
        self.ledger.remember(key, accepted)
        return LedgerEntry(accepted.accepted, accepted.rejected, accepted.at.timestamp())

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

    @staticmethod
    def _count_recipients(slug: str, records: CampaignRecords) -> None:
        if records.accepted:
            metrics.RECIPIENTS.labels(slug, "accepted").inc(records.accepted)
        reasons = Counter(rejection.sub_status for rejection in records.rejections)
        for sub_status, count in reasons.items():
            result = _RECIPIENT_RESULTS.get(sub_status, "rejected")
            metrics.RECIPIENTS.labels(slug, result).inc(count)


def _accepted_body(campaign: ParsedCampaign, entry: LedgerEntry) -> dict[str, Any]:
    return {
        "requestId": campaign.request.request_id,
        "batchId": campaign.request.batch_id,
        "accepted": entry.accepted,
        "rejected": entry.rejected,
    }


class IngressService:
    """HTTP server, producer, and the ledger follower; ``/metrics`` etc. on the same listener."""

    name = SERVICE

    def __init__(self, settings: Settings) -> None:
        kafka = settings.kafka
        self.settings = settings
        self.publisher = Publisher.for_service(kafka, SERVICE)
        self.ledger = RequestLedger(settings.ingress.ledger_retention_s)
        self.follower = LedgerFollower(
            make_consumer(kafka, None, role=f"{SERVICE}-ledger"), self.ledger
        )
        self.endpoint = CampaignEndpoint(
            settings=settings,
            ledger=self.ledger,
            batches=BatchPublisher(self.publisher, kafka.produce_timeout_s),
            publisher=self.publisher,
            is_ready=self.ready,
        )
        # One byte more than our limit, so that a too-large body gets our JSON 413.
        self.app = web.Application(
            client_max_size=settings.ingress.max_body_bytes + 1, middlewares=[http_metrics(SERVICE)]
        )
        self.app.router.add_post(CAMPAIGN_ROUTE, self.endpoint.handle)
        add_ops_routes(self.app, self.ready)
        self._http: web.AppRunner | None = None
        self._producer_started = False
        self._follower_started = False

    async def start(self) -> None:
        try:
            await self.publisher.start()
            self._producer_started = True
            await self.follower.start()
            self._follower_started = True
            # Serve (/healthz, and 503 for campaigns) while the ledger catches up.
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
        if self._follower_started:
            self._follower_started = False
            await self.follower.stop()
        if self._producer_started:
            self._producer_started = False
            await self.publisher.stop("ingress producer")

    def ready(self) -> bool:
        return self._producer_started and self.follower.caught_up.is_set() and self.follower.healthy


def build(settings: Settings) -> IngressService:
    return IngressService(settings)


async def main(settings: Settings) -> None:
    await run_service(build(settings))
