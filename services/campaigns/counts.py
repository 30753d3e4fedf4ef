"""What one input record adds to which campaign, and how counters add up. No I/O here.

Every input record is read leniently (orjson, only the fields counted): a record that cannot be
read adds nothing, except on ``sms.dead-letters``, where whatever a dead letter holds is counted
under ``UNKNOWN`` for what it does not name. Replies are counted under the tenant's ``REPLIES``
group, auto replies under ``AUTO_REPLIES``; "held for schedule" is worked out when asked from
per-second buckets. The table of topics and counters: ``docs/campaigns.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from shared.contract.campaign_controls import campaign_group
from shared.contract.events import CampaignCounts
from shared.contract.topics import (
    DEAD_LETTERS,
    INGRESS_REQUESTS,
    PRIORITY_RECIPIENTS,
    RECIPIENTS,
    REPORT_OUTCOMES,
    STATUSES,
    by_name,
)
from shared.times import parse_iso

log = logging.getLogger(__name__)

INPUT_TOPICS = (
    INGRESS_REQUESTS,
    RECIPIENTS,
    PRIORITY_RECIPIENTS,
    STATUSES,
    DEAD_LETTERS,
    REPORT_OUTCOMES,
)
UNKNOWN = "(unknown)"
REPLIES = "(replies)"
MAX_SCHEDULE_BUCKETS = 64
OPTED_OUT = "OptedOut"
_SEPARATOR = "|"

Campaign = tuple[str, str]  # (tenant, campaign group)


@dataclass
class Counts:
    """Counters of one campaign: of one input partition, or summed over all of them."""

    accepted: int = 0
    rejected: int = 0
    scheduled: dict[int, int] = field(default_factory=dict)  # Unix second -> recipients
    sent: int = 0
    delivered: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # sub-status -> messages
    dead_lettered: int = 0
    reports_acknowledged: int = 0
    replies_acknowledged: int = 0
    first_at: float | None = None  # Unix seconds of the first and last record counted
    last_at: float | None = None

    def add(self, other: Counts) -> None:
        self.accepted += other.accepted
        self.rejected += other.rejected
        for second, recipients in other.scheduled.items():
            self.scheduled[second] = self.scheduled.get(second, 0) + recipients
        self.sent += other.sent
        self.delivered += other.delivered
        for sub_status, messages in other.failed.items():
            self.failed[sub_status] = self.failed.get(sub_status, 0) + messages
        self.dead_lettered += other.dead_lettered
        self.reports_acknowledged += other.reports_acknowledged
        self.replies_acknowledged += other.replies_acknowledged
        if other.first_at is not None:
            self.first_at = (
                other.first_at if self.first_at is None else min(self.first_at, other.first_at)
            )
        if other.last_at is not None:
            self.last_at = (
                other.last_at if self.last_at is None else max(self.last_at, other.last_at)
            )

    def held(self, now: float) -> int:
        """Recipients whose scheduled time is still ahead of ``now``."""
        return sum(recipients for second, recipients in self.scheduled.items() if second > now)

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    @property
    def opted_out(self) -> int:
        return self.failed.get(OPTED_OUT, 0)

    def forget_past_schedule(self, now: float) -> None:
        """Drop seconds already passed; keep at most ``MAX_SCHEDULE_BUCKETS`` seconds, merging
        the earliest into the next (held a little longer rather than released early)."""
        for second in [s for s in self.scheduled if s <= now]:
            del self.scheduled[second]
        while len(self.scheduled) > MAX_SCHEDULE_BUCKETS:
            first, second = sorted(self.scheduled)[:2]
            self.scheduled[second] += self.scheduled.pop(first)


@dataclass(frozen=True)
class Contribution:
    """What one input record adds to one campaign."""

    tenant: str
    campaign: str  # campaign group
    counts: Counts


# -- reading input records -------------------------------------------------------------------------


def contributions(topic: str, value: bytes | None, at: float, now: float) -> list[Contribution]:
    """What the record ``value`` of ``topic``, written at ``at`` (Unix seconds), adds.

    ``now`` decides whether a scheduled recipient is still ahead (one that is not adds nothing).
    Never raises: an unreadable record adds nothing (dead letters: an unknown one).
    """
    known = by_name(topic)
    reader = _READERS.get(known.base) if known is not None else None
    if reader is None:
        return []
    document = _json_object(value)
    if document is None:
        if topic == DEAD_LETTERS.name and value is not None:
            return [_activity(UNKNOWN, UNKNOWN, at, Counts(dead_lettered=1))]
        if value is not None:
            log.warning("%s: unreadable record not counted", topic)
        return []
    try:
        return reader(document, at, now)
    except (TypeError, ValueError, AttributeError) as exc:
        log.warning("%s: record not counted (%s)", topic, exc)
        return []


def _ingress_request(document: dict[str, Any], at: float, now: float) -> list[Contribution]:
    tenant = _text(document.get("tenant"))
    if not tenant:
        return []
    rejected = document.get("rejected")
    return [
        _activity(
            tenant,
            campaign_group(_text(document.get("campaign_id"))),
            at,
            Counts(
                accepted=_count(document.get("accepted")),
                rejected=len(rejected) if isinstance(rejected, list) else 0,
            ),
        )
    ]


def _recipient(document: dict[str, Any], at: float, now: float) -> list[Contribution]:
    scheduled_at = _timestamp(document.get("scheduled_at"))
    if scheduled_at is None or scheduled_at <= now:
        return []
    tenant, campaign = _context_campaign(document)
    if not tenant:
        return []
    return [_activity(tenant, campaign, at, Counts(scheduled={math.ceil(scheduled_at): 1}))]


def _status(document: dict[str, Any], at: float, now: float) -> list[Contribution]:
    tenant, campaign = _context_campaign(document)
    status = document.get("status")
    if not tenant:
        return []
    if status == "sent":
        return [_activity(tenant, campaign, at, Counts(sent=1))]
    if status == "delivered":
        return [_activity(tenant, campaign, at, Counts(delivered=1))]
    if status == "failed":
        sub_status = _text(document.get("sub_status")) or UNKNOWN
        return [_activity(tenant, campaign, at, Counts(failed={sub_status: 1}))]
    return []


def _dead_letter(document: dict[str, Any], at: float, now: float) -> list[Contribution]:
    tenant, campaign = dead_letter_campaign(document.get("payload"))
    return [_activity(tenant, campaign, at, Counts(dead_lettered=1))]


def _report_outcome(document: dict[str, Any], at: float, now: float) -> list[Contribution]:
    tenant = _text(document.get("tenant"))
    counts = document.get("counts")
    if not tenant or not isinstance(counts, dict):
        return []
    if document.get("kind") == "incoming":
        replies = sum(_count(n) for n in counts.values())
        if not replies:
            return []
        return [_activity(tenant, REPLIES, at, Counts(replies_acknowledged=replies))]
    if document.get("kind") != "delivery":
        return []
    return [
        _activity(
            tenant, campaign_group(str(campaign_id)), at, Counts(reports_acknowledged=_count(n))
        )
        for campaign_id, n in counts.items()
        if _count(n)
    ]


def dead_letter_campaign(payload: object) -> tuple[str, str]:
    """(tenant, campaign group) of the record a dead letter holds, ``UNKNOWN`` where it says
    nothing: a message's ``context`` (recipients, dispatches, statuses, parked reports), or a
    top-level ``tenant`` (requests, replies: those name no campaign unless ``campaign_id``)."""
    document = (
        _json_object(payload.encode("utf-8", "replace")) if isinstance(payload, str) else None
    )
    if document is None:
        return UNKNOWN, UNKNOWN
    tenant, campaign = _context_campaign(document)
    if tenant:
        return tenant, campaign
    tenant = _text(document.get("tenant"))
    if not tenant:
        return UNKNOWN, UNKNOWN
    campaign_id = document.get("campaign_id")
    if isinstance(campaign_id, str):
        return tenant, campaign_group(campaign_id)
    if "from_number" in document:
        return tenant, REPLIES
    return tenant, UNKNOWN


_READERS = {
    INGRESS_REQUESTS.base: _ingress_request,
    RECIPIENTS.base: _recipient,
    PRIORITY_RECIPIENTS.base: _recipient,
    STATUSES.base: _status,
    DEAD_LETTERS.base: _dead_letter,
    REPORT_OUTCOMES.base: _report_outcome,
}


def _context_campaign(document: dict[str, Any]) -> tuple[str, str]:
    context = document.get("context")
    if not isinstance(context, dict):
        return "", ""
    return _text(context.get("tenant")), campaign_group(_text(context.get("campaign_id")))


def _activity(tenant: str, campaign: str, at: float, counts: Counts) -> Contribution:
    counts.first_at = counts.last_at = at
    return Contribution(tenant, campaign, counts)


def _json_object(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _timestamp(value: object) -> float | None:
    moment = parse_iso(value)
    return moment.timestamp() if moment is not None else None


# -- sms.campaign-counts ---------------------------------------------------------------------------


def counts_key(tenant: str, campaign: str, topic: str, partition: int) -> str:
    """Key of one campaign's counters of one input partition in ``sms.campaign-counts``."""
    return _SEPARATOR.join((tenant, campaign, topic, str(partition)))


