"""Which requests are one request, and how numbers are read (issue 14, points 1, 2 and 5).

Real HTTP through the real endpoint, a real broker; the bodies are optimove-sms-api.md §3.2's
text with values filled in (``tests/support/optimove_bodies.py``), counted on ``sms.recipients``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from services.ingress.app import IngressService, build
from services.ingress.batch import parse_campaign
from services.ingress.ledger import ledger_key
from shared.config import Settings
from shared.contract.events import IngressRequestAccepted, RecipientMessage, utcnow
from shared.contract.ids import content_request_key, message_id, request_key
from shared.contract.signing import sign
from shared.contract.topics import INGRESS_REQUESTS, PRIORITY_RECIPIENTS, RECIPIENTS, Topic
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import OutRecord, Publisher
from tests.support import (
    AGGREGATOR_API_KEY,
    TENANT,
    TENANT_SECRET,
    make_settings,
    read_topic,
    running,
)
from tests.support.optimove_bodies import AUTO_REPLY_METADATA, campaign_body, compact

pytestmark = pytest.mark.integration

ANN = {"message": "Hello Ann", "mobileNumber": "447911123456", "customerId": "cust-1"}
BOB = {"message": "Hello Bob", "mobileNumber": "447911123457", "customerId": "cust-2"}
CY = {"message": "Hello Cy", "mobileNumber": "447911123458", "customerId": "cust-3"}
# §3.4: an auto reply, e.g. Optimove's answer to a STOP.
CONFIRMATION = {
    "message": "You will get no more messages from us.",
    "mobileNumber": "447911123456",
    "customerId": "",
}


def auto_reply() -> bytes:
    return campaign_body([CONFIRMATION], batch_id="", request_id=None, metadata=AUTO_REPLY_METADATA)


def url_for(settings: Settings) -> str:
    return f"http://{settings.ingress.listen}/optimove/{TENANT}/campaigns"


async def post(
    client: aiohttp.ClientSession, settings: Settings, body: bytes, signed: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` signed over ``signed`` (the body itself unless given)."""
    headers = {
        "content-type": "application/json",
        "X-API-Key": AGGREGATOR_API_KEY,
        "x-hub-signature": sign(body if signed is None else signed, TENANT_SECRET),
    }
    async with client.post(url_for(settings), data=body, headers=headers) as response:
        return response.status, await response.json()


@contextlib.asynccontextmanager
async def ingress(settings: Settings) -> AsyncIterator[IngressService]:
    async with running(build(settings)) as service:
        assert service.ready()
        yield service


async def recipients(
    settings: Settings, expect: int, topic: Topic = RECIPIENTS
) -> list[RecipientMessage]:
    """What ingress published on ``topic``: campaigns on sms.recipients, auto replies on
    sms.recipients-priority."""
    records = await read_topic(settings, topic, RecipientMessage, expect=expect)
    return [message for _, message in records]


async def test_two_batches_sharing_a_request_id_are_both_sent_and_a_retry_is_not(
    kafka: EmbeddedBroker,
) -> None:
    """Point 1: keyed on requestId alone, the second batch got 202 and was never published."""
    settings = make_settings()
    first = campaign_body([ANN, BOB], batch_id="batch-1", request_id="req-1")
    second = campaign_body([CY], batch_id="batch-2", request_id="req-1")
    async with ingress(settings), aiohttp.ClientSession() as client:
        answers = [await post(client, settings, body) for body in (first, second, first)]
    assert [(status, answer["accepted"]) for status, answer in answers] == [
        (202, 2),
        (202, 1),
        (202, 2),  # the retry: answered again, nothing published
    ]
    published = await recipients(settings, expect=3)
    assert sorted(m.context.customer_id for m in published) == ["cust-1", "cust-2", "cust-3"]
    ids = {m.context.customer_id: m.context.message_id for m in published}
    second_key = request_key("batch-2", "req-1")
    assert second_key is not None
    assert ids["cust-3"] == message_id(TENANT, second_key, 0, CY["mobileNumber"])
    ledger = await read_topic(settings, INGRESS_REQUESTS, IngressRequestAccepted, expect=2)
    assert sorted(key or "" for key, _ in ledger) == sorted(
        ledger_key(TENANT, request_key(batch, "req-1") or "") for batch in ("batch-1", "batch-2")
    )


async def test_whitespace_variants_of_one_signed_auto_reply_send_it_once(
    kafka: EmbeddedBroker,
) -> None:
    """Point 2: Optimove signs the compact form; the bytes that arrive differ in whitespace and
    verify only through the tolerant check. They are one request: one message on Kafka."""
    settings = make_settings()
    documented = auto_reply()
    signed = compact(documented)
    variants = [
        documented,
        json.dumps(json.loads(documented), indent=4).encode() + b"\n",
        documented.replace(b"\n", b"\r\n") + b"  ",
    ]
    assert signed not in variants and len(set(variants)) == 3
    async with ingress(settings), aiohttp.ClientSession() as client:
        answers = await asyncio.gather(*(post(client, settings, v, signed) for v in variants))
        answers += [await post(client, settings, v, signed) for v in variants]
    assert {status for status, _ in answers} == {202}
    assert {answer["accepted"] for _, answer in answers} == {1}
    published = await recipients(settings, expect=1, topic=PRIORITY_RECIPIENTS)
    assert len(published) == 1
    assert published[0].destination == "+447911123456"
    # An auto reply goes before bulk traffic: never on sms.recipients (issue 17).
    assert await read_topic(settings, RECIPIENTS, RecipientMessage, settle_s=0.3) == []


