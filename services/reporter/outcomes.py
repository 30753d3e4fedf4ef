"""What becomes of a report, as plain functions: the next state of its parked entry, its dead
letter, the ``ReportOutcome`` the campaigns service counts, and the metrics and logs of each.

Nothing here sends, stores or publishes; ``parked_state.py`` writes the ``Change`` these return.
See ``docs/reporter.md`` for the guarantees.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from services.reporter.delivery import Action, AttemptObserver, AttemptResult, Decision, RetryPolicy
from services.reporter.metrics import (
    ATTEMPT_FAILURES,
    OPTIMOVE_UNAUTHORIZED,
    REPORT_REQUEST_DURATION,
    REPORTS,
    REPORTS_ALREADY_ACKNOWLEDGED,
    RESULT_ACCEPTED,
    RESULT_DEAD_LETTERED,
    STATUS_REPLY,
)
from services.reporter.parking import ParkedEntry, ParkedReport, deferred_due_at
from shared import metrics
from shared.contract.events import (
    DeadLetter,
    ReportKind,
    ReportOutcome,
    SchemaError,
    StatusEvent,
    decode,
    utcnow,
)
from shared.contract.topics import DEAD_LETTERS, INBOUND, REPORT_OUTCOMES, REPORTER_STATE
from shared.kafka.clients import OutRecord
from shared.kafka.runner import Record
from shared.kafka.runner import dead_letter as record_dead_letter
from shared.kafka.store import Entry
from shared.logs import mask_number

log = logging.getLogger(__name__)

STAGE = "reporter"
# Metric label for records naming a tenant we do not know: bounded, unlike the name itself.
UNKNOWN_TENANT_LABEL = "(unknown)"


@dataclass(frozen=True)
class Change:
    """One entry's next state, with the one it replaces (to undo it if publishing fails)."""

    key: str
    previous: Entry | None
    entry: ParkedEntry | None
    due_at: float | None
    dead_letters: Sequence[OutRecord] = ()
    # Metrics and logs, run once Kafka acknowledged the change.
    observe: Callable[[], None] | None = None


def settled(
    key: str,
    previous: Entry,
    parked: ParkedEntry,
    head: ParkedReport,
    decision: Decision,
    now: float,
    status: str,
    not_before: Callable[[str], float],
) -> Change:
    """The entry after one attempt at its head decided ``decision``.

    ``not_before(tenant)`` is when the tenant's circuit lets the next request go.
    """
    slug, kind = parked.tenant, parked.kind
    if decision.action is Action.RETRY:
        retry_at = max(now + decision.delay_s, not_before(slug))
        return Change(key, previous, parked.with_head(head), retry_at)
    rest = parked.without_head()
    # The next report of the message goes on the next pass.
    due_at = now if rest is not None else None
    if decision.action is Action.ACCEPTED:

        def accepted() -> None:
            REPORTS.labels(slug, kind, status, RESULT_ACCEPTED).inc()

        return Change(key, previous, rest, due_at, observe=accepted)
    letter = dead_letter(
        source_topic=head.topic,
        key=head.key,
        fallback_key=head.source,
        payload=head.payload,
        reason=decision.reason,
        attempts=head.attempts,
        result=head.last_result(),
    )

    def dead_lettered() -> None:
        REPORTS.labels(slug, kind, status, RESULT_DEAD_LETTERED).inc()
        metrics.DEAD_LETTERS.labels(STAGE, head.topic).inc()

    return Change(key, previous, rest, due_at, [letter], dead_lettered)


def rescheduled(
    key: str,
    previous: Entry,
    now: float,
    *,
    tenants: Collection[str],
    policy: RetryPolicy,
    jitter: Callable[[], float],
    not_before: Callable[[str], float],
) -> Change:
    """A due entry that cannot be sent now: a later turn, or a dead letter (too old, tenant no
    longer configured, unreadable)."""
    try:
        parked = ParkedEntry.from_value(previous.value)
    except ValidationError as exc:
        log.error("%s: unreadable parked entry %s dead-lettered: %s", STAGE, key, exc)
        letter = dead_letter(
            source_topic=REPORTER_STATE.name,
            key=key,
            fallback_key=key,
            payload=orjson.dumps(previous.value).decode("utf-8"),
            reason=f"unreadable parked entry: {exc}",
            attempts=0,
            result=None,
        )
        return Change(key, previous, None, None, [letter])
    head = parked.head
    status = status_of(head)
    if parked.tenant not in tenants:
        reason = f"unknown tenant {parked.tenant!r}: no longer in this deployment's config"
        decision = Decision(Action.REFUSED, reason=reason)
        return settled(key, previous, parked, head, decision, now, status, not_before)
    decision = policy.decide(head.last_result(), head.attempts, now - head.since, jitter)
    if decision.action is Action.GIVE_UP:
        log.error(
            "%s report dead-lettered: %s",
            parked.kind,
            decision.reason,
            extra={"tenant": parked.tenant, "attempts": head.attempts},
        )
        return settled(key, previous, parked, head, decision, now, status, not_before)
    due_at = deferred_due_at(
        head, now=now, not_before=not_before(parked.tenant), policy=policy, jitter=jitter
    )
    return Change(key, previous, parked.with_head(head.waited()), due_at)


