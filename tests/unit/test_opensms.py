from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from shared.contract.statuses import SubStatus
from shared.http_client import HttpClient
from shared.kafka.broker import free_port
from shared.providers import PROVIDER_KINDS, callback_url
from shared.providers.base import (
    CallbackRejected,
    CallbackReply,
    OutboundSms,
    SendAccepted,
    SendError,
    SendResult,
)
from shared.providers.opensms import FAILED_INVALID_NUMBER, FIXTURES, OpenSms, message_ids
from tests.support.providers import OPENSMS_ACCOUNT, bulk_provider_settings

ACCOUNT = OPENSMS_ACCOUNT
NOW = 1_700_000_000.0
FIRST = OutboundSms("m-1", "+254712345678", "Your order has shipped", "ACME")
SECOND = OutboundSms("m-2", "+254712345679", "Your order has shipped", "ACME")
THIRD = OutboundSms("m-3", "+254712345680", "Your order has shipped", "ACME")


@pytest.fixture
async def session() -> AsyncIterator[HttpClient]:
    async with HttpClient(timeout_s=2) as client:
        yield client


def make_provider(session: HttpClient, provider_url: str | None = None) -> OpenSms:
    settings = bulk_provider_settings(provider_url or "http://127.0.0.1:9")
    return OpenSms(ACCOUNT, settings.providers[ACCOUNT], session, callback_url(settings, ACCOUNT))


def answer(payload: Any) -> bytes:
    return orjson.dumps(payload)


def as_error(result: SendResult) -> SendError:
    assert isinstance(result, SendError), result
    return result


def as_accepted(result: SendResult) -> SendAccepted:
    assert isinstance(result, SendAccepted), result
    return result


def test_registered_under_its_kind() -> None:
    assert PROVIDER_KINDS["opensms"] is OpenSms
    assert OpenSms.max_batch > 1
    assert OpenSms.number_style == "plus"


# -- request body --------------------------------------------------------------------------------


async def test_request_body_follows_the_documented_shape(session: HttpClient) -> None:
    provider = make_provider(session)
    assert provider.send_url.endswith("/opensms/api/v3/sms/send")

    single = provider.request_body([FIRST])
    bulk = provider.request_body([FIRST, SECOND, THIRD])

    assert set(single) == set(FIXTURES["send_request"])
    assert single == {
        "recipient": "+254712345678",
        "sender_id": "ACME",
        "type": "plain",
        "message": "Your order has shipped",
    }
    # Several recipients in one comma-separated string, "+" and digits (decisions.md §10).
    assert set(bulk) == set(FIXTURES["send_request_bulk"])
    assert bulk["recipient"] == "+254712345678,+254712345679,+254712345680"


async def test_missing_sender_is_refused_without_calling_the_provider(
    session: HttpClient,
) -> None:
    # Nothing listens at the base URL: a call would come back as a retryable network error.
    provider = make_provider(session, f"http://127.0.0.1:{free_port()}")
    results = await provider.send([OutboundSms("m-1", "+254712345678", "hi", "")])
    error = as_error(results[0])
    assert not error.retryable
    assert error.sub_status == SubStatus.REJECTED
    assert "sender_id" in error.detail


async def test_unreachable_provider_gives_each_message_a_retryable_error(
    session: HttpClient,
) -> None:
    provider = make_provider(session, f"http://127.0.0.1:{free_port()}")
    results = await provider.send([FIRST, SECOND])
    assert len(results) == 2
    assert all(as_error(result).retryable for result in results)
    # No connection was made, so nothing can have been sent.
    assert not any(as_error(result).maybe_accepted for result in results)


# -- accepted sends ------------------------------------------------------------------------------


# providers.md §2.1, verbatim: the documented success answer names no message.
DOCUMENTED_SUCCESS = b'{"status":"success","data":"sms reports with all details"}'


