"""Ingress' fast paths give exactly the answers of the slow references they replace."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import orjson
import phonenumbers
import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE, SUPPORTED_REGIONS

from services.ingress.batch import build_records, parse_campaign
from services.ingress.e164 import fast_read, reader
from shared.config import TenantSettings
from shared.contract.events import MessageContext, RecipientMessage
from shared.contract.ids import message_id
from shared.contract.numbers import BareDigits, InvalidNumber, read_number, to_e164
from shared.kafka.batches import murmur2, partition_for

REGIONS = sorted(SUPPORTED_REGIONS)
CALLING_CODES = sorted(COUNTRY_CODE_TO_REGION_CODE)
# Regions with national prefixes, transform rules, shared calling codes, leading digits.
INTERESTING_REGIONS = ["GB", "US", "CA", "DE", "FR", "IT", "IQ", "JE", "AR", "MX", "BR", "RU", "AU"]


def verdict(function: object, raw: str, region: str, *args: object) -> str:
    assert callable(function)
    try:
        return str(function(raw, region, *args))
    except InvalidNumber as exc:
        return f"invalid: {exc}"


def e164_verdict(raw: str, region: str, bare_digits: BareDigits) -> str:
    try:
        return fast_read(raw, region, bare_digits).e164
    except InvalidNumber as exc:
        return f"invalid: {exc}"


READINGS: tuple[BareDigits, ...] = ("international", "national")


def assert_same(raw: str, region: str) -> None:
    """The fast path reads as the reference does, both ways of reading bare digits; read
    internationally, that is ``to_e164``'s answer (the reading of the normalizer's replies)."""
    for bare_digits in READINGS:
        fast = verdict(fast_read, raw, region, bare_digits)
        assert fast == verdict(read_number, raw, region, bare_digits), (raw, region, bare_digits)
    reference = verdict(to_e164, raw, region)
    assert e164_verdict(raw, region, "international") == reference, (raw, region)


def spellings(rng: random.Random, country_code: int, national: str) -> list[str]:
    """The ways a tenant may have stored one number."""
    written = [f"+{country_code}{national}", f"{country_code}{national}", f"0{national}", national]
    spaced = []
    for text in filter(None, written):
        out = [text[0]]
        for char in text[1:]:
            if char.isdigit() and out[-1].isdigit() and rng.random() < 0.2:
                out.append(rng.choice(" -"))
            out.append(char)
        spaced.append("".join(out))
    return written + spaced + [f" {written[0]}\t"]


def test_agrees_with_to_e164_on_real_and_mutated_numbers() -> None:
    rng = random.Random(20260301)
    checked = valid = 0
    for region in REGIONS:
        for number_type in (
            phonenumbers.PhoneNumberType.MOBILE,
            phonenumbers.PhoneNumberType.FIXED_LINE,
            phonenumbers.PhoneNumberType.TOLL_FREE,
        ):
            example = phonenumbers.example_number_for_type(region, number_type)
            if example is None or example.country_code is None:
                continue
            national = phonenumbers.national_significant_number(example)
            mutated = national[: -rng.randint(1, 4)] + "".join(
                rng.choice("0123456789") for _ in range(rng.randint(0, 5))
            )
            for candidate in (national, mutated):
                for raw in spellings(rng, example.country_code, candidate):
                    default_region = rng.choice([region, rng.choice(INTERESTING_REGIONS)])
                    assert_same(raw, default_region)
                    checked += 1
                    valid += not verdict(to_e164, raw, default_region).startswith("invalid")
    # The sample must exercise both verdicts broadly.
    assert checked > 5_000
    assert valid > 1_000, valid


def test_agrees_with_to_e164_on_random_digit_strings() -> None:
    rng = random.Random(7)
    for _ in range(3_000):
        prefix = rng.choice(["", "+", "0", "00", "+0"])
        prefix += rng.choice(["", str(rng.choice(CALLING_CODES))])
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 18)))
        assert_same(prefix + digits, rng.choice(INTERESTING_REGIONS + REGIONS[:20]))


@given(
    st.text(alphabet="+0123456789 -()./x", min_size=0, max_size=22),
    st.sampled_from([*INTERESTING_REGIONS, "ZZ", "gb", "XX"]),
)
@settings(max_examples=2_000, deadline=None)
def test_agrees_with_to_e164_on_arbitrary_spellings(raw: str, region: str) -> None:
    assert_same(raw, region)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+447911123456", "+447911123456"),
        ("447911123456", "+447911123456"),
        ("07911 123456", "+447911123456"),
        ("+44 7911-123456", "+447911123456"),
        ("9647501234567", "+9647501234567"),
    ],
)
def test_examples(raw: str, expected: str) -> None:
    for bare_digits in READINGS:
        assert fast_read(raw, "GB", bare_digits) == (expected, False)


@pytest.mark.parametrize(
    ("raw", "region", "international", "national"),
    [
        # Singapore +65 9623 4567, or a US number: issue 14, point 5.
        ("6596234567", "US", "+6596234567", "+16596234567"),
        ("65 9623-4567", "US", "+6596234567", "+16596234567"),
    ],
)
def test_bare_digits_valid_both_ways_are_read_as_configured_and_flagged(
    raw: str, region: str, international: str, national: str
) -> None:
    assert fast_read(raw, region, "international") == (international, True)
    assert fast_read(raw, region, "national") == (national, True)
    # With a "+" or a national "0" there is nothing to choose.
    assert fast_read("+" + raw, region, "national") == (international, False)
    read = reader(region, "international")
    assert read(raw) == (international, True)


def test_invalid_numbers_carry_the_references_reason() -> None:
    for bare_digits in READINGS:
        with pytest.raises(InvalidNumber, match="not a valid mobile number"):
            fast_read("12345", "GB", bare_digits)
        with pytest.raises(InvalidNumber, match="empty mobile number"):
            fast_read("  ", "GB", bare_digits)
        # optimove-sms-api.md §5's example: no valid number either way, for any tenant.
        for region in ("GB", "US", "SG"):
            with pytest.raises(InvalidNumber, match="not a valid mobile number"):
                fast_read("44123456789", region, bare_digits)


@given(st.binary(max_size=64))
@settings(max_examples=500, deadline=None)
def test_murmur2_matches_aiokafka(data: bytes) -> None:
    assert murmur2(data) == aiokafka_murmur2(data)


@given(st.binary(min_size=1, max_size=40), st.integers(min_value=1, max_value=64))
@settings(max_examples=500, deadline=None)
def test_partition_matches_the_default_partitioner(key: bytes, count: int) -> None:
    partitions = list(range(count))
    assert partition_for(key, partitions) == DefaultPartitioner()(key, partitions, partitions)


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.text(min_size=1), min_size=1, max_size=5),
    customer_id=st.text(),
    request_field=st.text(),
    scheduled=st.booleans(),
)
def test_recipient_values_are_exactly_the_models_bytes(
    texts: list[str], customer_id: str, request_field: str, scheduled: bool
) -> None:
    """build_records fills a template; each value must be what RecipientMessage would write."""
    metadata = {"appId": 7, "campaignId": request_field, "scheduledTime": 1767225600123}
    if not scheduled:
        del metadata["scheduledTime"]
    recipients = [
        {"message": text, "mobileNumber": f"+4474000000{i:02d}", "customerId": customer_id}
        for i, text in enumerate(texts)
    ]
    body = orjson.dumps(
        {
            "batchId": request_field,
            "metadata": metadata,
            "recipients": recipients,
            "requestId": request_field or "r",
            "senderId": request_field[:11] or None,
        }
    )
    campaign = parse_campaign(body)
    settings_ = TenantSettings(
        optimove_base_url="http://127.0.0.1:9/t",
        api_token="t",
        secret_key="s",
        aggregator_api_key="k",
        default_sender_id="ACME",
        routes=[{"provider": "p"}],
    )
    accepted_at = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)
    records = build_records(
        tenant="acme",
        settings=settings_,
        campaign=campaign,
        read=lambda raw: read_number(raw, "GB", "international"),
        accepted_at=accepted_at,
    )
    sendable = [(i, r) for i, r in enumerate(recipients) if r["message"].strip()]
    assert len(records.recipients) == len(sendable)
    for (key, value), (index, recipient) in zip(records.recipients, sendable, strict=True):
        expected = RecipientMessage(
            context=MessageContext(
                tenant="acme",
                message_id=message_id("acme", campaign.identity, index, recipient["mobileNumber"]),
                batch_id=request_field,
                request_id=request_field or "r",
                campaign_id=request_field,
                customer_id=customer_id,
                mobile_number=recipient["mobileNumber"],
                metadata_json=campaign.metadata_json,
            ),
            destination=recipient["mobileNumber"],
            text=recipient["message"],
            sender_id=request_field[:11] or "ACME",
            scheduled_at=campaign.scheduled_at,
            accepted_at=accepted_at,
        )
        assert value == expected.to_bytes()
        assert key == f"acme:{recipient['mobileNumber']}".encode()
