"""What a parked report holds, how a message's queue of reports moves, and the parked gauge."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY

from services.reporter.delivery import NOT_ATTEMPTED, AttemptResult, RetryPolicy
from services.reporter.parking import (
    ParkedCounts,
    ParkedEntry,
    ParkedReport,
    deferred_due_at,
    delivery_key,
    incoming_key,
    key_prefix,
    record_source,
)
from shared.config import KafkaSettings
from shared.contract.topics import REPORTER_STATE
from shared.kafka.runner import Record
from shared.kafka.store import ChangelogStore

POLICY = RetryPolicy(give_up_after_s=600.0, max_backoff_s=60.0, base_backoff_s=1.0)


def record(offset: int, value: bytes = b'{"x": 1}', key: bytes | None = b"m-1") -> Record:
    return ConsumerRecord(
        topic="sms.statuses",
        partition=4,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value),
        headers=[],
    )


def report(offset: int) -> ParkedReport:
    return ParkedReport.from_record(record(offset), since=100.0)


def test_a_report_remembers_its_record() -> None:
    parked = report(17)
    assert parked.source == record_source(record(17)) == "sms.statuses:4:17"
    assert (parked.topic, parked.key, parked.payload) == ("sms.statuses", "m-1", '{"x": 1}')
    assert parked.since == 100.0
    assert parked.attempts == 0
    assert parked.last_result() is NOT_ATTEMPTED


def test_after_an_attempt_it_keeps_the_last_answer() -> None:
    answered = AttemptResult(status_code=503, response_excerpt="busy", retry_after_s=3)
    parked = report(1).after(2, answered)

    assert parked.attempts == 2
    last = parked.last_result()
    assert (last.status_code, last.response_excerpt) == (503, "busy")
    # Without a new attempt nothing changes.
    assert parked.after(2, AttemptResult(status_code=500)) is parked
    assert parked.waited().waits == 1


def test_a_message_queue_keeps_order_and_recognises_a_record_read_twice() -> None:
    entry = ParkedEntry(kind="delivery", tenant="acme", reports=[report(1)])
    entry = entry.queued(report(5))

    assert [r.source for r in entry.reports] == ["sms.statuses:4:1", "sms.statuses:4:5"]
    assert entry.holds("sms.statuses:4:5")
    assert not entry.holds("sms.statuses:4:6")

    retried = entry.with_head(entry.head.after(1, AttemptResult(status_code=503)))
    assert retried.head.attempts == 1
    assert retried.reports[1] == report(5)

    rest = retried.without_head()
    assert rest is not None
    assert [r.source for r in rest.reports] == ["sms.statuses:4:5"]
    assert rest.without_head() is None


def test_an_entry_survives_its_changelog_form() -> None:
    entry = ParkedEntry(
        kind="incoming",
        tenant="acme",
        reports=[report(9).after(3, AttemptResult(status_code=None, error="timeout"))],
    )
    assert ParkedEntry.from_value(entry.to_value()) == entry


def test_an_entry_needs_a_report() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ParkedEntry(kind="delivery", tenant="acme", reports=[])


def test_keys_group_by_kind_and_tenant() -> None:
    assert delivery_key("acme", "m-1") == "delivery/acme/m-1"
    assert incoming_key("acme", "e-1") == "incoming/acme/e-1"
    assert delivery_key("acme", "m-1").startswith(key_prefix("delivery", "acme"))
    assert not incoming_key("acme", "e-1").startswith(key_prefix("delivery", "acme"))


def test_a_turn_skipped_waits_longer_each_time_but_never_before_the_probe() -> None:
    waits = []
    parked = report(1)
    for _ in range(8):
        due = deferred_due_at(parked, now=1000.0, not_before=0.0, policy=POLICY, jitter=lambda: 1)
        waits.append(due - 1000.0)
        parked = parked.waited()
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60]

    due = deferred_due_at(report(1), now=1000.0, not_before=1500.0, policy=POLICY, jitter=lambda: 0)
    assert due == 1500.0


def test_half_of_the_wait_is_jitter() -> None:
    parked = report(1).waited().waited()  # ceiling 4 s
    due = deferred_due_at(parked, now=0.0, not_before=0.0, policy=POLICY, jitter=lambda: 0.0)
    assert due == 2.0


def gauge(tenant: str, kind: str) -> float | None:
    return REGISTRY.get_sample_value("smsbridge_reports_parked", {"tenant": tenant, "kind": kind})


def test_parked_counts_add_up_over_partitions_and_follow_them() -> None:
    counts = ParkedCounts()
    counts.reset(0, {("t-gauge", "delivery"): 3})
    counts.reset(1, {("t-gauge", "delivery"): 2, ("t-gauge", "incoming"): 1})
    counts.change(1, "t-gauge", "delivery", +1)
    assert gauge("t-gauge", "delivery") == 6
    assert gauge("t-gauge", "incoming") == 1

    counts.change(0, "t-gauge", "delivery", -1)
    counts.drop([1])

    assert counts.total("t-gauge", "delivery") == 2
    assert gauge("t-gauge", "delivery") == 2
    assert gauge("t-gauge", "incoming") == 0


@pytest.fixture
def store() -> Iterator[ChangelogStore]:
    store = ChangelogStore(KafkaSettings(), REPORTER_STATE, name="test-parking")
    store.load(2, [])
    yield store
    store.close()


def test_the_store_counts_keys_by_prefix(store: ChangelogStore) -> None:
    for key in ("delivery/acme/m-1", "delivery/acme/m-2", "delivery/acme2/m-3", "incoming/acme/e"):
        store.put(2, key, {"v": 1})
    # Keys just around the prefix's range are not counted.
    store.put(2, "delivery/acme.", {"v": 1})
    store.put(2, "delivery/acme0", {"v": 1})

    assert store.count_prefix(2, key_prefix("delivery", "acme")) == 2
    assert store.count_prefix(2, key_prefix("delivery", "acme2")) == 1
    assert store.count_prefix(2, key_prefix("incoming", "acme")) == 1
    assert store.count_prefix(2, key_prefix("incoming", "beta")) == 0
    assert store.count_prefix(2, "") == store.count(2) == 6
