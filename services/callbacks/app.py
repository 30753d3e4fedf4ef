"""The callbacks service: provider webhooks in, ``sms.provider-events`` out, answered at once.

``POST /callbacks/{provider}/{account}/{token}`` (decisions.md §9): the account must exist with
that provider kind and the secret path token and the provider's own check must pass (else 401, the
same answer in the same time whichever failed, so that no one can list our accounts), the body must
fit (else 413) and parse (else 400). Each parsed event is stored on Kafka (acks=all) before the
provider gets its expected answer; if Kafka cannot take it, or not within the provider's deadline
(``answer_deadline_s``), the answer is 503 so that the provider retries. Nothing refused reaches
Kafka, and nothing a provider sends can crash the service.
``/metrics``, ``/healthz`` and ``/readyz`` answer on ``[callbacks] ops_listen``, never on the
public listener.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Sequence
from datetime import datetime

import orjson

from services.callbacks import metrics
from shared import metrics as shared_metrics
from shared.config import CallbacksSettings, ProviderSettings, Settings, split_listen
from shared.contract import ids
from shared.contract.events import ProviderEvent, utcnow
from shared.contract.signing import constant_time_equals
from shared.contract.topics import PROVIDER_EVENTS
from shared.http_server import HttpServer, Refusal, Request, Response, Route
from shared.kafka.clients import KafkaUnavailable, Publisher
from shared.kafka.service import OpsServer, Service, run_service
from shared.providers import PROVIDER_KINDS
from shared.providers.base import CallbackRejected, ParsedCallback, Provider

log = logging.getLogger(__name__)

NAME = "callbacks"
ROUTE = "/callbacks/{provider}/{account}/{token}"
# Seconds a provider should wait before retrying when Kafka could not take its callback.
RETRY_AFTER_S = 5
# One answer for a wrong token, a wrong signature, an unknown account and a kind mismatch.
NOT_AUTHORISED = "not authorised"
# What the HTTP server's own refusals count as (metric reasons of CALLBACKS_REFUSED).
SERVER_REFUSAL_REASONS = {413: "too_large", 408: "timeout"}


class DeadlinePassed(Exception):
    """The callback was not stored within the time its provider waits for an answer."""


def answer_deadline_s(callbacks: CallbacksSettings, account: ProviderSettings) -> float:
    """How long ``account``'s provider waits for our answer: the account's own setting, else its
    kind's, else the general one. Past it a provider counts the callback as failed anyway."""
    if account.callback_deadline_s is not None:
        return account.callback_deadline_s
    return callbacks.deadline_by_kind_s.get(account.kind, callbacks.deadline_s)


class Refused(Exception):
    """A callback we answer with an error and do not store."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # metric label: a fixed vocabulary
        self.message = message  # told to the provider


def correlation_key(provider: type[Provider], account: str, parsed: ParsedCallback) -> str:
    """The key that joins this event to its dispatch record (and picks its partition)."""
    if parsed.provider_message_id:
        return provider.correlation_key(account, parsed.provider_message_id, parsed.number)
    if parsed.kind in ("inbound", "opt_out") and parsed.number:
        # Unsolicited replies have no message to join: one key per customer keeps them in order.
        return f"{account}:from:{parsed.number}"
    raise CallbackRejected(f"{parsed.kind} event without a message id")


def provider_events(
    provider: type[Provider],
    account: str,
    body: bytes,
    parsed: Sequence[ParsedCallback],
    received_at: datetime,
) -> list[ProviderEvent]:
    """The events of one callback body, with ids that a repeated callback reproduces."""
    body_digest = hashlib.sha256(body).hexdigest()
    return [
        ProviderEvent(
            event_id=ids.event_id(account, body_digest, str(index)),
            kind=item.kind,
            provider_kind=provider.kind,
            provider_account=account,
            correlation_key=correlation_key(provider, account, item),
            provider_message_id=item.provider_message_id,
            number=item.number,
            provider_status=item.provider_status,
            reason=item.reason,
            text=item.text,
            to=item.to,
            occurred_at=item.occurred_at,
            received_at=received_at,
            raw=dict(item.raw),
        )
        for index, item in enumerate(parsed)
    ]


# Provider callbacks nest two or three levels. Far deeper bodies are refused: orjson writes at most
# 254 levels and pydantic reads about 200, so the normalizer could not read the stored event back.
MAX_NESTING = 32


def nesting(value: object) -> int:
    """How many arrays and objects deep ``value`` goes (without recursion: the input decides)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        else:
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
    return deepest