async def test_documented_success_answer_sends_every_recipient_keyed_by_number(
    session: HttpClient,
) -> None:
    results = make_provider(session).read_send_response([FIRST, SECOND], 200, DOCUMENTED_SUCCESS)
    assert len(results) == 2
    first, second = (as_accepted(result) for result in results)
    # Sent, with no provider id: its reports are matched by account and number.
    assert (first.message_id, first.provider_message_id) == ("m-1", "")
    assert (second.message_id, second.provider_message_id) == ("m-2", "")
    assert first.correlation_key == f"{ACCOUNT}:+254712345678"
    assert second.correlation_key == f"{ACCOUNT}:+254712345679"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"status": "success", "data": {"uid": "606812e63f78b"}}, ["606812e63f78b"]),
        ({"status": "success", "data": {"message_id": "msg_1", "to": "+254712345678"}}, ["msg_1"]),
        ({"status": "success", "message_id": "msg_2"}, ["msg_2"]),
        ({"status": "success", "data": [{"id": 42}]}, ["42"]),
    ],
)
async def test_single_recipient_ids_are_found_in_plausible_places(
    session: HttpClient, payload: dict[str, Any], expected: list[str]
) -> None:
    [result] = make_provider(session).read_send_response([FIRST], 200, answer(payload))
    accepted = as_accepted(result)
    assert [accepted.provider_message_id] == expected
    assert accepted.message_id == "m-1"
    # Keyed by number all the same: the report's key cannot know whether the answer had ids.
    assert accepted.correlation_key == f"{ACCOUNT}:+254712345678"


async def test_bulk_ids_are_matched_by_number_whatever_their_order_and_format(
    session: HttpClient,
) -> None:
    payload = {
        "status": "success",
        "data": [
            {"message_id": "msg_c", "recipient": "254712345680"},
            {"message_id": "msg_a", "recipient": "+254712345678"},
            {"message_id": "msg_b", "recipient": "0712 345 679"},  # national form
        ],
    }
    results = make_provider(session).read_send_response(
        [FIRST, SECOND, THIRD], 200, answer(payload)
    )
    assert [as_accepted(r).provider_message_id for r in results] == ["msg_a", "msg_b", "msg_c"]
    assert [as_accepted(r).message_id for r in results] == ["m-1", "m-2", "m-3"]


async def test_bulk_ids_without_numbers_are_matched_by_position(
    session: HttpClient,
) -> None:
    payload = {"status": "success", "data": {"messages": [{"uid": "u1"}, {"uid": "u2"}]}}
    results = make_provider(session).read_send_response([FIRST, SECOND], 200, answer(payload))
    assert [as_accepted(r).provider_message_id for r in results] == ["u1", "u2"]


async def test_recipient_missing_from_the_answer_is_sent_without_an_id(
    session: HttpClient,
) -> None:
    payload = {
        "status": "success",
        "data": [
            {"message_id": "msg_a", "recipient": "+254712345678"},
            {"message_id": "msg_c", "recipient": "+254712345680"},
        ],
    }
    first, second, third = make_provider(session).read_send_response(
        [FIRST, SECOND, THIRD], 200, answer(payload)
    )
    assert as_accepted(first).provider_message_id == "msg_a"
    assert as_accepted(second).provider_message_id == ""
    assert as_accepted(third).provider_message_id == "msg_c"


@pytest.mark.parametrize(
    "payload",
    [
        {"status": "success", "data": {"uid": "one-for-all"}},
        {"status": "success", "data": [{"uid": "same"}, {"uid": "same"}]},
        {"status": "success", "data": [{"uid": "u1"}]},
        {"status": "success", "data": [{"uid": "u1"}, "u2"]},
        {"status": "success", "data": {"uid": ""}},
    ],
)
async def test_ids_that_cannot_tell_recipients_apart_are_not_used(
    session: HttpClient, payload: dict[str, Any]
) -> None:
    results = make_provider(session).read_send_response([FIRST, SECOND], 200, answer(payload))
    assert [as_accepted(r).provider_message_id for r in results] == ["", ""]
    assert message_ids(payload, [FIRST.destination, SECOND.destination]) == {}


