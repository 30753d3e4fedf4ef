"""A customer's STOP, end to end, through Octopush (the provider with reply and STOP callbacks).

Campaign one reaches the customer; the customer replies STOP; the opt-out is recorded, the reply
reaches Optimove's Incoming Message endpoint with ``from`` written as Optimove wrote the number;
campaign two is not sent to that customer and is reported ``Failed``/``OptedOut``, while the other
recipient of campaign two is sent as usual.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from services.simulators.optimove import OptimoveSimulator
from services.simulators.providers import callback_urls_from_settings
from shared.broker import EmbeddedBroker
from shared.config import Route
from shared.events import OptOutChange
from shared.topics import OPT_OUTS
from tests.support import TENANT, read_topic, wait_for
from tests.support.pipeline import pipeline, post_campaign, simulated_optimove, simulated_providers
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
    optimove = simulated_optimove()
    providers = simulated_providers(callback_delay_ms=5)
    settings = bulk_provider_settings(providers.url)
    settings.tenants[TENANT].optimove_base_url = optimove.base_url(TENANT)
    settings.tenants[TENANT].routes = [Route(provider=OCTOPUSH_ACCOUNT)]
    providers.configure(callback_urls=callback_urls_from_settings(settings))

    async with pipeline(settings, optimove, providers):
        await post_campaign(settings, campaign("first", [CUSTOMER_AS_OPTIMOVE_WROTE_IT]))
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

        await post_campaign(
            settings, campaign("second", [CUSTOMER_AS_OPTIMOVE_WROTE_IT, OTHER_CUSTOMER])
        )
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
