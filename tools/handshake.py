"""``smsbridge handshake``: register a tenant's campaign endpoint with its Optimove (Flow 1).

See decisions.md §8. The endpoint is checked first, at its public URL, so that Optimove is never
told of a URL that cannot take its campaigns.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlsplit

import aiohttp

from services.ingress.app import API_KEY_HEADER, CAMPAIGN_ROUTE
from shared.config import Settings, plain_http_keys
from shared.contract.optimove import OptimoveContract
from shared.contract.signing import SIGNATURE_HEADER, sign


class EndpointUnreachable(Exception):
    """Our campaign endpoint does not answer as it must at its public URL."""


@dataclass(frozen=True)
class HandshakeAnswer:
    status: int
    body: str

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300


def campaign_send_url(settings: Settings, slug: str) -> str:
    """Where Optimove will post the tenant's campaigns: ingress's route at its public URL."""
    return settings.ingress.public_url.rstrip("/") + CAMPAIGN_ROUTE.format(tenant=slug)


async def check_campaign_endpoint(
    session: aiohttp.ClientSession, settings: Settings, slug: str, timeout_s: float = 10.0
) -> None:
    """Raise EndpointUnreachable unless the tenant's campaign endpoint works at its public URL.

    One request, through whatever proxy stands in front of ingress: the JSON object ``{}`` with
    the tenant's ``X-API-Key``, signed with its secret. Ingress checks the key and the signature
    before its readiness and the body, so its answer says how far the request got:

    - 400 (not a campaign request; nothing is published): our ingress is there, takes this
      tenant's key and signature, and is ready. It counts one ``invalid_schema`` request.
    - 401: the ingress there does not know this tenant with these secrets.
    - 503: it is starting (or Kafka is away); anything else: the URL does not reach our ingress.

    ``/readyz`` cannot tell: it is on ``[ingress] ops_listen``, which the public URL never reaches.
    """
    tenant = settings.tenants[slug]
    url = campaign_send_url(settings, slug)
    body = b"{}"
    headers = {
        "content-type": "application/json",
        API_KEY_HEADER: tenant.aggregator_api_key.get_secret_value(),
        SIGNATURE_HEADER: sign(body, tenant.secret_key.get_secret_value()),
    }
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as response:
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        detail = str(exc) or type(exc).__name__
        raise EndpointUnreachable(f"{origin(url)} is not reachable: {detail}") from None
    if status == 400:
        return
    if status == 401:
        raise EndpointUnreachable(
            f"{url} answered 401: ingress there does not know {slug} with this "
            "aggregator_api_key and secret_key"
        )
    if status == 503:
        raise EndpointUnreachable(f"{url} answered 503: ingress there is not ready")
    raise EndpointUnreachable(f"{url} answered {status} to a signed test request instead of 400")


def origin(url: str) -> str:
    """``scheme://host:port`` of ``url``: what an unreachable-host error is about."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def plain_http_refusal(settings: Settings, slug: str) -> str | None:
    """Why the handshake must not register the tenant's URLs over plain HTTP, or None: the
    campaign URL (Optimove posts recipients there) and its Optimove (the handshake carries our
    aggregator_api_key there) must be https:// unless ``allow_plain_http`` says otherwise."""
    if settings.allow_plain_http:
        return None
    plain = plain_http_keys(
        {
            "ingress.public_url": campaign_send_url(settings, slug),
            f"tenants.{slug}.optimove_base_url": settings.tenants[slug].optimove_base_url,
        }
    )
    if not plain:
        return None
    return (
        f"{', '.join(plain)} must be https:// (allow_plain_http = true permits http://, for "
        "development and tests only)"
    )


async def handshake(
    session: aiohttp.ClientSession, settings: Settings, slug: str, timeout_s: float = 10.0
) -> HandshakeAnswer:
    """Post the signed handshake to the tenant's Optimove and return its answer."""
    request = OptimoveContract(settings.optimove).handshake(
        settings.tenants[slug], campaign_send_url(settings, slug)
    )
    async with session.post(
        request.url,
        data=request.body,
        headers=request.headers,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        allow_redirects=False,
    ) as response:
        return HandshakeAnswer(response.status, await response.text(errors="replace"))


async def handshake_command(
    settings: Settings, slug: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    if slug not in settings.tenants:
        known = ", ".join(sorted(settings.tenants)) or "none"
        print(f"unknown tenant {slug!r} (configured: {known})", file=err)
        return 2
    url = campaign_send_url(settings, slug)
    refusal = plain_http_refusal(settings, slug)
    if refusal is not None:
        print(f"refusing the handshake for {slug}: {refusal}", file=err)
        return 1
    timeout_s = settings.reporter.request_timeout_s
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        try:
            await check_campaign_endpoint(session, settings, slug, timeout_s)
        except EndpointUnreachable as exc:
            print(f"refusing the handshake for {slug}: {exc}", file=err)
            print("Optimove must be able to post campaigns there before the handshake.", file=err)
            return 1
        print(f"campaign endpoint {url} answers; registering it with Optimove", file=out)
        try:
            answer = await handshake(session, settings, slug, timeout_s)
        except (aiohttp.ClientError, TimeoutError) as exc:
            print(f"handshake with Optimove failed: {str(exc) or type(exc).__name__}", file=err)
            return 1
    print(f"Optimove answered {answer.status}", file=out)
    print(answer.body, file=out)
    return 0 if answer.accepted else 1