@pytest.mark.parametrize(
    ("raw", "detail"),
    [(b"<html>ok</html>", "unreadable body"), (b"[1, 2]", "unreadable body")],
)
async def test_unreadable_success_is_terminal_for_every_message(
    session: HttpClient, raw: bytes, detail: str
) -> None:
    results = make_provider(session).read_send_response([FIRST, SECOND], 200, raw)
    assert len(results) == 2
    for result in results:
        error = as_error(result)
        assert not error.retryable
        assert error.maybe_accepted  # accepted or not: unknown
        assert error.sub_status == SubStatus.PROVIDER_ERROR
        assert detail in error.detail


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "retryable", "sub_status"),
    [
        (1001, False, SubStatus.INVALID_NUMBER),
        (1002, False, SubStatus.REJECTED),
        (1003, True, SubStatus.PROVIDER_ERROR),  # no balance: retry later, fail over
        (1004, False, SubStatus.REJECTED),
        # Duplicate: maybe an earlier attempt of ours; never retried, an unknown outcome.
        (1005, False, SubStatus.PROVIDER_ERROR),
        (1006, False, SubStatus.REJECTED),
        (1007, True, SubStatus.PROVIDER_ERROR),
        (1008, False, SubStatus.REJECTED),
    ],
)
async def test_documented_error_codes_map_to_retry_or_terminal_sub_status(
    session: HttpClient, code: int, retryable: bool, sub_status: str
) -> None:
    provider = make_provider(session)
    bodies = [
        {"status": "error", "code": code, "message": "Something is wrong"},
        {"status": "error", "error_code": str(code), "message": "Something is wrong"},
        {"status": "error", "error": {"code": code, "message": "Something is wrong"}},
        {"status": "error", "message": f"Error {code}: something is wrong"},
    ]
    for body in bodies:
        for status in (400, 200):  # refusals may come inside a 200
            results = provider.read_send_response([FIRST, SECOND], status, answer(body))
            assert len(results) == 2
            for result in results:
                error = as_error(result)
                assert (error.retryable, error.sub_status) == (retryable, sub_status), body
                assert error.maybe_accepted is (code == 1005)
                assert f"OpenSMS error {code}" in error.detail
                assert "omething is wrong" in error.detail
                assert error.status_code == status


@pytest.mark.parametrize(
    ("status", "body", "retryable", "sub_status"),
    [
        # Our token or account, not the message: another route may work.
        (401, {"message": "Unauthenticated."}, True, SubStatus.PROVIDER_ERROR),
        (403, {"message": "Forbidden"}, True, SubStatus.PROVIDER_ERROR),
        (404, {"message": "Not found"}, False, SubStatus.REJECTED),
        (422, {"message": "The recipient field is required."}, False, SubStatus.REJECTED),
        (400, {"message": "Invalid phone number"}, False, SubStatus.INVALID_NUMBER),
        (429, {"message": "Too Many Attempts."}, True, SubStatus.PROVIDER_ERROR),
        (500, {"message": "Server Error"}, True, SubStatus.PROVIDER_ERROR),
        (503, {}, True, SubStatus.PROVIDER_ERROR),
        (200, {"status": "error", "message": "Sender ID not approved"}, False, SubStatus.REJECTED),
    ],
)
async def test_http_errors_without_a_code(
    session: HttpClient,
    status: int,
    body: dict[str, Any],
    retryable: bool,
    sub_status: str,
) -> None:
    [result] = make_provider(session).read_send_response([FIRST], status, answer(body))
    error = as_error(result)
    assert error.retryable is retryable
    assert error.status_code == status
    if not retryable:
        assert error.sub_status == sub_status
    assert error.detail == (body.get("message") or f"HTTP {status}")


async def test_rate_limit_honours_retry_after_then_the_window_reset(
    session: HttpClient,
) -> None:
    provider = make_provider(session)
    limited = answer({"status": "error", "message": "Too Many Attempts."})
    cases: list[tuple[dict[str, str], float | None]] = [
        ({"Retry-After": "7", "X-RateLimit-Reset": str(int(NOW) + 30)}, 7.0),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(NOW) + 30)}, 30.0),
        ({"X-RateLimit-Reset": "12"}, 12.0),  # seconds, too small to be a Unix time
        ({"X-RateLimit-Reset": str(int(NOW) - 5)}, 0.0),
        ({}, None),
    ]
    for headers, wait in cases:
        [result] = provider.read_send_response([FIRST], 429, limited, headers, now=NOW)
        error = as_error(result)
        assert error.retryable
        assert error.retry_after_s == wait, headers


async def test_exhausted_window_delays_a_retryable_error_but_not_a_terminal_one(
    session: HttpClient,
) -> None:
    provider = make_provider(session)
    headers = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(NOW) + 45)}
    no_balance = answer({"status": "error", "code": 1003, "message": "Insufficient balance"})
    [retry] = provider.read_send_response([FIRST], 400, no_balance, headers, now=NOW)
    assert as_error(retry).retry_after_s == 45.0
    bad_number = answer({"status": "error", "code": 1001, "message": "Invalid phone number"})
    [terminal] = provider.read_send_response([FIRST], 400, bad_number, headers, now=NOW)
    assert as_error(terminal).retry_after_s is None
    # Remaining calls left in the window: the reset is no reason to wait.
    plenty = {"X-RateLimit-Remaining": "99", "X-RateLimit-Reset": str(int(NOW) + 45)}
    [server] = provider.read_send_response([FIRST], 503, b"", plenty, now=NOW)
    assert as_error(server).retry_after_s is None


