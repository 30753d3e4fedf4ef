"""How an HTTP answer asks to be retried: which statuses are worth another attempt, and the
``Retry-After`` header read in either of its forms (RFC 9110 §10.2.3). One home for providers,
the reporter's callbacks to Optimove and the simulators."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRY_AFTER_HEADER = "Retry-After"


def is_retryable_status(status: int) -> bool:
    """429 and 5xx: the server may answer differently later. 408 and other 4xx: it will not."""
    return status == 429 or 500 <= status <= 599


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait per ``Retry-After`` (delay-seconds or HTTP-date); None if unusable.

    A date in the past reads as 0 (retry now); negative, infinite or NaN seconds as unusable or 0.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    reference = now or datetime.now(UTC)
    return max(0.0, (moment - reference).total_seconds())
