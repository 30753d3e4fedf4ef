from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from shared.contract.statuses import SubStatus
from shared.http_client import HttpClient
from shared.kafka.broker import free_port
from shared.providers import callback_url
from shared.providers.base import CallbackRejected, OutboundSms, SendAccepted, SendError
from shared.providers.otpiq import FIXTURES, WEBHOOK_SECRET_HEADER, Otpiq
from shared.secrets import RotatingSecret
from tests.support import CALLBACK_TOKEN, OTPIQ_WEBHOOK_SECRET, make_settings

ACCOUNT = "otpiq-main"
SMS = OutboundSms(
    message_id="m-1", destination="+964750123456", text="Your order has shipped", sender_id="OTPIQ"
)


@pytest.fixture
async def session() -> AsyncIterator[HttpClient]:
    async with HttpClient(timeout_s=2) as client:
        yield client


def make_provider(
    session: HttpClient, *, webhook_secret: bool = True, provider_url: str | None = None
) -> Otpiq:
    settings = make_settings(provider_url=provider_url or "http://127.0.0.1:9")
    provider_settings = settings.providers[ACCOUNT]
    if not webhook_secret:
        provider_settings = provider_settings.model_copy(update={"webhook_secret": None})
    return Otpiq(ACCOUNT, provider_settings, session, callback_url(settings, ACCOUNT))


def body(name: str) -> bytes:
    return orjson.dumps(FIXTURES[name])


def as_error(result: object) -> SendError:
    assert isinstance(result, SendError), result
    return result


# -- request body --------------------------------------------------------------------------------


async def test_request_body_follows_the_documented_shape(session: HttpClient) -> None:
    provider = make_provider(session)
    request = provider.request_body(SMS)

    assert set(request) == set(FIXTURES["send_request"])
    assert request["phoneNumber"] == "964750123456"  # digits, no "+"
    assert request["smsType"] == "custom"
    assert request["customMessage"] == SMS.text
    assert request["senderId"] == "OTPIQ"
    assert request["provider"] == "sms"
    assert request["deliveryReport"] == {
        "webhookUrl": provider.callback_url,
        "deliveryReportType": "all",
        "webhookSecret": OTPIQ_WEBHOOK_SECRET,
    }
    assert provider.callback_url.endswith(f"/callbacks/otpiq/{ACCOUNT}/{CALLBACK_TOKEN}")


async def test_request_body_omits_absent_sender_and_secret(
    session: HttpClient,
) -> None:
    provider = make_provider(session, webhook_secret=False)
    request = provider.request_body(
        OutboundSms(message_id="m-2", destination="+447700900123", text="hi", sender_id="")
    )
    assert "senderId" not in request
    assert "webhookSecret" not in request["deliveryReport"]
    assert request["phoneNumber"] == "447700900123"


# -- send responses ------------------------------------------------------------------------------


async def test_documented_success_is_accepted_with_account_scoped_correlation_key(
    session: HttpClient,
) -> None:
    result = make_provider(session).read_send_response(SMS, 200, body("send_response"))
    assert result == SendAccepted(
        message_id="m-1",
        provider_message_id="sms-1234567890abcdef123456",
        correlation_key=f"{ACCOUNT}:sms-1234567890abcdef123456",
    )


@pytest.mark.parametrize(
    ("status", "fixture", "retryable", "sub_status"),
    [
        # Money runs out for every message alike: retry/fail over, do not burn the campaign.
        (400, "error_insufficient_credit", True, SubStatus.PROVIDER_ERROR),
        (400, "error_spending_threshold", True, SubStatus.PROVIDER_ERROR),
        (400, "error_validation", False, SubStatus.INVALID_NUMBER),
        (400, "error_sender_id", False, SubStatus.REJECTED),
        # A bad key is ours, not the message's: another route may work.
        (401, "error_unauthorized", True, SubStatus.PROVIDER_ERROR),
        (404, "error_not_found", False, SubStatus.REJECTED),
        (500, "error_server", True, SubStatus.PROVIDER_ERROR),
        (503, "error_server", True, SubStatus.PROVIDER_ERROR),
    ],
)
async def test_documented_errors_map_to_retry_or_terminal_sub_status(
    session: HttpClient, status: int, fixture: str, retryable: bool, sub_status: str
) -> None:
    error = as_error(make_provider(session).read_send_response(SMS, status, body(fixture)))
    assert error.retryable is retryable
    assert error.status_code == status
    if not retryable:
        assert error.sub_status == sub_status
    documented = FIXTURES[fixture].get("message") or FIXTURES[fixture].get("error")
    if documented:
        assert documented in error.detail


async def test_rate_limit_waits_the_minutes_the_body_asks_for(
    session: HttpClient,
) -> None:
    error = as_error(
        make_provider(session).read_send_response(SMS, 429, body("error_rate_limited"), "5")
    )
    assert error.retryable
    assert error.retry_after_s == 60.0  # waitMinutes wins over Retry-After


