"""A customer's STOP, end to end, through Octopush (the provider with reply and STOP callbacks).

Campaign one reaches the customer; the customer replies STOP; the opt-out is recorded, the reply
reaches Optimove's Incoming Message endpoint with ``from`` written as Optimove wrote the number;
campaign two is not sent to that customer and is reported ``Failed``/``OptedOut``, while the other
recipient of campaign two is sent as usual.
"""

from __future__ import annotations

import contextlib
from typing import Any

import aiohttp
import orjson
import pytest

from services.callbacks.app import build as build_callbacks
from services.ingress.app import build as build_ingress
from services.normalizer.app import build as build_normalizer
from services.reporter.app import build as build_reporter
from services.sender.app import build as build_sender
from services.simulators.optimove import OptimoveSimulator
from services.simulators.providers import ProviderSimulator, callback_urls_from_settings
from shared.broker import EmbeddedBroker, free_port
from shared.config import Route
from shared.events import OptOutChange
from shared.signing import sign
from shared.topics import OPT_OUTS
from tests.support import (
    AGGREGATOR_API_KEY,
    TENANT,
    TENANT_API_TOKEN,
    TENANT_SECRET,
    read_topic,
    running,
    wait_for,
)
from tests.support.providers import OCTOPUSH_ACCOUNT, OCTOPUSH_KEY, bulk_provider_settings

pytestmark = pytest.mark.integration

CUSTOMER_AS_OPTIMOVE_WROTE_IT = "07911 123456"
CUSTOMER_E164 = "+447911123456"
OTHER_CUSTOMER = "+447911123457"


def campaign(request_id: str, numbers: list[str]) -> bytes:
    return orjson.dumps(
        {
            "batchId": request_id,
            "requestId": request_id,
            "metadata": {"appId": 3, "campaignId": request_id, "tenantId": 9},
            "recipients": [
                {"message": f"Offer {request_id}", "mobileNumber": n, "customerId": f"c{i}"}
                for i, n in enumerate(numbers)
            ],
        }
    )


def reports(optimove: OptimoveSimulator, endpoint: str) -> list[dict[str, Any]]:
    return [orjson.loads(r["body"]) for r in optimove.received(endpoint=endpoint)]


def final_reports_for(optimove: OptimoveSimulator, campaign_id: str) -> list[dict[str, Any]]:
    return [
        report
        for report in reports(optimove, "delivery-report")
        if report["metadata"]["campaignId"] == campaign_id and report["type"]["status"] != "Sent"
    ]


async def test_stop_reply_opts_out_reaches_optimove_and_blocks_the_next_campaign(
    kafka: EmbeddedBroker,
) -> None:
    optimove_port, provider_port = free_port(), free_port()
    settings = bulk_provider_settings(f"http://127.0.0.1:{provider_port}")
    settings.tenants[TENANT].optimove_base_url = f"http://127.0.0.1:{optimove_port}/{TENANT}"
    settings.tenants[TENANT].routes = [Route(provider=OCTOPUSH_ACCOUNT)]
    optimove = OptimoveSimulator(
        "127.0.0.1", optimove_port, tenants={TENANT: (TENANT_API_TOKEN, TENANT_SECRET)}
    )
    providers = ProviderSimulator(
        "127.0.0.1",
        provider_port,
        callback_urls=callback_urls_from_settings(settings),
        callback_delay_ms=5,
    )
    url = f"http://{settings.ingress.listen}/optimove/{TENANT}/campaigns"

    async def post(body: bytes) -> None:
        headers = {
            "content-type": "application/json",
            "X-API-Key": AGGREGATOR_API_KEY,
            "x-hub-signature": sign(body, TENANT_SECRET),
        }
        async with (
            aiohttp.ClientSession() as client,
            client.post(url, data=body, headers=headers) as response,
        ):
            assert response.status == 202, await response.text()

    async with contextlib.AsyncExitStack() as stack:
        await optimove.start()
        stack.push_async_callback(optimove.stop)
        await providers.start()
        stack.push_async_callback(providers.stop)
        for build in (build_normalizer, build_reporter, build_sender, build_callbacks):
            await stack.enter_async_context(running(build(settings)))
        await stack.enter_async_context(running(build_ingress(settings)))

        await post(campaign("first", [CUSTOMER_AS_OPTIMOVE_WROTE_IT]))
        await wait_for(
            lambda: len(final_reports_for(optimove, "first")) == 1, 60, "first campaign report"
        )
        first = final_reports_for(optimove, "first")[0]
        assert first["type"]["status"] == "Delivered", first

        ticket = providers.latest_ticket("octopush", OCTOPUSH_KEY, CUSTOMER_E164)
        assert ticket is not None
        await providers.reply("octopush", OCTOPUSH_KEY, CUSTOMER_E164, "STOP", message_id=ticket)

        # The opt-out is recorded on the tenant's list...
        opt_outs = await read_topic(settings, OPT_OUTS, OptOutChange, expect=1, timeout_s=30)
        assert [(key, change.opted_out) for key, change in opt_outs] == [
            (f"{TENANT}:{CUSTOMER_E164}", True)
        ]
        # ...and the reply reaches Optimove, from the number as Optimove wrote it.
        await wait_for(
            lambda: len(reports(optimove, "incoming-message")) >= 1, 30, "incoming message"
        )
        incoming = [m for r in reports(optimove, "incoming-message") for m in r["messages"]]
        assert [(m["from"], m["message"]) for m in incoming] == [
            (CUSTOMER_AS_OPTIMOVE_WROTE_IT, "STOP")
        ]

        await post(campaign("second", [CUSTOMER_AS_OPTIMOVE_WROTE_IT, OTHER_CUSTOMER]))
        await wait_for(
            lambda: len(final_reports_for(optimove, "second")) == 2, 60, "second campaign"
        )
        outcome = {
            r["mobileNumber"]: (r["type"]["status"], r["type"]["subStatus"])
            for r in final_reports_for(optimove, "second")
        }
        assert outcome == {
            CUSTOMER_AS_OPTIMOVE_WROTE_IT: ("Failed", "OptedOut"),
            OTHER_CUSTOMER: ("Delivered", "Delivered"),
        }
        assert providers.count("octopush", CUSTOMER_E164, "Offer second") == 0
        assert providers.count("octopush", CUSTOMER_E164, "Offer first") == 1
        assert providers.count("octopush", OTHER_CUSTOMER, "Offer second") == 1
