"""The sender service against the embedded broker and the provider simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest

from services.sender.app import build
from services.simulators.providers import ProviderSimulator
from shared import topics
from shared.broker import EmbeddedBroker, free_port
from shared.config import Settings
from shared.events import (
    DeadLetter,
    DispatchRecord,
    MessageContext,
    RecipientMessage,
    utcnow,
)
from shared.kafka import OutRecord, Publisher, make_producer
from shared.statuses import SubStatus
from tests.support import TENANT, make_settings, read_topic, running, wait_for

pytestmark = pytest.mark.integration

ACCOUNT = "otpiq-main"


@pytest.fixture
async def simulator() -> AsyncIterator[ProviderSimulator]:
    # Nobody listens for the delivery callbacks here; one attempt each keeps the logs quiet.
    sim = ProviderSimulator("127.0.0.1", free_port(), callback_attempts=1, seed=1)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


def recipient(
    index: int,
    number: str,
    text: str = "Your order has shipped",
    *,
    tenant: str = TENANT,
    sender_id: str = "ACME",
    scheduled_at: datetime | None = None,
    accepted_at: datetime | None = None,
) -> RecipientMessage:
    return RecipientMessage(
        context=MessageContext(
            tenant=tenant,
            message_id=f"m-test-{index}",
            batch_id="batch-1",
            request_id="request-1",
            mobile_number=number.lstrip("+"),
            metadata_json='{"campaign": 1}',
        ),
        destination=number,
        text=text,
        sender_id=sender_id,
        scheduled_at=scheduled_at,
        accepted_at=accepted_at or utcnow(),
    )


async def publish(
    settings: Settings,
    messages: list[RecipientMessage],
    raw: list[tuple[bytes, bytes]] | None = None,
) -> None:
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    try:
        publisher = Publisher(producer, 10.0)
        await publisher.publish(
            OutRecord(topics.RECIPIENTS, f"{m.context.tenant}:{m.destination}", m) for m in messages
        )
        if raw:
            await publisher.publish_raw(topics.RECIPIENTS.name, raw)
    finally:
        await producer.stop()


async def dispatches(settings: Settings, expect: int) -> dict[str, tuple[str, DispatchRecord]]:
    """Dispatch records by message id, with their Kafka keys; fails on duplicates."""
    found = await read_topic(settings, topics.DISPATCHES, DispatchRecord, expect=expect)
    by_message = {record.context.message_id: (key or "", record) for key, record in found}
    assert len(by_message) == len(found) == expect, found
    return by_message


async def test_recipients_are_sent_once_and_accepted_dispatches_are_keyed_by_correlation(
    kafka: EmbeddedBroker, simulator: ProviderSimulator
) -> None:
    settings = make_settings(provider_url=simulator.url)
    long_unicode = "Привет! " * 10  # 80 UCS-2 units: two segments
    messages = [
        recipient(1, "+447700900001"),
        recipient(2, "+447700900002", long_unicode),
        recipient(3, "+9647501234567", sender_id=""),  # falls back to the tenant's sender
        recipient(4, "+447700900004", tenant="globex"),  # not configured here
    ]
    await publish(settings, messages, raw=[(b"acme:+447700900005", b"{not json")])

    async with running(build(settings)):
        await wait_for(lambda: len(simulator.sends) >= 3, 30, "three sends")
        found = await dispatches(settings, expect=4)
        dead = await read_topic(settings, topics.DEAD_LETTERS, DeadLetter, expect=1)

    by_phone = {send.phone: send for send in simulator.sends}
    assert len(simulator.sends) == 3
    assert sorted(by_phone) == ["447700900001", "447700900002", "9647501234567"]
    assert simulator.count("otpiq", "447700900002", long_unicode) == 1
    assert by_phone["9647501234567"].sender == "ACME"
    assert by_phone["447700900001"].account == "sk_test_otpiq"

    for index, message in enumerate(messages[:3], start=1):
        key, record = found[f"m-test-{index}"]
        send = by_phone[message.destination.lstrip("+")]
        assert record.outcome == "accepted"
        assert record.sub_status == SubStatus.SENT
        assert record.provider_kind == "otpiq"
        assert record.provider_account == ACCOUNT
        assert record.provider_message_id == send.provider_message_id
        assert record.correlation_key == f"{ACCOUNT}:{send.provider_message_id}"
        assert key == record.correlation_key
        assert record.destination == message.destination
        assert record.context == message.context
    assert found["m-test-1"][1].segments == 1
    assert found["m-test-2"][1].segments == 2

    key, no_route = found["m-test-4"]
    assert (no_route.outcome, no_route.sub_status) == ("failed", SubStatus.NO_ROUTE)
    assert key == no_route.correlation_key == "message:m-test-4"
    assert "globex" in no_route.detail

    [(_, letter)] = dead
    assert letter.stage == "sender"
    assert letter.source_topic == topics.RECIPIENTS.name
    assert letter.redrive_topic == topics.RECIPIENTS.name
    assert letter.payload == "{not json"
    assert "RecipientMessage" in letter.reason


async def test_provider_answering_500_throughout_gives_a_failed_provider_error_dispatch(
    kafka: EmbeddedBroker, simulator: ProviderSimulator
) -> None:
    simulator.configure(http_error_rate=1.0)
    settings = make_settings(provider_url=simulator.url)
    message = recipient(1, "+447700900001")
    await publish(settings, [message])

    async with running(build(settings)):
        found = await dispatches(settings, expect=1)

    key, record = found["m-test-1"]
    assert (record.outcome, record.sub_status) == ("failed", SubStatus.PROVIDER_ERROR)
    assert key == record.correlation_key == "message:m-test-1"
    assert record.provider_account == ACCOUNT
    assert "3 attempt" in record.detail
    assert simulator.sends == []
    assert simulator.answers["otpiq"] == {"500": settings.sender.max_attempts_per_route}


async def test_scheduled_message_waits_while_a_due_one_is_sent_first(
    kafka: EmbeddedBroker, simulator: ProviderSimulator
) -> None:
    settings = make_settings(provider_url=simulator.url)
    scheduled_at = utcnow() + timedelta(seconds=8)
    later = recipient(1, "+447700900001", "later", scheduled_at=scheduled_at)
    now = recipient(2, "+447700900002", "now")
    await publish(settings, [later, now])  # the scheduled one is first on the topic

    async with running(build(settings)):
        await wait_for(lambda: len(simulator.sends) >= 1, 30, "the due message")
        [first] = simulator.sends
        assert first.text == "now"
        assert utcnow() < scheduled_at, "the broker took too long to test the hold"
        await wait_for(lambda: len(simulator.sends) == 2, 30, "the scheduled message")
        found = await dispatches(settings, expect=2)

    second = simulator.sends[1]
    assert second.text == "later"
    assert second.at >= scheduled_at
    assert found["m-test-1"][1].outcome == "accepted"
    assert found["m-test-1"][1].provider_message_id == second.provider_message_id


async def test_expired_messages_are_failed_expired_and_never_reach_the_provider(
    kafka: EmbeddedBroker, simulator: ProviderSimulator
) -> None:
    settings = make_settings(provider_url=simulator.url)
    validity = timedelta(seconds=settings.tenants[TENANT].validity_s)
    long_ago = utcnow() - validity - timedelta(minutes=5)
    messages = [
        recipient(1, "+447700900001", accepted_at=long_ago),
        recipient(2, "+447700900002", scheduled_at=long_ago),  # accepted now, scheduled long ago
        recipient(3, "+447700900003"),
    ]
    await publish(settings, messages)

    async with running(build(settings)):
        found = await dispatches(settings, expect=3)

    for message_id in ("m-test-1", "m-test-2"):
        key, record = found[message_id]
        assert (record.outcome, record.sub_status) == ("failed", SubStatus.EXPIRED)
        assert key == record.correlation_key == f"message:{message_id}"
    assert found["m-test-3"][1].outcome == "accepted"
    assert [send.phone for send in simulator.sends] == ["447700900003"]