async def test_rate_limit_without_wait_minutes_falls_back_to_retry_after(
    session: HttpClient,
) -> None:
    error = as_error(make_provider(session).read_send_response(SMS, 429, b"{}", "7"))
    assert error.retryable
    assert error.retry_after_s == 7.0


@pytest.mark.parametrize("raw", [b"<html>Bad Gateway</html>", b"", b"[]"])
async def test_unreadable_5xx_is_retryable(session: HttpClient, raw: bytes) -> None:
    error = as_error(make_provider(session).read_send_response(SMS, 502, raw))
    assert error.retryable
    assert error.status_code == 502


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b"<html>ok</html>", "unreadable body"),
        (b"[1, 2]", "unreadable body"),
        (b'{"message": "SMS task created successfully"}', "without smsId"),
        (b'{"smsId": ""}', "without smsId"),
        (b'{"smsId": 42}', "without smsId"),
    ],
)
async def test_success_without_a_usable_sms_id_is_terminal(
    session: HttpClient, raw: bytes, detail: str
) -> None:
    # Accepted or not is unknown; a retry could send twice, so the message is reported instead.
    error = as_error(make_provider(session).read_send_response(SMS, 200, raw))
    assert not error.retryable
    assert error.sub_status == SubStatus.PROVIDER_ERROR
    assert detail in error.detail


async def test_client_error_without_body_is_terminal_rejection(
    session: HttpClient,
) -> None:
    error = as_error(make_provider(session).read_send_response(SMS, 422, b""))
    assert not error.retryable
    assert error.sub_status == SubStatus.REJECTED
    assert error.detail == "HTTP 422"


async def test_unreachable_provider_is_a_retryable_error_not_an_exception(
    session: HttpClient,
) -> None:
    provider = make_provider(session, provider_url=f"http://127.0.0.1:{free_port()}")
    [result] = await provider.send([SMS])
    error = as_error(result)
    assert error.retryable
    assert error.status_code is None


# -- callbacks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "status", "canonical", "reason"),
    [
        ("callback_sent", "sent", ("sent", SubStatus.SENT), ""),
        ("callback_delivered", "delivered", ("delivered", SubStatus.DELIVERED), ""),
        (
            "callback_failed",
            "failed",
            ("failed", SubStatus.UNDELIVERABLE),
            "Carrier rejected the message",
        ),
    ],
)
def test_parse_documented_callbacks(
    fixture: str, status: str, canonical: tuple[str, str], reason: str
) -> None:
    [parsed] = Otpiq.parse_callback(body(fixture), "application/json")
    assert parsed.kind == "status"
    assert parsed.provider_message_id == "sms-1234567890abcdef123456"
    assert parsed.provider_status == status
    assert parsed.reason == reason
    assert parsed.raw == FIXTURES[fixture]
    assert Otpiq.canonical(parsed.provider_status) == canonical
    assert Otpiq.correlation_key(ACCOUNT, parsed.provider_message_id, "") == (
        f"{ACCOUNT}:sms-1234567890abcdef123456"
    )


def test_track_only_statuses_have_a_mapping() -> None:
    assert Otpiq.canonical("read") == ("delivered", SubStatus.DELIVERED)
    assert Otpiq.canonical("expired") == ("failed", SubStatus.EXPIRED)
    assert Otpiq.canonical("bogus") is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"status": "sent"}', "smsId is missing"),
        (b'{"smsId": "", "status": "sent"}', "smsId is missing"),
        (b'{"smsId": "sms-1"}', "status is missing"),
        (b'{"smsId": "sms-1", "status": 3}', "status is missing"),
    ],
)
def test_malformed_callbacks_are_rejected_with_a_reason(raw: bytes, message: str) -> None:
    with pytest.raises(CallbackRejected, match=message):
        Otpiq.parse_callback(raw, "application/json")


def test_failed_callback_reason_ignored_when_not_text() -> None:
    payload: dict[str, Any] = {**FIXTURES["callback_failed"], "reason": {"code": 1}}
    [parsed] = Otpiq.parse_callback(orjson.dumps(payload), "application/json")
    assert parsed.reason == ""


def test_verify_callback_compares_the_echoed_secret() -> None:
    settings = make_settings().providers[ACCOUNT]
    right = CIMultiDict({WEBHOOK_SECRET_HEADER.lower(): OTPIQ_WEBHOOK_SECRET})
    assert Otpiq.verify_callback(settings, right)
    assert Otpiq.verify_callback(settings, {"x-otpiq-webhook-secret": OTPIQ_WEBHOOK_SECRET})
    assert not Otpiq.verify_callback(settings, {WEBHOOK_SECRET_HEADER: "wrong"})
    assert not Otpiq.verify_callback(settings, {WEBHOOK_SECRET_HEADER: ""})
    assert not Otpiq.verify_callback(settings, {})


def test_verify_callback_without_configured_secret_accepts() -> None:
    settings = make_settings().providers[ACCOUNT].model_copy(update={"webhook_secret": None})
    assert Otpiq.verify_callback(settings, {})
    with_secret = settings.model_copy(update={"webhook_secret": RotatingSecret("s")})
    assert not Otpiq.verify_callback(with_secret, {})
