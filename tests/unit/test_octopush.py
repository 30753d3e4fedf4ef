from __future__ import annotations

import urllib.parse
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
    OutboundSms,
    ParsedCallback,
    SendAccepted,
    SendError,
    SendResult,
)
from shared.providers.bulk import plan_calls
from shared.providers.octopush import FIXTURES, Octopush, paris_date, paris_time, request_id
from tests.support.providers import OCTOPUSH_ACCOUNT, bulk_provider_settings

ACCOUNT = OCTOPUSH_ACCOUNT
TEXT = "Your order has shipped"
FIRST = OutboundSms("m-1", "+33600000001", TEXT, "ACME")
SECOND = OutboundSms("m-2", "+33600000002", TEXT, "ACME")
THIRD = OutboundSms("m-3", "+33600000003", TEXT, "ACME")
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
async def session() -> AsyncIterator[HttpClient]:
    async with HttpClient(timeout_s=2) as client:
        yield client


def make_provider(
    session: HttpClient, provider_url: str | None = None, **settings: Any
) -> Octopush:
    config = bulk_provider_settings(provider_url or "http://127.0.0.1:9", octopush=settings)
    return Octopush(ACCOUNT, config.providers[ACCOUNT], session, callback_url(config, ACCOUNT))


def as_error(result: SendResult) -> SendError:
    assert isinstance(result, SendError), result
    return result


def as_accepted(result: SendResult) -> SendAccepted:
    assert isinstance(result, SendAccepted), result
    return result


def parse_one(payload: dict[str, Any], content_type: str = "application/json") -> ParsedCallback:
    if content_type == FORM:
        raw = urllib.parse.urlencode(payload).encode()
    else:
        raw = orjson.dumps(payload)
    [parsed] = Octopush.parse_callback(raw, content_type)
    return parsed


def test_registered_under_its_kind() -> None:
    assert PROVIDER_KINDS["octopush"] is Octopush
    assert Octopush.max_batch == 500
    assert Octopush.number_style == "plus"


# -- request body --------------------------------------------------------------------------------


async def test_request_body_follows_the_documented_shape(session: HttpClient) -> None:
    provider = make_provider(session)
    assert provider.send_url.endswith("/octopush/v1/public/sms-campaign/send")

    body = provider.request_body([FIRST, SECOND, THIRD])

    assert set(body) == set(FIXTURES["send_request"])
    assert body["recipients"] == [
        {"phone_number": "+33600000001"},
        {"phone_number": "+33600000002"},
        {"phone_number": "+33600000003"},
    ]
    assert body["text"] == TEXT
    assert body["sender"] == "ACME"
    assert body["type"] == "sms_premium"  # the low-cost type has no delivery reports
    assert body["purpose"] == "alert"
    # Off unless the account asks: in France it replaces an alphanumeric sender.
    assert body["with_replies"] is False
    assert body["auto_optimize_text"] is False
    assert body["request_id"] == request_id([FIRST, SECOND, THIRD])


# providers.md §3.1, the send fields of the v1 API (the table's names, verbatim).
DOCUMENTED_SEND_FIELDS = {
    "recipients",
    "text",
    "type",
    "sender",
    "purpose",
    "send_at",
    "with_replies",
    "simulation_mode",
    "request_id",
    "auto_optimize_text",
    "auto_remove_blacklisted_numbers",
    "list_name",
    "recipient_tracking",
}


async def test_replies_are_an_account_setting_off_by_default(
    session: HttpClient,
) -> None:
    assert make_provider(session).request_body([FIRST])["with_replies"] is False
    wanted = make_provider(session, with_replies=True).request_body([FIRST])
    assert wanted["with_replies"] is True


async def test_blacklisted_numbers_are_removed_not_failing_the_call(
    session: HttpClient,
) -> None:
    body = make_provider(session).request_body([FIRST, SECOND, THIRD])
    assert body["auto_remove_blacklisted_numbers"] is True
    assert set(body) <= DOCUMENTED_SEND_FIELDS


