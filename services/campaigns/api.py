"""The campaigns HTTP API, on ``[campaigns] listen`` beside ``/metrics``, ``/healthz``, ``/readyz``.

``GET /admin/campaigns[?tenant=T]`` and ``GET /admin/campaigns/{tenant}/{campaign}`` read the
counters and the controls in force; ``POST .../pause|resume|cancel`` (a tenant or one campaign)
publishes a ``CampaignControl`` on ``sms.campaign-control``, answered 202 only once Kafka
acknowledged it. Every call needs ``Authorization: Bearer <campaigns.admin_token>``. The calls,
answers and special campaign names in full: ``docs/campaigns.md``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from services.campaigns.counts import REPLIES, UNKNOWN, Counts
from services.campaigns.metrics import ADMIN_UNAUTHORIZED, CONTROLS_PUBLISHED
from services.campaigns.mirror import CountsMirror
from services.campaigns.pace import fresh_statuses, pace_of
from shared.config import Settings
from shared.contract.campaign_controls import AUTO_REPLIES, CampaignControls, control_key
from shared.contract.events import CampaignControl, ControlAction, SenderStatus
from shared.contract.signing import constant_time_equals
from shared.contract.topics import CAMPAIGN_CONTROL
from shared.kafka.clients import KafkaUnavailable, OutRecord, Publisher
from shared.kafka.service import http_metrics

log = logging.getLogger(__name__)

SERVICE = "campaigns"
PREFIX = "/admin"
ADMIN_CAMPAIGNS_ROUTE = "/admin/campaigns"
ADMIN_CAMPAIGN_ROUTE = "/admin/campaigns/{tenant}/{campaign}"
ACTIONS: tuple[ControlAction, ...] = ("pause", "resume", "cancel")
_ACTION = "{action:pause|resume|cancel}"
RETRY_AFTER_S = 5
MAX_REASON_CHARS = 1000
# Counted and readable, but not campaigns anyone could pause.
NOT_CONTROLLABLE = frozenset({REPLIES, UNKNOWN})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Lookup = Callable[[str], dict[str, Any] | None]


def json_response(status: int, payload: Mapping[str, Any], **headers: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(payload),
        content_type="application/json",
        headers=headers or None,
    )


def error_response(status: int, error: str, **headers: str) -> web.Response:
    return json_response(status, {"error": error}, **headers)


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")


def _control_json(control: CampaignControl | None) -> dict[str, Any] | None:
    if control is None:
        return None
    return {
        "action": control.action,
        "reason": control.reason,
        "requested_by": control.requested_by,
        "at": control.at.isoformat(timespec="milliseconds"),
    }


def campaign_view(
    tenant: str,
    campaign: str,
    counts: Counts,
    now: float,
    controls: CampaignControls,
    senders: Sequence[SenderStatus] = (),
) -> dict[str, Any]:
    """One campaign as the API answers it (``senders``: the sender instances' latest status)."""
    campaign_id = "" if campaign == AUTO_REPLIES else campaign
    tenant_control = controls.control(tenant, None)
    campaign_control = controls.control(tenant, campaign_id)
    return {
        "tenant": tenant,
        "campaign": campaign,
        "accepted": counts.accepted,
        "rejected": counts.rejected,
        "held_for_schedule": counts.held(now),
        "sent": counts.sent,
        "delivered": counts.delivered,
        "failed": counts.failed_total,
        "failed_by_sub_status": dict(sorted(counts.failed.items())),
        "opted_out": counts.opted_out,
        "dead_lettered": counts.dead_lettered,
        "reports_acknowledged": counts.reports_acknowledged,
        "replies_acknowledged": counts.replies_acknowledged,
        **pace_of(tenant, campaign_id, senders),
        "first_activity_at": _iso(counts.first_at),
        "last_activity_at": _iso(counts.last_at),
        "control": {
            "tenant": _control_json(tenant_control),
            "campaign": _control_json(campaign_control),
            "effect": controls.effect(tenant, campaign_id).value,
        },
    }


class CampaignsApi:
    def __init__(
        self,
        settings: Settings,
        *,
        counts: CountsMirror,
        controls: Lookup,
        publisher: Publisher,
        sender_status: Callable[[], Iterable[dict[str, Any]]] = list,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.sender_status = sender_status
        self.counts = counts
        self.controls = CampaignControls(controls)
        self.publisher = publisher
        self.clock = clock

    @property
    def middlewares(self) -> list[Middleware]:
        return [http_metrics(SERVICE), json_errors, self.authenticate]

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(ADMIN_CAMPAIGNS_ROUTE, self.list_campaigns)
        app.router.add_get(ADMIN_CAMPAIGN_ROUTE, self.show_campaign)
        app.router.add_post(f"{ADMIN_CAMPAIGNS_ROUTE}/{{tenant}}/{_ACTION}", self.control_tenant)
        app.router.add_post(f"{ADMIN_CAMPAIGN_ROUTE}/{_ACTION}", self.control_campaign)

    # -- authentication ----------------------------------------------------------------------------

    @web.middleware
    async def authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != PREFIX and not request.path.startswith(f"{PREFIX}/"):
            return await handler(request)
        token = self.settings.campaigns.admin_token  # read per call: it may be rotated live
        if token is None:
            return self._refuse(request, "not_configured", "admin API disabled: no admin_token")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return self._refuse(request, "missing", "Authorization: Bearer <token> required")
        if not token.matches(
            lambda value: constant_time_equals(given.strip(), value), "campaigns.admin_token"
        ):
            return self._refuse(request, "mismatch", "wrong admin token")
        return await handler(request)

    @staticmethod
    def _refuse(request: web.Request, reason: str, error: str) -> web.Response:
        ADMIN_UNAUTHORIZED.labels(reason).inc()
        log.warning(
            "admin call refused",
            extra={"reason": reason, "path": request.path, "remote": request.remote},
        )
        if reason == "not_configured":
            error += " is configured ([campaigns] admin_token)"
        return error_response(401, error, **{"WWW-Authenticate": 'Bearer realm="smsbridge"'})

    # -- status ------------------------------------------------------------------------------------

    def campaigns(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Every campaign with counters (of ``tenant`` only, if given), by tenant and campaign."""
        now = self.clock()
        senders = fresh_statuses(self.sender_status(), now)
        return [
            campaign_view(slug, campaign, counts, now, self.controls, senders)
            for (slug, campaign), counts in self.counts.totals.campaigns(tenant)
        ]

    async def list_campaigns(self, request: web.Request) -> web.Response:
        tenant = request.query.get("tenant") or None
        return json_response(200, {"at": _iso(self.clock()), "campaigns": self.campaigns(tenant)})

    async def show_campaign(self, request: web.Request) -> web.Response:
        tenant, campaign = request.match_info["tenant"], request.match_info["campaign"]
        counts = self.counts.totals.get(tenant, campaign)
        if counts is None:
            return error_response(404, f"nothing counted of campaign {campaign!r} of {tenant!r}")
        return json_response(
            200,
            campaign_view(
                tenant,
                campaign,
                counts,
                self.clock(),
                self.controls,
                fresh_statuses(self.sender_status(), self.clock()),
            ),
        )

    # -- controls ----------------------------------------------------------------------------------

    async def control_tenant(self, request: web.Request) -> web.Response:
        return await self._control(request, None)

    async def control_campaign(self, request: web.Request) -> web.Response:
        campaign = request.match_info["campaign"]
        if campaign in NOT_CONTROLLABLE:
            return error_response(400, f"{campaign} is counted, not a campaign to control")
        return await self._control(request, "" if campaign == AUTO_REPLIES else campaign)

    async def _control(self, request: web.Request, campaign_id: str | None) -> web.Response:
        tenant = request.match_info["tenant"]
        action: ControlAction = request.match_info["action"]  # type: ignore[assignment]
        if tenant not in self.settings.tenants:
            return error_response(404, f"unknown tenant {tenant!r}")
        try:
            reason, requested_by = await _control_body(request)
        except ValueError as exc:
            return error_response(400, str(exc))
        control = CampaignControl(
            tenant=tenant,
            campaign_id=campaign_id,
            action=action,
            reason=reason,
            requested_by=requested_by or "admin-api",
        )
        key = control_key(tenant, campaign_id)
        scope = "tenant" if campaign_id is None else "campaign"
        try:
            await self.publisher.publish([OutRecord(CAMPAIGN_CONTROL, key, control)])
        except KafkaUnavailable as exc:
            log.warning(
                "campaign control not stored: Kafka unavailable (%s)",
                exc,
                extra={"tenant": tenant, "action": action, "key": key},
            )
            retry = {"Retry-After": str(RETRY_AFTER_S)}
            return error_response(503, "Kafka unavailable; control not stored, retry", **retry)
        CONTROLS_PUBLISHED.labels(action, scope).inc()
        log.info(
            "campaign control published",
            extra={
                "tenant": tenant,
                "campaign_id": campaign_id,
                "action": action,
                "reason": reason,
                "requested_by": control.requested_by,
            },
        )
        return json_response(
            202,
            {
                "tenant": tenant,
                "campaign": None if campaign_id is None else (campaign_id or AUTO_REPLIES),
                "action": action,
                "scope": scope,
                "topic": CAMPAIGN_CONTROL.name,
                "key": key,
                "at": control.at.isoformat(timespec="milliseconds"),
            },
        )


async def _control_body(request: web.Request) -> tuple[str, str]:
    """``reason`` and ``requested_by`` of an optional JSON object body."""
    raw = await request.read()
    if not raw.strip():
        return "", ""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    fields = {}
    for name in ("reason", "requested_by"):
        value = body.get(name, "")
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string")
        if len(value) > MAX_REASON_CHARS:
            raise ValueError(f"{name} is longer than {MAX_REASON_CHARS} characters")
        fields[name] = value
    return fields["reason"], fields["requested_by"]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 404 and 405 as JSON errors, like every other answer of the API."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = {
            404: f"no such resource: {request.path}",
            405: f"{request.method} not allowed on {request.path}",
        }.get(exc.status, exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return error_response(exc.status, error, **headers)