async def test_the_same_auto_reply_after_the_dedupe_window_goes_out_again_with_new_ids(
    kafka: EmbeddedBroker,
) -> None:
    """Point 1: id-less requests were remembered for the ledger's seven days, so a genuine
    second auto reply with the same words was never sent."""
    settings = make_settings(overrides={"ingress": {"idless_dedupe_s": 2.0}})
    body = auto_reply()
    async with ingress(settings), aiohttp.ClientSession() as client:
        first = await post(client, settings, body)
        retry = await post(client, settings, body)  # within the window: Optimove retrying
        await asyncio.sleep(2.5)
        later = await post(client, settings, body)
    assert [status for status, _ in (first, retry, later)] == [202, 202, 202]
    published = await recipients(settings, expect=2, topic=PRIORITY_RECIPIENTS)
    assert len(published) == 2
    # The sender and later stages recognise repeats by message id: the second needs its own.
    assert published[0].context.message_id != published[1].context.message_id


async def test_an_auto_reply_is_known_to_an_instance_started_later(kafka: EmbeddedBroker) -> None:
    settings = make_settings()
    body = auto_reply()
    async with ingress(settings), aiohttp.ClientSession() as client:
        assert (await post(client, settings, body))[0] == 202
    other = make_settings()
    spaced = json.dumps(json.loads(body)).encode()  # ", " and ": ": another variant
    async with ingress(other), aiohttp.ClientSession() as client:
        assert (await post(client, other, spaced, compact(body)))[0] == 202
    assert len(await recipients(settings, expect=1, topic=PRIORITY_RECIPIENTS)) == 1
    entries = await read_topic(settings, INGRESS_REQUESTS, IngressRequestAccepted, expect=2)
    # The claim, then the entry that says the records are on Kafka.
    assert [(event.pending, event.accepted) for _, event in entries] == [(True, 0), (False, 1)]


async def test_a_retry_after_a_failed_attempt_reuses_its_message_ids(kafka: EmbeddedBroker) -> None:
    """An attempt that claimed the auto reply and then failed (503) may have published its
    records already: the retry must give them the same ids, so the sender sends once."""
    settings = make_settings()
    body = auto_reply()
    campaign = parse_campaign(body)
    failed_at = utcnow()
    claimed_key = content_request_key(campaign.identity, int(failed_at.timestamp() * 1000))
    publisher = Publisher.for_service(settings.kafka, "test")
    await publisher.start()
    try:
        claim = IngressRequestAccepted(
            tenant=TENANT, request_key=claimed_key, accepted=0, pending=True, at=failed_at
        )
        await publisher.publish(
            [OutRecord(INGRESS_REQUESTS, ledger_key(TENANT, campaign.identity), claim)]
        )
    finally:
        await publisher.stop("test")
    async with ingress(settings), aiohttp.ClientSession() as client:
        assert (await post(client, settings, body))[0] == 202
    (message,) = await recipients(settings, expect=1, topic=PRIORITY_RECIPIENTS)
    assert message.context.message_id == message_id(
        TENANT, claimed_key, 0, CONFIRMATION["mobileNumber"]
    )


def ambiguous_count(read_as: str) -> float:
    labels = {"tenant": TENANT, "read_as": read_as}
    return REGISTRY.get_sample_value("smsbridge_ingress_ambiguous_numbers_total", labels) or 0.0


@pytest.mark.parametrize(
    ("bare_digits", "destination"),
    [(None, "+6596234567"), ("international", "+6596234567"), ("national", "+16596234567")],
)
async def test_bare_digits_of_a_us_tenant(
    kafka: EmbeddedBroker, bare_digits: str | None, destination: str
) -> None:
    """Point 5: 6596234567 (Singapore +65 9623 4567, also a valid US number) went to +1 659...;
    bare digits are international unless the tenant says national, and the answer says which.
    """
    tenant: dict[str, Any] = {"default_region": "US"}
    if bare_digits is not None:
        tenant["bare_digits"] = bare_digits
    settings = make_settings(overrides={"tenants": {TENANT: tenant}})
    read_as = bare_digits or "international"
    body = campaign_body(
        [
            {"message": "Hi", "mobileNumber": "6596234567", "customerId": "sg"},
            {"message": "Hi", "mobileNumber": "2025550123", "customerId": "us"},
            # optimove-sms-api.md §5's example number: valid neither way (libphonenumber).
            {"message": "Hi", "mobileNumber": "44123456789", "customerId": "documented"},
        ],
        batch_id=f"batch-{read_as}",
    )
    before = ambiguous_count(read_as)
    async with ingress(settings), aiohttp.ClientSession() as client:
        status, answer = await post(client, settings, body)
        again = await post(client, settings, body)
    assert status == 202, answer
    assert answer["ambiguousNumbers"] == [{"index": 0, "readAs": read_as}]
    assert answer["rejected"] == [{"index": 2, "reason": "not a valid mobile number"}]
    assert again == (202, answer)  # a retry is answered the same, from the ledger
    assert "6596234567" not in json.dumps(answer)
    assert ambiguous_count(read_as) == before + 1
    published = {m.context.customer_id: m for m in await recipients(settings, expect=2)}
    assert published["sg"].destination == destination
    assert published["sg"].context.mobile_number == "6596234567"  # reported as received
    assert published["us"].destination == "+12025550123"
