"""Dry run: the provider call of a tenant with ``dry_run = true``, simulated.

Everything else of a send runs as for a real one (route, rate limit, circuit, intent and outcome,
dispatch record); only the HTTP call is replaced. ``DryRun.send`` accepts every message with an id
derived from the message id; ``delivery_report`` is the report the provider would call back with,
its outcome drawn from the tenant's ``dry_run_outcomes`` by a hash of the message id, so a replay
gets the same one. Every status carries the mark ``DryRun:<sub-status>`` in its ``subStatus``.
Details: docs/providers.md, "Dry run".
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import ClassVar

from shared.config import ProviderSettings
from shared.contract import ids
from shared.contract.events import CanonicalStatus, DispatchRecord, ProviderEvent
from shared.contract.statuses import SubStatus
from shared.http_client import HttpClient
from shared.providers.base import (
    CallbackRejected,
    OutboundSms,
    ParsedCallback,
    Provider,
    SendAccepted,
    SendResult,
)

KIND = "dryrun"
MARK = "DryRun:"
_ID_PREFIX = "dryrun-"


def marked(sub_status: str) -> str:
    """The sub-status a dry-run message reports: ``DryRun:Delivered``."""
    return f"{MARK}{sub_status}"


def is_marked(sub_status: str) -> bool:
    return sub_status.startswith(MARK)


def provider_message_id(message_id: str) -> str:
    return _ID_PREFIX + hashlib.sha256(message_id.encode("utf-8")).hexdigest()[:24]


def outcome_for(message_id: str, outcomes: Mapping[str, float]) -> str:
    """The outcome of one message: a point in [0, 1) from a hash of its id, placed on the
    weights in sub-status order (independent of the order the configuration lists them)."""
    weighted = [(name, weight) for name, weight in sorted(outcomes.items()) if weight > 0]
    if not weighted:
        raise ValueError("dry_run_outcomes needs a positive weight")
    digest = hashlib.sha256(f"dry-run-outcome\x1f{message_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64 * sum(weight for _, weight in weighted)
    for name, weight in weighted:
        point -= weight
        if point < 0:
            return name
    return weighted[-1][0]  # float rounding at the very top


class DryRun(Provider):
    kind = KIND
    max_batch = 1  # it stands in for the route's account, whose batching applies
    status_map: ClassVar[Mapping[str, tuple[CanonicalStatus, str]]] = {}

    def __init__(
        self,
        account: str,
        settings: ProviderSettings,
        session: HttpClient | None = None,
        callback_url: str = "",
    ) -> None:
        # No session is ever used: nothing leaves the process.
        self.account = account
        self.settings = settings
        self.callback_url = callback_url

    async def send(self, batch: list[OutboundSms]) -> list[SendResult]:
        return [self.accept(sms) for sms in batch]

    def accept(self, sms: OutboundSms) -> SendAccepted:
        provider_id = provider_message_id(sms.message_id)
        key = self.correlation_key(self.account, provider_id, sms.destination)
        return SendAccepted(sms.message_id, provider_id, key)

    @classmethod
    def canonical(cls, provider_status: str) -> tuple[CanonicalStatus, str] | None:
        """The provider status of a dry-run report is its outcome, a sub-status."""
        outcome = provider_status.strip()
        if not outcome:
            return None
        status: CanonicalStatus = "delivered" if outcome == SubStatus.DELIVERED else "failed"
        return status, marked(outcome)

    @classmethod
    def parse_callback(cls, body: bytes, content_type: str) -> list[ParsedCallback]:
        raise CallbackRejected("a dry run sends no callbacks")


def delivery_report(dispatch: DispatchRecord, outcomes: Mapping[str, float]) -> ProviderEvent:
    """The delivery report of an accepted dry-run dispatch; the same one every time."""
    outcome = outcome_for(dispatch.context.message_id, outcomes)
    return ProviderEvent(
        event_id=ids.event_id(dispatch.correlation_key, KIND, outcome),
        kind="status",
        provider_kind=KIND,
        provider_account=dispatch.provider_account,
        correlation_key=dispatch.correlation_key,
        provider_message_id=dispatch.provider_message_id,
        provider_status=outcome,
        occurred_at=dispatch.dispatched_at,
        received_at=dispatch.dispatched_at,
        raw={"dryRun": True, "outcome": outcome},
    )