def campaign_prefix(tenant: str, campaign: str) -> str:
    """What every ``counts_key`` of the campaign starts with (and maybe keys of others: a
    campaign id may contain the separator)."""
    return _SEPARATOR.join((tenant, campaign, ""))


def campaigns_of_key(key: str) -> list[Campaign]:
    """Every (tenant, campaign group) whose counters ``key`` may be: one, unless the tenant or
    the campaign contains the separator, when each way of splitting them is (topic names and
    partitions never contain it). Empty for a key that is not a ``counts_key``."""
    parts = key.rsplit(_SEPARATOR, 2)
    if len(parts) != 3:
        return []
    both = parts[0]
    splits: list[Campaign] = []
    at = both.find(_SEPARATOR)
    while at >= 0:
        splits.append((both[:at], both[at + 1 :]))
        at = both.find(_SEPARATOR, at + 1)
    return splits


def to_event(
    tenant: str, campaign: str, topic: str, partition: int, offset: int, counts: Counts
) -> CampaignCounts:
    first = counts.first_at if counts.first_at is not None else 0.0
    last = counts.last_at if counts.last_at is not None else first
    return CampaignCounts(
        tenant=tenant,
        campaign=campaign,
        source_topic=topic,
        source_partition=partition,
        offset=offset,
        accepted=counts.accepted,
        rejected=counts.rejected,
        scheduled=sorted(counts.scheduled.items()),
        sent=counts.sent,
        delivered=counts.delivered,
        failed=dict(counts.failed),
        dead_lettered=counts.dead_lettered,
        reports_acknowledged=counts.reports_acknowledged,
        replies_acknowledged=counts.replies_acknowledged,
        first_at=datetime.fromtimestamp(first, UTC),
        last_at=datetime.fromtimestamp(last, UTC),
    )