@pytest.mark.parametrize("raw", [b"<html>Bad Gateway</html>", b"[]"])
async def test_unreadable_5xx_is_retryable(session: HttpClient, raw: bytes) -> None:
    [result] = make_provider(session).read_send_response([FIRST], 502, raw)
    error = as_error(result)
    assert error.retryable
    assert "unreadable body" in error.detail


# -- callbacks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "status", "canonical", "reason"),
    [
        ("callback_pending", "pending", ("sent", SubStatus.SENT), ""),
        ("callback_delivered", "delivered", ("delivered", SubStatus.DELIVERED), ""),
        (
            "callback_failed",
            FAILED_INVALID_NUMBER,
            ("failed", SubStatus.INVALID_NUMBER),
            "Invalid phone number",
        ),
    ],
)
def test_parse_documented_callbacks(
    fixture: str, status: str, canonical: tuple[str, str], reason: str
) -> None:
    [parsed] = OpenSms.parse_callback(orjson.dumps(FIXTURES[fixture]), "application/json")
    assert parsed.kind == "status"
    assert parsed.provider_message_id == "msg_123456"
    assert parsed.number == "+254712345678"
    assert parsed.provider_status == status
    assert parsed.reason == reason
    assert parsed.occurred_at == datetime(2024, 1, 13, 12, 0, tzinfo=UTC)
    assert parsed.raw == FIXTURES[fixture]
    assert OpenSms.canonical(parsed.provider_status) == canonical
    # The key of the send to that number: reports are matched by number (number_match.py).
    assert OpenSms.correlation_key(ACCOUNT, parsed.provider_message_id, parsed.number) == (
        f"{ACCOUNT}:+254712345678"
    )


def test_a_report_without_phone_is_keyed_by_its_id() -> None:
    payload = {k: v for k, v in FIXTURES["callback_delivered"].items() if k != "phone"}
    [parsed] = OpenSms.parse_callback(orjson.dumps(payload), "application/json")
    assert parsed.number == ""
    key = OpenSms.correlation_key(ACCOUNT, parsed.provider_message_id, parsed.number)
    assert key == f"{ACCOUNT}:id:msg_123456"


def test_failure_for_another_reason_is_undeliverable() -> None:
    payload = {**FIXTURES["callback_failed"], "error": "Absent subscriber"}
    [parsed] = OpenSms.parse_callback(orjson.dumps(payload), "")
    assert parsed.provider_status == "failed"
    assert OpenSms.canonical(parsed.provider_status) == ("failed", SubStatus.UNDELIVERABLE)
    assert parsed.reason == "Absent subscriber"


def test_status_falls_back_to_the_event_name_and_times_to_utc() -> None:
    payload = {
        "event": "sms.delivered",
        "message_id": 123456,
        "phone": "+254712345678",
        "timestamp": "2024-01-13T15:00:00+03:00",
    }
    [parsed] = OpenSms.parse_callback(orjson.dumps(payload), "")
    assert parsed.provider_status == "delivered"
    assert parsed.provider_message_id == "123456"
    assert parsed.occurred_at == datetime(2024, 1, 13, 12, 0, tzinfo=UTC)
    for timestamp in ("yesterday", 17, None):
        [undated] = OpenSms.parse_callback(orjson.dumps({**payload, "timestamp": timestamp}), "")
        assert undated.occurred_at is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "not JSON"),
        (orjson.dumps(FIXTURES["callback_delivered"])[:-9], "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"event": "sms.delivered", "status": "delivered"}', "message_id is missing"),
        (b'{"message_id": "", "status": "delivered"}', "message_id is missing"),
        (b'{"message_id": "msg_1"}', "status is missing"),
        (b'{"message_id": "msg_1", "event": "delivered"}', "status is missing"),
        (b'{"message_id": "msg_1", "status": 3}', "status is missing"),
    ],
)
def test_malformed_callbacks_are_rejected_with_a_reason(raw: bytes, message: str) -> None:
    with pytest.raises(CallbackRejected, match=message):
        OpenSms.parse_callback(raw, "application/json")


def test_callback_answer_is_the_documented_one() -> None:
    assert OpenSms.callback_reply == CallbackReply()
    assert orjson.loads(OpenSms.callback_reply.body) == FIXTURES["callback_reply"]
    # No authentication is documented: the secret URL token is the check.
    assert OpenSms.verify_callback(bulk_provider_settings().providers[ACCOUNT], {})
