"""A campaign's pace as the sender instances report it (``SenderStatus`` on
``sms.sender-status``): its share of its provider account's sends, its sends per second, and its
messages parked until their send window opens. Summed over the instances that reported lately.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from shared.contract.events import SenderStatus

# A status older than this is an instance that stopped without saying so: ignored.
STALE_AFTER_S = 30.0


def fresh_statuses(values: Iterable[dict[str, Any]], now: float) -> list[SenderStatus]:
    statuses = []
    for value in values:
        try:
            status = SenderStatus.model_validate(value)
        except ValidationError:
            continue  # a record of another version: it shows nothing
        if now - status.at.timestamp() <= STALE_AFTER_S:
            statuses.append(status)
    return statuses


def pace_of(tenant: str, campaign_id: str, statuses: Iterable[SenderStatus]) -> dict[str, Any]:
    """``share``: the campaign's part of its accounts' current sends (None when it sends
    nothing now); ``sends_per_s``; ``waiting_for_window``."""
    statuses = list(statuses)
    mine = [
        pace
        for status in statuses
        for pace in status.campaigns
        if (pace.tenant, pace.campaign) == (tenant, campaign_id)
    ]
    accounts = {pace.account for pace in mine if pace.account}
    sends = sum(pace.sends_per_s for pace in mine)
    on_accounts = sum(
        pace.sends_per_s
        for status in statuses
        for pace in status.campaigns
        if pace.account in accounts
    )
    return {
        "share": round(sends / on_accounts, 3) if on_accounts and sends else None,
        "sends_per_s": round(sends, 1),
        "waiting_for_window": sum(pace.waiting_for_window for pace in mine),
    }
