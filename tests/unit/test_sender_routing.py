"""The sender's pure decisions: routes, due time and expiry, the retry schedule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.sender.routing import (
    Exhausted,
    UseRoute,
    WaitForCircuit,
    choose_route,
    due_at,
    expires_at,
    is_expired,
    routes_for,
)
from shared.config import Route
from shared.contract.events import MessageContext, RecipientMessage
from shared.logs import scrub
from shared.retry import RetryPolicy
from tests.support import TENANT, make_settings

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def message(
    scheduled_at: datetime | None = None, accepted_at: datetime = START
) -> RecipientMessage:
    return RecipientMessage(
        context=MessageContext(
            tenant=TENANT, message_id="m-1", batch_id="b", mobile_number="1", metadata_json="{}"
        ),
        destination="+447700900123",
        text="hello",
        sender_id="",
        scheduled_at=scheduled_at,
        accepted_at=accepted_at,
    )


def test_routes_serve_matching_prefixes_lowest_priority_first() -> None:
    settings = make_settings(
        overrides={
            "providers": {
                "second": {
                    "kind": "otpiq",
                    "base_url": "http://127.0.0.1:9",
                    "api_key": "k",
                    "callback_token": "t",
                },
                "third": {
                    "kind": "otpiq",
                    "base_url": "http://127.0.0.1:9",
                    "api_key": "k",
                    "callback_token": "t",
                },
            },
            "tenants": {
                TENANT: {
                    "routes": [
                        {"provider": "otpiq-main", "priority": 200},
                        {"provider": "second", "prefixes": ["964"], "priority": 10},
                        {"provider": "third", "priority": 200},
                    ]
                }
            },
        }
    )
    tenant = settings.tenants[TENANT]
    assert [r.provider for r in routes_for(tenant, "+9647501234567")] == [
        "second",
        "otpiq-main",
        "third",  # equal priorities keep their configured order
    ]
    assert [r.provider for r in routes_for(tenant, "+447700900123")] == ["otpiq-main", "third"]


def test_due_time_and_expiry_use_the_schedule_when_there_is_one() -> None:
    scheduled = START + timedelta(hours=30)
    assert due_at(message(scheduled_at=scheduled)) == scheduled
    assert due_at(message()) == START
    # Naive times are read as UTC rather than failing the comparison.
    assert due_at(message(accepted_at=START.replace(tzinfo=None))) == START
    day = 24 * 3600.0
    assert expires_at(message(), day) == START + timedelta(days=1)
    assert not is_expired(message(), day, START + timedelta(hours=24))
    assert is_expired(message(), day, START + timedelta(hours=24, seconds=1))
    assert not is_expired(message(scheduled_at=scheduled), day, START + timedelta(hours=40))


def test_retry_waits_grow_exponentially_to_the_cap_with_full_jitter() -> None:
    schedule = RetryPolicy(max_attempts=5, base_s=0.5, cap_s=4.0)
    assert [schedule.ceiling(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for attempt in range(1, 7):
        for _ in range(50):
            assert 0.0 <= schedule.delay(attempt) <= schedule.ceiling(attempt)
    # The jitter spreads retries: not every draw is the same.
    assert len({round(schedule.delay(3), 6) for _ in range(20)}) > 1
    assert schedule.delay(2, jitter=lambda ceiling: ceiling) == 1.0


def test_a_providers_retry_after_wins_when_longer() -> None:
    schedule = RetryPolicy(base_s=0.5, cap_s=4.0)
    assert schedule.delay(1, retry_after_s=60.0) == 60.0
    assert schedule.delay(3, retry_after_s=0.1, jitter=lambda ceiling: ceiling) == 2.0


def test_attempts_per_route_are_counted() -> None:
    schedule = RetryPolicy(max_attempts=3)
    assert [schedule.may_retry(n) for n in (1, 2, 3)] == [True, True, False]


ROUTES = [Route(provider="a", priority=1), Route(provider="b", priority=2)]


def test_the_first_route_not_given_up_on_and_not_blocked_is_used() -> None:
    assert choose_route(ROUTES, [], lambda _: None) == UseRoute(ROUTES[0])
    assert choose_route(ROUTES, ["a"], lambda _: None) == UseRoute(ROUTES[1])
    blocked = {"a": 50.0}
    assert choose_route(ROUTES, [], blocked.get) == UseRoute(ROUTES[1])


def test_when_every_route_left_is_blocked_the_message_waits_for_the_first_to_reopen() -> None:
    blocked = {"a": 50.0, "b": 20.0}
    assert choose_route(ROUTES, [], blocked.get) == WaitForCircuit(20.0)
    assert choose_route(ROUTES, ["b"], blocked.get) == WaitForCircuit(50.0)


def test_every_route_given_up_on_is_exhausted() -> None:
    assert choose_route(ROUTES, ["a", "b"], lambda _: None) == Exhausted()
    assert choose_route([], [], lambda _: None) == Exhausted()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bad number +447700900123 (code 1001)", "bad number +4477******23 (code 1001)"),
        ("HTTP 503", "HTTP 503"),
    ],
)
def test_scrub_masks_long_digit_runs_only(text: str, expected: str) -> None:
    assert scrub(text) == expected
