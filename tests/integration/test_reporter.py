"""The reporter on a real broker against the simulated Optimove (decisions.md §4, §5, §7).

The simulator is switched into failure modes: a 503 outage that ends, timeouts, 429 with
``Retry-After``, refusals (400, 401), an outage that never ends (given up), one tenant down while
another keeps flowing, and parked reports that outlive the reporter that parked them.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from services.reporter.app import build
from shared.config import Settings
from shared.contract.events import (
    CanonicalStatus,
    DeadLetter,
    Event,
    InboundMessage,
    MessageContext,
    StatusEvent,
)
from shared.contract.optimove import API_KEY_HEADER
from shared.contract.signing import SIGNATURE_HEADER, verify
from shared.contract.topics import DEAD_LETTERS, INBOUND, STATUSES, Topic
from shared.kafka.broker import EmbeddedBroker, free_port
from shared.kafka.clients import OutRecord, Publisher, make_producer
from simulators.optimove import FailureMode, OptimoveSimulator
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
# Short waits everywhere, so that outages of a few seconds are enough.
FAST_RETRIES: dict[str, Any] = {
    "max_backoff_s": 0.5,
    "inline_retry_s": 0.5,
    "parked_poll_interval_s": 0.1,
    "request_timeout_s": 2.0,
}


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


def campaign(prefix: str, messages: int, tenant: str = TENANT) -> list[StatusEvent]:
    """Sent then Delivered for each message, all Sent first (as a campaign produces them)."""
    ids = [f"{prefix}-{i:03d}" for i in range(messages)]
    return [status(m, "sent", "Sent", tenant) for m in ids] + [
        status(m, "delivered", "Delivered", tenant) for m in ids
    ]


def reply(index: int, tenant: str = TENANT) -> InboundMessage:
    return InboundMessage(
        event_id=f"e-in-{tenant}-{index}",
        tenant=tenant,
        to="ACME",
        from_number=f"44791112{index:04d}",
        text=f"reply {index}",
        sent_at=datetime(2026, 1, 2, 3, 4, tzinfo=UTC) + timedelta(seconds=index),
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


def sequences(simulator: OptimoveSimulator, tenant: str) -> dict[str, list[str]]:
    """Per message, the statuses Optimove accepted, in the order it accepted them."""
    found: dict[str, list[str]] = defaultdict(list)
    for body in accepted(simulator, "delivery-report", tenant):
        found[body["messageId"]].append(body["type"]["status"])
    return found


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def parked(tenant: str, kind: str = "delivery") -> float:
    return metric("smsbridge_reports_parked", tenant=tenant, kind=kind)


async def no_dead_letters(settings: Settings) -> list[tuple[str | None, DeadLetter]]:
    return await read_topic(settings, DEAD_LETTERS, DeadLetter, settle_s=0.3)


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
        "smsbridge_reports_total", tenant=TENANT, kind="delivery", status="sent", result="accepted"
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
    by_message: dict[str, list[str]] = defaultdict(list)
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
        by_message[message_id].append(f"{body['type']['status']}/{body['type']['subStatus']}")
    # Per message, the order of the topic is kept.
    assert by_message == {
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
        "from": "447911120000",
        "message": "reply 0",
        "sentAt": "2026-01-02T03:04:00Z",
    }
    accepted_after = metric(
        "smsbridge_reports_total", tenant=TENANT, kind="delivery", status="sent", result="accepted"
    )
    assert accepted_after - accepted_before == len(message_ids)


async def test_an_outage_that_ends_loses_nothing_and_repeats_nothing(
    kafka: EmbeddedBroker,
) -> None:
    port = free_port()
    settings = settings_for(port, FAST_RETRIES)
    simulator = simulator_on(port)
    simulator.set_mode(FailureMode(status=503), tenant=TENANT)
    events = campaign("m", 30)
    parked_before = metric(
        "smsbridge_reports_total", tenant=TENANT, kind="delivery", status="sent", result="parked"
    )

    await simulator.start()
    try:
        async with running(build(settings)):
            await publish(settings, statuses_of(events))
            await wait_for(lambda: parked(TENANT) == 30, what="every message parked")
            simulator.clear_modes(TENANT)  # Optimove is back
            await wait_for(
                lambda: len(accepted(simulator, "delivery-report")) >= len(events),
                timeout_s=60,
                what="every report after the outage",
            )
            await wait_for(lambda: parked(TENANT) == 0, what="nothing parked any more")
            dead = await no_dead_letters(settings)
        tally = simulator.tally(TENANT)[TENANT]
        failed = sum(1 for r in simulator.received(tenant=TENANT) if r["status"] == 503)
    finally:
        await simulator.stop()

    assert len(accepted(simulator, "delivery-report")) == len(events)  # none twice
    assert (tally["final"], tally["duplicates"]) == (30, 0)
    assert sequences(simulator, TENANT) == {
        e.context.message_id: ["Sent", "Delivered"] for e in events
    }
    assert dead == []
    assert failed >= 1
    assert (
        metric(
            "smsbridge_reports_total",
            tenant=TENANT,
            kind="delivery",
            status="sent",
            result="parked",
        )
        - parked_before
        == 30
    )


async def test_timeouts_are_retried(kafka: EmbeddedBroker) -> None:
    port = free_port()
    settings = settings_for(port, {**FAST_RETRIES, "request_timeout_s": 0.5})
    simulator = simulator_on(port)
    # Slower than the reporter waits; the simulator still takes them late, as a real peer may.
    simulator.set_mode(FailureMode(delay_ms=1500, remaining=3), tenant=TENANT)
    events = [status(f"m-{i:03d}", "delivered", "Delivered") for i in range(5)]
    timeouts_before = metric(
        "smsbridge_report_attempt_failures_total", tenant=TENANT, kind="delivery", code="timeout"
    )

    await simulator.start()
    try:
        async with running(build(settings)):
            await publish(settings, statuses_of(events))
            await wait_for(
                lambda: simulator.tally(TENANT)[TENANT]["final"] == 5,
                timeout_s=60,
                what="every report despite the timeouts",
            )
            dead = await no_dead_letters(settings)
            # The timed-out requests finish at the simulator 1.5 s after they began, maybe after
            # their retries did: wait for them rather than race them.
            await wait_for(
                lambda: len(simulator.received(tenant=TENANT)) >= len(events) + 3,
                timeout_s=10,
                what="the late answers to the timed-out requests",
            )
        requests = simulator.received(tenant=TENANT)
    finally:
        await simulator.stop()

    timeouts = (
        metric(
            "smsbridge_report_attempt_failures_total",
            tenant=TENANT,
            kind="delivery",
            code="timeout",
        )
        - timeouts_before
    )
    assert timeouts == 3
    assert dead == []
    # Each timed-out request was sent again; a late answer may have counted it twice.
    assert len(events) + 3 <= len(requests)


async def test_429_retry_after_is_honoured_for_the_whole_tenant(kafka: EmbeddedBroker) -> None:
    port = free_port()
    settings = settings_for(port, {**FAST_RETRIES, "max_backoff_s": 10.0})
    simulator = simulator_on(port)
    simulator.set_mode(FailureMode(status=429, remaining=1, retry_after="2"), tenant=TENANT)
    first, *later = [status(f"m-{i:03d}", "sent", "Sent") for i in range(3)]

    await simulator.start()
    try:
        async with running(build(settings)):
            await publish(settings, statuses_of([first]))
            await wait_for(
                lambda: len(simulator.received(tenant=TENANT)) == 1, what="the first request"
            )
            # Published after the 429: they must wait for the Retry-After as well.
            await publish(settings, statuses_of(later))
            await wait_for(
                lambda: len(accepted(simulator, "delivery-report")) == 3,
                timeout_s=30,
                what="every report after the Retry-After",
            )
        requests = simulator.received(tenant=TENANT)
    finally:
        await simulator.stop()

    limited, *rest = requests
    assert limited["status"] == 429
    assert [r["status"] for r in rest] == [200, 200, 200]
    limited_at = datetime.fromisoformat(limited["received_at"])
    waited = [(datetime.fromisoformat(r["received_at"]) - limited_at).total_seconds() for r in rest]
    assert min(waited) >= 1.9


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
    dead_before = metric(
        "smsbridge_reports_total",
        tenant=OTHER,
        kind="incoming",
        status="reply",
        result="dead_lettered",
    )

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
    assert (
        metric(
            "smsbridge_reports_total",
            tenant=OTHER,
            kind="incoming",
            status="reply",
            result="dead_lettered",
        )
        - dead_before
        == 1
    )

    assert "unknown tenant 'ghost'" in letters["m-404"].reason
    assert letters["m-404"].attempts == 0

    # Refusals are final: each was asked once, the unknown tenant never.
    assert sorted((r["tenant"], r["endpoint"], r["status"]) for r in received) == [
        (TENANT, "delivery-report", 400),
        (OTHER, "delivery-report", 401),
        (OTHER, "incoming-message", 401),
    ]


async def test_reports_older_than_the_give_up_age_are_dead_lettered(
    kafka: EmbeddedBroker,
) -> None:
    port = free_port()
    settings = settings_for(port, {**FAST_RETRIES, "give_up_after_s": 2.0})
    simulator = simulator_on(port)
    simulator.set_mode(FailureMode(status=503), tenant=OTHER)  # never recovers
    doomed = status("m-900", "delivered", "Delivered", tenant=OTHER)

    await simulator.start()
    try:
        async with running(build(settings)):
            await publish(settings, statuses_of([doomed]))
            dead = await read_topic(settings, DEAD_LETTERS, DeadLetter, expect=1, timeout_s=30)
            await wait_for(lambda: parked(OTHER) == 0, what="the parked report gone")
        beta_attempts = len(simulator.received(tenant=OTHER))
    finally:
        await simulator.stop()

    assert len(dead) == 1
    key, letter = dead[0]
    assert key == "m-900"
    assert letter.stage == "reporter"
    assert letter.status_code == 503
    assert "simulated failure" in letter.response_excerpt
    assert letter.attempts == beta_attempts
    assert letter.attempts >= 2
    assert "gave up" in letter.reason
    assert letter.source_topic == letter.redrive_topic == STATUSES.name
    assert StatusEvent.model_validate_json(letter.payload) == doomed


async def test_one_tenant_down_does_not_slow_the_others(kafka: EmbeddedBroker) -> None:
    port = free_port()
    # Few slots, so that reports held for their tenant's outage would stall everything.
    settings = settings_for(
        port,
        {
            **FAST_RETRIES,
            "inline_retry_s": 3.0,
            "request_timeout_s": 1.0,
            "runner": {"max_in_flight": 10},
        },
    )
    simulator = simulator_on(port)
    simulator.set_mode(FailureMode(status=503), tenant=OTHER)
    down = campaign("b", 50, tenant=OTHER)
    up = campaign("a", 50)

    await simulator.start()
    try:
        async with running(build(settings)):
            # The failing tenant's reports come first in the topic.
            await publish(settings, statuses_of(down))
            await publish(settings, statuses_of(up))
            await wait_for(
                lambda: len(accepted(simulator, "delivery-report")) == len(up),
                timeout_s=60,
                what="the healthy tenant's reports",
            )
            assert simulator.modes() == {OTHER: simulator.modes()[OTHER]}  # beta still down
            assert accepted(simulator, "delivery-report", OTHER) == []
            await wait_for(lambda: parked(OTHER) == 50, what="beta's messages parked")
            # Probed one request at a time: far fewer requests than reports.
            assert len(simulator.received(tenant=OTHER)) < len(down)

            simulator.clear_modes(OTHER)
            await wait_for(
                lambda: len(accepted(simulator, "delivery-report", OTHER)) >= len(down),
                timeout_s=60,
                what="beta's reports once it is back",
            )
            await wait_for(lambda: parked(OTHER) == 0, what="nothing parked any more")
    finally:
        await simulator.stop()

    assert len(accepted(simulator, "delivery-report", OTHER)) == len(down)  # none twice
    for tenant, events in ((TENANT, up), (OTHER, down)):
        assert sequences(simulator, tenant) == {
            e.context.message_id: ["Sent", "Delivered"] for e in events
        }


async def test_parked_reports_and_replies_outlive_the_reporter(kafka: EmbeddedBroker) -> None:
    port = free_port()
    settings = settings_for(port, {**FAST_RETRIES, "inbound_batch_delay_s": 0.05})
    simulator = simulator_on(port)
    simulator.set_mode(FailureMode(status=503), tenant=OTHER)
    events = campaign("b", 10, tenant=OTHER)
    replies = [reply(i, OTHER) for i in range(5)]

    await simulator.start()
    try:
        async with running(build(settings)):
            await publish(settings, statuses_of(events))
            await publish(settings, [(INBOUND, OTHER, r) for r in replies])
            await wait_for(
                lambda: parked(OTHER) == 10 and parked(OTHER, "incoming") == 5,
                what="everything parked",
            )
        # A new reporter restores them from sms.reporter-state, and sends them once back.
        async with running(build(settings)):
            await wait_for(
                lambda: parked(OTHER) == 10 and parked(OTHER, "incoming") == 5,
                what="everything restored",
            )
            simulator.clear_modes(OTHER)
            await wait_for(
                lambda: (
                    len(accepted(simulator, "delivery-report", OTHER)) >= len(events)
                    and simulator.tally(OTHER)[OTHER]["incoming_messages"] >= len(replies)
                ),
                timeout_s=60,
                what="every report after the restart",
            )
            await wait_for(
                lambda: parked(OTHER) + parked(OTHER, "incoming") == 0, what="nothing parked"
            )
            dead = await no_dead_letters(settings)
    finally:
        await simulator.stop()

    assert dead == []
    assert len(accepted(simulator, "delivery-report", OTHER)) == len(events)
    assert sequences(simulator, OTHER) == {
        e.context.message_id: ["Sent", "Delivered"] for e in events
    }
    texts = [
        m["message"] for b in accepted(simulator, "incoming-message", OTHER) for m in b["messages"]
    ]
    assert sorted(texts) == sorted(r.text for r in replies)
