"""The sender's decisions, with a scripted provider and a fake clock (no network, no broker)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from aiokafka.structs import ConsumerRecord

from services.sender.dispatcher import (
    Dispatcher,
    RetryPolicy,
    due_at,
    is_expired,
    routes_for,
    scrub,
    send_with_retries,
)
from shared import topics
from shared.events import CanonicalStatus, MessageContext, RecipientMessage
from shared.providers.base import (
    CallbackRejected,
    OutboundSms,
    ParsedCallback,
    Provider,
    SendAccepted,
    SendError,
    SendResult,
)
from shared.runner import PoisonRecord
from shared.statuses import SubStatus
from tests.support import TENANT, make_settings

ACCOUNT = "otpiq-main"
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class FakeTime:
    def __init__(self) -> None:
        self.now = START
        self.slept: list[float] = []

    def clock(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += timedelta(seconds=seconds)


class ScriptedProvider(Provider):
    """Answers each send with the next scripted result and notes when it was called."""

    kind = "otpiq"
    status_map: ClassVar[Mapping[str, tuple[CanonicalStatus, str]]] = {}

    def __init__(self, results: list[SendResult], time: FakeTime | None = None) -> None:
        self.account = ACCOUNT
        self.results = results
        self.time = time
        self.calls: list[tuple[OutboundSms, datetime | None]] = []

    async def send(self, batch: list[OutboundSms]) -> list[SendResult]:
        [sms] = batch
        self.calls.append((sms, self.time.now if self.time else None))
        return [self.results.pop(0)]

    @classmethod
    def parse_callback(cls, body: bytes, content_type: str) -> list[ParsedCallback]:
        raise CallbackRejected("not used")


def accepted(provider_message_id: str = "sms-1") -> SendAccepted:
    return SendAccepted("m-1", provider_message_id, f"{ACCOUNT}:{provider_message_id}")


def retryable(retry_after_s: float | None = None) -> SendError:
    return SendError("HTTP 503", retryable=True, retry_after_s=retry_after_s, status_code=503)


def message(
    *,
    tenant: str = TENANT,
    destination: str = "+447700900123",
    sender_id: str = "SHOP",
    scheduled_at: datetime | None = None,
    accepted_at: datetime = START,
) -> RecipientMessage:
    return RecipientMessage(
        context=MessageContext(
            tenant=tenant,
            message_id="m-1",
            batch_id="b-1",
            mobile_number=destination.lstrip("+"),
            metadata_json="{}",
        ),
        destination=destination,
        text="hello",
        sender_id=sender_id,
        scheduled_at=scheduled_at,
        accepted_at=accepted_at,
    )


def dispatcher(
    provider: ScriptedProvider, time: FakeTime, overrides: dict[str, Any] | None = None
) -> Dispatcher:
    return Dispatcher(
        make_settings(overrides=overrides),
        retry_policy=RetryPolicy(max_attempts=3, base_delay_s=0.5, max_wait_s=120),
        clock=time.clock,
        sleep=time.sleep,
        providers={ACCOUNT: provider},
    )


# -- routing, due time, expiry ---------------------------------------------------------------


def test_routes_serve_matching_prefixes_lowest_priority_first() -> None:
    settings = make_settings(
        overrides={
            "providers": {
                "second": {
                    "kind": "otpiq",
                    "base_url": "http://127.0.0.1:9",
                    "api_key": "k",
                    "callback_token": "t",
                }
            },
            "tenants": {
                TENANT: {
                    "routes": [
                        {"provider": "otpiq-main", "priority": 200},
                        {"provider": "second", "prefixes": ["964"], "priority": 10},
                    ]
                }
            },
        }
    )
    tenant = settings.tenants[TENANT]
    assert [r.provider for r in routes_for(tenant, "+9647501234567")] == ["second", "otpiq-main"]
    assert [r.provider for r in routes_for(tenant, "+447700900123")] == ["otpiq-main"]


def test_due_time_and_expiry_use_the_schedule_when_there_is_one() -> None:
    scheduled = START + timedelta(hours=30)
    assert due_at(message(scheduled_at=scheduled)) == scheduled
    assert due_at(message()) == START
    # Naive times are read as UTC rather than failing the comparison.
    assert due_at(message(accepted_at=START.replace(tzinfo=None))) == START
    day = 24 * 3600.0
    assert not is_expired(message(), day, START + timedelta(hours=24))
    assert is_expired(message(), day, START + timedelta(hours=24, seconds=1))
    assert not is_expired(message(scheduled_at=scheduled), day, START + timedelta(hours=40))


def test_scrub_masks_long_digit_runs_only() -> None:
    assert scrub("bad number +447700900123 (code 1001)") == "bad number +4477******23 (code 1001)"


def test_retry_delays_grow_with_full_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=4.0)
    delays = policy.delays()
    caps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for cap in caps:
        assert 0.0 <= next(delays) <= cap


# -- sending and retries -----------------------------------------------------------------------


async def test_retryable_failure_is_retried_then_accepted() -> None:
    time = FakeTime()
    provider = ScriptedProvider([retryable(), accepted()], time)
    sms = OutboundSms("m-1", "+447700900123", "hi", "SHOP")
    result, attempts = await send_with_retries(
        provider, sms, RetryPolicy(max_attempts=3, base_delay_s=0.5), time.sleep
    )
    assert result == accepted()
    assert attempts == 2
    assert len(time.slept) == 1
    assert 0.0 <= time.slept[0] <= 0.5


async def test_retry_after_is_honoured_and_an_excessive_one_ends_the_retries() -> None:
    time = FakeTime()
    provider = ScriptedProvider([retryable(retry_after_s=60), accepted()], time)
    sms = OutboundSms("m-1", "+447700900123", "hi", "SHOP")
    policy = RetryPolicy(max_attempts=3, max_wait_s=120)
    _, attempts = await send_with_retries(provider, sms, policy, time.sleep)
    assert attempts == 2
    assert time.slept[0] >= 60

    time = FakeTime()
    provider = ScriptedProvider([retryable(retry_after_s=600), accepted()], time)
    result, attempts = await send_with_retries(provider, sms, policy, time.sleep)
    assert isinstance(result, SendError)
    assert attempts == 1
    assert time.slept == []


async def test_exhausted_retries_become_a_provider_error_dispatch() -> None:
    time = FakeTime()
    provider = ScriptedProvider([retryable(), retryable(), retryable()], time)
    record = await dispatcher(provider, time).dispatch(message())
    assert (record.outcome, record.sub_status) == ("failed", SubStatus.PROVIDER_ERROR)
    assert record.correlation_key == "message:m-1"
    assert "gave up after 3 attempt(s)" in record.detail
    assert len(provider.calls) == 3
    assert len(time.slept) == 2


async def test_terminal_error_keeps_its_sub_status_and_is_not_retried() -> None:
    time = FakeTime()
    error = SendError("bad phone", retryable=False, sub_status=SubStatus.INVALID_NUMBER)
    provider = ScriptedProvider([error], time)
    record = await dispatcher(provider, time).dispatch(message())
    assert (record.outcome, record.sub_status, record.detail) == (
        "failed",
        SubStatus.INVALID_NUMBER,
        "bad phone",
    )
    assert (record.provider_kind, record.provider_account) == ("otpiq", ACCOUNT)
    assert len(provider.calls) == 1


async def test_accepted_send_is_dispatched_under_the_correlation_key() -> None:
    time = FakeTime()
    provider = ScriptedProvider([accepted("sms-abc")], time)
    record = await dispatcher(provider, time).dispatch(message(sender_id=""))
    assert record.outcome == "accepted"
    assert record.sub_status == SubStatus.SENT
    assert record.correlation_key == f"{ACCOUNT}:sms-abc"
    assert record.provider_message_id == "sms-abc"
    assert record.segments == 1
    [(sms, _)] = provider.calls
    assert sms.sender_id == "ACME"  # the tenant's default when the message has none
    assert sms.destination == "+447700900123"


# -- schedule, expiry, routing failures --------------------------------------------------------


async def test_scheduled_message_is_held_until_due_and_never_sent_before() -> None:
    time = FakeTime()
    provider = ScriptedProvider([accepted()], time)
    due = START + timedelta(seconds=150)
    record = await dispatcher(provider, time).dispatch(message(scheduled_at=due))
    assert record.outcome == "accepted"
    [(_, sent_at)] = provider.calls
    assert sent_at is not None and sent_at >= due
    assert time.slept == [60.0, 60.0, 30.0]  # the wall clock is re-read while holding


async def test_expired_message_is_failed_without_a_send() -> None:
    time = FakeTime()
    time.now = START + timedelta(hours=25)
    provider = ScriptedProvider([accepted()], time)
    record = await dispatcher(provider, time).dispatch(message())
    assert (record.outcome, record.sub_status) == ("failed", SubStatus.EXPIRED)
    assert record.correlation_key == "message:m-1"
    assert provider.calls == []


async def test_unknown_tenant_and_unserved_destination_are_no_route() -> None:
    time = FakeTime()
    provider = ScriptedProvider([], time)
    record = await dispatcher(provider, time).dispatch(message(tenant="globex"))
    assert (record.outcome, record.sub_status) == ("failed", SubStatus.NO_ROUTE)

    only_iraq = {"tenants": {TENANT: {"routes": [{"provider": ACCOUNT, "prefixes": ["964"]}]}}}
    record = await dispatcher(provider, time, only_iraq).dispatch(message())
    assert (record.outcome, record.sub_status) == ("failed", SubStatus.NO_ROUTE)
    assert record.correlation_key == "message:m-1"
    assert provider.calls == []


async def test_undecodable_record_is_poison() -> None:
    time = FakeTime()
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        topic=topics.RECIPIENTS.name,
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=b"acme:+447700900123",
        value=b'{"destination": "+447700900123"}',
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=0,
        headers=[],
    )
    with pytest.raises(PoisonRecord, match="RecipientMessage"):
        await dispatcher(ScriptedProvider([], time), time).handle(record)


async def test_handle_publishes_the_dispatch_keyed_by_its_correlation_key() -> None:
    time = FakeTime()
    value = message().to_bytes()
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        topics.RECIPIENTS.name, 0, 0, 0, 0, b"k", value, None, 0, 0, []
    )
    [out] = await dispatcher(ScriptedProvider([accepted("sms-9")], time), time).handle(record)
    assert out.topic == topics.DISPATCHES
    assert out.key == f"{ACCOUNT}:sms-9"
