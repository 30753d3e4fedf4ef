"""The provider simulator server: one HTTP server for every provider API, plus the control
routes."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Mapping
from typing import Any

import orjson

from shared.contract.events import utcnow
from shared.http_client import HttpClient, HttpError
from shared.http_server import HttpServer, Route
from shared.logs import mask_number
from simulators.providers.control import ReplyError, control_routes
from simulators.providers.octopush import OctopushProtocol
from simulators.providers.opensms import OpenSmsProtocol
from simulators.providers.options import SimulatorOptions, updated_callback_urls
from simulators.providers.otpiq import OtpiqProtocol
from simulators.providers.protocol import (
    AcceptedSend,
    CallbackDelivery,
    PlannedCallback,
    ProviderProtocol,
)

log = logging.getLogger(__name__)

PROTOCOLS: tuple[type[ProviderProtocol], ...] = (OtpiqProtocol, OpenSmsProtocol, OctopushProtocol)
# Far above any send (500 Octopush recipients are some 20 KiB): nothing is refused for its size.
MAX_BODY_BYTES = 16 * 1024 * 1024
# Requests under way at a stop are given as long as aiohttp's runner gave them.
STOP_GRACE_S = 60.0


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
        self._http: HttpServer | None = None
        self._session: HttpClient | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        """The providers' send routes (first: they take the load), then the control routes."""
        routes = [route for protocol in self.protocols for route in protocol.routes()]
        return routes + control_routes(self)

    async def start(self) -> None:
        # Per attempt: 10 s from when one of the 100 connections is free; waiting for it does not
        # count, or a burst of callbacks (a provider's delivery queue) would time out in the
        # queue and be given up without ever being sent.
        self._session = HttpClient(timeout_s=10.0, limit=100)
        # A send whose client gave up is still taken, as a real provider does (ambiguous sends).
        self._http = HttpServer(
            self.routes(), max_body_bytes=MAX_BODY_BYTES, cancel_on_disconnect=False
        )
        await self._http.start(self.host, self.port)
        if self.port == 0:
            self.port = self._http.port
        log.info("provider simulator listening on %s", self.url)

    async def stop(self) -> None:
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.stop(STOP_GRACE_S)
            self._http = None
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
                http_status = (await self._session.post(callback.url, body, headers)).status
            except HttpError as exc:
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