async def test_purpose_is_configurable_and_an_absent_sender_is_omitted(
    session: HttpClient,
) -> None:
    provider = make_provider(session, purpose="wholesale")
    body = provider.request_body([OutboundSms("m-1", "+33600000001", "hi", "")])
    assert body["purpose"] == "wholesale"
    assert "sender" not in body


def test_request_id_is_derived_from_the_message_ids() -> None:
    same = request_id([FIRST, SECOND])
    assert request_id([OutboundSms("m-1", "+1", "x", "y"), OutboundSms("m-2", "+2", "x", "y")]) == (
        same
    )
    assert request_id([SECOND, FIRST]) != same
    assert request_id([FIRST]) != same
    assert request_id([FIRST, THIRD]) != same


def test_calls_share_text_and_sender_never_repeat_a_number_and_respect_the_bound() -> None:
    other_text = OutboundSms("m-4", "+33600000001", "Another text", "ACME")
    other_sender = OutboundSms("m-5", "+33600000002", TEXT, "OTHER")
    again = OutboundSms("m-6", "+33600000001", TEXT, "ACME")
    batch = [FIRST, other_text, SECOND, other_sender, again, THIRD]

    assert plan_calls(batch, 500) == [[0, 2, 5], [1], [3], [4]]
    assert plan_calls(batch, 2) == [[0, 2], [1], [3], [4, 5]]
    assert plan_calls([], 500) == []
    with pytest.raises(ValueError):
        plan_calls(batch, 0)


async def test_unreachable_provider_gives_each_message_a_retryable_error(
    session: HttpClient,
) -> None:
    provider = make_provider(session, f"http://127.0.0.1:{free_port()}")
    results = await provider.send([FIRST, SECOND, OutboundSms("m-9", "+33600000009", "x", "B")])
    assert len(results) == 3
    assert all(as_error(result).retryable for result in results)


# -- send answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201])
async def test_ticket_covers_every_message_keyed_by_ticket_and_number(
    session: HttpClient, status: int
) -> None:
    raw = orjson.dumps(FIXTURES["send_response"])
    results = make_provider(session).read_send_response([FIRST, SECOND], status, raw)
    accepted = [as_accepted(result) for result in results]
    assert [a.message_id for a in accepted] == ["m-1", "m-2"]
    assert {a.provider_message_id for a in accepted} == {"sms_5fec89fe97109"}
    assert [a.correlation_key for a in accepted] == [
        f"{ACCOUNT}:sms_5fec89fe97109:+33600000001",
        f"{ACCOUNT}:sms_5fec89fe97109:+33600000002",
    ]
    # The key a callback for that number produces is the same one.
    callback = {**FIXTURES["callback_delivered"], "message_id": "sms_5fec89fe97109"}
    parsed = parse_one({**callback, "number": "+33600000002"})
    key = Octopush.correlation_key(ACCOUNT, parsed.provider_message_id, parsed.number)
    assert key == accepted[1].correlation_key


@pytest.mark.parametrize(
    ("raw", "detail", "unknown"),
    [
        # Accepted or not? Only an identical resend, which Octopush de-duplicates, is safe.
        (b"<html>ok</html>", "unreadable body", True),
        (b"[]", "unreadable body", True),
        # Accepted, but without a ticket its reports cannot be matched.
        (b'{"number_of_contacts": 2}', "without sms_ticket", False),
        (b'{"sms_ticket": ""}', "without sms_ticket", False),
        (b'{"sms_ticket": 5}', "without sms_ticket", False),
    ],
)
async def test_success_without_a_usable_ticket_is_terminal_for_every_message(
    session: HttpClient, raw: bytes, detail: str, unknown: bool
) -> None:
    assert Octopush.deduplicates_resends
    results = make_provider(session).read_send_response([FIRST, SECOND], 201, raw)
    assert len(results) == 2
    for result in results:
        error = as_error(result)
        assert not error.retryable
        assert error.maybe_accepted is unknown
        assert error.sub_status == SubStatus.PROVIDER_ERROR
        assert detail in error.detail


