"""The whole pipeline on a real broker: a signed campaign travels through all five services."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from typing import Any

import orjson
import pytest

from shared.contract.signing import verify
from shared.kafka.broker import EmbeddedBroker
from simulators.campaign_load import sample_numbers
from tests.support import TENANT_SECRET, make_settings, wait_for
from tests.support.pipeline import pipeline, post_campaign, simulated_optimove, simulated_providers

pytestmark = [pytest.mark.integration, pytest.mark.smoke]

RECIPIENTS = 1000
BATCH_SIZE = 250


def campaign_batches(numbers: list[str]) -> list[bytes]:
    """Optimove-shaped request bodies, pretty-printed so the raw bytes differ from compact JSON."""
    bodies = []
    for start in range(0, len(numbers), BATCH_SIZE):
        chunk = numbers[start : start + BATCH_SIZE]
        body = {
            "batchId": f"batch-{start // BATCH_SIZE}",
            "requestId": f"req-{start // BATCH_SIZE}",
            "senderId": "ACME",
            "metadata": {
                "appId": 7,
                "brandId": "brand-1",
                "campaignId": "spring-sale",
                "campaignType": 1,
                "channelId": 501,
                "engagementId": "eng-42",
                "isHashed": False,
                "scheduledTime": 0,
                "tenantId": 1234,
                "extra": {"nested": ["kept", "as", "is"], "unicode": "café ☕"},
            },
            "recipients": [
                {
                    "message": f"Hello customer {start + i}, 20% off today ☀",
                    "mobileNumber": number,
                    "customerId": f"cust-{start + i}",
                }
                for i, number in enumerate(chunk)
            ],
        }
        bodies.append(orjson.dumps(body, option=orjson.OPT_INDENT_2))
    return bodies


async def test_signed_campaign_reaches_optimove_as_sent_then_final_reports(
    kafka: EmbeddedBroker,
) -> None:
    optimove = simulated_optimove()
    providers = simulated_providers(fail_rate=0.1, callback_delay_ms=5, seed=7)
    settings = make_settings(optimove_url=optimove.url, provider_url=providers.url)
    numbers = sample_numbers(RECIPIENTS, seed=11)
    bodies = campaign_batches(numbers)
    posted: dict[str, dict[str, Any]] = {}  # customerId -> recipient as posted
    metadata_by_batch: dict[str, Any] = {}
    for body in bodies:
        parsed = orjson.loads(body)
        metadata_by_batch[parsed["batchId"]] = parsed["metadata"]
        for recipient in parsed["recipients"]:
            posted[recipient["customerId"]] = recipient

    async with pipeline(settings, optimove, providers):
        for body in bodies:
            answer = await post_campaign(settings, body)
            assert answer["accepted"] == BATCH_SIZE
            assert answer["rejected"] == []

        def final_reports() -> int:
            return sum(
                1
                for request in optimove.received(endpoint="delivery-report")
                if orjson.loads(request["body"])["type"]["status"] != "Sent"
            )

        await wait_for(lambda: final_reports() >= RECIPIENTS, timeout_s=120, what="final reports")
        # A duplicate report, if the pipeline made one, would land now: give it the chance.
        await asyncio.sleep(2)
        reports = optimove.received(endpoint="delivery-report")

    statuses: dict[str, list[str]] = defaultdict(list)
    sub_statuses: Counter[str] = Counter()
    for request in reports:
        assert request["status"] == 200, request
        raw = request["body"].encode("utf-8")
        assert verify(raw, request["headers"]["x-hub-signature"], TENANT_SECRET) is None
        report = orjson.loads(raw)
        as_posted = posted[report["customerId"]]
        assert report["mobileNumber"] == as_posted["mobileNumber"]
        assert report["metadata"] == metadata_by_batch[report["batchId"]]
        statuses[report["messageId"]].append(report["type"]["status"])
        if report["type"]["status"] != "Sent":
            sub_statuses[report["type"]["subStatus"]] += 1

    assert len(statuses) == RECIPIENTS
    for message_id, sequence in statuses.items():
        finals = [s for s in sequence if s != "Sent"]
        assert len(finals) == 1, (message_id, sequence)
        assert sequence[0] == "Sent", (message_id, sequence)
        assert sequence.count("Sent") == 1, (message_id, sequence)
        assert finals[0] in {"Delivered", "Failed"}
    delivered = sum(1 for s in statuses.values() if "Delivered" in s)
    failed = RECIPIENTS - delivered
    # The simulator fails about 10%: both outcomes must have been exercised and reported.
    assert 0 < failed < RECIPIENTS * 0.25, (delivered, failed, sub_statuses)
    assert len(providers.sends) == RECIPIENTS
