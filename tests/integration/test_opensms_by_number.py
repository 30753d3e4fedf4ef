"""OpenSMS's documented success answer names no message: sent, then matched by number.

A real broker, the real ingress, sender, callbacks and normalizer; OpenSMS is an HTTP server on
loopback that answers every send with the documented body (providers.md §2.1), and the delivery
reports are the documented webhook bodies (providers.md §2.2) posted to the callbacks service.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from services.callbacks.app import build as build_callbacks
from services.ingress.app import build as build_ingress
from services.normalizer.app import build as build_normalizer
from services.sender.app import build as build_sender
from shared.contract.events import StatusEvent
from shared.contract.topics import STATUSES
from shared.kafka.broker import EmbeddedBroker, free_port
from shared.providers import callback_url
from tests.support import TENANT, read_topic, wait_for
from tests.support.pipeline import pipeline, post_campaign
from tests.support.providers import OPENSMS_ACCOUNT, bulk_provider_settings

pytestmark = pytest.mark.integration

# providers.md §2.1, verbatim.
DOCUMENTED_SUCCESS = b'{"status":"success","data":"sms reports with all details"}'
# providers.md §2.2, verbatim: the documented webhook example...
DOCUMENTED_FAILED = (
    b'{"event":"sms.failed","message_id":"msg_123456","phone":"+254712345678",\n'
    b' "status":"failed","error":"Invalid phone number","timestamp":"2024-01-13T12:00:00Z"}'
)
# ... and a delivered one after its field table (event, message_id, phone, status, timestamp).
DOCUMENTED_DELIVERED = (
    b'{"event":"sms.delivered","message_id":"msg_123457","phone":"+254712345679",'
    b'"status":"delivered","timestamp":"2024-01-13T12:00:00Z"}'
)


class DocumentedOpenSms:
    """OpenSMS as documented: every send answered ``DOCUMENTED_SUCCESS``; the sends are kept."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sends: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None

    async def _send(self, request: web.Request) -> web.Response:
        self.sends.append(await request.json())
        return web.Response(body=DOCUMENTED_SUCCESS, content_type="application/json")

    @property
    def recipients(self) -> list[str]:
        return [number for send in self.sends for number in send["recipient"].split(",")]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/opensms/api/v3/sms/send", self._send)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def post_report(url: str, body: bytes) -> Any:
    """POST a webhook body as a provider does, again after a 503 (not stored in time)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(20):
            async with http.post(
                url, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                if response.status != 503:
                    assert response.status == 200, await response.text()
                    return await response.json()
            await asyncio.sleep(0.2)
    raise AssertionError("the callbacks service kept answering 503")


def campaign(*numbers: str) -> bytes:
    return orjson.dumps(
        {
            "batchId": "batch-ke-1",
            "requestId": "req-ke-1",
            "senderId": "ACME",
            "metadata": {
                "appId": 7,
                "brandId": "brand-1",
                "campaignId": "ke",
                "campaignType": 1,
                "channelId": 501,
                "engagementId": "eng-42",
                "isHashed": False,
                "scheduledTime": 0,
                "tenantId": 1234,
            },
            "recipients": [
                {"message": "Habari", "mobileNumber": number, "customerId": f"c-{index}"}
                for index, number in enumerate(numbers)
            ],
        }
    )


async def test_documented_success_is_sent_and_documented_reports_finish_it(
    kafka: EmbeddedBroker,
) -> None:
    opensms = DocumentedOpenSms()
    settings = bulk_provider_settings(
        opensms.url,
        overrides={"tenants": {TENANT: {"routes": [{"provider": OPENSMS_ACCOUNT}]}}},
    )
    services = (build_normalizer, build_sender, build_callbacks, build_ingress)
    async with pipeline(settings, opensms, services=services):
        await post_campaign(settings, campaign("+254712345678", "+254712345679"))
        await wait_for(
            lambda: sorted(opensms.recipients) == ["+254712345678", "+254712345679"],
            30,
            "both recipients sent to OpenSMS",
        )
        sent = await read_topic(settings, STATUSES, StatusEvent, expect=2)
        assert sorted((s.status, s.sub_status) for _, s in sent) == [("sent", "Sent")] * 2

        for body in (DOCUMENTED_FAILED, DOCUMENTED_DELIVERED):
            assert await post_report(callback_url(settings, OPENSMS_ACCOUNT), body) == {
                "status": "received"
            }

        records = await read_topic(settings, STATUSES, StatusEvent, expect=4)

    by_number: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for key, status in records:
        assert key == status.context.message_id
        by_number[status.context.mobile_number].append(
            (status.status, status.sub_status, status.provider_message_id)
        )
    assert dict(by_number) == {
        "+254712345678": [("sent", "Sent", ""), ("failed", "InvalidNumber", "msg_123456")],
        "+254712345679": [("sent", "Sent", ""), ("delivered", "Delivered", "msg_123457")],
    }