@pytest.mark.parametrize(
    "body",
    [
        {"code": 120, "message": "Duplicate request"},
        {"error_code": "120"},
        {"error": {"code": 120, "message": "Duplicate request"}},
        {"message": "This request_id has already been used"},
    ],
)
async def test_duplicate_request_id_is_terminal_and_says_why(
    session: HttpClient, body: dict[str, Any]
) -> None:
    results = make_provider(session).read_send_response([FIRST, SECOND], 400, orjson.dumps(body))
    for result in results:
        error = as_error(result)
        assert not error.retryable
        assert not error.maybe_accepted  # accepted for sure: resending again is pointless
        assert error.sub_status == SubStatus.PROVIDER_ERROR
        assert "duplicate request_id" in error.detail


@pytest.mark.parametrize(
    ("code", "retryable", "sub_status"),
    [
        (101, True, SubStatus.PROVIDER_ERROR),  # bad login: ours, not the message's
        (102, False, SubStatus.REJECTED),
        (103, False, SubStatus.INVALID_NUMBER),
        (104, True, SubStatus.PROVIDER_ERROR),  # out of credit: retry later, fail over
        (106, False, SubStatus.REJECTED),
        (107, False, SubStatus.EMPTY_MESSAGE),
        (121, False, SubStatus.REJECTED),
        (150, False, SubStatus.INVALID_NUMBER),
        (151, True, SubStatus.PROVIDER_ERROR),  # country not served: another route may
        (153, True, SubStatus.PROVIDER_ERROR),
    ],
)
async def test_legacy_error_codes_map_to_retry_or_terminal_sub_status(
    session: HttpClient, code: int, retryable: bool, sub_status: str
) -> None:
    provider = make_provider(session)
    for status, body in [
        (400, {"code": code, "message": "Refused"}),
        (200, {"error_code": str(code)}),  # the legacy API answers 200 with the code
    ]:
        results = provider.read_send_response([FIRST, SECOND], status, orjson.dumps(body))
        assert len(results) == 2
        for result in results:
            error = as_error(result)
            assert (error.retryable, error.sub_status) == (retryable, sub_status)
            assert f"Octopush error {code}" in error.detail


@pytest.mark.parametrize(
    ("status", "body", "retryable", "sub_status", "detail"),
    [
        (401, {"message": "Unauthorized"}, True, SubStatus.PROVIDER_ERROR, "Unauthorized"),
        (403, {}, True, SubStatus.PROVIDER_ERROR, "HTTP 403"),
        (404, {"message": "Not Found"}, False, SubStatus.REJECTED, "Not Found"),
        (
            400,
            {"message": "recipients[0].phone_number: invalid phone number"},
            False,
            SubStatus.INVALID_NUMBER,
            "invalid phone number",
        ),
        (422, {}, False, SubStatus.REJECTED, "HTTP 422"),
        (429, {"message": "Too many requests"}, True, SubStatus.PROVIDER_ERROR, "Too many"),
        (500, {"title": "Internal error"}, True, SubStatus.PROVIDER_ERROR, "Internal error"),
        (503, {}, True, SubStatus.PROVIDER_ERROR, "HTTP 503"),
    ],
)
async def test_errors_without_a_known_code_follow_the_http_status(
    session: HttpClient,
    status: int,
    body: dict[str, Any],
    retryable: bool,
    sub_status: str,
    detail: str,
) -> None:
    [result] = make_provider(session).read_send_response([FIRST], status, orjson.dumps(body))
    error = as_error(result)
    assert error.retryable is retryable
    assert error.status_code == status
    if not retryable:
        assert error.sub_status == sub_status
    assert detail in error.detail


