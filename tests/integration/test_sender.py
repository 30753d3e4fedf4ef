"""The sender service against the embedded broker and real provider simulators (OTPIQ protocol)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.sender.app import build
from shared.config import Settings
from shared.contract import topics
from shared.contract.events import (
    DeadLetter,
    DispatchRecord,
    OptOutChange,
    RecipientMessage,
    utcnow,
)
from shared.contract.statuses import SubStatus
from shared.kafka.broker import EmbeddedBroker, free_port
from shared.kafka.clients import OutRecord, Publisher, bootstrap, group_name, make_producer
from simulators.providers import ProviderSimulator
from tests.support import TENANT, make_settings, read_topic, running, wait_for
from tests.support.ops import recipient
from tests.support.providers import OCTOPUSH_ACCOUNT, OPENSMS_ACCOUNT, bulk_provider_settings

pytestmark = pytest.mark.integration

ACCOUNT = "otpiq-main"
BACKUP = "otpiq-backup"
GROUP = "smsbridge-sender"
# Quick retries and timers, so that a test of retries does not wait for production delays.
FAST = {"retry_base_delay_s": 0.05, "retry_max_delay_s": 0.2, "timer_interval_s": 0.05}


@contextlib.asynccontextmanager
async def simulator(**options: Any) -> AsyncIterator[ProviderSimulator]:
    # Nobody listens for delivery reports here: they are planned far out and never sent.
    sim = ProviderSimulator(
        "127.0.0.1", free_port(), callback_attempts=1, callback_delay_ms=600_000, **options
    )
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@pytest.fixture
async def provider() -> AsyncIterator[ProviderSimulator]:
    async with simulator(seed=1) as sim:
        yield sim


def two_routes(primary: ProviderSimulator, backup: ProviderSimulator) -> Settings:
    """Tenant ``acme`` routed to two OTPIQ accounts, each on its own simulator."""
    return make_settings(
        provider_url=primary.url,
        overrides={
            "sender": {**FAST, "max_attempts_per_route": 2},
            "providers": {
                BACKUP: {
                    "kind": "otpiq",
                    "base_url": f"{backup.url}/otpiq/api",
                    "api_key": "sk_test_backup",
                    "callback_token": "cb-token-backup",
                }
            },
            "tenants": {
                TENANT: {
                    "routes": [
                        {"provider": BACKUP, "priority": 20},
                        {"provider": ACCOUNT, "priority": 10},
                    ]
                }
            },
        },
    )


async def publish(
    settings: Settings,
    messages: list[RecipientMessage],
    raw: list[tuple[bytes, bytes]] | None = None,
    opt_outs: list[OptOutChange] | None = None,
) -> None:
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    try:
        publisher = Publisher(producer, 10.0)
        await publisher.publish(
            OutRecord(topics.OPT_OUTS, f"{change.tenant}:{change.number}", change)
            for change in opt_outs or []
        )
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


async def committed_total(settings: Settings, group: str = GROUP) -> int:
    """Sum of the group's committed offsets on sms.recipients (asked without joining it)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap(settings.kafka),
        group_id=group_name(settings.kafka, group),
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        total = 0
        for partition in range(topics.RECIPIENTS.partitions):
            offset = await consumer.committed(TopicPartition(topics.RECIPIENTS.name, partition))
            total += offset or 0
        return total
    finally:
        await consumer.stop()


