"""The HTTP-status fallback and message reading every provider module shares."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from shared.contract.statuses import SubStatus
from shared.providers import PROVIDER_KINDS
from shared.providers.base import fallback_error, first_message, http_error

INVALID_NUMBER = re.compile(r"\binvalid\b.*\bnumber\b", re.I)


@pytest.mark.parametrize(
    ("status", "message", "retryable", "sub_status", "detail"),
    [
        (401, "Unauthorized", True, SubStatus.PROVIDER_ERROR, "Unauthorized"),
        (403, "", True, SubStatus.PROVIDER_ERROR, "HTTP 403"),
        (429, "Too many requests", True, SubStatus.PROVIDER_ERROR, "Too many requests"),
        (500, "", True, SubStatus.PROVIDER_ERROR, "HTTP 500"),
        (503, "Invalid number", True, SubStatus.PROVIDER_ERROR, "Invalid number"),
        (400, "invalid phone number", False, SubStatus.INVALID_NUMBER, "invalid phone number"),
        (200, "Invalid number", False, SubStatus.INVALID_NUMBER, "Invalid number"),
        (200, "Sender ID not approved", False, SubStatus.REJECTED, "Sender ID not approved"),
        (404, "Not found", False, SubStatus.REJECTED, "Not found"),
        (302, "", False, SubStatus.REJECTED, "HTTP 302"),
    ],
)
def test_fallback_follows_the_status_then_the_text(
    status: int, message: str, retryable: bool, sub_status: str, detail: str
) -> None:
    error = fallback_error(status, message, 7.0, INVALID_NUMBER)
    assert error.retryable is retryable
    assert error.sub_status == sub_status
    assert error.detail == detail
    assert error.status_code == status
    # Only a retry waits; a terminal error has nothing to wait for.
    assert error.retry_after_s == (7.0 if retryable else None)
    assert not error.maybe_accepted


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"message": "  first  ", "error": "second"}, "first"),
        ({"message": " ", "error": "second"}, "second"),
        ({"message": 42, "error": {"message": "nested"}}, "nested"),
        ({"error": {"code": 1}, "detail": "detail"}, "detail"),
        ({"title": "not one of the fields"}, ""),
        ({"message": "x" * 250}, "x" * 200),
    ],
)
def test_first_message_takes_the_first_text_among_the_fields(
    body: dict[str, Any], expected: str
) -> None:
    assert first_message(body, ("message", "error", "detail")) == expected


def test_only_opensms_is_matched_by_number_and_keys_its_sends_so() -> None:
    assert {kind for kind, cls in PROVIDER_KINDS.items() if cls.matched_by_number} == {"opensms"}
    opensms, otpiq = PROVIDER_KINDS["opensms"], PROVIDER_KINDS["otpiq"]
    # The send answer's id does not change the key: a report cannot know whether there was one.
    assert opensms.correlation_key("ke", "", "+254712345678") == "ke:+254712345678"
    assert opensms.correlation_key("ke", "msg_1", "+254712345678") == "ke:+254712345678"
    assert otpiq.correlation_key("iq", "sms-1", "+9647501234567") == "iq:sms-1"


def test_a_retry_after_date_is_honoured_like_seconds() -> None:
    """One Retry-After reading for every provider: the HTTP-date form counts too (RFC 9110)."""
    in_two_minutes = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)

    dated = http_error(503, "busy", retry_after=in_two_minutes)
    counted = http_error(429, "slow down", retry_after="7")

    assert dated.retryable and dated.retry_after_s is not None
    assert 115.0 <= dated.retry_after_s <= 120.0
    assert counted.retry_after_s == 7.0
    assert http_error(503, "busy", retry_after="inf").retry_after_s is None
    assert not http_error(408, "timeout").retryable  # only 429 and 5xx are asked again