async def test_retry_after_is_honoured_on_retryable_errors(
    session: HttpClient,
) -> None:
    provider = make_provider(session)
    [limited] = provider.read_send_response([FIRST], 429, b"", {"retry-after": "12"})
    assert as_error(limited).retry_after_s == 12.0
    [unreadable] = provider.read_send_response([FIRST], 502, b"<html/>", {"Retry-After": "3"})
    assert as_error(unreadable).retry_after_s == 3.0
    assert "unreadable body" in as_error(unreadable).detail


# -- callbacks -----------------------------------------------------------------------------------


def test_documented_delivery_report() -> None:
    parsed = parse_one(FIXTURES["callback_delivered"])
    assert parsed.kind == "status"
    assert parsed.provider_message_id == "sms_0000000000000000000000"
    assert parsed.number == "+33600112233"
    assert parsed.provider_status == "DELIVERED"
    # Paris wall-clock time, winter (UTC+1).
    assert parsed.occurred_at == datetime(2025, 1, 22, 10, 46, 6, tzinfo=UTC)
    assert parsed.raw == FIXTURES["callback_delivered"]
    assert Octopush.canonical(parsed.provider_status) == ("delivered", SubStatus.DELIVERED)


def test_documented_inbound_reply() -> None:
    parsed = parse_one(FIXTURES["callback_inbound"])
    assert parsed.kind == "inbound"
    assert parsed.provider_message_id == "sms_5fa275dbf21dc"
    assert parsed.number == "+33600000000"
    assert parsed.text == "some reply"
    assert parsed.to == "12345"
    assert parsed.occurred_at == datetime(2020, 11, 4, 10, 11, 45, tzinfo=UTC)


# providers.md §3.4, verbatim.
DOCUMENTED_STOP = (
    b'{"message_id":"sms_5fa275dbf21dc","number":"+33600000000","text":"stop",'
    b'"stop_date":"2020-11-04 11:11:45"}'
)


@pytest.mark.parametrize("content_type", ["application/json", FORM])
def test_stop_without_text_is_an_opt_out(content_type: str) -> None:
    payload = {k: v for k, v in orjson.loads(DOCUMENTED_STOP).items() if k != "text"}
    raw = (
        urllib.parse.urlencode(payload).encode() if content_type == FORM else orjson.dumps(payload)
    )
    [parsed] = Octopush.parse_callback(raw, content_type)
    assert parsed.kind == "opt_out"
    assert (parsed.provider_message_id, parsed.number) == ("sms_5fa275dbf21dc", "+33600000000")
    # Forwarded to Optimove as a STOP: the callback says so, whatever the customer wrote.
    assert parsed.text == "STOP"
    assert parsed.occurred_at == datetime(2020, 11, 4, 10, 11, 45, tzinfo=UTC)


def test_documented_stop() -> None:
    parsed = parse_one(FIXTURES["callback_stop"])
    assert parsed.kind == "opt_out"
    assert parsed.provider_message_id == "sms_5fa275dbf21dc"
    assert parsed.number == "+33600000000"
    assert parsed.text == "stop"
    assert parsed.occurred_at == datetime(2020, 11, 4, 10, 11, 45, tzinfo=UTC)


@pytest.mark.parametrize("fixture", ["callback_delivered", "callback_inbound", "callback_stop"])
def test_form_bodies_read_like_json(fixture: str) -> None:
    flat = {k: v for k, v in FIXTURES[fixture].items() if not isinstance(v, dict)}
    from_form = parse_one(flat, FORM)
    from_json = parse_one(flat)
    assert from_form.kind == from_json.kind
    assert from_form.provider_message_id == from_json.provider_message_id
    assert from_form.number == from_json.number
    assert from_form.provider_status == from_json.provider_status
    assert from_form.text == from_json.text
    assert from_form.occurred_at == from_json.occurred_at
    assert from_form.raw == {k: str(v) for k, v in flat.items()}