def acknowledged(
    slug: str, kind: ReportKind, counts: dict[str, int], at: datetime | None = None
) -> OutRecord:
    """What the campaigns service counts of a request Optimove accepted (``ReportOutcome``)."""
    outcome = ReportOutcome(tenant=slug, kind=kind, counts=counts, at=at or utcnow())
    return OutRecord(REPORT_OUTCOMES, slug, outcome)


def merge_acknowledged(records: list[OutRecord]) -> list[OutRecord]:
    """``records`` with the ``ReportOutcome`` records of one tenant and kind summed into one, in
    the place of the first: the campaigns service reads one record where it read many."""
    merged: list[OutRecord] = []
    first: dict[tuple[str, ReportKind], int] = {}
    for record in records:
        outcome = record.value
        if record.topic is not REPORT_OUTCOMES or not isinstance(outcome, ReportOutcome):
            merged.append(record)
            continue
        index = first.setdefault((outcome.tenant, outcome.kind), len(merged))
        if index == len(merged):
            merged.append(record)
            continue
        earlier = merged[index].value
        assert isinstance(earlier, ReportOutcome)
        counts = dict(earlier.counts)
        for campaign, count in outcome.counts.items():
            counts[campaign] = counts.get(campaign, 0) + count
        merged[index] = acknowledged(
            outcome.tenant, outcome.kind, counts, max(earlier.at, outcome.at)
        )
    return merged


def dead_letter(
    *,
    source_topic: str,
    key: str | None,
    fallback_key: str,
    payload: str,
    reason: str,
    attempts: int,
    result: AttemptResult | None,
) -> OutRecord:
    return OutRecord(
        DEAD_LETTERS,
        key or fallback_key,
        DeadLetter(
            source_topic=source_topic,
            stage=STAGE,
            reason=reason,
            key=key,
            payload=payload,
            attempts=attempts,
            status_code=result.status_code if result is not None else None,
            response_excerpt=result.response_excerpt if result is not None else "",
            redrive_topic=source_topic,
        ),
    )


def unknown_tenant(record: Record, slug: str, kind: str, extra: dict[str, Any]) -> OutRecord:
    """The dead letter of a record naming a tenant this deployment does not know."""
    reason = f"unknown tenant {slug!r}: not in this deployment's configuration"
    log.error("%s report dead-lettered: %s", kind, reason, extra=extra)
    REPORTS.labels(UNKNOWN_TENANT_LABEL, kind, "unknown", RESULT_DEAD_LETTERED).inc()
    return record_dead_letter(STAGE, record, reason, attempts=0)


def observer(slug: str, kind: str, messages: int, extra: dict[str, Any]) -> AttemptObserver:
    """Metrics and logs of every attempt at one request."""

    def observe(result: AttemptResult, decision: Decision) -> None:
        REPORT_REQUEST_DURATION.labels(slug, kind).observe(result.duration_s)
        if result.accepted:
            return
        ATTEMPT_FAILURES.labels(slug, kind, result.failure_code).inc()
        if result.status_code == 401:
            OPTIMOVE_UNAUTHORIZED.labels(slug).inc()
            log.error(
                "Optimove answered 401 for tenant %s (%s report): check the tenant's "
                "api_token and secret_key",
                slug,
                kind,
                extra=extra,
            )
        elif decision.action is Action.RETRY:
            # The circuit logs a failing tenant once; every report's retry is detail.
            log.debug(
                "%s report of %d message(s) not accepted (%s); next attempt in %.1fs",
                kind,
                messages,
                result.describe(),
                decision.delay_s,
                extra=extra,
            )

    return observe


def skipped_as_acknowledged(slug: str, kind: str, extra: dict[str, Any]) -> None:
    """A record read again (a replay) whose report Optimove already accepted: not posted."""
    REPORTS_ALREADY_ACKNOWLEDGED.labels(slug, kind).inc()
    log.debug("%s report already acknowledged by Optimove: not posted again", kind, extra=extra)


def log_not_delivered(kind: str, decision: Decision, attempts: int, extra: dict[str, Any]) -> None:
    log.error(
        "%s report dead-lettered: %s", kind, decision.reason, extra={**extra, "attempts": attempts}
    )


def key_tenant(key: str) -> str:
    """The tenant named by a parked entry's key (``kind/tenant/id``)."""
    return key.split("/", 2)[1]


def readable(entry: Entry | None) -> ParkedEntry | None:
    if entry is None:
        return None
    try:
        return ParkedEntry.from_value(entry.value)
    except ValidationError:
        return None


def status_of(report: ParkedReport) -> str:
    """The metric label of a parked report's status."""
    if report.topic == INBOUND.name:
        return STATUS_REPLY
    try:
        return decode(StatusEvent, report.payload.encode("utf-8")).status
    except SchemaError:
        return "unknown"


def delivery_extra(event: StatusEvent) -> dict[str, Any]:
    context = event.context
    return {
        "message_id": context.message_id,
        "tenant": context.tenant,
        "status": event.status,
        "sub_status": event.sub_status,
        "number": mask_number(context.mobile_number),
    }
