"""A customer's STOP, end to end, through Octopush (the provider with reply and STOP callbacks).

Campaign one reaches the customer; the customer replies STOP; the opt-out is recorded, the reply
reaches Optimove's Incoming Message endpoint with ``from`` written as Optimove wrote the number;
campaign two is not sent to that customer and is reported ``Failed``/``OptedOut``, while the other
recipient of campaign two is sent as usual. Optimove's auto reply confirming a STOP still goes out.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
import pytest

from shared.config import Route
from shared.contract.events import LastInbound, OptOutChange, utcnow
from shared.contract.topics import LAST_INBOUND, OPT_OUTS
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import OutRecord, Publisher, make_producer
from shared.providers import callback_url
from simulators.optimove import OptimoveSimulator
from simulators.providers import callback_urls_from_settings
from tests.support import TENANT, read_topic, wait_for
from tests.support.optimove_bodies import AUTO_REPLY_METADATA, campaign_body
from tests.support.pipeline import pipeline, post_campaign, simulated_optimove, simulated_providers
from tests.support.providers import (
    OCTOPUSH_ACCOUNT,
    OCTOPUSH_KEY,
    bulk_provider_settings,
    post_provider_callback,
)

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


# -- Optimove's auto reply to a STOP -------------------------------------------------------------

# providers.md §3.4, verbatim: the customer texts STOP to the Octopush account.
OCTOPUSH_STOP = (
    b'{"message_id":"sms_5fa275dbf21dc","number":"+33600000000","text":"stop",'
    b'"stop_date":"2020-11-04 11:11:45"}'
)
STOPPED_NOW = "+33600000000"
STOPPED_LONG_AGO = "+33600000009"


def auto_reply(text: str, numbers: list[str]) -> bytes:
    """The documented body (optimove-sms-api.md §3.2) as §3.4 says auto replies come: batchId,
    metadata.brandId and metadata.campaignId all ""."""
    recipients = [
        {"message": text, "mobileNumber": number, "customerId": f"c{i}"}
        for i, number in enumerate(numbers)
    ]
    return campaign_body(
        recipients, batch_id="", request_id=None, sender_id="", metadata=AUTO_REPLY_METADATA
    )


def outcome(report: dict[str, Any]) -> tuple[str, str]:
    return report["type"]["status"], report["type"]["subStatus"]


async def test_the_auto_reply_to_a_stop_goes_out_while_campaigns_and_old_opt_outs_stay_stopped(
    kafka: EmbeddedBroker,
) -> None:
    optimove = simulated_optimove()
    providers = simulated_providers(callback_delay_ms=5)
    settings = bulk_provider_settings(providers.url)
    settings.tenants[TENANT].optimove_base_url = optimove.base_url(TENANT)
    settings.tenants[TENANT].routes = [Route(provider=OCTOPUSH_ACCOUNT)]
    providers.configure(callback_urls=callback_urls_from_settings(settings))
    # A customer who opted out, and last wrote to us, three days ago (beyond the 48 h window).
    long_ago = utcnow() - timedelta(days=3)
    key = f"{TENANT}:{STOPPED_LONG_AGO}"
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    try:
        await Publisher(producer, 10.0).publish(
            [
                OutRecord(
                    OPT_OUTS,
                    key,
                    OptOutChange(
                        tenant=TENANT,
                        number=STOPPED_LONG_AGO,
                        opted_out=True,
                        source="keyword",
                        at=long_ago,
                    ),
                ),
                OutRecord(
                    LAST_INBOUND,
                    key,
                    LastInbound(tenant=TENANT, number=STOPPED_LONG_AGO, at=long_ago),
                ),
            ]
        )
    finally:
        await producer.stop()

    async with pipeline(settings, optimove, providers):
        await post_provider_callback(callback_url(settings, OCTOPUSH_ACCOUNT), OCTOPUSH_STOP)
        await wait_for(
            lambda: len(reports(optimove, "incoming-message")) >= 1, 30, "the STOP at Optimove"
        )
        [stop] = [m for r in reports(optimove, "incoming-message") for m in r["messages"]]
        assert (stop["from"], stop["message"]) == ("33600000000", "stop")

        # Optimove confirms the STOP, and answers the customer of long ago; a campaign follows.
        await post_campaign(
            settings, auto_reply("You will get no more messages.", [STOPPED_NOW, STOPPED_LONG_AGO])
        )
        await post_campaign(settings, campaign("later", [STOPPED_NOW]))

        def finals() -> list[dict[str, Any]]:
            return [
                r for r in reports(optimove, "delivery-report") if r["type"]["status"] != "Sent"
            ]

        await wait_for(lambda: len(finals()) == 3, 60, "three final reports")
        by_campaign_and_number = {
            (r["metadata"]["campaignId"], r["mobileNumber"]): outcome(r) for r in finals()
        }

    assert by_campaign_and_number == {
        ("", STOPPED_NOW): ("Delivered", "Delivered"),
        ("", STOPPED_LONG_AGO): ("Failed", "OptedOut"),
        ("later", STOPPED_NOW): ("Failed", "OptedOut"),
    }
    assert providers.count("octopush", STOPPED_NOW, "You will get no more messages.") == 1
    assert providers.count("octopush", STOPPED_LONG_AGO, "You will get no more messages.") == 0
    assert providers.count("octopush", STOPPED_NOW, "Offer later") == 0
