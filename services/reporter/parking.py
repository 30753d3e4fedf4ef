"""Reports waiting for a later attempt: what ``sms.reporter-state`` holds, and how it moves.

One store entry per message that has parked reports, in the partition of the record it came from
(``sms.statuses``, ``sms.inbound`` and ``sms.reporter-state`` are co-partitioned):

- delivery reports: key ``delivery/{tenant}/{message id}``, the message's reports in the order
  they were read; the head is the next to send. A newer report for a message with parked reports
  queues behind them, so the order per message is kept across retries and restarts.
- incoming messages: key ``incoming/{tenant}/{event id}``, one reply each (replies are separate
  messages; several due at once are sent in one request).

The entry's ``due_at`` (Unix seconds) is when its head is attempted next. Memory stays flat
however long an outage lasts: entries live on disk and on Kafka, not in the process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.reporter.delivery import NOT_ATTEMPTED, AttemptResult, RetryPolicy
from services.reporter.metrics import KIND_DELIVERY, KIND_INCOMING, REPORTS_PARKED
from shared.kafka.runner import Record

ParkedKind = Literal["delivery", "incoming"]


def delivery_key(tenant: str, message_id: str) -> str:
    return f"{KIND_DELIVERY}/{tenant}/{message_id}"


def incoming_key(tenant: str, event_id: str) -> str:
    return f"{KIND_INCOMING}/{tenant}/{event_id}"


def key_prefix(kind: str, tenant: str) -> str:
    return f"{kind}/{tenant}/"


# Every parked delivery entry's key starts with it: the store keeps a running count of them.
PARKED_DELIVERIES = f"{KIND_DELIVERY}/"


def record_source(record: Record) -> str:
    """Identifies a record: the same record read again (after a crash) is recognised."""
    return f"{record.topic}:{record.partition}:{record.offset}"


class ParkedReport(BaseModel):
    """One report (one input record) waiting for its next attempt."""

    model_config = ConfigDict(frozen=True)

    source: str  # see ``record_source``
    topic: str
    key: str | None
    payload: str  # the record's value, as read
    since: float  # when the reporter first took it (Unix seconds): the give-up age counts from it
    attempts: int = 0
    # Turns skipped because the tenant's circuit was open; they lengthen the next wait.
    waits: int = 0
    last_status_code: int | None = None
    last_response_excerpt: str = ""
    last_error: str = ""

    @classmethod
    def from_record(cls, record: Record, since: float) -> ParkedReport:
        key = record.key.decode("utf-8", "replace") if record.key is not None else None
        return cls(
            source=record_source(record),
            topic=record.topic,
            key=key,
            payload=(record.value or b"").decode("utf-8", "replace"),
            since=since,
        )

    def last_result(self) -> AttemptResult:
        if self.attempts == 0:
            return NOT_ATTEMPTED
        return AttemptResult(
            status_code=self.last_status_code,
            response_excerpt=self.last_response_excerpt,
            error=self.last_error,
        )

    def after(self, attempts: int, result: AttemptResult) -> ParkedReport:
        """This report once ``attempts`` attempts were made, the last giving ``result``."""
        if attempts == self.attempts:
            return self
        return self.model_copy(
            update={
                "attempts": attempts,
                "last_status_code": result.status_code,
                "last_response_excerpt": result.response_excerpt,
                "last_error": result.error,
            }
        )

    def waited(self) -> ParkedReport:
        return self.model_copy(update={"waits": self.waits + 1})


class ParkedEntry(BaseModel):
    """A store entry: one message's parked reports, oldest first."""

    model_config = ConfigDict(frozen=True)

    kind: ParkedKind
    tenant: str
    reports: list[ParkedReport] = Field(min_length=1)

    @property
    def head(self) -> ParkedReport:
        return self.reports[0]

    def holds(self, source: str) -> bool:
        return any(report.source == source for report in self.reports)

    def queued(self, report: ParkedReport) -> ParkedEntry:
        return self.model_copy(update={"reports": [*self.reports, report]})

    def with_head(self, report: ParkedReport) -> ParkedEntry:
        return self.model_copy(update={"reports": [report, *self.reports[1:]]})

    def without_head(self) -> ParkedEntry | None:
        """What is left once the head is done with; None when nothing is."""
        if len(self.reports) == 1:
            return None
        return self.model_copy(update={"reports": self.reports[1:]})

    def to_value(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_value(cls, value: Mapping[str, Any]) -> ParkedEntry:
        return cls.model_validate(value)


def deferred_due_at(
    report: ParkedReport,
    *,
    now: float,
    not_before: float,
    policy: RetryPolicy,
    jitter: Callable[[], float],
) -> float:
    """When a report whose turn came while its tenant's circuit was open is looked at again.

    The wait grows with every attempt and every skipped turn (up to ``max_backoff_s``), so a long
    outage rewrites each parked report about once per ``max_backoff_s``, not once per pass; and
    never before the circuit's next probe.
    """
    ceiling = policy.backoff_ceiling_s(report.attempts + report.waits + 1)
    return max(not_before, now + ceiling * (0.5 + 0.5 * jitter()))


class ParkedCounts:
    """Parked messages per tenant and kind in the partitions held here, exported as a gauge."""

    def __init__(self) -> None:
        self._counts: dict[int, Counter[tuple[str, str]]] = {}

    def reset(self, partition: int, counts: Mapping[tuple[str, str], int]) -> None:
        before = self._counts.get(partition, Counter())
        self._counts[partition] = Counter({label: n for label, n in counts.items() if n})
        self._export(set(before) | set(counts))

    def change(self, partition: int, tenant: str, kind: str, delta: int) -> None:
        if delta == 0:
            return
        counts = self._counts.setdefault(partition, Counter())
        counts[(tenant, kind)] += delta
        self._export({(tenant, kind)})

    def drop(self, partitions: Iterable[int]) -> None:
        labels: set[tuple[str, str]] = set()
        for partition in partitions:
            labels |= set(self._counts.pop(partition, Counter()))
        self._export(labels)

    def total(self, tenant: str, kind: str) -> int:
        return sum(counts[(tenant, kind)] for counts in self._counts.values())

    def _export(self, labels: Iterable[tuple[str, str]]) -> None:
        for tenant, kind in labels:
            REPORTS_PARKED.labels(tenant, kind).set(self.total(tenant, kind))
