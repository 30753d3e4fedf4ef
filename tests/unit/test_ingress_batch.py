"""services/ingress/batch.py: parsing, validation, metadata text, records (no Kafka, no HTTP)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson
import pytest

from services.ingress.batch import (
    EMPTY_MESSAGE,
    MISSING_NUMBER,
    CampaignRecords,
    InvalidJson,
    ParsedCampaign,
    SchemaViolation,
    build_records,
    metadata_text,
    parse_campaign,
    top_level_members,
)
from services.ingress.e164 import reader
from shared.config import TenantSettings
from shared.contract.events import DispatchRecord, MessageContext, RecipientMessage, decode
from shared.contract.ids import content_key, content_request_key, message_id, request_key
from shared.contract.numbers import read_number, to_e164
from shared.contract.priority import recipients_topic
from shared.contract.topics import PRIORITY_RECIPIENTS, RECIPIENTS
from tests.support import TENANT, make_settings
from tests.support.optimove_bodies import AUTO_REPLY_METADATA, SECTION_3_2, SPEC, campaign_body

ACCEPTED_AT = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
METADATA = {"appId": 7, "brandId": "b", "campaignId": "spring", "scheduledTime": 0}


def tenant_settings(**changes: Any) -> TenantSettings:
    return make_settings().tenants[TENANT].model_copy(update=changes)


def body(**members: Any) -> bytes:
    document: dict[str, Any] = {"batchId": "batch-1", "metadata": METADATA, "recipients": []}
    document.update(members)
    return orjson.dumps({k: v for k, v in document.items() if v is not ...})


def records_for(raw: bytes, **tenant_changes: Any) -> tuple[ParsedCampaign, CampaignRecords]:
    campaign = parse_campaign(raw)
    settings = tenant_settings(**tenant_changes)
    records = build_records(
        tenant=TENANT,
        settings=settings,
        campaign=campaign,
        read=partial(
            read_number, default_region=settings.default_region, bare_digits=settings.bare_digits
        ),
        accepted_at=ACCEPTED_AT,
    )
    return campaign, records


# -- parsing and schema ----------------------------------------------------------------------------


def test_parses_the_documented_shape() -> None:
    raw = body(
        requestId="req-1",
        senderId="ACME",
        recipients=[{"message": "hi", "mobileNumber": "+447911123456", "customerId": "c1"}],
        futureField={"tolerated": True},
    )
    campaign = parse_campaign(raw)
    request = campaign.request
    assert (request.batch_id, request.request_id, request.sender_id) == ("batch-1", "req-1", "ACME")
    assert request.metadata.app_id == 7
    assert request.metadata.campaign_id == "spring"
    assert campaign.recipients == [
        {"message": "hi", "mobileNumber": "+447911123456", "customerId": "c1"}
    ]
    assert campaign.identity == request_key("batch-1", "req-1")
    assert not campaign.by_content
    assert campaign.scheduled_at is None  # scheduledTime 0 = now


def test_optional_members_may_be_absent() -> None:
    campaign = parse_campaign(b'{"batchId": "", "metadata": {"appId": 1}}')
    assert campaign.recipients == []
    assert campaign.request.request_id is None
    assert campaign.request.sender_id is None
    assert campaign.request.metadata.campaign_id is None


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b'{"batchId": "b",}', b"\xff\xfe", b"NaN", b'{"batchId": "\xff"}'],
)
def test_not_json(raw: bytes) -> None:
    with pytest.raises(InvalidJson):
        parse_campaign(raw)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"[]", "(root)"),
        (b'"text"', "(root)"),
        (b'{"metadata": {"appId": 1}}', "batchId"),
        (b'{"batchId": 5, "metadata": {"appId": 1}}', "batchId"),
        (b'{"batchId": null, "metadata": {"appId": 1}}', "batchId"),
        (b'{"batchId": "b"}', "metadata"),
        (b'{"batchId": "b", "metadata": []}', "metadata"),
        (b'{"batchId": "b", "metadata": {}}', "metadata.appId"),
        (b'{"batchId": "b", "metadata": {"appId": "7"}}', "metadata.appId"),
        (b'{"batchId": "b", "metadata": {"appId": 7.5}}', "metadata.appId"),
        (b'{"batchId": "b", "metadata": {"appId": true}}', "metadata.appId"),
        (b'{"batchId": "b", "metadata": {"appId": 1, "campaignId": 3}}', "metadata.campaignId"),
        (
            b'{"batchId": "b", "metadata": {"appId": 1, "scheduledTime": "soon"}}',
            "metadata.scheduledTime",
        ),
        (
            b'{"batchId": "b", "metadata": {"appId": 1, "scheduledTime": 99999999999999999}}',
            "metadata.scheduledTime",
        ),
        (b'{"batchId": "b", "metadata": {"appId": 1}, "requestId": 5}', "requestId"),
        (b'{"batchId": "b", "metadata": {"appId": 1}, "senderId": []}', "senderId"),
        (b'{"batchId": "b", "metadata": {"appId": 1}, "recipients": {}}', "recipients"),
        (b'{"batchId": "b", "metadata": {"appId": 1}, "recipients": [{}, "x"]}', "recipients.1"),
        (
            b'{"batchId": "b", "metadata": {"appId": 1}, "recipients": [{"mobileNumber": 44}]}',
            "recipients.0.mobileNumber",
        ),
        (
            b'{"batchId": "b", "metadata": {"appId": 1}, "recipients": [{"message": ["x"]}]}',
            "recipients.0.message",
        ),
        (
            b'{"batchId": "b", "metadata": {"appId": 1}, "recipients": [{"customerId": 12}]}',
            "recipients.0.customerId",
        ),
    ],
)
def test_schema_violations_name_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(SchemaViolation) as caught:
        parse_campaign(raw)
    assert caught.value.field == field
    assert caught.value.detail


def test_scheduled_time_is_epoch_milliseconds() -> None:
    raw = body(metadata={"appId": 1, "scheduledTime": 1767225600123})
    assert parse_campaign(raw).scheduled_at == datetime(2026, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
    for now in (0, -5, None):
        raw = body(metadata={"appId": 1, "scheduledTime": now})
        assert parse_campaign(raw).scheduled_at is None


# -- metadata, byte for byte ----------------------------------------------------------------------

PRETTY_METADATA = (
    '{\n\t"appId" : 7 ,\n  "campaignId":"caf\\u00e9",  "emoji": "\\ud83d\\ude00 ☕",\n'
    '  "nested": {"a": [1, 2.50, 1e3, -0, {"b": null}], "s": "}{\\"]["},\n'
    '  "isHashed": false, "scheduledTime": 0\n}'
)


def test_metadata_text_is_kept_byte_for_byte() -> None:
    raw = '  {"batchId": "b",\r\n "metadata" :  ' + PRETTY_METADATA + ' , "recipients": []}  '
    campaign = parse_campaign(raw.encode())
    assert campaign.metadata_json == PRETTY_METADATA
    assert campaign.request.metadata.campaign_id == "café"
    # It is still the same JSON document.
    assert json.loads(campaign.metadata_json) == json.loads(raw)["metadata"]


def test_metadata_after_the_recipients_is_found() -> None:
    raw = (
        '{"recipients": [{"message": "{\\"metadata\\": 1}", "mobileNumber": "+447911123456"}],'
        ' "batchId": "b", "metadata": ' + PRETTY_METADATA + "}"
    )
    assert parse_campaign(raw.encode()).metadata_json == PRETTY_METADATA


def test_nested_metadata_keys_are_not_the_top_level_member() -> None:
    raw = '{"batchId": "b", "x": {"metadata": {"appId": 2}}, "metadata": {"appId": 1}}'
    assert parse_campaign(raw.encode()).metadata_json == '{"appId": 1}'


def test_repeated_metadata_member_reports_the_one_validated() -> None:
    # JSON parsers keep the last of repeated members; so must the report.
    raw = b'{"batchId": "b", "metadata": {"appId": 1}, "metadata": {"appId": 2 }}'
    campaign = parse_campaign(raw)
    assert campaign.request.metadata.app_id == 2
    assert campaign.metadata_json == '{"appId": 2 }'


def test_escaped_member_name_is_still_metadata() -> None:
    raw = b'{"batchId": "b", "m\\u0065tadata": {"appId": 3}}'
    assert parse_campaign(raw).metadata_json == '{"appId": 3}'


def test_top_level_members_spans() -> None:
    text = '{ "a" : [1, {"b": "]"}] , "c":"d",\n"e": {} }'
    spans = [(name, text[start:end]) for name, _, start, end in top_level_members(text)]
    assert spans == [("a", '[1, {"b": "]"}]'), ("c", '"d"'), ("e", "{}")]
    assert list(top_level_members(" {} ")) == []


def test_metadata_text_without_metadata_is_a_schema_violation() -> None:
    with pytest.raises(SchemaViolation):
        metadata_text('{"batchId": "b"}', {"appId": 1})


# -- records ---------------------------------------------------------------------------------------

NUMBERS = ["+447911123456", "447911123457", "07911 123458", "+44 7911 123459"]


def recipients(numbers: list[str]) -> list[dict[str, Any]]:
    return [
        {"message": f"Hello {i} ☀", "mobileNumber": n, "customerId": f"cust-{i}"}
        for i, n in enumerate(numbers)
    ]


def test_one_recipient_message_per_sendable_recipient() -> None:
    metadata_json = '{"appId": 7, "campaignId": "spring", "scheduledTime": 1767225600000}'
    raw = (
        '{"batchId": "batch-1", "requestId": "req-9", "senderId": "PROMO", "metadata": '
        + metadata_json
        + ', "recipients": '
        + json.dumps(recipients(NUMBERS))
        + "}"
    ).encode()
    _, records = records_for(raw)
    assert records.request_key == request_key("batch-1", "req-9")
    assert records.accepted == len(NUMBERS)
    assert records.rejections == [] and records.dispatches == []
    for index, ((key, value), number) in enumerate(zip(records.recipients, NUMBERS, strict=True)):
        e164 = to_e164(number, "GB")
        assert key == f"{TENANT}:{e164}".encode()
        expected = RecipientMessage(
            context=MessageContext(
                tenant=TENANT,
                message_id=message_id(TENANT, records.request_key, index, number),
                batch_id="batch-1",
                request_id="req-9",
                campaign_id="spring",
                customer_id=f"cust-{index}",
                mobile_number=number,
                metadata_json=metadata_json,
            ),
            destination=e164,
            text=f"Hello {index} ☀",
            sender_id="PROMO",
            scheduled_at=datetime(2026, 1, 1, tzinfo=UTC),
            accepted_at=ACCEPTED_AT,
        )
        # The template-built value is exactly what the model itself would write.
        assert value == expected.to_bytes()
        assert decode(RecipientMessage, value) == expected


def test_ids_are_deterministic_and_distinct() -> None:
    raw = body(requestId="req-1", recipients=recipients(NUMBERS + NUMBERS[:1]))
    _, first = records_for(raw)
    _, again = records_for(raw)
    assert first.recipients == again.recipients  # same accepted_at: identical bytes
    ids = [decode(RecipientMessage, v).context.message_id for _, v in first.recipients]
    assert len(set(ids)) == len(ids)  # even the repeated number at another index


DOCUMENTED_RECIPIENTS = [
    {"message": "Hello Ann", "mobileNumber": "447911123456", "customerId": "cust-1"},
    {"message": "Hello Bob", "mobileNumber": "+447911123457", "customerId": "cust-2"},
]


def test_the_documented_body_is_the_specs_text() -> None:
    if SPEC.exists():  # the spec lives beside the repository
        assert SECTION_3_2 in SPEC.read_text(encoding="utf-8")
    assert parse_campaign(campaign_body(DOCUMENTED_RECIPIENTS)).recipients == DOCUMENTED_RECIPIENTS


def message_ids(records: CampaignRecords) -> list[str]:
    return [decode(RecipientMessage, value).context.message_id for _, value in records.recipients]


def test_two_batches_sharing_a_request_id_are_two_requests() -> None:
    """Issue 14, point 1: keyed on requestId alone, the second batch was taken for a retry."""
    first, first_records = records_for(campaign_body(DOCUMENTED_RECIPIENTS, batch_id="batch-1"))
    second, second_records = records_for(campaign_body(DOCUMENTED_RECIPIENTS, batch_id="batch-2"))
    assert first.identity != second.identity
    assert not set(message_ids(first_records)) & set(message_ids(second_records))
    # A true retry (same ids, same content, other whitespace) is the same request.
    retry, retry_records = records_for(compact_of(campaign_body(DOCUMENTED_RECIPIENTS)))
    assert retry.identity == first.identity
    assert message_ids(retry_records) == message_ids(first_records)


def compact_of(raw: bytes) -> bytes:
    return json.dumps(json.loads(raw), separators=(",", ":")).encode()


def test_request_identity_of_each_combination_of_ids() -> None:
    assert parse_campaign(body(requestId="r", batchId="b")).identity == request_key("b", "r")
    assert parse_campaign(body(requestId="", batchId="b")).identity == "b:b"
    assert parse_campaign(body(batchId="b")).identity == "b:b"
    assert parse_campaign(body(batchId="", requestId="r")).identity == "r:r"
    # Whatever the ids contain, two different pairs never share a key.
    assert request_key("a:b", "c") != request_key("a", "b:c")
    assert request_key('a","b', "c") != request_key("a", 'b","c')


def auto_reply(recipients: list[dict[str, str]], request_id: str | None = None) -> bytes:
    return campaign_body(
        recipients, batch_id="", request_id=request_id, metadata=AUTO_REPLY_METADATA
    )


def test_an_id_less_request_is_known_by_its_content_whatever_the_whitespace() -> None:
    """Issue 14, point 2: whitespace variants of one signed body were three requests."""
    documented = auto_reply(DOCUMENTED_RECIPIENTS)
    variants = [
        documented,
        compact_of(documented),
        json.dumps(json.loads(documented), indent=4, ensure_ascii=False).encode() + b"\n",
    ]
    assert len(set(variants)) == 3
    parsed = [parse_campaign(variant) for variant in variants]
    assert all(campaign.by_content for campaign in parsed)
    expected = content_key(orjson.dumps(orjson.loads(documented), option=orjson.OPT_SORT_KEYS))
    assert {campaign.identity for campaign in parsed} == {expected}
    # requestId "" is no id either; other words are another request.
    assert parse_campaign(auto_reply(DOCUMENTED_RECIPIENTS, request_id="")).by_content
    other = [{**DOCUMENTED_RECIPIENTS[0], "message": "Hello again"}]
    assert parse_campaign(auto_reply(other)).identity != expected


def test_an_id_less_requests_message_ids_carry_its_first_acceptance() -> None:
    """Issue 14, point 1: the same auto reply a day later must not share the first's ids (the
    sender would take it for a repeat)."""
    campaign = parse_campaign(auto_reply(DOCUMENTED_RECIPIENTS))
    settings = tenant_settings()

    def ids_at(first_accepted_ms: int) -> list[str]:
        return message_ids(
            build_records(
                tenant=TENANT,
                settings=settings,
                campaign=campaign,
                read=reader("GB", "international"),
                accepted_at=ACCEPTED_AT,
                request_key=content_request_key(campaign.identity, first_accepted_ms),
            )
        )

    today = ids_at(1_767_225_600_000)
    assert ids_at(1_767_225_600_000) == today
    assert not set(ids_at(1_767_225_600_000 + 86_400_000)) & set(today)


def test_a_body_nested_beyond_what_can_be_re_serialised_is_a_schema_violation() -> None:
    deep = b'{"batchId": "", "metadata": {"appId": 1}, "x": ' + b"[" * 300 + b"]" * 300 + b"}"
    with pytest.raises(SchemaViolation, match="nested too deeply"):
        parse_campaign(deep)


def test_auto_replies_are_valid() -> None:
    raw = body(
        batchId="",
        metadata={"appId": 1, "brandId": "", "campaignId": ""},
        recipients=[{"message": "Thanks!", "mobileNumber": "+447911123456"}],
    )
    campaign, records = records_for(raw)
    assert records.accepted == 1
    message = decode(RecipientMessage, records.recipients[0][1])
    assert (message.context.batch_id, message.context.campaign_id) == ("", "")
    assert message.context.customer_id == ""
    assert message.context.request_id is None
    # Two different auto replies do not collide.
    other = body(
        batchId="",
        metadata={"appId": 1, "brandId": "", "campaignId": ""},
        recipients=[{"message": "Thanks again!", "mobileNumber": "+447911123456"}],
    )
    assert parse_campaign(other).identity != campaign.identity


@pytest.mark.parametrize("sender", [..., None, ""])
def test_sender_id_falls_back_to_the_tenant_default(sender: Any) -> None:
    raw = body(senderId=sender, recipients=recipients(NUMBERS[:1]))
    _, records = records_for(raw, default_sender_id="TENANT-DEFAULT")
    assert decode(RecipientMessage, records.recipients[0][1]).sender_id == "TENANT-DEFAULT"


def test_unsendable_recipients_are_rejected_with_a_failed_dispatch() -> None:
    raw = body(
        requestId="req-2",
        recipients=[
            {"message": "ok", "mobileNumber": "+447911123456", "customerId": "ok"},
            {"message": "x", "mobileNumber": "12345", "customerId": "invalid"},
            {"message": "x", "customerId": "missing"},
            {"message": "x", "mobileNumber": None, "customerId": "null"},
            {"message": "x", "mobileNumber": "   ", "customerId": "blank-number"},
            {"message": " \n\t", "mobileNumber": "+447911123457", "customerId": "blank"},
            {"mobileNumber": "+447911123458", "customerId": "no-message"},
            {"message": "", "mobileNumber": "+447911123459"},
        ],
    )
    _, records = records_for(raw)
    assert records.accepted == 1
    assert [(r.index, r.reason, r.sub_status.value) for r in records.rejections] == [
        (1, "not a valid mobile number", "InvalidNumber"),
        (2, MISSING_NUMBER, "InvalidNumber"),
        (3, MISSING_NUMBER, "InvalidNumber"),
        (4, "empty mobile number", "InvalidNumber"),
        (5, EMPTY_MESSAGE, "EmptyMessage"),
        (6, EMPTY_MESSAGE, "EmptyMessage"),
        (7, EMPTY_MESSAGE, "EmptyMessage"),
    ]
    assert records.rejections[0].as_json() == {
        "index": 1,
        "reason": "not a valid mobile number",
    }
    numbers = ["12345", "", "", "   ", "+447911123457", "+447911123458", "+447911123459"]
    for (key, value), rejection, number in zip(
        records.dispatches, records.rejections, numbers, strict=True
    ):
        record = decode(DispatchRecord, value)
        identifier = message_id(TENANT, records.request_key, rejection.index, number)
        assert key == f"message:{identifier}".encode()
        assert record.correlation_key == f"message:{identifier}"
        assert record.context.message_id == identifier
        assert record.context.mobile_number == number
        assert (record.outcome, record.sub_status, record.detail) == (
            "failed",
            rejection.sub_status.value,
            rejection.reason,
        )
        assert record.context.metadata_json == json.dumps(METADATA, separators=(",", ":"))
        sendable_number = rejection.sub_status.value == "EmptyMessage"
        assert record.destination == (to_e164(number, "GB") if sendable_number else "")


def test_fast_normaliser_builds_the_same_records() -> None:
    raw = body(requestId="req-3", recipients=recipients([*NUMBERS, "12345", "0044 7911 123456"]))
    campaign = parse_campaign(raw)
    reference = build_records(
        tenant=TENANT,
        settings=tenant_settings(),
        campaign=campaign,
        read=partial(read_number, default_region="GB", bare_digits="international"),
        accepted_at=ACCEPTED_AT,
    )
    fast = build_records(
        tenant=TENANT,
        settings=tenant_settings(),
        campaign=campaign,
        read=reader("GB", "international"),
        accepted_at=ACCEPTED_AT,
    )
    assert fast == reference


# -- bare digits (issue 14, point 5) ---------------------------------------------------------------

# Singapore +65 9623 4567 written as Optimove writes international numbers (optimove-sms-api.md
# §5: "44123456789"), which is also a valid US number, +1 659-623-4567.
SINGAPORE_BARE = "6596234567"
BARE_DIGIT_RECIPIENTS = [
    {"message": "Hi", "mobileNumber": SINGAPORE_BARE, "customerId": "sg"},
    {"message": "Hi", "mobileNumber": "+16596234567", "customerId": "us-plus"},
    {"message": "Hi", "mobileNumber": "447911123456", "customerId": "gb-bare"},
    {"message": "Hi", "mobileNumber": "2025550123", "customerId": "us-national"},
    # The documented example itself: no valid number either way (libphonenumber), so refused,
    # never sent to a number of the tenant's own country.
    {"message": "Hi", "mobileNumber": "44123456789", "customerId": "documented"},
]


def destinations(records: CampaignRecords) -> dict[str, str]:
    return {
        message.context.customer_id: message.destination
        for message in (decode(RecipientMessage, value) for _, value in records.recipients)
    }


def test_bare_digits_are_international_by_default_and_the_answer_says_which() -> None:
    """Issue 14, point 5: for a US tenant 6596234567 became +16596234567, another person."""
    assert tenant_settings().bare_digits == "international"
    _, records = records_for(campaign_body(BARE_DIGIT_RECIPIENTS), default_region="US")
    assert destinations(records) == {
        "sg": "+6596234567",
        "us-plus": "+16596234567",
        "gb-bare": "+447911123456",  # valid only internationally: not ambiguous
        "us-national": "+12025550123",  # +20 25550123 is no number: not ambiguous
    }
    assert [(r.index, r.reason) for r in records.rejections] == [(4, "not a valid mobile number")]
    assert (records.ambiguous, records.ambiguous_read_as) == ([0], "international")


def test_bare_digits_national_keeps_the_old_reading_and_still_says_so() -> None:
    _, records = records_for(
        campaign_body(BARE_DIGIT_RECIPIENTS), default_region="US", bare_digits="national"
    )
    assert destinations(records)["sg"] == "+16596234567"
    assert (records.ambiguous, records.ambiguous_read_as) == ([0], "national")


def test_an_ambiguous_number_with_an_empty_message_is_not_listed() -> None:
    recipients = [{"message": " ", "mobileNumber": SINGAPORE_BARE, "customerId": "sg"}]
    _, records = records_for(campaign_body(recipients), default_region="US")
    assert records.ambiguous == []
    assert decode(DispatchRecord, records.dispatches[0][1]).destination == "+6596234567"


def test_auto_replies_and_listed_campaigns_go_to_the_priority_topic() -> None:
    """Issue 17: they must not queue behind a bulk backlog on sms.recipients."""
    auto_reply = campaign_body(DOCUMENTED_RECIPIENTS, batch_id="", metadata=AUTO_REPLY_METADATA)
    assert records_for(auto_reply)[1].priority
    campaign = campaign_body(DOCUMENTED_RECIPIENTS)
    assert not records_for(campaign)[1].priority
    listed = campaign_body(DOCUMENTED_RECIPIENTS, metadata={"campaignId": "vip"})
    assert records_for(listed, priority_campaigns=["vip"])[1].priority
    assert recipients_topic(True) is PRIORITY_RECIPIENTS
    assert recipients_topic(False) is RECIPIENTS
