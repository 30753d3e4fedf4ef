"""Ingress on a real broker and a real HTTP listener: what is answered, what lands on Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import REGISTRY

from services.ingress.app import IngressService, build
from services.ingress.ledger import ledger_key
from shared.config import Settings
from shared.contract.events import DispatchRecord, IngressRequestAccepted, RecipientMessage
from shared.contract.ids import message_id, request_key
from shared.contract.signing import sign
from shared.contract.topics import DISPATCHES, INGRESS_REQUESTS, RECIPIENTS, ensure_topics
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import make_admin
from tests.support import (
    AGGREGATOR_API_KEY,
    TENANT,
    TENANT_SECRET,
    make_settings,
    read_topic,
    running,
)

pytestmark = pytest.mark.integration

METADATA_TEXT = (
    '{\n    "appId": 7,  "brandId": "brand-1",\n    "campaignId": "spring-sale",\n'
    '    "scheduledTime": 1767225600123, "tenantId": 1234,\n'
    '    "extra": {"nested": ["kept", "as", "is"], "unicode": "caf\\u00e9 \u2615"}\n  }'
)
SCHEDULED_AT_ISO = "2026-01-01T00:00:00.123000+00:00"


def campaign_body(
    recipients: list[dict[str, Any]],
    *,
    request_id: str | None = "req-1",
    batch_id: str = "batch-1",
    sender_id: str | None = "ACME-PROMO",
) -> bytes:
    """An Optimove-shaped body, pretty-printed by hand so its bytes match no re-serialisation."""
    members = [f'"batchId": {orjson.dumps(batch_id).decode()}', f'"metadata": {METADATA_TEXT}']
    members.append(
        '"recipients": [\n    '
        + ",\n    ".join(orjson.dumps(r).decode() for r in recipients)
        + "\n  ]"
    )
    if request_id is not None:
        members.append(f'"requestId": {orjson.dumps(request_id).decode()}')
    if sender_id is not None:
        members.append(f'"senderId": {orjson.dumps(sender_id).decode()}')
    return ("{\n  " + ",\n  ".join(members) + "\n}\n").encode()


def headers_for(
    body: bytes, *, api_key: str | None = AGGREGATOR_API_KEY, secret: str = TENANT_SECRET
) -> dict[str, str]:
    headers = {"content-type": "application/json", "x-hub-signature": sign(body, secret)}
    if api_key is not None:
        headers["X-API-Key"] = api_key
    return headers


def url_for(settings: Settings, tenant: str = TENANT) -> str:
    return f"http://{settings.ingress.listen}/optimove/{tenant}/campaigns"


async def post(
    client: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with client.post(url, data=body, headers=headers) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json(), dict(response.headers)


def without_date(headers: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name.lower() != "date"}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def ingress(settings: Settings) -> AsyncIterator[IngressService]:
    service = build(settings)
    async with running(service):
        assert service.ready()
        yield service


RECIPIENTS_OK = [
    {"message": "Hello Ann ☀", "mobileNumber": "+447911123456", "customerId": "cust-1"},
    {"message": "Hello Bob", "mobileNumber": "447911123458", "customerId": "cust-2"},
    {"message": "Hello Cy", "mobileNumber": "07911 123 457", "customerId": "cust-3"},
]
E164 = ["+447911123456", "+447911123458", "+447911123457"]
REQUEST_KEY = request_key("batch-1", "req-1") or "(has ids)"


async def test_signed_batch_is_accepted_and_every_recipient_published(
    kafka: EmbeddedBroker,
) -> None:
    settings = make_settings()
    body = campaign_body(RECIPIENTS_OK)
    accepted_before = metric("smsbridge_ingress_recipients_total", tenant=TENANT, result="accepted")
    async with ingress(settings), aiohttp.ClientSession() as client:
        status, answer, _ = await post(client, url_for(settings), body, headers_for(body))
        async with client.get(f"http://{settings.ingress.ops_listen}/readyz") as ready:
            assert ready.status == 200
        async with client.get(f"http://{settings.ingress.ops_listen}/metrics") as exported:
            exposition = await exported.text()

    assert status == 202, answer
    assert answer == {
        "requestId": "req-1",
        "batchId": "batch-1",
        "accepted": 3,
        "rejected": [],
        "ambiguousNumbers": [],
    }
    assert 'smsbridge_ingress_requests_total{result="accepted",tenant="acme"}' in exposition
    assert metric("smsbridge_ingress_recipients_total", tenant=TENANT, result="accepted") == (
        accepted_before + 3
    )

    published = await read_topic(settings, RECIPIENTS, RecipientMessage, expect=3)
    assert len(published) == 3
    by_customer = {message.context.customer_id: (key, message) for key, message in published}
    for index, (recipient, e164) in enumerate(zip(RECIPIENTS_OK, E164, strict=True)):
        key, message = by_customer[recipient["customerId"]]
        assert key == f"{TENANT}:{e164}"
        assert message.destination == e164
        assert message.text == recipient["message"]
        assert message.sender_id == "ACME-PROMO"
        assert message.scheduled_at is not None
        assert message.scheduled_at.isoformat() == SCHEDULED_AT_ISO
        context = message.context
        key = REQUEST_KEY
        assert context.message_id == message_id(TENANT, key, index, recipient["mobileNumber"])
        assert context.mobile_number == recipient["mobileNumber"]  # exactly as received
        assert context.metadata_json == METADATA_TEXT  # byte for byte
        assert (context.tenant, context.batch_id, context.request_id) == (
            TENANT,
            "batch-1",
            "req-1",
        )
        assert context.campaign_id == "spring-sale"

    ledger = await read_topic(settings, INGRESS_REQUESTS, IngressRequestAccepted, expect=1)
    assert [(key, event.accepted, event.rejected) for key, event in ledger] == [
        (ledger_key(TENANT, REQUEST_KEY), 3, [])
    ]
    assert await read_topic(settings, DISPATCHES, DispatchRecord, settle_s=0.2) == []


async def test_refused_requests_publish_nothing(kafka: EmbeddedBroker) -> None:
    settings = make_settings()
    body = campaign_body(RECIPIENTS_OK)
    url = url_for(settings)

    def refusals(reason: str) -> float:
        return metric(
            "smsbridge_signature_failures_total",
            endpoint="campaigns",
            tenant=TENANT,
            reason=reason,
        )

    reasons = (
        "api_key_mismatch",
        "api_key_missing",
        "signature_mismatch",
        "signature_missing",
        "signature_unknown_algorithm",
    )
    before = {reason: refusals(reason) for reason in reasons}
    no_signature = headers_for(body)
    del no_signature["x-hub-signature"]
    sha1 = headers_for(body)
    sha1["x-hub-signature"] = "sha1=" + sign(body, TENANT_SECRET).partition("=")[2][:40]
    cases: list[tuple[str, bytes, dict[str, str], int]] = [
        ("wrong API key", body, headers_for(body, api_key="not-the-key"), 401),
        ("no API key", body, headers_for(body, api_key=None), 401),
        ("wrong secret", body, headers_for(body, secret="not-the-secret"), 401),
        ("no signature", body, no_signature, 401),
        ("sha1 signature", body, sha1, 401),
        ("tampered body", body.replace(b"Hello Ann", b"Hello Eve"), headers_for(body), 401),
    ]
    async with ingress(settings), aiohttp.ClientSession() as client:
        for what, payload, headers, expected in cases:
            status, answer, _ = await post(client, url, payload, headers)
            assert status == expected, what
            assert set(answer) >= {"error", "reason"}, what
            assert "Hello" not in orjson.dumps(answer).decode(), what
        # Issue 14, point 10: an unknown tenant is answered exactly as a wrong key is.
        for api_key in (AGGREGATOR_API_KEY, "not-the-key", None):
            unknown = await post(
                client, url_for(settings, "ghost"), body, headers_for(body, api_key=api_key)
            )
            wrong = await post(
                client, url, body, headers_for(body, api_key=api_key and "not-the-key")
            )
            assert unknown[0] == wrong[0] == 401, api_key
            assert unknown[1] == wrong[1], api_key
            assert without_date(unknown[2]) == without_date(wrong[2]), api_key

    assert {reason: refusals(reason) - before[reason] for reason in reasons} == {
        "api_key_mismatch": 3,
        "api_key_missing": 2,
        "signature_mismatch": 2,
        "signature_missing": 1,
        "signature_unknown_algorithm": 1,
    }
    assert await read_topic(settings, RECIPIENTS, RecipientMessage, settle_s=0.3) == []
    assert await read_topic(settings, INGRESS_REQUESTS, IngressRequestAccepted, settle_s=0) == []


async def test_malformed_and_oversized_bodies_are_refused_and_publish_nothing(
    kafka: EmbeddedBroker,
) -> None:
    settings = make_settings(overrides={"ingress": {"max_body_bytes": 4096}})
    url = url_for(settings)
    not_json = b'{"batchId": "b", "metadata": {"appId": 1}, '
    wrong_type = campaign_body(RECIPIENTS_OK).replace(b'"appId": 7', b'"appId": "7"')
    bad_number = campaign_body([{"message": "hi", "mobileNumber": 447911123456}])
    too_large = campaign_body(
        [{"message": "x" * 500, "mobileNumber": "+447911123456"} for _ in range(10)]
    )
    assert len(too_large) > 4096

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    async with ingress(settings), aiohttp.ClientSession() as client:
        status, answer, _ = await post(client, url, not_json, headers_for(not_json))
        assert (status, answer["error"]) == (400, "body is not valid JSON")

        status, answer, _ = await post(client, url, wrong_type, headers_for(wrong_type))
        assert (status, answer["field"]) == (400, "metadata.appId")

        status, answer, _ = await post(client, url, bad_number, headers_for(bad_number))
        assert (status, answer["field"]) == (400, "recipients.0.mobileNumber")

        status, answer, _ = await post(client, url, too_large, headers_for(too_large))
        assert (status, answer["error"]) == (413, "body too large")

        # Without a Content-Length the limit is found while reading.
        async with client.post(url, data=chunks(), headers=headers_for(b"")) as response:
            assert response.status == 413
            assert (await response.json())["error"] == "body too large"

    assert await read_topic(settings, RECIPIENTS, RecipientMessage, settle_s=0.3) == []
    assert await read_topic(settings, INGRESS_REQUESTS, IngressRequestAccepted, settle_s=0) == []


async def test_repeated_request_is_answered_again_and_publishes_nothing_new(
    kafka: EmbeddedBroker,
) -> None:
    settings = make_settings()
    body = campaign_body([*RECIPIENTS_OK, {"message": "Hi", "mobileNumber": "12345"}])
    async with ingress(settings), aiohttp.ClientSession() as client:
        first = await post(client, url_for(settings), body, headers_for(body))
        again = await post(client, url_for(settings), body, headers_for(body))
        # Optimove retries concurrently too: one of them publishes, the other waits and repeats.
        together = await asyncio.gather(
            *(post(client, url_for(settings), body, headers_for(body)) for _ in range(3))
        )
    assert first[0] == again[0] == 202
    assert again[1] == first[1]
    assert first[1]["accepted"] == 3
    assert [answer for _, answer, _ in together] == [first[1]] * 3

    # Another instance, started later, learns the request from sms.ingress-requests.
    other_settings = make_settings()
    async with ingress(other_settings), aiohttp.ClientSession() as client:
        status, answer, _ = await post(client, url_for(other_settings), body, headers_for(body))
    assert (status, answer) == (202, first[1])

    assert len(await read_topic(settings, RECIPIENTS, RecipientMessage, expect=3)) == 3
    assert len(await read_topic(settings, DISPATCHES, DispatchRecord, expect=1)) == 1
    ledger = await read_topic(settings, INGRESS_REQUESTS, IngressRequestAccepted, expect=1)
    assert len(ledger) == 1


async def test_rejected_recipients_are_listed_and_reported_failed(kafka: EmbeddedBroker) -> None:
    settings = make_settings()
    recipients = [
        {"message": "ok", "mobileNumber": "+447911123456", "customerId": "good"},
        {"message": "no such number", "mobileNumber": "12345", "customerId": "bad-number"},
        {"message": "nobody", "customerId": "no-number"},
        {"message": "   ", "mobileNumber": "+447911123457", "customerId": "blank"},
    ]
    body = campaign_body(recipients, request_id=None, batch_id="batch-rejects")
    async with ingress(settings), aiohttp.ClientSession() as client:
        status, answer, _ = await post(client, url_for(settings), body, headers_for(body))

    assert status == 202
    assert answer == {
        "requestId": None,
        "batchId": "batch-rejects",
        "accepted": 1,
        "rejected": [
            {"index": 1, "reason": "not a valid mobile number"},
            {"index": 2, "reason": "missing mobile number"},
            {"index": 3, "reason": "empty message"},
        ],
        "ambiguousNumbers": [],
    }
    dispatches = await read_topic(settings, DISPATCHES, DispatchRecord, expect=3)
    by_customer = {record.context.customer_id: (key, record) for key, record in dispatches}
    expected = {
        "bad-number": (1, "12345", "InvalidNumber"),
        "no-number": (2, "", "InvalidNumber"),
        "blank": (3, "+447911123457", "EmptyMessage"),
    }
    assert set(by_customer) == set(expected)
    for customer, (index, number, sub_status) in expected.items():
        key, record = by_customer[customer]
        identifier = message_id(TENANT, "b:batch-rejects", index, number)
        assert key == record.correlation_key == f"message:{identifier}"
        assert record.context.message_id == identifier
        assert (record.outcome, record.sub_status) == ("failed", sub_status)
        assert record.detail == answer["rejected"][index - 1]["reason"]
        assert record.context.metadata_json == METADATA_TEXT
    published = await read_topic(settings, RECIPIENTS, RecipientMessage, expect=1)
    assert [message.context.customer_id for _, message in published] == ["good"]


@pytest.mark.own_broker
@pytest.mark.smoke
async def test_kafka_outage_answers_503_and_the_retry_succeeds(kafka: EmbeddedBroker) -> None:
    settings = make_settings(
        overrides={"kafka": {"produce_timeout_s": 1.0, "request_timeout_ms": 2000}}
    )
    body = campaign_body(RECIPIENTS_OK)
    async with ingress(settings), aiohttp.ClientSession() as client:
        published = await _outage_then_retry(settings, body, client, kafka)

    # A batch left over from the failed attempt may land too; each message is there at least once.
    assert {message.context.customer_id for _, message in published} == {
        "cust-1",
        "cust-2",
        "cust-3",
    }


async def _outage_then_retry(
    settings: Settings,
    body: bytes,
    client: aiohttp.ClientSession,
    kafka: EmbeddedBroker,
) -> list[tuple[str | None, RecipientMessage]]:
    # A broker may linger on SIGTERM while clients are connected: stop it off the event loop.
    await asyncio.to_thread(kafka.stop)
    started = time.monotonic()
    status, answer, headers = await post(client, url_for(settings), body, headers_for(body))
    assert status == 503, answer
    assert headers["Retry-After"] == "5"
    assert "error" in answer
    assert time.monotonic() - started < 5

    await asyncio.to_thread(kafka.start)  # on the same port (and data, for Apache Kafka)
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        await ensure_topics(admin)
    finally:
        await admin.close()
    # As Optimove would: retry until the request is taken.
    deadline = time.monotonic() + 30
    while True:
        status, answer, _ = await post(client, url_for(settings), body, headers_for(body))
        if status != 503 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert status == 202, answer
    assert answer["accepted"] == 3
    ledger = await read_topic(settings, INGRESS_REQUESTS, IngressRequestAccepted, expect=1)
    assert [key for key, _ in ledger] == [ledger_key(TENANT, REQUEST_KEY)]
    return await read_topic(settings, RECIPIENTS, RecipientMessage, expect=3)
