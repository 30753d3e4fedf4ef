"""The campaign status shows each campaign's current share of its provider account and how many
of its messages wait for their send window, as the sender instances report them on
``sms.sender-status`` (services/sender/status.py, services/campaigns/pace.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.campaigns.app import build as build_campaigns
from services.sender.app import build as build_sender
from shared.contract.events import IngressRequestAccepted
from shared.contract.topics import INGRESS_REQUESTS
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import OutRecord
from tests.integration.test_fair_sending import LIMIT, OTHER, message, publish
from tests.integration.test_sender import FAST, simulator
from tests.support import TENANT, make_settings, running, settings_data, wait_for
from tests.support.campaigns_api import campaign_status, campaigns_section
from tests.support.ops import publisher

pytestmark = pytest.mark.integration

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def tomorrow_only() -> dict[str, Any]:
    """A window open all of tomorrow (London time, where the numbers are: UTC in winter, so
    tomorrow starts within 24 h, before the messages' validity ends) and closed now."""
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date()
    return {"hours": {WEEKDAYS[tomorrow.weekday()]: ["00:00-24:00"]}}


async def test_the_status_shows_each_campaigns_share_and_its_messages_waiting_for_a_window(
    kafka: EmbeddedBroker,
) -> None:
    async with simulator(latency_ms=20) as sim:
        acme = settings_data(provider_url=sim.url)["tenants"][TENANT]
        settings = make_settings(
            provider_url=sim.url,
            overrides={
                "sender": FAST,
                "campaigns": campaigns_section(),
                "providers": {"otpiq-main": {"rate_limit_per_s": LIMIT}},
                "tenants": {OTHER: {**acme, "send_window": tomorrow_only()}},
            },
        )
        big = [message(i, TENANT, "big", f"+4477009{i:05d}") for i in range(2_000)]
        night = [message(i, OTHER, "night", f"+4477008{i:05d}") for i in range(20)]
        await publish(settings, [*big, *night])
        async with publisher(settings) as out:  # what ingress records beside them
            await out.publish(
                OutRecord(
                    INGRESS_REQUESTS,
                    f"{tenant}:{campaign}",
                    IngressRequestAccepted(
                        tenant=tenant, request_key=campaign, campaign_id=campaign, accepted=count
                    ),
                )
                for tenant, campaign, count in ((TENANT, "big", len(big)), (OTHER, "night", 20))
            )
        async with running(build_sender(settings)), running(build_campaigns(settings)):

            async def shown() -> bool:
                sending = await campaign_status(settings, TENANT, "big")
                waiting = await campaign_status(settings, OTHER, "night")
                return (
                    sending is not None
                    and waiting is not None
                    and (sending["share"] or 0) > 0.99  # the only campaign sending
                    and sending["sends_per_s"] > 0
                    and waiting["waiting_for_window"] == len(night)
                    and waiting["share"] is None
                )

            await wait_for(shown, 60, "the share and the window waits in the campaign status")
    assert not [send for send in sim.sends if send.phone.startswith("4477008")]
