"""The reporter on a real broker against the simulated Optimove (decisions.md §4, §5, §7)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from services.reporter.app import build
from services.simulators.optimove import FailureMode, OptimoveSimulator
from shared.broker import EmbeddedBroker, free_port
from shared.config import Settings
from shared.events import (
    CanonicalStatus,
    DeadLetter,
    Event,
    InboundMessage,
    MessageContext,
    StatusEvent,
)
from shared.kafka import OutRecord, Publisher, make_producer
from shared.optimove import API_KEY_HEADER
from shared.signing import SIGNATURE_HEADER, verify
from shared.topics import DEAD_LETTERS, INBOUND, STATUSES, Topic
from tests.support import (
    TENANT,
    TENANT_API_TOKEN,
    TENANT_SECRET,
    make_settings,
    read_topic,
    running,
    wait_for,
)

pytestmark = pytest.mark.integration

OTHER = "beta"
OTHER_TOKEN = "beta-api-token"
OTHER_SECRET = "beta-shared-secret"
# As ingress stores it: the exact text Optimove sent, spacing and escapes included.
METADATA_JSON = (
    '{"appId": 7, "tenantId": 1234, "campaignId": "spring", "brandId": "",'
    ' "scheduledTime": 1700000000000, "extra": {"u": "caf\\u00e9 ☕", "n": [1, 2.50]}}'
)


def settings_for(
    simulator_port: int, reporter: dict[str, Any] | None = None, other_token: str = OTHER_TOKEN
) -> Settings:
    optimove_url = f"http://127.0.0.1:{simulator_port}"
    other = {
        "optimove_base_url": f"{optimove_url}/{OTHER}",
        "api_token": other_token,
        "secret_key": OTHER_SECRET,
        "aggregator_api_key": "beta-aggregator-key",
        "routes": [{"provider": "otpiq-main"}],
    }
    return make_settings(
        optimove_url=optimove_url,
        overrides={"tenants": {OTHER: other}, "reporter": reporter or {}},
    )


def simulator_on(port: int) -> OptimoveSimulator:
    return OptimoveSimulator(
        "127.0.0.1",
        port,
        {TENANT: (TENANT_API_TOKEN, TENANT_SECRET), OTHER: (OTHER_TOKEN, OTHER_SECRET)},
    )


def status(
    message_id: str, canonical: CanonicalStatus, sub_status: str, tenant: str = TENANT
) -> StatusEvent:
    return StatusEvent(
        event_id=f"e-{message_id}-{canonical}",
        context=MessageContext(
            tenant=tenant,
            message_id=message_id,
            batch_id="batch-1",
            request_id="req-1",
            campaign_id="spring",
            customer_id=f"cust-{message_id}",
            mobile_number=f"07911 123 {message_id[-3:]}",
            metadata_json=METADATA_JSON,
        ),
        status=canonical,
        sub_status=sub_status,
        provider_message_id=f"p-{message_id}",
    )


def reply(index: int, tenant: str = TENANT) -> InboundMessage:
    return InboundMessage(
        event_id=f"e-in-{index}",
        tenant=tenant,
        to="ACME",
        from_number=f"4479111234{index:02d}",
        text=f"reply {index}",
        sent_at=datetime(2026, 1, 2, 3, 4, index, tzinfo=UTC),
    )


async def publish(settings: Settings, records: list[tuple[Topic, str, Event]]) -> None:
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    try:
        await Publisher(producer, 10).publish(OutRecord(t, k, v) for t, k, v in records)
    finally:
        await producer.stop()


def statuses_of(events: list[StatusEvent]) -> list[tuple[Topic, str, Event]]:
    return [(STATUSES, e.context.message_id, e) for e in events]


def accepted(simulator: OptimoveSimulator, endpoint: str, tenant: str = TENANT) -> list[Any]:
    return [
        orjson.loads(r["body"])
        for r in simulator.received(endpoint=endpoint, tenant=tenant)
        if not r["rejected"]
    ]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_reports_arrive_signed_with_metadata_unchanged_and_replies_batched(
    kafka: EmbeddedBroker,
) -> None:
    port = free_port()
    settings = settings_for(port, {"inbound_batch_size": 4, "inbound_batch_delay_s": 0.3})
    simulator = simulator_on(port)
    message_ids = [f"m-{i:03d}" for i in range(6)]
    events = [status(m, "sent", "Sent") for m in message_ids] + [
        status(m, "delivered", "Delivered") if i % 3 else status(m, "failed", "Undeliverable")
        for i, m in enumerate(message_ids)
    ]
    replies = [reply(i) for i in range(6)]
    accepted_before = metric(
        "smsbridge_reports_total", tenant=TENANT, kind="delivery", result="accepted"
    )

    await simulator.start()
    try:
        async with running(build(settings)):
            await publish(settings, statuses_of(events))
            await publish(settings, [(INBOUND, TENANT, r) for r in replies])
            await wait_for(
                lambda: (
                    len(accepted(simulator, "delivery-report")) >= len(events)
                    and simulator.tally(TENANT)[TENANT]["incoming_messages"] >= len(replies)
                ),
                timeout_s=30,
                what="every report at the simulator",
            )
        recorded = simulator.received(tenant=TENANT)
    finally:
        await simulator.stop()

    reports = [r for r in recorded if r["endpoint"] == "delivery-report"]
    assert len(reports) == len(events)  # none twice, none refused
    sequences: dict[str, list[str]] = defaultdict(list)
    for request in reports:
        raw = request["body"].encode("utf-8")
        assert request["status"] == 200
        assert request["headers"][API_KEY_HEADER] == TENANT_API_TOKEN
        assert request["headers"]["content-type"] == "application/json"
        assert verify(raw, request["headers"][SIGNATURE_HEADER], TENANT_SECRET) is None
        assert b'"metadata":' + METADATA_JSON.encode("utf-8") in raw
        body = orjson.loads(raw)
        message_id = body["messageId"]
        assert body["mobileNumber"] == f"07911 123 {message_id[-3:]}"
        assert body["customerId"] == f"cust-{message_id}"
        assert body["providerMessageId"] == f"p-{message_id}"
        sequences[message_id].append(f"{body['type']['status']}/{body['type']['subStatus']}")
    # Per message, the order of the topic is kept.
    assert sequences == {
        m: ["Sent/Sent", "Delivered/Delivered" if i % 3 else "Failed/Undeliverable"]
        for i, m in enumerate(message_ids)
    }

    incoming = [r for r in recorded if r["endpoint"] == "incoming-message"]
    batches = [orjson.loads(r["body"])["messages"] for r in incoming]
    assert all(
        verify(r["body"].encode(), r["headers"][SIGNATURE_HEADER], TENANT_SECRET) is None
        for r in incoming
    )
    assert max(len(batch) for batch in batches) > 1  # batched, not one by one
    assert all(len(batch) <= 4 for batch in batches)
    assert [m["message"] for batch in batches for m in batch] == [r.text for r in replies]
    assert batches[0][0] == {
        "to": "ACME",
        "from": "447911123400",
        "message": "reply 0",
        "sentAt": "2026-01-02T03:04:00Z",
    }
    accepted_after = metric(
        "smsbridge_reports_total", tenant=TENANT, kind="delivery", result="accepted"
    )
    assert accepted_after - accepted_before == len(events)


async def test_transient_failures_are_retried_and_old_ones_given_up(
    kafka: EmbeddedBroker,
) -> None:
    port = free_port()
    settings = settings_for(
        port, {"give_up_after_s": 2.0, "max_backoff_s": 0.2, "request_timeout_s": 2.0}
    )
    simulator = simulator_on(port)
    simulator.set_mode(FailureMode(status=503, remaining=3, retry_after="0"), tenant=TENANT)
    simulator.set_mode(FailureMode(status=503), tenant=OTHER)  # never recovers
    events = [status(f"m-{i:03d}", "delivered", "Delivered") for i in range(4)]
    doomed = status("m-900", "delivered", "Delivered", tenant=OTHER)
    retried_before = metric(
        "smsbridge_reports_total", tenant=TENANT, kind="delivery", result="retried"
    )

    await simulator.start()
    try:
        async with running(build(settings)):
            await publish(settings, statuses_of([*events, doomed]))
            dead = await read_topic(settings, DEAD_LETTERS, DeadLetter, expect=1, timeout_s=30)
            await wait_for(
                lambda: len(accepted(simulator, "delivery-report")) >= len(events),
                what="acme's reports after the outage",
            )
        tally = simulator.tally(TENANT)[TENANT]
        acme_statuses = [r["status"] for r in simulator.received(tenant=TENANT)]
        beta_attempts = len(simulator.received(tenant=OTHER))
    finally:
        await simulator.stop()

    assert sorted(acme_statuses) == [200] * 4 + [503] * 3
    assert tally["final"] == 4
    assert tally["duplicates"] == 0
    assert (
        metric("smsbridge_reports_total", tenant=TENANT, kind="delivery", result="retried")
        - retried_before
        == 3
    )

    assert len(dead) == 1
    key, letter = dead[0]
    assert key == "m-900"
    assert letter.stage == "reporter"
    assert letter.status_code == 503
    assert letter.attempts == beta_attempts
    assert letter.attempts >= 3
    assert "gave up" in letter.reason
    assert letter.source_topic == letter.redrive_topic == STATUSES.name
    assert StatusEvent.model_validate_json(letter.payload) == doomed


async def test_refused_reports_are_dead_lettered_at_once(kafka: EmbeddedBroker) -> None:
    port = free_port()
    # The reporter holds a wrong API token for beta: Optimove answers 401.
    settings = settings_for(port, other_token="stale-token")
    simulator = simulator_on(port)
    simulator.set_mode(FailureMode(status=400, remaining=1), tenant=TENANT)
    refused = status("m-400", "delivered", "Delivered")
    unauthorized = status("m-401", "sent", "Sent", tenant=OTHER)
    stranger = status("m-404", "sent", "Sent", tenant="ghost")
    unauthorized_before = metric("smsbridge_optimove_unauthorized_total", tenant=OTHER)

    await simulator.start()
    try:
        async with running(build(settings)):
            await publish(settings, statuses_of([refused, unauthorized, stranger]))
            await publish(settings, [(INBOUND, OTHER, reply(1, OTHER))])
            dead = await read_topic(settings, DEAD_LETTERS, DeadLetter, expect=4, timeout_s=30)
        received = simulator.received()
    finally:
        await simulator.stop()

    letters = {letter.key: letter for _, letter in dead}
    assert len(dead) == 4
    assert set(letters) == {"m-400", "m-401", "m-404", OTHER}

    bad_request = letters["m-400"]
    assert (bad_request.status_code, bad_request.attempts) == (400, 1)
    assert "simulated failure" in bad_request.response_excerpt
    assert "HTTP 400" in bad_request.reason
    assert bad_request.redrive_topic == STATUSES.name

    for key in ("m-401", OTHER):
        letter = letters[key]
        assert (letter.status_code, letter.attempts) == (401, 1)
        assert "invalid app-api-key" in letter.response_excerpt
    assert letters[OTHER].redrive_topic == INBOUND.name
    assert InboundMessage.model_validate_json(letters[OTHER].payload) == reply(1, OTHER)
    assert metric("smsbridge_optimove_unauthorized_total", tenant=OTHER) - unauthorized_before == 2

    assert "unknown tenant 'ghost'" in letters["m-404"].reason
    assert letters["m-404"].attempts == 0

    # Refusals are final: each was asked once, the unknown tenant never.
    assert sorted((r["tenant"], r["endpoint"], r["status"]) for r in received) == [
        (TENANT, "delivery-report", 400),
        (OTHER, "delivery-report", 401),
        (OTHER, "incoming-message", 401),
    ]
