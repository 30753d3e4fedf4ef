"""What the simulated Optimove's accepted requests add up to, per tenant and campaign."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ReportTally:
    """Accepted delivery reports of one tenant and one campaign."""

    reports: int = 0
    # When (Unix seconds) each message's first report, and its first final report, arrived.
    first_report_at: dict[str, float] = field(default_factory=dict)
    first_final_at: dict[str, float] = field(default_factory=dict)
    final_reports: Counter[str] = field(default_factory=Counter)
    # The first final report per message decides its outcome; later ones are duplicates.
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    duplicates: int = 0

    def add(self, message_id: str, status: str, sub_status: str, final: bool, at: float) -> None:
        self.reports += 1
        self.first_report_at.setdefault(message_id, at)
        if not final:
            return
        self.final_reports[message_id] += 1
        seen = self.final_reports[message_id]
        if seen == 1:
            self.first_final_at[message_id] = at
            self.outcomes[(status, sub_status)] += 1
        elif seen == 2:
            self.duplicates += 1


@dataclass
class TenantCounters:
    incoming_messages: int = 0
    incoming_requests: int = 0
    handshakes: int = 0
    rejected_requests: int = 0
    campaigns: dict[str, ReportTally] = field(default_factory=dict)


def campaigns_of(counters: TenantCounters, campaign_id: str | None) -> Iterable[ReportTally]:
    """The tallies of one campaign, or (None) of all the tenant's campaigns."""
    if campaign_id is None:
        return counters.campaigns.values()
    return [counters.campaigns.get(campaign_id, ReportTally())]


def tenant_tally(
    counters: TenantCounters, campaign_id: str | None, delivered_status: str
) -> dict[str, Any]:
    """What one tenant's accepted delivery reports and incoming messages add up to."""
    reports = messages = duplicates = 0
    outcomes: Counter[tuple[str, str]] = Counter()
    for campaign in campaigns_of(counters, campaign_id):
        reports += campaign.reports
        messages += len(campaign.first_report_at)
        duplicates += campaign.duplicates
        outcomes.update(campaign.outcomes)
    by_status: dict[str, dict[str, int]] = {}
    for (status, sub_status), count in sorted(outcomes.items()):
        by_status.setdefault(status, {})[sub_status] = count
    final = sum(outcomes.values())
    delivered = sum(n for (s, _), n in outcomes.items() if s == delivered_status)
    return {
        "reports": reports,
        "messages": messages,
        "final": final,
        "delivered": delivered,
        "failed": final - delivered,
        "final_by_status": by_status,
        "duplicates": duplicates,
        "incoming_messages": counters.incoming_messages,
        "incoming_requests": counters.incoming_requests,
        "handshakes": counters.handshakes,
        "rejected_requests": counters.rejected_requests,
    }


def first_report_times(counters: TenantCounters, campaign_id: str | None) -> dict[str, Any]:
    """Per message id: when its first report and its first final report arrived."""
    first: dict[str, float] = {}
    final: dict[str, float] = {}
    for campaign in campaigns_of(counters, campaign_id):
        first.update(campaign.first_report_at)
        final.update(campaign.first_final_at)
    return {"first_report": first, "first_final": final}
