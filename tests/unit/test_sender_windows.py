"""Send windows (services/sender/windows.py): the recipient's local time from the number, allowed
hours per weekday, dates with no sending, per-country overrides, several possible zones."""

from __future__ import annotations

from datetime import datetime

import pytest

from services.sender.windows import opens_at, window_for, zones_of
from shared.config import SendWindow
from shared.contract.events import MessageContext, RecipientMessage
from tests.support import TENANT, make_settings

PARIS = "+33612345678"
LONDON = "+447700900123"
NEW_YORK = "+12025550123"
RUSSIA = "+79161234567"  # a mobile number: any of Russia's zones

FRENCH_RULES = SendWindow.model_validate(
    {
        "hours": {day: ["08:00-20:00"] for day in ("mon", "tue", "wed", "thu", "fri")}
        | {"sat": ["10:00-12:00", "14:00-18:00"]},
        "closed_dates": ["2026-12-25"],
    }
)


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_open_hours_in_the_recipients_time_are_open() -> None:
    assert opens_at(FRENCH_RULES, PARIS, at("2026-12-24T19:30+01:00")) is None


def test_after_hours_it_opens_next_allowed_day_skipping_a_closed_date() -> None:
    # Thursday 20:30 in Paris; Friday is Christmas (closed): Saturday 10:00.
    assert opens_at(FRENCH_RULES, PARIS, at("2026-12-24T20:30+01:00")) == at(
        "2026-12-26T10:00+01:00"
    )
    # Saturday's lunch break: 14:00 the same day.
    assert opens_at(FRENCH_RULES, PARIS, at("2026-12-26T12:00+01:00")) == at(
        "2026-12-26T14:00+01:00"
    )
    # Sunday is left out: Monday 08:00.
    assert opens_at(FRENCH_RULES, PARIS, at("2026-12-27T09:00+01:00")) == at(
        "2026-12-28T08:00+01:00"
    )


def test_the_same_instant_is_judged_in_each_recipients_own_time() -> None:
    instant = at("2026-12-23T19:30+00:00")  # 20:30 in Paris, 19:30 in London, 14:30 in New York
    assert opens_at(FRENCH_RULES, PARIS, instant) is not None
    assert opens_at(FRENCH_RULES, LONDON, instant) is None
    assert opens_at(FRENCH_RULES, NEW_YORK, instant) is None


def test_daylight_saving_time_moves_the_opening_in_utc() -> None:
    weekdays = SendWindow.model_validate({"hours": {"sun": ["09:00-17:00"]}})
    # 8 March 2026: New York changes to summer time at 02:00; 09:00 is then 13:00 UTC.
    opening = opens_at(weekdays, NEW_YORK, at("2026-03-08T06:00+00:00"))
    assert opening == at("2026-03-08T13:00+00:00")


def test_a_number_in_several_zones_waits_until_the_window_is_open_in_all() -> None:
    zones, region = zones_of(RUSSIA)
    assert region == "RU" and len(zones) > 5
    every_day = SendWindow.model_validate(
        {"hours": {day: ["08:00-20:00"] for day in ("mon", "tue", "wed", "thu", "fri", "sat")}}
    )
    # Noon UTC: open in Moscow, midnight in Kamchatka. Open in all from 06:00 UTC (Kamchatka
    # 18:00, Bucharest 08:00) the next day.
    opening = opens_at(every_day, RUSSIA, at("2026-12-01T12:00+00:00"))
    assert opening == at("2026-12-02T06:00+00:00")


def test_a_window_without_any_opening_never_opens() -> None:
    closed = SendWindow.model_validate({"hours": {}})
    assert opens_at(closed, PARIS, at("2026-12-24T12:00+01:00")) == float("inf")


def test_bad_hours_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        SendWindow.model_validate({"hours": {"mon": ["8-20"]}})
    with pytest.raises(ValueError, match="after the start"):
        SendWindow.model_validate({"hours": {"mon": ["20:00-08:00"]}})
    with pytest.raises(ValueError, match="mon"):
        SendWindow.model_validate({"hours": {"monday": ["08:00-20:00"]}})
    assert SendWindow.model_validate({"hours": {"mon": ["00:00-24:00"]}})


def message(
    destination: str, *, batch_id: str = "b-1", campaign_id: str = "c-1"
) -> RecipientMessage:
    context = MessageContext(
        tenant=TENANT,
        message_id="m-1",
        batch_id=batch_id,
        campaign_id=campaign_id,
        mobile_number=destination.lstrip("+"),
        metadata_json="{}",
    )
    return RecipientMessage(context=context, destination=destination, text="x", sender_id="S")


def test_a_country_override_replaces_the_tenants_window_and_auto_replies_have_none() -> None:
    tenant = make_settings(
        overrides={
            "tenants": {
                TENANT: {
                    "send_window": {"hours": {"mon": ["09:00-10:00"]}},
                    "send_window_by_country": {"FR": FRENCH_RULES.model_dump(mode="json")},
                }
            }
        }
    ).tenants[TENANT]
    assert window_for(message(PARIS), tenant) == FRENCH_RULES
    assert window_for(message(LONDON), tenant) == tenant.send_window
    assert window_for(message(PARIS, batch_id="", campaign_id=""), tenant) is None


def test_country_codes_are_checked() -> None:
    with pytest.raises(ValueError, match="ISO region codes"):
        make_settings(
            overrides={"tenants": {TENANT: {"send_window_by_country": {"France": {"hours": {}}}}}}
        )
