"""The campaign simulator builds requests as Optimove does and judges the tally correctly."""

from __future__ import annotations

import re

import orjson
import phonenumbers
import pytest

from shared.contract import ids
from shared.contract.numbers import InvalidNumber, to_e164
from shared.contract.signing import verify
from simulators.campaign_load import (
    INVALID_NUMBER,
    Campaign,
    build_campaign,
    judge,
    sample_numbers,
    signed_headers,
)


def test_sample_numbers_are_valid_distinct_gb_mobiles() -> None:
    numbers = sample_numbers(500, seed=3)

    assert len(numbers) == 500
    e164 = [to_e164(number, "GB") for number in numbers]
    assert len(set(e164)) == 500
    for number in e164:
        parsed = phonenumbers.parse(number)
        assert phonenumbers.region_code_for_number(parsed) in {"GB", "GG", "JE", "IM"}
        assert phonenumbers.number_type(parsed) == phonenumbers.PhoneNumberType.MOBILE


def test_sample_numbers_mix_the_formats_optimove_may_send() -> None:
    numbers = sample_numbers(50, seed=3)

    patterns = {
        "e164": r"\+447\d{9}",
        "digits": r"447\d{9}",
        "national": r"07\d{9}",
        "national spaced": r"07\d{3} \d{3} \d{3}",
        "international spaced": r"\+44 7\d{3} \d{6}",
    }
    for name, pattern in patterns.items():
        assert any(re.fullmatch(pattern, n) for n in numbers), name
    assert all(any(re.fullmatch(p, n) for p in patterns.values()) for n in numbers)


def test_sample_numbers_are_deterministic_per_seed() -> None:
    assert sample_numbers(20, seed=1) == sample_numbers(20, seed=1)
    assert sample_numbers(20, seed=1) != sample_numbers(20, seed=2)
    assert sample_numbers(5, seed=1) == sample_numbers(20, seed=1)[:5]


def campaign(recipients: int = 7, batch_size: int = 3, failures: bool = False) -> Campaign:
    return build_campaign(
        tenant="dev",
        recipients=recipients,
        batch_size=batch_size,
        sender_id="DEVSMS",
        campaign_id="sim-test",
        seed=5,
        scheduled_ms=1_700_000_000_000,
        with_expected_failures=failures,
    )


def test_batches_carry_everything_optimove_sends() -> None:
    built = campaign()

    assert [b.recipients for b in built.batches] == [3, 3, 1]
    bodies = [orjson.loads(b.body) for b in built.batches]
    assert len({b["batchId"] for b in bodies}) == 3
    assert len({b["requestId"] for b in bodies}) == 3
    customers = [r["customerId"] for body in bodies for r in body["recipients"]]
    assert customers == [f"cust-{i}" for i in range(7)]
    for body, batch in zip(bodies, built.batches, strict=True):
        assert body["batchId"] == batch.batch_id
        assert body["requestId"] == batch.request_id
        assert body["senderId"] == "DEVSMS"
        metadata = body["metadata"]
        assert metadata["campaignId"] == "sim-test"
        assert metadata["scheduledTime"] == 1_700_000_000_000
        assert isinstance(metadata["appId"], int)
        assert isinstance(metadata["tenantId"], int)
        assert metadata["isHashed"] is False
        for recipient in body["recipients"]:
            assert recipient["message"]
            to_e164(recipient["mobileNumber"], "GB")


def test_request_ids_give_distinct_message_ids() -> None:
    built = campaign()
    message_ids = set()
    for batch in built.batches:
        body = orjson.loads(batch.body)
        key = ids.request_key(body["batchId"], body["requestId"])
        assert key is not None
        for index, recipient in enumerate(body["recipients"]):
            message_ids.add(ids.message_id("dev", key, index, recipient["mobileNumber"]))
    assert len(message_ids) == 7


def test_signed_headers_verify_against_the_raw_body() -> None:
    body = campaign().batches[0].body
    headers = signed_headers(body, "dev-shared-secret", "dev-aggregator-key")

    assert headers["X-API-Key"] == "dev-aggregator-key"
    assert headers["content-type"] == "application/json"
    assert verify(body, headers["x-hub-signature"], "dev-shared-secret") is None
    # Not compact JSON: the raw bytes are what is signed, as with Optimove's own requests.
    assert body != orjson.dumps(orjson.loads(body))


def test_expected_failures_are_unsendable_recipients() -> None:
    built = campaign(recipients=80, batch_size=50, failures=True)
    recipients = {
        r["customerId"]: r for b in built.batches for r in orjson.loads(b.body)["recipients"]
    }

    assert sorted(built.expected_failures.values()) == ["EmptyMessage"] * 2 + ["InvalidNumber"] * 2
    for customer_id, sub_status in built.expected_failures.items():
        recipient = recipients[customer_id]
        if sub_status == "InvalidNumber":
            assert recipient["mobileNumber"] == INVALID_NUMBER
            with pytest.raises(InvalidNumber):
                to_e164(recipient["mobileNumber"], "GB")
        else:
            assert recipient["message"] == ""


def test_campaign_rejects_nonsense_sizes() -> None:
    with pytest.raises(ValueError):
        campaign(recipients=0)
    with pytest.raises(ValueError):
        campaign(batch_size=0)


TALLY = {
    "reports": 20,
    "final": 10,
    "delivered": 8,
    "failed": 2,
    "final_by_status": {"Delivered": {"Delivered": 8}, "Failed": {"Expired": 1, "Rejected": 1}},
    "duplicates": 0,
}


def test_judge_complete_campaign() -> None:
    verdict = judge(TALLY, expected=10)
    assert verdict.ok
    assert (verdict.delivered, verdict.failed, verdict.missing) == (8, 2, 0)
    assert verdict.failed_by_sub_status == {"Expired": 1, "Rejected": 1}


def test_judge_missing_and_duplicate_reports() -> None:
    verdict = judge({**TALLY, "duplicates": 1}, expected=12)
    assert not verdict.ok
    assert verdict.missing == 2
    assert verdict.duplicates == 1
    assert len(verdict.problems) == 2


def test_judge_counts_wrong_expected_failures_as_problems() -> None:
    verdict = judge(TALLY, expected=10, wrong_failures=["cust-19: expected Failed/InvalidNumber"])
    assert not verdict.ok