async def wait_until_committed(settings: Settings, expected: int, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (total := await committed_total(settings)) != expected:
        if loop.time() > deadline:
            raise AssertionError(f"{total} offsets committed after {timeout_s}s, not {expected}")
        await asyncio.sleep(0.2)


# -- sending, dispatch records ---------------------------------------------------------------


async def test_recipients_are_sent_once_and_accepted_dispatches_are_keyed_by_correlation(
    kafka: EmbeddedBroker, provider: ProviderSimulator
) -> None:
    settings = make_settings(provider_url=provider.url)
    long_unicode = "Привет! " * 10  # 80 UCS-2 units: two segments
    messages = [
        recipient(1, "+447700900001"),
        recipient(2, "+447700900002", long_unicode),
        recipient(3, "+9647501234567", sender_id=""),  # falls back to the tenant's sender
        recipient(4, "+447700900004", tenant="globex"),  # not configured here
    ]
    await publish(settings, messages, raw=[(b"acme:+447700900005", b"{not json")])

    async with running(build(settings)):
        await wait_for(lambda: len(provider.sends) >= 3, 30, "three sends")
        found = await dispatches(settings, expect=4)
        dead = await read_topic(settings, topics.DEAD_LETTERS, DeadLetter, expect=2)

    by_phone = {send.phone: send for send in provider.sends}
    assert len(provider.sends) == 3
    assert sorted(by_phone) == ["447700900001", "447700900002", "9647501234567"]
    assert provider.count("otpiq", "447700900002", long_unicode) == 1
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

    letters = {letter.payload: letter for _, letter in dead}
    assert len(letters) == 2
    poison = letters["{not json"]
    assert poison.stage == "sender"
    assert poison.redrive_topic == topics.RECIPIENTS.name
    assert "RecipientMessage" in poison.reason
    [unroutable] = [letter for payload, letter in letters.items() if payload != "{not json"]
    assert unroutable.reason == "NoRoute: tenant 'globex' is not in the configuration (removed?)"
    assert unroutable.key == "globex:+447700900004"
    assert RecipientMessage.model_validate_json(unroutable.payload) == messages[3]


# -- not sent: opted out, expired ----------------------------------------------------------------


async def test_an_opted_out_recipient_is_reported_opted_out_and_never_sent(
    kafka: EmbeddedBroker, provider: ProviderSimulator
) -> None:
    settings = make_settings(provider_url=provider.url)
    stop = OptOutChange(tenant=TENANT, number="+447700900001", opted_out=True, source="STOP")
    # Another tenant's opt-out of the same number does not concern acme.
    elsewhere = OptOutChange(tenant="globex", number="+447700900002", opted_out=True, source="x")
    await publish(
        settings,
        [recipient(1, "+447700900001"), recipient(2, "+447700900002")],
        opt_outs=[stop, elsewhere],
    )

    async with running(build(settings)):
        found = await dispatches(settings, expect=2)

    key, opted_out = found["m-test-1"]
    assert (opted_out.outcome, opted_out.sub_status) == ("failed", SubStatus.OPTED_OUT)
    assert key == "message:m-test-1"
    assert found["m-test-2"][1].outcome == "accepted"
    assert [send.phone for send in provider.sends] == ["447700900002"]


async def test_expired_messages_are_failed_expired_and_never_reach_the_provider(
    kafka: EmbeddedBroker, provider: ProviderSimulator
) -> None:
    settings = make_settings(provider_url=provider.url)
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
    assert [send.phone for send in provider.sends] == ["447700900003"]


# -- later ---------------------------------------------------------------------------------------


async def test_a_scheduled_message_waits_with_its_offset_committed_while_due_ones_flow(
    kafka: EmbeddedBroker, provider: ProviderSimulator
) -> None:
    settings = make_settings(
        provider_url=provider.url,
        overrides={"sender": {**FAST, "runner": {"commit_interval_s": 0.2}}},
    )
    scheduled_at = utcnow() + timedelta(seconds=12)
    # The scheduled one first, and on the same key (same number): it must not hold back the
    # next message, nor its partition.
    later = recipient(1, "+447700900001", "later", scheduled_at=scheduled_at)
    now = [recipient(2, "+447700900001", "now"), recipient(3, "+447700900003", "now too")]
    await publish(settings, [later, *now])

    async with running(build(settings)):
        await wait_for(lambda: len(provider.sends) >= 2, 30, "the due messages")
        assert {send.text for send in provider.sends} == {"now", "now too"}
        await wait_until_committed(settings, 3, timeout_s=15)
        assert len(provider.sends) == 2, "the scheduled message went early"
        assert utcnow() < scheduled_at, "the broker took too long to test the hold"
        await wait_for(lambda: len(provider.sends) == 3, 30, "the scheduled message")
        found = await dispatches(settings, expect=3)

    last = provider.sends[2]
    assert last.text == "later"
    assert last.at >= scheduled_at
    assert found["m-test-1"][1].outcome == "accepted"
    assert found["m-test-1"][1].provider_message_id == last.provider_message_id


async def test_failover_to_the_second_route_when_the_first_answers_5xx(
    kafka: EmbeddedBroker,
) -> None:
    async with simulator(http_error_rate=1.0) as broken, simulator() as backup:
        settings = two_routes(broken, backup)
        await publish(settings, [recipient(1, "+447700900001")])

        async with running(build(settings)):
            found = await dispatches(settings, expect=1)

    key, record = found["m-test-1"]
    assert (record.outcome, record.provider_account) == ("accepted", BACKUP)
    [send] = backup.sends
    assert send.account == "sk_test_backup"
    assert key == f"{BACKUP}:{send.provider_message_id}"
    assert broken.sends == []
    assert broken.answers["otpiq"] == {"500": 2}  # max_attempts_per_route, then the next route


async def test_what_no_route_can_send_is_dead_lettered_and_reported_failed(
    kafka: EmbeddedBroker,
) -> None:
    async with simulator(http_error_rate=1.0) as first, simulator(http_error_rate=1.0) as second:
        settings = two_routes(first, second)
        message = recipient(1, "+447700900001")
        await publish(settings, [message])

        async with running(build(settings)):
            found = await dispatches(settings, expect=1)
            [(key, letter)] = await read_topic(settings, topics.DEAD_LETTERS, DeadLetter, expect=1)

    _, record = found["m-test-1"]
    assert (record.outcome, record.sub_status) == ("failed", SubStatus.PROVIDER_ERROR)
    assert record.correlation_key == "message:m-test-1"
    assert f"tried {ACCOUNT}, {BACKUP}" in record.detail
    assert key == f"{TENANT}:+447700900001"
    assert letter.stage == "sender"
    assert letter.redrive_topic == topics.RECIPIENTS.name
    assert letter.attempts == 4
    assert letter.status_code == 500
    assert letter.reason.startswith("ProviderError: every route failed")
    assert RecipientMessage.model_validate_json(letter.payload) == message
    assert (first.answers["otpiq"], second.answers["otpiq"]) == ({"500": 2}, {"500": 2})


# -- replay ----------------------------------------------------------------------------------------


async def test_a_replay_from_the_beginning_with_a_new_group_sends_nothing_twice(
    kafka: EmbeddedBroker, provider: ProviderSimulator
) -> None:
    settings = make_settings(provider_url=provider.url)
    messages = [recipient(i, f"+4477009{i:05d}") for i in range(20)]
    await publish(settings, messages)

    async with running(build(settings)):
        first = await dispatches(settings, expect=20)
    assert len(provider.sends) == 20

    # A new consumer group reads sms.recipients from the start; the send state comes back
    # from sms.sender-state.
    async with running(build(settings, group_id="smsbridge-sender-replay")):
        replayed = await read_topic(settings, topics.DISPATCHES, DispatchRecord, expect=40)

    assert len(provider.sends) == 20
    assert all(count["count"] == 1 for count in provider.counts())
    # Every message's dispatch record was published again, identical (consumers de-duplicate).
    for message_id, (_, original) in first.items():
        copies = [record for _, record in replayed if record.context.message_id == message_id]
        assert copies == [original, original]


# -- a provider that throttles and loses answers -------------------------------------------------


ROUTE_OF = {"otpiq": ACCOUNT, "opensms": OPENSMS_ACCOUNT, "octopush": OCTOPUSH_ACCOUNT}
NUMBER_OF = {"otpiq": "+4477009{:05d}", "opensms": "+2547123{:05d}", "octopush": "+336000{:05d}"}


@pytest.mark.parametrize("kind", ["otpiq", "opensms", "octopush"])
async def test_throttled_and_garbled_answers_neither_lose_nor_double_a_message(
    kind: str, kafka: EmbeddedBroker
) -> None:
    """30% of calls answered 429, 20% of accepted ones answered with an unreadable body."""
    count = 40
    async with simulator(
        rate_limited_rate=0.3, rate_limited_wait_s=0.2, garbled_rate=0.2, seed=7
    ) as sim:
        settings = bulk_provider_settings(
            sim.url,
            overrides={
                "sender": {**FAST, "max_attempts_per_route": 12},
                "tenants": {TENANT: {"routes": [{"provider": ROUTE_OF[kind]}]}},
                # The breaker would rightly open at this failure rate: not what is tested here.
                "providers": {ROUTE_OF[kind]: {"circuit_min_calls": 10_000}},
            },
        )
        # A text of its own per message: one call each, so that each call draws its faults.
        messages = [
            recipient(i, NUMBER_OF[kind].format(i), f"Order {i} has shipped") for i in range(count)
        ]
        await publish(settings, messages)
        async with running(build(settings)):
            found = await dispatches(settings, expect=count)

    answers = sim.answers[kind]
    assert answers.get("429", 0) > 0, answers
    # Every message reached the provider exactly once: a 429 is retried until it goes through,
    # and a lost answer is never sent again.
    sent = Counter((send.phone.lstrip("+"), send.text) for send in sim.sends)
    assert sent == Counter((m.destination.lstrip("+"), m.text) for m in messages)
    records = [record for _, record in found.values()]
    accepted = [r for r in records if r.outcome == "accepted"]
    unknown = [r for r in records if r.outcome != "accepted"]
    assert {r.provider_message_id for r in accepted} <= {s.provider_message_id for s in sim.sends}
    # ... and each lost answer is reported as what it is: the provider may have it.
    assert unknown, "no answer was garbled"
    assert all((r.outcome, r.sub_status) == ("failed", SubStatus.PROVIDER_ERROR) for r in unknown)
    assert len(accepted) + len(unknown) == count
