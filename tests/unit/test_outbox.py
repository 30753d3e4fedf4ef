"""The outbox (sender, normalizer): one publish per turn of the event loop, each caller
acknowledged."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from services.reporter.outcomes import acknowledged, merge_acknowledged
from shared.contract.events import OptOutChange, ReportOutcome, StateChange
from shared.contract.topics import NORMALIZER_STATE, OPT_OUTS
from shared.kafka.clients import KafkaUnavailable, OutRecord, Publisher
from shared.kafka.outbox import Outbox


class CountingPublisher(Publisher):
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail = False

    async def publish(self, records: Iterable[OutRecord]) -> None:
        keys = [record.key for record in records]
        self.calls.append(keys)
        await asyncio.sleep(0)
        if self.fail:
            raise KafkaUnavailable("broker down")


def record(key: str) -> OutRecord:
    change = OptOutChange(tenant="acme", number=key, opted_out=True, source="test")
    return OutRecord(OPT_OUTS, key, change)


async def test_callers_of_one_turn_share_one_publish_in_their_order() -> None:
    publisher = CountingPublisher()
    outbox = Outbox(publisher)
    await asyncio.gather(
        outbox.publish([record("a1"), record("a2")]),
        outbox.publish([record("b1")]),
        outbox.publish([record("c1"), record("c2")]),
    )
    assert publisher.calls == [["a1", "a2", "b1", "c1", "c2"]]
    await outbox.publish([record("d1")])
    assert publisher.calls[-1] == ["d1"]


async def test_a_failed_publish_fails_every_caller_in_it() -> None:
    publisher = CountingPublisher()
    publisher.fail = True
    outbox = Outbox(publisher)
    results = await asyncio.gather(
        outbox.publish([record("a")]), outbox.publish([record("b")]), return_exceptions=True
    )
    assert [type(result) for result in results] == [KafkaUnavailable, KafkaUnavailable]
    publisher.fail = False
    await outbox.publish([record("a")])  # and the next turn works again


async def test_nothing_to_publish_publishes_nothing() -> None:
    publisher = CountingPublisher()
    await Outbox(publisher).publish([])
    assert publisher.calls == []


async def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    publisher = CountingPublisher()
    outbox = Outbox(publisher)
    cancelled = asyncio.create_task(outbox.publish([record("a")]))
    other = asyncio.create_task(outbox.publish([record("b")]))
    await asyncio.sleep(0)
    cancelled.cancel()
    await other
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert publisher.calls == [["a", "b"]]  # handed over already: its records still go


async def test_a_record_that_cannot_be_encoded_fails_its_own_caller_alone() -> None:
    publisher = CountingPublisher()
    outbox = Outbox(publisher)
    unencodable = OutRecord(NORMALIZER_STATE, "bad", StateChange(value={"x": object()}))
    results = await asyncio.gather(
        outbox.publish([record("a")]),
        outbox.publish([unencodable]),
        outbox.publish([record("b")]),
        return_exceptions=True,
    )
    # Its own error, not "Kafka unavailable": the runner retries it, then dead-letters it.
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], TypeError)
    assert publisher.calls == [["a", "b"]]


async def test_the_reporters_counts_of_one_turn_go_out_as_one_record_per_tenant_and_kind() -> None:
    """``merge_acknowledged``: the campaigns service reads one outcome where it read many, and
    the counts add up to the same."""
    published: list[OutRecord] = []

    class Recording(Publisher):
        def __init__(self) -> None:
            pass

        async def publish(self, records: Iterable[OutRecord]) -> None:
            published.extend(records)

    outbox = Outbox(Recording(), merge=merge_acknowledged)
    await asyncio.gather(
        outbox.publish([record("a"), acknowledged("acme", "delivery", {"c1": 1})]),
        outbox.publish([acknowledged("acme", "delivery", {"c1": 1, "c2": 2})]),
        outbox.publish([acknowledged("acme", "incoming", {"": 3})]),
        outbox.publish([acknowledged("other", "delivery", {"c1": 1}), record("b")]),
    )
    outcomes = [
        (r.key, r.value.kind, r.value.counts) if isinstance(r.value, ReportOutcome) else r.key
        for r in published
    ]
    assert outcomes == [
        "a",
        ("acme", "delivery", {"c1": 2, "c2": 2}),
        ("acme", "incoming", {"": 3}),
        ("other", "delivery", {"c1": 1}),
        "b",
    ]
