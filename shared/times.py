"""ISO 8601 times, read and written one way: aware and in UTC; a time read without an offset is
taken as UTC (or as the zone the caller says its source writes)."""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo


def parse_iso(value: object, naive_zone: tzinfo = UTC) -> datetime | None:
    """``value`` read as an ISO 8601 time in UTC; None when it is not a string holding one.

    ``naive_zone``: the zone of a time written without an offset (UTC unless said otherwise).
    """
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=naive_zone)
    return moment.astimezone(UTC)


def format_iso(moment: datetime | float, *, timespec: str = "seconds", zulu: bool = False) -> str:
    """``moment`` (a datetime or Unix seconds) in UTC as ISO 8601, to ``timespec``; ``zulu``
    writes the zone as ``Z`` instead of ``+00:00``."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    text = moment.astimezone(UTC).isoformat(timespec=timespec)
    return text.removesuffix("+00:00") + "Z" if zulu else text
