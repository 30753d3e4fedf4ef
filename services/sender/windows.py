"""Send windows: whether a campaign message may reach its recipient now, in the recipient's local
time, and if not, when it may.

The time zone comes from the number (``phonenumbers.timezone``). A number that may be in several
zones (a Russian mobile number spans eleven) is judged in all of them: it goes out when the window
is open in every one. When no such instant exists within ``HORIZON_DAYS``, it goes out when the
window is open in any of them. The rules themselves are the operator's configuration.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import phonenumbers
from phonenumbers import timezone as number_zones

from shared.config import SendWindow, TenantSettings
from shared.contract.events import RecipientMessage
from shared.contract.priority import is_auto_reply

HORIZON_DAYS = 8
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_UNKNOWN_ZONE = "Etc/Unknown"


def window_for(message: RecipientMessage, tenant: TenantSettings) -> SendWindow | None:
    """The window a message must wait for, or None (auto replies, tenants without a window)."""
    context = message.context
    if is_auto_reply(context.batch_id, context.campaign_id):
        return None  # an auto reply answers the customer: it is not marketing
    if tenant.send_window_by_country:
        _, region = zones_of(message.destination)
        by_country = tenant.send_window_by_country.get(region)
        if by_country is not None:
            return by_country
    return tenant.send_window


def opens_at(window: SendWindow, destination: str, now: float) -> float | None:
    """None when the window is open for ``destination`` at ``now`` (epoch seconds); else when it
    opens next (``inf`` when it does not within ``HORIZON_DAYS``)."""
    zones, _ = zones_of(destination)
    instant = datetime.fromtimestamp(now, UTC)
    if all(is_open(window, instant, zone) for zone in zones):
        return None
    starts = sorted({start for zone in zones for start in _starts(window, instant, zone)})
    for start in starts:
        if all(is_open(window, start, zone) for zone in zones):
            return start.timestamp()
    if starts and any(is_open(window, instant, zone) for zone in zones):
        return None  # no common instant: open in one of its zones is open
    return starts[0].timestamp() if starts else float("inf")


def is_open(window: SendWindow, instant: datetime, zone: ZoneInfo) -> bool:
    local = instant.astimezone(zone)
    if local.date() in window.closed_dates:
        return False
    minute = local.hour * 60 + local.minute
    return any(first <= minute < last for first, last in _ranges(window, local.date()))


def _starts(window: SendWindow, instant: datetime, zone: ZoneInfo) -> list[datetime]:
    """Every opening of the window in ``zone`` after ``instant``, within the horizon."""
    today = instant.astimezone(zone).date()
    found = []
    for offset in range(HORIZON_DAYS + 1):
        day = today + timedelta(days=offset)
        if day in window.closed_dates:
            continue
        for first, _ in _ranges(window, day):
            local = datetime.combine(day, time(first // 60, first % 60), tzinfo=zone)
            if local > instant:
                found.append(local.astimezone(UTC))
    return found


def _ranges(window: SendWindow, day: date) -> list[tuple[int, int]]:
    ranges = window.hours.get(_WEEKDAYS[day.weekday()], [])  # type: ignore[call-overload]
    return sorted(_minutes_range(text) for text in ranges)


@functools.lru_cache(maxsize=4096)
def _minutes_range(text: str) -> tuple[int, int]:
    start, _, end = text.partition("-")
    return _minutes(start), _minutes(end)


def _minutes(text: str) -> int:
    hours, _, minutes = text.strip().partition(":")
    return int(hours) * 60 + int(minutes)


@functools.lru_cache(maxsize=20_000)
def zones_of(destination: str) -> tuple[Sequence[ZoneInfo], str]:
    """The time zones a number may be in, and its region (ISO code, "ZZ" when unknown); a number
    whose zone is unknown is judged in UTC."""
    try:
        number = phonenumbers.parse(destination)
    except phonenumbers.NumberParseException:
        return (ZoneInfo("UTC"),), "ZZ"
    region = phonenumbers.region_code_for_number(number) or "ZZ"
    names = [name for name in number_zones.time_zones_for_number(number) if name != _UNKNOWN_ZONE]
    return tuple(ZoneInfo(name) for name in names) or (ZoneInfo("UTC"),), region
