"""Canonical message statuses, their order, and the sub-status vocabulary (decisions.md §4)."""

from __future__ import annotations

from enum import StrEnum

from shared.contract.events import CanonicalStatus

# Statuses only move forward; equal rank is not a move.
RANK: dict[CanonicalStatus, int] = {"sent": 1, "delivered": 2, "failed": 2}


def is_forward(current: CanonicalStatus | None, new: CanonicalStatus) -> bool:
    return current is None or RANK[new] > RANK[current]


class SubStatus(StrEnum):
    SENT = "Sent"
    ACKNOWLEDGED = "Acknowledged"
    DELIVERED = "Delivered"
    INVALID_NUMBER = "InvalidNumber"
    EMPTY_MESSAGE = "EmptyMessage"
    OPTED_OUT = "OptedOut"
    REJECTED = "Rejected"
    BLACKLISTED = "Blacklisted"
    PROVIDER_ERROR = "ProviderError"
    EXPIRED = "Expired"
    UNDELIVERABLE = "Undeliverable"
    CANCELLED = "Cancelled"
    NO_ROUTE = "NoRoute"
    # Its send window (the tenant's rules) did not open before its validity ended.
    OUTSIDE_SEND_WINDOW = "OutsideSendWindow"
