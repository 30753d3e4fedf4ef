"""``smsbridge simulate campaign`` posts each batch as Optimove does: 429 and 5xx are retried
(the shared retry policy, a Retry-After honoured), any other refusal ends the campaign at once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from shared.kafka.broker import free_port
from shared.kafka.service import serve
from simulators.campaign_load import CampaignBatch, CampaignError, post_batch

pytestmark = pytest.mark.integration

BATCH = CampaignBatch(batch_id="b-1", request_id="r-1", body=b'{"recipients": []}', recipients=0)
ACCEPTED = {"accepted": 0}


class Ingress:
    """A stand-in for ingress that gives the answers it is told to, in order, then 202."""

    def __init__(self, answers: list[Callable[[], web.Response]]) -> None:
        self.answers = answers
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        assert await request.read() == BATCH.body
        self.requests += 1
        if self.answers:
            return self.answers.pop(0)()
        return web.json_response(ACCEPTED, status=202)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def post(ingress: Ingress, session: aiohttp.ClientSession, attempts: int) -> object:
    app = web.Application()
    app.router.add_post("/campaign", ingress.handle)
    port = free_port()
    runner = await serve(app, f"127.0.0.1:{port}")
    try:
        return await post_batch(
            session, f"http://127.0.0.1:{port}/campaign", BATCH, {}, attempts=attempts
        )
    finally:
        await runner.cleanup()


async def test_a_busy_ingress_is_retried_until_it_accepts(session: aiohttp.ClientSession) -> None:
    ingress = Ingress(
        [
            lambda: web.json_response({"error": "busy"}, status=503, headers={"Retry-After": "0"}),
            lambda: web.json_response({"error": "slow down"}, status=429),
        ]
    )
    assert await post(ingress, session, attempts=3) == ACCEPTED
    assert ingress.requests == 3


async def test_a_refusal_is_not_retried(session: aiohttp.ClientSession) -> None:
    ingress = Ingress([lambda: web.json_response({"error": "bad batch"}, status=400)])
    with pytest.raises(CampaignError, match=r"batch b-1 refused: HTTP 400: .*bad batch"):
        await post(ingress, session, attempts=3)
    assert ingress.requests == 1


async def test_the_campaign_gives_up_after_its_attempts(session: aiohttp.ClientSession) -> None:
    ingress = Ingress([lambda: web.json_response({}, status=500) for _ in range(5)])
    with pytest.raises(CampaignError, match=r"not accepted after 2 attempts: HTTP 500"):
        await post(ingress, session, attempts=2)
    assert ingress.requests == 2
