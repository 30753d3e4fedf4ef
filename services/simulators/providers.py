"""Provider simulator: a real HTTP server that speaks the SMS providers' documented protocols.

Each provider is one ``ProviderProtocol`` class (OTPIQ today; OpenSMS and Octopush slot in beside
it) that validates sends as the real API does, answers with the documented bodies, and plans the
delivery callbacks the real provider would make. The simulator owns what they share: latency,
injected HTTP errors, the delivered/failed outcome mix, callback delivery with retries, and the
record of every accepted send that tests and operators inspect.

Control endpoints (not part of any provider's API):

- ``GET|POST /_simulator/config``: read or change ``latency_ms``, ``fail_rate``,
  ``http_error_rate``, ``callback_delay_ms``, ``callback_attempts``, ``callback_retry_delay_ms``,
  ``seed``.
- ``GET /_simulator/sends``: every accepted send, a count per (provider, phone, text), and the HTTP
  statuses answered per provider; ``DELETE`` resets all of it.
- ``GET /_simulator/callbacks``: every callback delivery and how it ended.

Deviation from the real OTPIQ API, on purpose: ``deliveryReport.webhookUrl`` may be plain http, so
that loopback test servers can receive callbacks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import re
import secrets
import signal
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from typing import Any, ClassVar

import aiohttp
from aiohttp import web

from shared.config import split_listen
from shared.events import utcnow
from shared.logs import configure_logging, mask_number
from shared.providers.otpiq import WEBHOOK_SECRET_HEADER

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8091"
CONTROL_PREFIX = "/_simulator"


class OptionsError(ValueError):
    """A simulator option has a value it cannot use."""


@dataclass(frozen=True)
class SimulatorOptions:
    latency_ms: float = 0.0
    fail_rate: float = 0.0  # fraction of accepted sends whose final status is failed
    http_error_rate: float = 0.0  # fraction of sends answered 500 without sending
    callback_delay_ms: float = 50.0  # before each callback of a message
    callback_attempts: int = 4  # per callback, when the receiver answers 5xx or is unreachable
    callback_retry_delay_ms: float = 200.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("fail_rate", "http_error_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise OptionsError(f"{name} must be between 0 and 1, got {value}")
        for name in ("latency_ms", "callback_delay_ms", "callback_retry_delay_ms"):
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


class ProviderProtocol(ABC):
    """One provider's API as the simulator serves it."""

    kind: ClassVar[str]

    def __init__(self, simulator: ProviderSimulator) -> None:
        self.simulator = simulator

    @abstractmethod
    def add_routes(self, app: web.Application) -> None: ...

    def counted(
        self, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """Wrap a provider endpoint so that every answer is counted and the latency applies."""

        async def wrapped(request: web.Request) -> web.Response:
            await self.simulator.simulate_latency()
            response = await handler(request)
            self.simulator.answers[self.kind][str(response.status)] += 1
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


PROTOCOLS: tuple[type[ProviderProtocol], ...] = (OtpiqProtocol,)


class ProviderSimulator:
    """The simulator server; ``start()``/``stop()`` for in-process use, ``url`` once started."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        self.host = host
        self.port = port
        self.options = SimulatorOptions().updated(options)
        self.rng = random.Random(self.options.seed)
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
        return app

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
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
        self.options = self.options.updated(changes)
        if "seed" in changes:
            self.rng.seed(self.options.seed)
        return self.options

    async def simulate_latency(self) -> None:
        if self.options.latency_ms > 0:
            await asyncio.sleep(self.options.latency_ms / 1000)

    def draw_http_error(self) -> bool:
        return self.options.http_error_rate > 0 and self.rng.random() < self.options.http_error_rate

    def draw_failure(self) -> bool:
        return self.options.fail_rate > 0 and self.rng.random() < self.options.fail_rate

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
            await asyncio.sleep(self.options.callback_delay_ms / 1000)
            delivery = await self._deliver(provider, provider_message_id, callback)
            self.callbacks.append(delivery)

    async def _deliver(
        self, provider: str, provider_message_id: str, callback: PlannedCallback
    ) -> CallbackDelivery:
        """POST one callback; a 5xx or an unreachable receiver is retried, like a provider does."""
        assert self._session is not None
        attempts, http_status, delivered = 0, None, False
        while attempts < self.options.callback_attempts:
            attempts += 1
            try:
                async with self._session.post(
                    callback.url, json=callback.payload, headers=callback.headers
                ) as response:
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

    async def _get_config(self, _: web.Request) -> web.Response:
        return web.json_response(asdict(self.options))

    async def _set_config(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
        except ValueError:
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        if not isinstance(changes, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        try:
            options = self.configure(**changes)
        except OptionsError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(options))

    async def _get_sends(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "total": len(self.sends),
                "sends": [send.as_json() for send in self.sends],
                "counts": self.counts(),
                "answers": {kind: dict(counter) for kind, counter in self.answers.items()},
            }
        )

    async def _delete_sends(self, _: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"total": 0})

    async def _get_callbacks(self, _: web.Request) -> web.Response:
        return web.json_response([delivery.as_json() for delivery in self.callbacks])


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
    parser.add_argument("--callback-delay-ms", type=float, default=defaults.callback_delay_ms)
    parser.add_argument("--callback-attempts", type=int, default=defaults.callback_attempts)
    parser.add_argument(
        "--callback-retry-delay-ms", type=float, default=defaults.callback_retry_delay_ms
    )
    parser.add_argument("--seed", type=int, default=None)


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "latency_ms": args.latency_ms,
        "fail_rate": args.fail_rate,
        "http_error_rate": args.http_error_rate,
        "callback_delay_ms": args.callback_delay_ms,
        "callback_attempts": args.callback_attempts,
        "callback_retry_delay_ms": args.callback_retry_delay_ms,
        "seed": args.seed,
    }


async def serve_until_signalled(simulator: ProviderSimulator) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await simulator.start()
    try:
        await stop.wait()
    finally:
        await simulator.stop()


def cli(args: argparse.Namespace) -> int:
    configure_logging("simulator-providers")
    try:
        host, port = split_listen(args.listen)
        simulator = ProviderSimulator(host, port, **options_from_args(args))
    except (OptionsError, ValueError) as exc:
        log.error("invalid simulator option: %s", exc)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_until_signalled(simulator))
    return 0