def test_unlabelled_bodies_are_recognised_and_an_unencoded_plus_survives() -> None:
    form = b"message_id=sms_1&number=+33600000000&status=ACK&delivery_date=2020-11-04+11:11:45"
    [parsed] = Octopush.parse_callback(form, "")
    assert parsed.number == "+33600000000"  # the "+" decoded to a space
    assert parsed.provider_status == "ACK"
    assert parsed.occurred_at == datetime(2020, 11, 4, 10, 11, 45, tzinfo=UTC)
    [labelled] = Octopush.parse_callback(form, f"{FORM}; charset=UTF-8")
    assert labelled.number == "+33600000000"
    [prefixed] = Octopush.parse_callback(form.replace(b"=+336", b"=00336"), FORM)
    assert prefixed.number == "+33600000000"
    [as_json] = Octopush.parse_callback(orjson.dumps(FIXTURES["callback_stop"]), "text/plain")
    assert as_json.kind == "opt_out"


def test_field_names_match_in_any_case() -> None:
    parsed = parse_one(
        {
            "MESSAGE_ID": "sms_1",
            "Number": "+33600000000",
            "STATUS": "BAD_DESTINATION",
            "DELIVERY_DATE": "2024-07-01 12:00:00",
        }
    )
    assert parsed.kind == "status"
    assert (parsed.provider_message_id, parsed.provider_status) == ("sms_1", "BAD_DESTINATION")
    # Paris wall-clock time, summer (UTC+2).
    assert parsed.occurred_at == datetime(2024, 7, 1, 10, 0, tzinfo=UTC)
    assert parse_one({"NUMBER": "+33600000000", "TEXT": "Oui", "ANSWER_DATE": "x"}).kind == (
        "inbound"
    )


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"stop_date": "2020-11-04 11:11:45", "reception_date": "2020-11-04 11:11:45"}, "opt_out"),
        ({"stop_date": "2020-11-04 11:11:45", "delivery_date": "2020-11-04 11:11:45"}, "opt_out"),
        ({"answer_date": "2020-11-04 11:11:45"}, "inbound"),
        ({"reception_date": "2020-11-04 11:11:45", "delivery_date": "2020-11-04"}, "inbound"),
        ({"delivery_date": "2020-11-04 11:11:45", "status": "ACK"}, "status"),
    ],
)
def test_dispatch_rule_stop_then_inbound_then_delivery(fields: dict[str, str], kind: str) -> None:
    payload = {"message_id": "sms_1", "number": "+33600000000", "text": "x", **fields}
    assert parse_one(payload).kind == kind
    assert parse_one(payload, FORM).kind == kind


def test_unsolicited_inbound_has_no_message_id() -> None:
    payload = {k: v for k, v in FIXTURES["callback_inbound"].items() if k != "message_id"}
    parsed = parse_one(payload)
    assert parsed.kind == "inbound"
    assert parsed.provider_message_id == ""
    assert parsed.number == "+33600000000"


@pytest.mark.parametrize(
    ("raw", "content_type", "message"),
    [
        (b'{"foo": "bar"}', "application/json", "not an Octopush callback"),
        (b"foo=bar", FORM, "not an Octopush callback"),
        (b"", "", "not an Octopush callback"),
        (b"[1, 2]", "application/json", "not a JSON object"),
        (orjson.dumps(FIXTURES["callback_stop"])[:-5], "application/json", "not JSON"),
        (orjson.dumps(FIXTURES["callback_stop"])[:-5], "", "not JSON"),
        (b"not json", "", "neither JSON nor a form"),
        (b"a=1&&b", FORM, "neither JSON nor a form"),
    ],
)
def test_unknown_shapes_are_rejected(raw: bytes, content_type: str, message: str) -> None:
    with pytest.raises(CallbackRejected, match=message):
        Octopush.parse_callback(raw, content_type)