def encode_events(events: Sequence[ProviderEvent]) -> list[tuple[bytes, bytes]]:
    """Each event as the (key, value) Kafka will hold, all encoded before any is stored;
    CallbackRejected for a body too deeply nested to be stored and read back."""
    if any(nesting(event.raw) > MAX_NESTING for event in events):
        raise CallbackRejected(f"callback nested deeper than {MAX_NESTING} levels")
    return [(event.correlation_key.encode(), event.to_bytes()) for event in events]


class CallbackEndpoint:
    """The request handler, and the answer to what the HTTP server refuses itself."""

    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self.settings = settings
        self.publisher = publisher
        # Compared with the token of a request for an unknown account, so that it takes as long
        # as a wrong token for a known one; never equal to anything sent.
        self._dummy_token = secrets.token_urlsafe(32)

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        provider_label = _provider_label(request.match_info.get("provider", ""))
        try:
            response = await self._handle(request)
        except Refused as refused:
            metrics.CALLBACKS_REFUSED.labels(provider_label, refused.reason).inc()
            log.warning(
                "callback refused: %s",
                refused.reason,
                extra={"provider": provider_label, "detail": refused.message[:200]},
            )
            response = _error(refused.status, refused.message)
        except KafkaUnavailable as exc:
            metrics.CALLBACKS_REFUSED.labels(provider_label, "kafka_unavailable").inc()
            log.error("callback not stored, Kafka unavailable: %s", exc)
            response = _retry_later()
        except DeadlinePassed as exc:
            # Its events may still reach Kafka after this answer; the provider's retry carries
            # the same event ids, and the normalizer drops the second copy.
            metrics.CALLBACKS_REFUSED.labels(provider_label, "deadline").inc()
            log.error("callback not stored within its deadline of %ss", exc)
            response = _retry_later()
        except Exception as exc:
            # Our fault, not the provider's: say nothing about it beyond 500, log no payload.
            metrics.CALLBACKS_REFUSED.labels(provider_label, "internal_error").inc()
            log.error("callback handling failed: %s", type(exc).__name__, exc_info=True)
            response = _error(500, "internal error")
        shared_metrics.HTTP_REQUESTS.labels(NAME, "callback", str(response.status)).inc()
        shared_metrics.HTTP_DURATION.labels(NAME, "callback").observe(time.perf_counter() - started)
        return response

    async def _handle(self, request: Request) -> Response:
        arrived = asyncio.get_running_loop().time()
        kind = request.match_info["provider"]
        account = request.match_info["account"]
        account_settings = self.settings.providers.get(account)
        provider = PROVIDER_KINDS.get(kind)
        if account_settings is None or account_settings.kind != kind or provider is None:
            # Answered as a wrong token, after the same comparison: no account list by probing.
            constant_time_equals(request.match_info["token"], self._dummy_token)
            raise Refused(401, "unknown_account", NOT_AUTHORISED)
        self._authenticate(request, provider, account_settings)
        deadline_s = answer_deadline_s(self.settings.callbacks, account_settings)
        deadline = asyncio.timeout_at(arrived + deadline_s)
        try:
            async with deadline:
                return await self._store(request, provider, account)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise DeadlinePassed(deadline_s) from None

    async def _store(self, request: Request, provider: type[Provider], account: str) -> Response:
        body = request.body  # read whole, within max_body_bytes, by the server
        parsed = _parse(provider, body, request)
        events = _build_events(provider, account, body, parsed)
        try:
            records = encode_events(events)
        except CallbackRejected as exc:
            raise Refused(400, "malformed", str(exc)) from None
        await self.publisher.publish_raw(PROVIDER_EVENTS.name, records)
        for event in events:
            metrics.CALLBACKS_RECEIVED.labels(provider.kind, event.kind).inc()
        reply = provider.callback_reply
        return Response(reply.status, reply.body, reply.content_type)

    def refused(self, refusal: Refusal) -> Response:
        """The answer to a request the HTTP server refused before it reached ``handle``."""
        segments = refusal.path.split("/")
        provider_label = _provider_label(segments[2] if len(segments) > 2 else "")
        reason = SERVER_REFUSAL_REASONS.get(refusal.status, "malformed")
        metrics.CALLBACKS_REFUSED.labels(provider_label, reason).inc()
        log.warning("callback refused: %s", reason, extra={"provider": provider_label})
        response = _error(refusal.status, refusal.message)
        shared_metrics.HTTP_REQUESTS.labels(NAME, "callback", str(response.status)).inc()
        return response

    def _authenticate(
        self, request: Request, provider: type[Provider], account: ProviderSettings
    ) -> None:
        token = request.match_info["token"]
        if not account.callback_token.matches(
            lambda value: constant_time_equals(token, value),
            f"providers.{request.match_info.get('account', '')}.callback_token",
        ):
            raise Refused(401, "bad_token", NOT_AUTHORISED)
        if not provider.verify_callback(account, request.headers):
            raise Refused(401, "bad_signature", NOT_AUTHORISED)


