"""Provider simulator: a real HTTP server that speaks the SMS providers' documented protocols.

Each provider is one ``ProviderProtocol`` class (OTPIQ under ``/otpiq/api``, OpenSMS under
``/opensms/api/v3``, Octopush under ``/octopush/v1/public``) that validates sends as the real API
does, answers with the documented bodies, and plans the callbacks the real provider would make.
The simulator owns what they share: latency, injected faults (HTTP 500s, 429s in each provider's
own shape, accepted sends answered with an unreadable body), the delivered/failed outcome mix,
callback delivery with retries, and the record of every accepted send (one entry per
recipient) that tests and operators inspect.

OTPIQ takes its callback URL in each request. OpenSMS and Octopush have theirs set once in their
dashboards; here that is the callback map, API key (or Octopush login) -> URL, given with
``--callback-url KEY=URL``, derived from ``--config`` (each such account's API key -> its URL at
our callbacks service), or changed at run time through ``/_simulator/config``.

Control endpoints (not part of any provider's API):

- ``GET|POST /_simulator/config``: read or change ``latency_ms``, ``fail_rate``,
  ``http_error_rate``, ``rate_limited_rate``, ``rate_limited_wait_s``, ``garbled_rate``,
  ``callback_delay_ms``, ``callback_attempts``, ``callback_retry_delay_ms``,
  ``seed``, and ``callback_urls`` (merged; a null URL removes the key).
- ``GET /_simulator/sends``: every accepted send, a count per (provider, phone, text), and the HTTP
  statuses answered per provider; ``DELETE`` resets all of it.
- ``GET /_simulator/callbacks``: every callback delivery and how it ended.
- ``POST /_simulator/reply`` ``{"provider": "octopush", "account_key", "number", "text",
  "message_id"?}``: a customer texts back; the inbound callback (or, for a STOP word, the opt-out
  callback) is posted to that account's callback URL before the answer, which describes it.

Deviation from the real OTPIQ API, on purpose: ``deliveryReport.webhookUrl`` may be plain http, so
that loopback test servers can receive callbacks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import random
import re
import secrets
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, ClassVar

import aiohttp
import orjson
from aiohttp import web

from shared.config import ConfigError, Settings, configured_path, load_settings, split_listen
from shared.events import utcnow
from shared.keywords import KeywordRules
from shared.logs import configure_logging, mask_number
from shared.providers import callback_url
from shared.providers.octopush import paris_date
from shared.providers.otpiq import WEBHOOK_SECRET_HEADER
from shared.segments import count_segments
from shared.service import run, serve_until_signalled

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8091"
CONTROL_PREFIX = "/_simulator"
# Providers whose callback URL is set once in their dashboard, not per request.
DASHBOARD_CALLBACK_KINDS = frozenset({"opensms", "octopush"})
# What a simulated reply must say to count as an opt-out (decisions.md §6).
OPT_OUT_WORDS = KeywordRules.of()


class OptionsError(ValueError):
    """A simulator option has a value it cannot use."""


class ReplyError(ValueError):
    """A simulated customer reply that cannot be made."""


def updated_callback_urls(
    current: Mapping[str, str], changes: Mapping[str, str | None]
) -> dict[str, str]:
    """``current`` with ``changes`` merged in (a None URL removes the key), or OptionsError."""
    if not isinstance(changes, Mapping):
        raise OptionsError("callback_urls must map an API key (or login) to a URL")
    merged = dict(current)
    for key, url in changes.items():
        if not isinstance(key, str) or not key:
            raise OptionsError("callback_urls keys must be non-empty strings")
        if url is None:
            merged.pop(key, None)
        elif isinstance(url, str) and url.startswith(("http://", "https://")):
            merged[key] = url
        else:
            raise OptionsError("callback_urls values must be http(s) URLs or null")
    return merged


@dataclass(frozen=True)
class SimulatorOptions:
    latency_ms: float = 0.0
    fail_rate: float = 0.0  # fraction of accepted sends whose final status is failed
    http_error_rate: float = 0.0  # fraction of sends answered 500 without sending
    # Fraction of sends answered 429 without sending, in the provider's shape, asking for a wait
    # of ``rate_limited_wait_s`` (OTPIQ's waitMinutes, a fraction of a minute here; Retry-After).
    rate_limited_rate: float = 0.0
    rate_limited_wait_s: float = 1.0
    # Fraction of sends accepted (recorded, callbacks planned) whose answer is lost: a 200 with an
    # HTML body, as a proxy in between might give. The sender cannot know it was sent.
    garbled_rate: float = 0.0
    callback_delay_ms: float = 50.0  # before each callback of a message
    callback_attempts: int = 4  # per callback, when the receiver answers 5xx or is unreachable
    callback_retry_delay_ms: float = 200.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("fail_rate", "http_error_rate", "rate_limited_rate", "garbled_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise OptionsError(f"{name} must be between 0 and 1, got {value}")
        for name in (
            "latency_ms",
            "callback_delay_ms",
            "callback_retry_delay_ms",
            "rate_limited_wait_s",
        ):
            if getattr(self, name) < 0:
                raise OptionsError(f"{name} must not be negative")
        if self.callback_attempts < 1:
            raise OptionsError("callback_attempts must be at least 1")

    def updated(self, changes: Mapping[str, Any]) -> SimulatorOptions:
        """A copy with ``changes`` applied; unknown names and wrong types are OptionsError."""
        known = {option.name for option in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise OptionsError(f"unknown option(s): {', '.join(unknown)}")
        coerced: dict[str, Any] = {}
        for name, value in changes.items():
            if isinstance(value, bool):
                raise OptionsError(f"{name} must be a number")
            if name == "seed":
                if value is not None and not isinstance(value, int):
                    raise OptionsError("seed must be an integer or null")
                coerced[name] = value
            elif name == "callback_attempts":
                if not isinstance(value, int):
                    raise OptionsError("callback_attempts must be an integer")
                coerced[name] = value
            else:
                if not isinstance(value, int | float):
                    raise OptionsError(f"{name} must be a number")
                coerced[name] = float(value)
        return replace(self, **coerced)


@dataclass(frozen=True)
class AcceptedSend:
    provider: str
    account: str
    phone: str
    text: str
    sender: str
    provider_message_id: str
    at: datetime

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "at": self.at.isoformat()}


@dataclass(frozen=True)
class PlannedCallback:
    """One HTTP callback a provider makes, in the provider's own shape."""

    url: str
    payload: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CallbackDelivery:
    provider: str
    provider_message_id: str
    url: str
    payload: dict[str, Any]
    attempts: int
    http_status: int | None  # the last answer; None when the receiver was unreachable
    delivered: bool
    at: datetime

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "at": self.at.isoformat()}