@pytest.mark.parametrize(
    ("raw", "content_type", "text"),
    [
        (b"number=%2B33600000000&text=arr%C3%AAt&stop_date=d", FORM, "arrêt"),
        (b"number=%2B33600000000&text=arr%CAt&stop_date=d", FORM, "arrÊt"),
        ("number=%2B33600000000&text=arrêt&stop_date=d".encode(), FORM, "arrêt"),
        ("number=%2B33600000000&text=arrêt&stop_date=d".encode("latin-1"), FORM, "arrêt"),
        (
            b"number=%2B33600000000&text=arr%CAt&stop_date=d",
            f"{FORM}; charset=ISO-8859-1",
            "arrÊt",
        ),
        (b"number=%2B33600000000&text=ok&stop_date=d", f"{FORM}; charset=bogus", "ok"),
    ],
)
def test_form_text_in_another_encoding_is_kept_not_refused(
    raw: bytes, content_type: str, text: str
) -> None:
    [parsed] = Octopush.parse_callback(raw, content_type)
    assert (parsed.kind, parsed.number, parsed.text) == ("opt_out", "+33600000000", text)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"number": "+33600000000", "status": "ACK", "delivery_date": "d"}, "message_id"),
        ({"message_id": "sms_1", "status": "ACK", "delivery_date": "d"}, "number"),
        ({"message_id": "sms_1", "number": "abc", "status": "ACK", "delivery_date": "d"}, "number"),
        ({"message_id": "sms_1", "number": "+33600000000", "delivery_date": "d"}, "status"),
        ({"number": "+33600000000", "reception_date": "d"}, "text"),
        ({"message_id": "sms_1", "text": "stop", "stop_date": "d"}, "number"),
    ],
)
def test_callbacks_missing_required_fields_are_rejected(
    payload: dict[str, Any], message: str
) -> None:
    with pytest.raises(CallbackRejected, match=message):
        parse_one(payload)


def test_every_documented_status_has_a_mapping() -> None:
    expected = {
        "ACK": ("sent", SubStatus.ACKNOWLEDGED),
        "DELIVERED": ("delivered", SubStatus.DELIVERED),
        "READ": ("delivered", SubStatus.DELIVERED),
        "NOT_DELIVERED": ("failed", SubStatus.UNDELIVERABLE),
        "NOT_ALLOWED": ("failed", SubStatus.REJECTED),
        "BAD_DESTINATION": ("failed", SubStatus.INVALID_NUMBER),
        "BLACKLISTED_NUMBER": ("failed", SubStatus.BLACKLISTED),
        "UNKNOWN_DELIVERY": ("failed", SubStatus.EXPIRED),
        "UNDEFINED": ("failed", SubStatus.EXPIRED),
    }
    for status, canonical in expected.items():
        assert Octopush.canonical(status.lower()) == canonical
    assert Octopush.canonical("OPENED") is None


def test_dates_are_paris_wall_clock_converted_to_utc() -> None:
    assert paris_time("2024-03-31 01:30:00") == datetime(2024, 3, 31, 0, 30, tzinfo=UTC)
    assert paris_time("2024-03-31 03:30:00") == datetime(2024, 3, 31, 1, 30, tzinfo=UTC)
    assert paris_time("2024-07-01T12:00:00+00:00") == datetime(2024, 7, 1, 12, 0, tzinfo=UTC)
    assert paris_time("04/11/2020") is None
    assert paris_time("") is None
    assert paris_time(1604484705) is None
    moment = datetime(2025, 1, 22, 10, 46, 6, tzinfo=UTC)
    assert paris_date(moment) == "2025-01-22 11:46:06"
    assert paris_time(paris_date(moment)) == moment


def test_callback_answer_is_empty() -> None:
    reply = Octopush.callback_reply
    assert (reply.status, reply.body, reply.content_type) == (200, b"", None)
    assert Octopush.verify_callback(bulk_provider_settings().providers[ACCOUNT], {})