def _parse(provider: type[Provider], body: bytes, request: Request) -> list[ParsedCallback]:
    try:
        return provider.parse_callback(body, request.content_type)
    except CallbackRejected as exc:
        raise Refused(400, "malformed", str(exc) or "malformed callback") from None
    except Exception as exc:
        # A parser that trips over odd input is still the input's fault: 400, never a crash.
        log.warning("%s parser failed: %s", provider.kind, type(exc).__name__)
        raise Refused(400, "malformed", "malformed callback") from None


def _build_events(
    provider: type[Provider], account: str, body: bytes, parsed: Sequence[ParsedCallback]
) -> list[ProviderEvent]:
    try:
        return provider_events(provider, account, body, parsed, utcnow())
    except CallbackRejected as exc:
        raise Refused(400, "malformed", str(exc)) from None
    except ValueError as exc:  # a field the event schema cannot hold
        log.warning("%s callback does not fit the event schema: %s", provider.kind, type(exc))
        raise Refused(400, "malformed", "callback fields out of range") from None


def _provider_label(kind: str) -> str:
    # The path segment is the caller's text; only known kinds become label values.
    return kind if kind in PROVIDER_KINDS else "unknown"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(status, orjson.dumps({"error": message}), "application/json", headers or {})


def _retry_later() -> Response:
    return _error(
        503,
        "temporarily unable to store the callback; retry later",
        {"Retry-After": str(RETRY_AFTER_S)},
    )


def build_server(settings: Settings, publisher: Publisher) -> HttpServer:
    endpoint = CallbackEndpoint(settings, publisher)
    return HttpServer(
        [Route("POST", ROUTE, endpoint.handle)],
        max_body_bytes=settings.callbacks.max_body_bytes,
        refused=endpoint.refused,
    )


class CallbacksService:
    """Producer plus HTTP listener; stops taking callbacks before the producer goes."""

    name = NAME

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.publisher = Publisher.for_service(settings.kafka, NAME)
        self.http = build_server(settings, self.publisher)
        self.ops = OpsServer(settings.callbacks.ops_listen, self.ready)
        self._serving = False
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        try:
            # Alive (not ready) from the start: a slow Kafka must not look like a hung process.
            await self.ops.start()
            await self.publisher.start()
            await self.http.start(*split_listen(self.settings.callbacks.listen))
        except BaseException:
            # The producer is closed even when its start failed: it was made in __init__.
            await self.publisher.stop("callbacks producer")
            await self.ops.stop()
            raise
        self._serving = True

    async def wait(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        self._serving = False
        await self.http.stop()
        await self.publisher.stop("callbacks producer")
        await self.ops.stop()
        self._stopped.set()

    def ready(self) -> bool:
        return self._serving


def build(settings: Settings) -> Service:
    return CallbacksService(settings)


async def main(settings: Settings) -> None:
    # /metrics, /healthz and /readyz: CallbacksService serves them on [callbacks] ops_listen.
    await run_service(build(settings))
