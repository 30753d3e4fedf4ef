"""A stranger on the internet against ingress (issue 14, points 9 and 10): no body is read
before its key is found right, the bodies read at once are capped, nesting is no 500, and an
unknown tenant is answered as a wrong key. Real HTTP (raw sockets where a slow client matters),
a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from services.ingress.app import IngressService, build
from shared.config import Settings, split_listen
from shared.contract.events import RecipientMessage
from shared.contract.signing import sign
from shared.contract.topics import RECIPIENTS
from shared.kafka.broker import EmbeddedBroker
from tests.support import AGGREGATOR_API_KEY, TENANT, TENANT_SECRET, make_settings, read_topic
from tests.support import running as running_service
from tests.support.optimove_bodies import campaign_body

pytestmark = pytest.mark.integration

ANN = {"message": "Hello Ann", "mobileNumber": "447911123456", "customerId": "cust-1"}


@contextlib.asynccontextmanager
async def ingress(settings: Settings) -> AsyncIterator[IngressService]:
    async with running_service(build(settings)) as service:
        assert service.ready()
        yield service


def path_for(tenant: str = TENANT) -> str:
    return f"/optimove/{tenant}/campaigns"


def signed_headers(body: bytes, api_key: str | None = AGGREGATOR_API_KEY) -> dict[str, str]:
    headers = {"content-type": "application/json", "x-hub-signature": sign(body, TENANT_SECRET)}
    if api_key is not None:
        headers["X-API-Key"] = api_key
    return headers


async def post(
    client: aiohttp.ClientSession,
    settings: Settings,
    body: bytes,
    headers: dict[str, str],
    tenant: str = TENANT,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    url = f"http://{settings.ingress.listen}{path_for(tenant)}"
    async with client.post(url, data=body, headers=headers) as response:
        return response.status, await response.json(), dict(response.headers)


class SlowUpload:
    """A client that declares a body and sends only its first bytes, then waits."""

    def __init__(self, settings: Settings, *, tenant: str, api_key: str, length: int) -> None:
        self.settings = settings
        self.tenant = tenant
        self.api_key = api_key
        self.length = length
        self.writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None

    async def start(self, first_bytes: bytes) -> None:
        host, port = split_listen(self.settings.ingress.listen)
        self.reader, self.writer = await asyncio.open_connection(host, port)
        head = (
            f"POST {path_for(self.tenant)} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nX-API-Key: {self.api_key}\r\n"
            f"x-hub-signature: {sign(b'{}', TENANT_SECRET)}\r\n"
            f"Content-Length: {self.length}\r\n\r\n"
        )
        self.writer.write(head.encode() + first_bytes)
        await self.writer.drain()

    async def finish(self, rest: bytes) -> None:
        assert self.writer is not None
        self.writer.write(rest)
        await self.writer.drain()

    async def status(self, timeout_s: float) -> int:
        """The status of the answer, once it came; fails if none came within ``timeout_s``."""
        assert self.reader is not None
        line = await asyncio.wait_for(self.reader.readline(), timeout_s)
        return int(line.split()[1])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def test_no_body_is_read_before_its_key_is_found_right(kafka: EmbeddedBroker) -> None:
    """Point 9: ingress read up to 32 MiB from anyone before it looked at X-API-Key. A client
    declaring 30 MiB and sending a few bytes waited for an answer that came only after all of
    it; now a wrong key, or an unknown tenant, is answered at once."""
    settings = make_settings()
    async with ingress(settings):
        for tenant, api_key in ((TENANT, "not-the-key"), ("ghost", AGGREGATOR_API_KEY)):
            upload = SlowUpload(settings, tenant=tenant, api_key=api_key, length=30 * 1024 * 1024)
            try:
                await upload.start(b'{"batchId": "')
                assert await upload.status(timeout_s=5) == 401, tenant
            finally:
                upload.close()


async def test_bytes_of_bodies_read_at_once_are_capped(kafka: EmbeddedBroker) -> None:
    """Point 9: past [ingress] max_reading_bytes, 503 with Retry-After, and nothing is lost:
    the request goes through once the budget is free again."""
    settings = make_settings(
        overrides={"ingress": {"max_body_bytes": 64_000, "max_reading_bytes": 100_000}}
    )
    body = campaign_body([ANN] * 600, batch_id="batch-cap")
    assert 40_000 < len(body) < 64_000  # fits alone, not beside the slow one
    async with ingress(settings), aiohttp.ClientSession() as client:
        slow = SlowUpload(settings, tenant=TENANT, api_key=AGGREGATOR_API_KEY, length=60_000)
        try:
            await slow.start(b" " * 1_000)  # 60,000 bytes reserved while it trickles in
            await asyncio.sleep(0.2)
            status, answer, headers = await post(client, settings, body, signed_headers(body))
            assert status == 503, answer
            assert int(headers["Retry-After"]) > 0
            await slow.finish(b" " * 59_000)
            assert await slow.status(timeout_s=5) == 401  # its signature was not of these bytes
        finally:
            slow.close()
        status, answer, _ = await post(client, settings, body, signed_headers(body))
        assert (status, answer["accepted"]) == (202, 600)
    assert len(await read_topic(settings, RECIPIENTS, RecipientMessage, expect=600)) == 600


@pytest.mark.parametrize("depth", [1_100, 200_000])
async def test_a_deeply_nested_body_is_refused_not_a_server_error(
    kafka: EmbeddedBroker, depth: int
) -> None:
    """Point 9: with a bad signature, re-serialising it for the tolerant check raised
    RecursionError (500). Signed right, it is no campaign request (400)."""
    settings = make_settings()
    deep = b'{"batchId": "", "metadata": {"appId": 1}, "x": ' + b"[" * depth + b"]" * depth + b"}"
    bad = signed_headers(deep)
    bad["x-hub-signature"] = sign(b"something else", TENANT_SECRET)
    async with ingress(settings), aiohttp.ClientSession() as client:
        status, answer, _ = await post(client, settings, deep, bad)
        assert (status, answer["reason"]) == (401, "signature_mismatch")
        status, answer, _ = await post(client, settings, deep, signed_headers(deep))
        assert status == 400, answer


async def test_an_unknown_tenant_is_a_wrong_key_in_answer_and_in_time(
    kafka: EmbeddedBroker,
) -> None:
    """Point 10: an unknown tenant got 404 at once, a wrong key 401 after the body was read:
    both told a stranger which tenants exist. Now the same 401, and no difference in time a
    body's size could make (neither reads it)."""
    settings = make_settings()
    body = campaign_body([ANN] * 20_000)  # about 1.5 MB
    wrong_key = signed_headers(body, api_key="not-the-key")
    timings: dict[str, list[float]] = {"ghost": [], TENANT: []}
    answers: dict[str, set[tuple[int, str]]] = {"ghost": set(), TENANT: set()}
    async with ingress(settings), aiohttp.ClientSession() as client:
        for _ in range(15):
            for tenant in ("ghost", TENANT):
                started = time.perf_counter()
                status, answer, _ = await post(client, settings, body, wrong_key, tenant=tenant)
                timings[tenant].append(time.perf_counter() - started)
                answers[tenant].add((status, str(sorted(answer.items()))))
    assert answers["ghost"] == answers[TENANT]
    assert {status for status, _ in answers[TENANT]} == {401}
    ghost, known = statistics.median(timings["ghost"]), statistics.median(timings[TENANT])
    assert 1 / 3 < ghost / known < 3, (ghost, known)