GARBLED_BODY = "<html><body><h1>200 OK</h1>upstream answered</body></html>"


def retry_after(wait_s: float) -> str:
    """A Retry-After header value: whole seconds, rounded up."""
    return str(max(0, math.ceil(wait_s)))


class ProviderProtocol(ABC):
    """One provider's API as the simulator serves it."""

    kind: ClassVar[str]

    def __init__(self, simulator: ProviderSimulator) -> None:
        self.simulator = simulator

    @abstractmethod
    def add_routes(self, app: web.Application) -> None: ...

    @abstractmethod
    def rate_limited(self, wait_s: float) -> web.Response:
        """The provider's 429, asking to wait ``wait_s``."""

    def counted(
        self, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """Wrap a provider endpoint: the latency and injected faults apply, every answer counts.

        A 429 comes before anything else, as from a gateway in front of the API; a garbled
        answer replaces a successful one, after the send was accepted.
        """

        async def wrapped(request: web.Request) -> web.Response:
            simulator = self.simulator
            await simulator.simulate_latency()
            if simulator.draw(simulator.options.rate_limited_rate):
                response = self.rate_limited(simulator.options.rate_limited_wait_s)
            else:
                response = await handler(request)
                if response.status < 300 and simulator.draw(simulator.options.garbled_rate):
                    response = web.Response(text=GARBLED_BODY, content_type="text/html")
            simulator.answers[self.kind][str(response.status)] += 1
            return response

        return wrapped


class OtpiqProtocol(ProviderProtocol):
    """``POST /otpiq/api/sms`` (providers.md §1): one number per request, per-request DLR URL."""

    kind = "otpiq"
    send_path = "/otpiq/api/sms"
    phone_pattern = re.compile(r"^[0-9]{10,15}$")
    sms_types = frozenset({"verification", "custom"})
    routings = frozenset(
        {
            "auto",
            "whatsapp-sms",
            "telegram-sms",
            "whatsapp-telegram-sms",
            "sms",
            "whatsapp",
            "telegram",
        }
    )
    report_types = frozenset({"all", "final"})
    cost_per_sms = 200  # IQD, the documented example
    initial_credit = 100_000_000
    failure_reason = "Carrier rejected the message"

    def __init__(self, simulator: ProviderSimulator) -> None:
        super().__init__(simulator)
        self.credit: dict[str, int] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(self.send_path, self.counted(self.send))

    @staticmethod
    def error(status: int, body: dict[str, Any]) -> web.Response:
        return web.json_response(body, status=status)

    def rate_limited(self, wait_s: float) -> web.Response:
        # The SDK's 429 fields; the real API's numbers are undocumented.
        wait = {"waitMinutes": round(wait_s / 60, 4), "maxRequests": 100, "timeWindowMinutes": 1}
        return self.error(429, wait)

    async def send(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        scheme, _, api_key = authorization.partition(" ")
        if scheme != "Bearer" or not api_key.strip():
            return self.error(401, {"message": "Unauthorized"})
        try:
            body = await request.json()
        except ValueError:
            return self.error(400, {"message": "Request body must be valid JSON"})
        if not isinstance(body, dict):
            return self.error(400, {"message": "Request body must be a JSON object"})
        problem = self.validate(body)
        if problem is not None:
            return self.error(400, {"message": problem})
        if self.simulator.draw_http_error():
            return self.error(500, {"message": "Internal server error"})
        account = api_key.strip()
        credit = self.credit.get(account, self.initial_credit)
        if credit < self.cost_per_sms:
            return self.error(
                400,
                {
                    "error": "Insufficient credit",
                    "yourCredit": credit,
                    "requiredCredit": self.cost_per_sms,
                    "canCover": False,
                },
            )
        self.credit[account] = credit - self.cost_per_sms
        sms_id = f"sms-{secrets.token_hex(12)}"
        sender = str(body.get("senderId") or "")
        text = (
            str(body["customMessage"])
            if body["smsType"] == "custom"
            else f"Your verification code is {body.get('verificationCode') or '000000'}"
        )
        self.simulator.record_send(
            AcceptedSend(
                provider=self.kind,
                account=account,
                phone=body["phoneNumber"],
                text=text,
                sender=sender,
                provider_message_id=sms_id,
                at=utcnow(),
            )
        )
        report = body.get("deliveryReport")
        if isinstance(report, dict):
            self.simulator.deliver_callbacks(
                self.kind, sms_id, self.plan_callbacks(report, sms_id, sender)
            )
        return web.json_response(
            {
                "message": "SMS task created successfully",
                "smsId": sms_id,
                "remainingCredit": self.credit[account],
                "cost": self.cost_per_sms,
                "canCover": True,
                "paymentType": "prepaid",
            }
        )

    def validate(self, body: Mapping[str, Any]) -> str | None:
        """The first problem with a send body, worded like a validation error; None if valid."""
        phone = body.get("phoneNumber")
        if not isinstance(phone, str) or not self.phone_pattern.match(phone):
            return "phoneNumber must be 10-15 digits in international format without +"
        sms_type = body.get("smsType")
        if sms_type not in self.sms_types:
            return f"smsType must be one of: {', '.join(sorted(self.sms_types))}"
        if sms_type == "custom":
            message = body.get("customMessage")
            if not isinstance(message, str) or not message:
                return "customMessage is required for smsType custom"
        else:
            code = body.get("verificationCode")
            if code is not None and (not isinstance(code, str) or not 1 <= len(code) <= 20):
                return "verificationCode must be 1-20 characters"
        sender = body.get("senderId")
        if sender is not None and (not isinstance(sender, str) or len(sender) > 11):
            return "senderId must be a string of at most 11 characters"
        routing = body.get("provider")
        if routing is not None and routing not in self.routings:
            return f"provider must be one of: {', '.join(sorted(self.routings))}"
        report = body.get("deliveryReport")
        if report is not None:
            if not isinstance(report, dict):
                return "deliveryReport must be an object"
            url = report.get("webhookUrl")
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                return "deliveryReport.webhookUrl must be a URL"
            if report.get("deliveryReportType", "all") not in self.report_types:
                return "deliveryReport.deliveryReportType must be all or final"
            secret = report.get("webhookSecret")
            if secret is not None and not isinstance(secret, str):
                return "deliveryReport.webhookSecret must be a string"
        return None

    def plan_callbacks(
        self, report: Mapping[str, Any], sms_id: str, sender: str
    ) -> list[PlannedCallback]:
        """``sent`` (unless only final reports were asked for), then ``delivered`` or ``failed``."""
        report_type = str(report.get("deliveryReportType", "all"))
        headers: dict[str, str] = {}
        secret = report.get("webhookSecret")
        if isinstance(secret, str) and secret:
            headers[WEBHOOK_SECRET_HEADER] = secret
        base: dict[str, Any] = {
            "smsId": sms_id,
            "deliveryReportType": report_type,
            "channel": "sms",
        }
        if sender:
            base["senderId"] = sender
        url = str(report["webhookUrl"])
        planned: list[PlannedCallback] = []
        if report_type == "all":
            planned.append(
                PlannedCallback(url, {**base, "isFinal": False, "status": "sent"}, headers)
            )
        if self.simulator.draw_failure():
            final = {**base, "isFinal": True, "status": "failed", "reason": self.failure_reason}
        else:
            final = {**base, "isFinal": True, "status": "delivered"}
        planned.append(PlannedCallback(url, final, headers))
        return planned


class OpenSmsProtocol(ProviderProtocol):
    """``POST /opensms/api/v3/sms/send`` (providers.md §2): comma-separated recipients.

    Delivery reports go to the URL the account set "in the dashboard": the simulator's callback
    map, keyed by the Bearer token. The error body of the real API is undocumented; the simulator
    answers ``{"status": "error", "code": 1001, "message": ...}`` (the code only where one is
    documented). Every answer carries ``X-RateLimit-*`` headers for a per-minute window.
    """

    kind = "opensms"
    send_path = "/opensms/api/v3/sms/send"
    number_pattern = re.compile(r"^\+?[1-9][0-9]{7,14}$")
    sender_pattern = re.compile(r"^(\+?[0-9]{6,15}|[A-Za-z0-9 ]{1,11})$")
    schedule_format = "%Y-%m-%d %H:%M"
    max_message_length = 160  # error 1002
    rate_limit_per_minute = 10_000  # the Professional plan
    failure_error = "Delivery failed"

    def __init__(self, simulator: ProviderSimulator) -> None:
        super().__init__(simulator)
        self.windows: dict[str, tuple[int, int]] = {}  # token -> (minute, requests in it)
        self.clock: Callable[[], float] = time.time

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(self.send_path, self.counted(self.send))

    @staticmethod
    def error(
        status: int,
        message: str,
        code: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        body: dict[str, Any] = {"status": "error", "message": message}
        if code is not None:
            body["code"] = code
        return web.json_response(body, status=status, headers=headers)

    def rate_limited(self, wait_s: float) -> web.Response:
        return self.error(429, "Too Many Attempts.", headers={"Retry-After": retry_after(wait_s)})

    def take_request(self, token: str, now: float) -> tuple[dict[str, str], bool]:
        """Count one request in the token's window: the rate-limit headers, and whether it fits."""
        minute = int(now // 60)
        window, used = self.windows.get(token, (minute, 0))
        if window != minute:
            used = 0
        allowed = used < self.rate_limit_per_minute
        if allowed:
            used += 1
        self.windows[token] = (minute, used)
        reset = (minute + 1) * 60
        headers = {
            "X-RateLimit-Limit": str(self.rate_limit_per_minute),
            "X-RateLimit-Remaining": str(max(0, self.rate_limit_per_minute - used)),
            "X-RateLimit-Reset": str(reset),
        }
        if not allowed:
            headers["Retry-After"] = str(max(1, math.ceil(reset - now)))
        return headers, allowed

    async def send(self, request: web.Request) -> web.Response:
        token = bearer_token(request)
        if token is None:
            return self.error(401, "Unauthenticated.")
        limits, allowed = self.take_request(token, self.clock())
        if not allowed:
            return self.error(429, "Too Many Attempts.", headers=limits)
        try:
            body = await request.json()
        except ValueError:
            return self.error(400, "Request body must be valid JSON", headers=limits)
        if not isinstance(body, dict):
            return self.error(400, "Request body must be a JSON object", headers=limits)
        problem = self.validate(body)
        if problem is not None:
            code, message = problem
            return self.error(400, message, code, headers=limits)
        if self.simulator.draw_http_error():
            return self.error(500, "Internal server error", headers=limits)
        records = [self.accept(token, number, body) for number in recipients_of(body)]
        data: Any = records[0] if len(records) == 1 else records
        return web.json_response({"status": "success", "data": data}, headers=limits)

    def accept(self, token: str, number: str, body: Mapping[str, Any]) -> dict[str, Any]:
        message_id = f"msg_{secrets.token_hex(8)}"
        self.simulator.record_send(
            AcceptedSend(
                provider=self.kind,
                account=token,
                phone=number,
                text=str(body["message"]),
                sender=str(body["sender_id"]),
                provider_message_id=message_id,
                at=utcnow(),
            )
        )
        url = self.simulator.callback_url_for(self.kind, token)
        if url is not None:
            self.simulator.deliver_callbacks(
                self.kind, message_id, self.plan_callbacks(url, message_id, number)
            )
        return {"message_id": message_id, "recipient": number, "status": "pending"}

    def validate(self, body: Mapping[str, Any]) -> tuple[int | None, str] | None:
        """The first problem with a send body as (documented error code, message); None if valid."""
        recipient = body.get("recipient")
        if not isinstance(recipient, str) or not recipient.strip():
            return None, "The recipient field is required."
        if not all(self.number_pattern.match(n) for n in recipients_of(body)):
            return 1001, "Invalid phone number (use the international format +254...)"
        sender = body.get("sender_id")
        if not isinstance(sender, str) or not self.sender_pattern.match(sender):
            return 1004, "Invalid sender ID: a phone number or at most 11 letters and digits"
        if body.get("type") != "plain":
            return 1006, "Invalid message type: use plain"
        message = body.get("message")
        if not isinstance(message, str) or not message:
            return None, "The message field is required."
        if len(message) > self.max_message_length:
            return 1002, f"Message exceeds {self.max_message_length} characters"
        schedule = body.get("schedule_time")
        if schedule is not None:
            try:
                at = datetime.strptime(str(schedule), self.schedule_format).replace(tzinfo=UTC)
            except ValueError:
                return None, "The schedule time does not match the format Y-m-d H:i."
            if at < utcnow():
                return 1008, "Schedule time is in the past"
        return None

    def plan_callbacks(self, url: str, message_id: str, number: str) -> list[PlannedCallback]:
        """``sms.pending``, then ``sms.delivered`` or ``sms.failed``."""
        phone = "+" + number.lstrip("+")
        base = {"message_id": message_id, "phone": phone}
        pending = {"event": "sms.pending", **base, "status": "pending", "timestamp": iso_now()}
        if self.simulator.draw_failure():
            final = {
                "event": "sms.failed",
                **base,
                "status": "failed",
                "error": self.failure_error,
                "timestamp": iso_now(),
            }
        else:
            final = {
                "event": "sms.delivered",
                **base,
                "status": "delivered",
                "timestamp": iso_now(),
            }
        return [PlannedCallback(url, pending), PlannedCallback(url, final)]


class OctopushProtocol(ProviderProtocol):
    """``POST /octopush/v1/public/sms-campaign/send`` (providers.md §3): up to 500 recipients.

    Authenticated by ``api-key`` and ``api-login``. Callbacks go to the URL the account set in
    its dashboard: the simulator's callback map, keyed by the API key (or the login). Delivery
    reports only for ``sms_premium``: ``ACK`` then ``DELIVERED`` or ``NOT_DELIVERED`` per recipient.
    The v1 error body is undocumented; the simulator answers ``{"code", "message"}`` with the
    legacy code where one fits. ``send_at`` is accepted but the send happens at once.
    """

    kind = "octopush"
    send_path = "/octopush/v1/public/sms-campaign/send"
    phone_pattern = re.compile(r"^\+[1-9][0-9]{7,14}$")
    sender_pattern = re.compile(r"^[A-Za-z0-9]{3,11}$")
    sms_types = frozenset({"sms_premium", "sms_low_cost"})
    purposes = frozenset({"alert", "wholesale"})
    flags = (
        "with_replies",
        "simulation_mode",
        "auto_optimize_text",
        "auto_remove_blacklisted_numbers",
    )
    max_recipients = 500
    max_text_length = 1224
    price_per_sms = 0.0333  # EUR, the documented example
    initial_credit = 1_000_000.0
    request_id_window_s = 24 * 3600.0
    reply_short_code = "38100"  # the free short number replies arrive on in France

    def __init__(self, simulator: ProviderSimulator) -> None:
        super().__init__(simulator)
        self.credit: dict[str, float] = {}
        self.request_ids: dict[tuple[str, str], float] = {}  # (api key, request_id) -> first seen

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(self.send_path, self.counted(self.send))

    @staticmethod
    def error(status: int, message: str, code: int | None = None) -> web.Response:
        body: dict[str, Any] = {"message": message}
        if code is not None:
            body["code"] = code
        return web.json_response(body, status=status)

    def rate_limited(self, wait_s: float) -> web.Response:
        # Octopush's rate limits are undocumented: a plain 429 with Retry-After.
        response = self.error(429, "Too many requests")
        response.headers["Retry-After"] = retry_after(wait_s)
        return response

    async def send(self, request: web.Request) -> web.Response:
        api_key = request.headers.get("api-key", "").strip()
        login = request.headers.get("api-login", "").strip()
        if not api_key or not login:
            return self.error(401, "Bad login: api-key and api-login are required", 101)
        try:
            body = await request.json()
        except ValueError:
            return self.error(400, "Request body must be valid JSON")
        if not isinstance(body, dict):
            return self.error(400, "Request body must be a JSON object")
        problem = self.validate(body)
        if problem is not None:
            code, message = problem
            return self.error(400, message, code)
        if self.simulator.draw_http_error():
            return self.error(500, "Internal server error", 500)
        request_id = body.get("request_id")
        now = time.time()
        if isinstance(request_id, str) and request_id:
            first_seen = self.request_ids.get((api_key, request_id))
            if first_seen is not None and now - first_seen < self.request_id_window_s:
                return self.error(400, "request_id already used in the last 24 hours", 120)
        numbers = [str(contact["phone_number"]) for contact in body["recipients"]]
        text = str(body["text"])
        sms_needed = count_segments(text).segments * len(numbers)
        cost = round(sms_needed * self.price_per_sms, 4)
        credit = self.credit.get(api_key, self.initial_credit)
        if credit < cost:
            return self.error(400, "Not enough credit", 104)
        ticket = f"sms_{secrets.token_hex(7)[:13]}"
        if not body.get("simulation_mode"):
            self.credit[api_key] = credit - cost
            if isinstance(request_id, str) and request_id:
                self.request_ids[(api_key, request_id)] = now
            self.accept(api_key, login, ticket, numbers, body)
        return web.json_response(
            {
                "sms_ticket": ticket,
                "number_of_contacts": len(numbers),
                "total_cost": cost,
                "number_of_sms_needed": sms_needed,
                "residual_credit": round(self.credit.get(api_key, credit), 4),
            },
            status=201,
        )

    def accept(
        self, api_key: str, login: str, ticket: str, numbers: list[str], body: Mapping[str, Any]
    ) -> None:
        url = self.simulator.callback_url_for(self.kind, api_key, login)
        reports = body["type"] == "sms_premium" and url is not None
        for number in numbers:
            self.simulator.record_send(
                AcceptedSend(
                    provider=self.kind,
                    account=api_key,
                    phone=number,
                    text=str(body["text"]),
                    sender=str(body.get("sender") or ""),
                    provider_message_id=ticket,
                    at=utcnow(),
                )
            )
            if reports and url is not None:
                self.simulator.deliver_callbacks(
                    self.kind, ticket, self.plan_callbacks(url, ticket, number)
                )

    def validate(self, body: Mapping[str, Any]) -> tuple[int | None, str] | None:
        """The first problem with a send body as (legacy error code, message); None if valid."""
        recipients = body.get("recipients")
        if not isinstance(recipients, list) or not recipients:
            return 103, "recipients: at least one contact is required"
        if len(recipients) > self.max_recipients:
            return None, f"recipients: at most {self.max_recipients} contacts per campaign"
        for index, contact in enumerate(recipients):
            number = contact.get("phone_number") if isinstance(contact, dict) else None
            if not isinstance(number, str) or not self.phone_pattern.match(number):
                return None, (
                    f"recipients[{index}].phone_number: invalid phone number, "
                    "expected international format like +33600000000"
                )
        text = body.get("text")
        if not isinstance(text, str) or not text:
            return 107, "text is required"
        if len(text) > self.max_text_length:
            return None, f"text must be at most {self.max_text_length} characters"
        if body.get("type") not in self.sms_types:
            return None, f"type must be one of: {', '.join(sorted(self.sms_types))}"
        sender = body.get("sender")
        if sender is not None and (
            not isinstance(sender, str) or not self.sender_pattern.match(sender)
        ):
            return 106, "sender must be 3 to 11 letters or digits"
        purpose = body.get("purpose")
        if purpose is not None and purpose not in self.purposes:
            return None, f"purpose must be one of: {', '.join(sorted(self.purposes))}"
        request_id = body.get("request_id")
        if request_id is not None and not isinstance(request_id, str):
            return None, "request_id must be a string"
        for flag in self.flags:
            if flag in body and not isinstance(body[flag], bool):
                return None, f"{flag} must be a boolean"
        return None

    def plan_callbacks(self, url: str, ticket: str, number: str) -> list[PlannedCallback]:
        """``ACK`` from the first carrier, then ``DELIVERED`` or ``NOT_DELIVERED``."""
        final = "NOT_DELIVERED" if self.simulator.draw_failure() else "DELIVERED"
        return [
            PlannedCallback(url, self.delivery_report(ticket, number, status))
            for status in ("ACK", final)
        ]

    def delivery_report(self, ticket: str, number: str, status: str) -> dict[str, Any]:
        return {
            "channel": "sms",
            "message_id": ticket,
            "number": number,
            "status": status,
            "unit_price": self.price_per_sms,
            "delivery_date": paris_date(utcnow()),
            "meta_data": {},
        }

    def reply_payload(
        self, account_key: str, number: str, text: str, message_id: str | None
    ) -> dict[str, Any]:
        """What Octopush posts when ``number`` texts back: STOP words opt out, the rest is a reply.

        Without a given ``message_id`` the latest campaign sent to that number is named, as
        Octopush does "if it's found".
        """
        if message_id is None:
            message_id = self.simulator.latest_ticket(self.kind, account_key, number)
        payload: dict[str, Any] = {} if message_id is None else {"message_id": message_id}
        payload.update({"number": number, "text": text})
        if OPT_OUT_WORDS.classify(text) == "opt_out":
            payload["stop_date"] = paris_date(utcnow())
        else:
            payload["sim_card_number"] = self.reply_short_code
            payload["reception_date"] = paris_date(utcnow())
        return payload


def bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme == "Bearer" and token.strip() else None


def recipients_of(body: Mapping[str, Any]) -> list[str]:
    return [number.strip() for number in str(body["recipient"]).split(",")]


def iso_now() -> str:
    return utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")


PROTOCOLS: tuple[type[ProviderProtocol], ...] = (OtpiqProtocol, OpenSmsProtocol, OctopushProtocol)


class ProviderSimulator:
    """The simulator server; ``start()``/``stop()`` for in-process use, ``url`` once started."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        callback_urls: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        self.host = host
        self.port = port
        self.options = SimulatorOptions().updated(options)
        self.rng = random.Random(self.options.seed)
        # Where providers with a dashboard-configured callback URL post, by API key (or login).
        self.callback_urls: dict[str, str] = updated_callback_urls({}, callback_urls or {})
        self._unmapped_warned: set[str] = set()
        self.sends: list[AcceptedSend] = []
        self.callbacks: list[CallbackDelivery] = []
        self.answers: dict[str, Counter[str]] = {}
        self.protocols = [protocol(self) for protocol in PROTOCOLS]
        for protocol in self.protocols:
            self.answers[protocol.kind] = Counter()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application()
        for protocol in self.protocols:
            protocol.add_routes(app)
        app.router.add_get(f"{CONTROL_PREFIX}/config", self._get_config)
        app.router.add_post(f"{CONTROL_PREFIX}/config", self._set_config)
        app.router.add_get(f"{CONTROL_PREFIX}/sends", self._get_sends)
        app.router.add_delete(f"{CONTROL_PREFIX}/sends", self._delete_sends)
        app.router.add_get(f"{CONTROL_PREFIX}/callbacks", self._get_callbacks)
        app.router.add_post(f"{CONTROL_PREFIX}/reply", self._post_reply)
        return app

    async def start(self) -> None:
        # Per attempt: connecting and each read may take 5 s; waiting for one of the pool's
        # connections does not count, or a burst of callbacks (a provider's delivery queue)
        # would time out in the queue and be given up without ever being sent.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=5.0)
        )
        self._runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])
        log.info("provider simulator listening on %s", self.url)

    async def stop(self) -> None:
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- shared behaviour ----------------------------------------------------------------------

    def configure(self, **changes: Any) -> SimulatorOptions:
        """Change options; ``callback_urls`` (API key or login -> URL, None removes) is merged."""
        urls = changes.pop("callback_urls", None)
        callback_urls = (
            self.callback_urls if urls is None else updated_callback_urls(self.callback_urls, urls)
        )
        self.options = self.options.updated(changes)
        self.callback_urls = callback_urls
        if "seed" in changes:
            self.rng.seed(self.options.seed)
        return self.options

    def protocol(self, kind: str) -> ProviderProtocol:
        return next(protocol for protocol in self.protocols if protocol.kind == kind)

    def callback_url_for(self, provider: str, *account_keys: str) -> str | None:
        """The callback URL configured for an account, found by any of its keys."""
        for key in account_keys:
            if key and key in self.callback_urls:
                return self.callback_urls[key]
        if provider not in self._unmapped_warned:
            self._unmapped_warned.add(provider)
            log.warning(
                "no callback URL configured for this %s account: it gets no callbacks", provider
            )
        return None

    def latest_ticket(self, provider: str, account: str, phone: str) -> str | None:
        """The provider message id of the latest send to ``phone`` through that account."""
        return next(
            (
                send.provider_message_id
                for send in reversed(self.sends)
                if (send.provider, send.account, send.phone) == (provider, account, phone)
            ),
            None,
        )

    async def reply(
        self,
        provider: str,
        account_key: str,
        number: str,
        text: str,
        message_id: str | None = None,
    ) -> CallbackDelivery:
        """A customer texts back: post the provider's inbound (or STOP) callback, now."""
        if provider != OctopushProtocol.kind:
            raise ReplyError(f"{provider!r} sends no inbound callbacks; only octopush does")
        if not OctopushProtocol.phone_pattern.match(number):
            raise ReplyError("number must be in international format like +33600000000")
        url = self.callback_url_for(provider, account_key)
        if url is None:
            raise ReplyError("no callback URL configured for that account")
        octopush = self.protocol(provider)
        assert isinstance(octopush, OctopushProtocol)
        payload = octopush.reply_payload(account_key, number, text, message_id)
        delivery = await self._deliver(
            provider, str(payload.get("message_id", "")), PlannedCallback(url, payload)
        )
        self.callbacks.append(delivery)
        return delivery

    async def simulate_latency(self) -> None:
        if self.options.latency_ms > 0:
            await asyncio.sleep(self.options.latency_ms / 1000)

    def draw(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def draw_http_error(self) -> bool:
        return self.draw(self.options.http_error_rate)

    def draw_failure(self) -> bool:
        return self.draw(self.options.fail_rate)

    def record_send(self, send: AcceptedSend) -> None:
        self.sends.append(send)
        log.info(
            "%s accepted a send to %s as %s",
            send.provider,
            mask_number(send.phone),
            send.provider_message_id,
        )

    def count(self, provider: str, phone: str, text: str) -> int:
        return sum(
            1 for s in self.sends if (s.provider, s.phone, s.text) == (provider, phone, text)
        )

    def counts(self) -> list[dict[str, Any]]:
        tally = Counter((s.provider, s.phone, s.text) for s in self.sends)
        return [
            {"provider": provider, "phone": phone, "text": text, "count": count}
            for (provider, phone, text), count in tally.items()
        ]

    def reset(self) -> None:
        self.sends.clear()
        self.callbacks.clear()
        for counter in self.answers.values():
            counter.clear()

    def deliver_callbacks(
        self, provider: str, provider_message_id: str, planned: list[PlannedCallback]
    ) -> None:
        """Deliver ``planned`` in order, in the background, each after the callback delay."""
        task = asyncio.create_task(self._deliver_in_order(provider, provider_message_id, planned))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _deliver_in_order(
        self, provider: str, provider_message_id: str, planned: list[PlannedCallback]
    ) -> None:
        for callback in planned:
            if self.options.callback_delay_ms > 0:
                await asyncio.sleep(self.options.callback_delay_ms / 1000)
            delivery = await self._deliver(provider, provider_message_id, callback)
            self.callbacks.append(delivery)

    async def _deliver(
        self, provider: str, provider_message_id: str, callback: PlannedCallback
    ) -> CallbackDelivery:
        """POST one callback; a 5xx or an unreachable receiver is retried, like a provider does."""
        assert self._session is not None
        attempts, http_status, delivered = 0, None, False
        body = orjson.dumps(callback.payload)
        headers = {"Content-Type": "application/json", **callback.headers}
        while attempts < self.options.callback_attempts:
            attempts += 1
            try:
                async with self._session.post(callback.url, data=body, headers=headers) as response:
                    await response.read()
                    http_status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                http_status = None
                log.info("callback to %s failed: %s", provider, type(exc).__name__)
            else:
                if http_status < 500:
                    delivered = 200 <= http_status < 300
                    break
            if attempts < self.options.callback_attempts:
                await asyncio.sleep(self.options.callback_retry_delay_ms / 1000)
        if not delivered:
            log.warning(
                "gave up on a %s callback for %s after %d attempt(s) (last status %s)",
                provider,
                provider_message_id,
                attempts,
                http_status,
            )
        return CallbackDelivery(
            provider=provider,
            provider_message_id=provider_message_id,
            url=callback.url,
            payload=callback.payload,
            attempts=attempts,
            http_status=http_status,
            delivered=delivered,
            at=utcnow(),
        )

    # -- control endpoints ---------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {**asdict(self.options), "callback_urls": dict(self.callback_urls)}

    async def _get_config(self, _: web.Request) -> web.Response:
        return web.json_response(self._config())

    async def _set_config(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
        except ValueError:
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        if not isinstance(changes, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        try:
            self.configure(**changes)
        except OptionsError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self._config())

    async def _get_sends(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "total": len(self.sends),
                "sends": [send.as_json() for send in self.sends],
                "counts": self.counts(),
                "answers": {
                    kind: dict(counter) for kind, counter in self.answers.items() if counter
                },
            }
        )

    async def _delete_sends(self, _: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"total": 0})

    async def _get_callbacks(self, _: web.Request) -> web.Response:
        return web.json_response([delivery.as_json() for delivery in self.callbacks])

    async def _post_reply(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        message_id = body.get("message_id")
        fields_ok = all(
            isinstance(body.get(name), str)
            for name in ("provider", "account_key", "number", "text")
        ) and (message_id is None or isinstance(message_id, str))
        if not fields_ok:
            return web.json_response(
                {"error": "provider, account_key, number and text are required strings"},
                status=400,
            )
        try:
            delivery = await self.reply(
                body["provider"], body["account_key"], body["number"], body["text"], message_id
            )
        except ReplyError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(delivery.as_json())


# -- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SimulatorOptions()
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT to serve on")
    parser.add_argument("--latency-ms", type=float, default=defaults.latency_ms)
    parser.add_argument(
        "--fail-rate",
        type=float,
        default=defaults.fail_rate,
        help="fraction of accepted sends whose final status is failed",
    )
    parser.add_argument(
        "--http-error-rate",
        type=float,
        default=defaults.http_error_rate,
        help="fraction of sends answered 500 without sending",
    )
    parser.add_argument(
        "--rate-limited-rate",
        type=float,
        default=defaults.rate_limited_rate,
        help="fraction of sends answered 429 (in the provider's shape) without sending",
    )
    parser.add_argument(
        "--rate-limited-wait-s",
        type=float,
        default=defaults.rate_limited_wait_s,
        help="the wait a 429 asks for",
    )
    parser.add_argument(
        "--garbled-rate",
        type=float,
        default=defaults.garbled_rate,
        help="fraction of sends accepted but answered with an unreadable body",
    )
    parser.add_argument("--callback-delay-ms", type=float, default=defaults.callback_delay_ms)
    parser.add_argument("--callback-attempts", type=int, default=defaults.callback_attempts)
    parser.add_argument(
        "--callback-retry-delay-ms", type=float, default=defaults.callback_retry_delay_ms
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--callback-url",
        action="append",
        default=[],
        metavar="KEY=URL",
        help="callback URL of the OpenSMS/Octopush account with this API key (or login); "
        "repeatable, added to those derived from --config",
    )


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "latency_ms": args.latency_ms,
        "fail_rate": args.fail_rate,
        "http_error_rate": args.http_error_rate,
        "rate_limited_rate": args.rate_limited_rate,
        "rate_limited_wait_s": args.rate_limited_wait_s,
        "garbled_rate": args.garbled_rate,
        "callback_delay_ms": args.callback_delay_ms,
        "callback_attempts": args.callback_attempts,
        "callback_retry_delay_ms": args.callback_retry_delay_ms,
        "seed": args.seed,
    }


def callback_urls_from_settings(settings: Settings) -> dict[str, str]:
    """Each dashboard-configured account's API key -> the callback URL it would be given."""
    return {
        provider.api_key.get_secret_value(): callback_url(settings, account)
        for account, provider in settings.providers.items()
        if provider.kind in DASHBOARD_CALLBACK_KINDS
    }


def callback_urls_from_args(values: list[str]) -> dict[str, str]:
    urls: dict[str, str] = {}
    for value in values:
        key, sep, url = value.partition("=")
        if not sep or not key or not url:
            raise OptionsError(f"--callback-url expects KEY=URL, got {value!r}")
        urls[key] = url
    return urls


def cli(args: argparse.Namespace) -> int:
    configure_logging("simulator-providers")
    config_path = configured_path(getattr(args, "config", None))
    urls: dict[str, str] = {}
    try:
        settings = load_settings(config_path)  # without a file: the environment's
    except ConfigError as exc:
        log.error("cannot derive callback URLs from the configuration: %s", exc)
        return 2
    if config_path:
        # A line per send is too many under a benchmark's load: the configured level decides.
        configure_logging("simulator-providers", settings.log_level)
        urls.update(callback_urls_from_settings(settings))
    try:
        urls.update(callback_urls_from_args(args.callback_url))
        host, port = split_listen(args.listen)
        simulator = ProviderSimulator(host, port, urls, **options_from_args(args))
    except (OptionsError, ValueError) as exc:
        log.error("invalid simulator option: %s", exc)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        run(serve_until_signalled(simulator), settings.event_loop)
    return 0