@dataclass(frozen=True)
class StoredCounts:
    """One ``CampaignCounts`` record as read back from the topic."""

    tenant: str
    campaign: str
    source_topic: str
    source_partition: int
    offset: int
    counts: Counts


_COUNTS_VERSION = CampaignCounts.model_fields["schema_version"].default


def read_counts(values: Iterable[dict[str, Any]]) -> Iterator[StoredCounts]:
    """The readable ``CampaignCounts`` among mirrored values (others are skipped and logged)."""
    for value in values:
        try:
            event = CampaignCounts.model_validate(value)
        except ValueError as exc:
            log.error("unreadable campaign counts skipped: %s", exc)
            continue
        if event.schema_version != _COUNTS_VERSION:
            log.error("campaign counts of schema_version %s skipped", event.schema_version)
            continue
        counts = Counts(
            accepted=event.accepted,
            rejected=event.rejected,
            scheduled=dict(event.scheduled),
            sent=event.sent,
            delivered=event.delivered,
            failed=dict(event.failed),
            dead_lettered=event.dead_lettered,
            reports_acknowledged=event.reports_acknowledged,
            replies_acknowledged=event.replies_acknowledged,
            first_at=event.first_at.timestamp(),
            last_at=event.last_at.timestamp(),
        )
        yield StoredCounts(
            event.tenant,
            event.campaign,
            event.source_topic,
            event.source_partition,
            event.offset,
            counts,
        )


def summarize(stored: Iterable[StoredCounts]) -> dict[tuple[str, str], Counts]:
    """Per (tenant, campaign group): the counters of every input partition added up."""
    totals: dict[tuple[str, str], Counts] = {}
    for record in stored:
        totals.setdefault((record.tenant, record.campaign), Counts()).add(record.counts)
    return totals


def last_activity(values: Iterable[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """Per (tenant, campaign group): the latest ``last_at`` among mirrored ``CampaignCounts``
    values (read without a full decode: it runs over the whole table)."""
    last: dict[tuple[str, str], float] = {}
    for value in values:
        tenant, campaign = value.get("tenant"), value.get("campaign")
        at = _timestamp(value.get("last_at"))
        if isinstance(tenant, str) and isinstance(campaign, str) and at is not None:
            last[(tenant, campaign)] = max(last.get((tenant, campaign), at), at)
    return last


def expired(
    last_activity: dict[tuple[str, str], float], now: float, after_s: float
) -> set[tuple[str, str]]:
    """Campaigns whose last activity is more than ``after_s`` before ``now``."""
    horizon = now - after_s
    return {campaign for campaign, last in last_activity.items() if last < horizon}
