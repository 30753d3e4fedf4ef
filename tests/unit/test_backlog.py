"""The backlog's bookkeeping (shared/kafka/backlog.py): a lane keeps its order, the commit stops
at the lowest record waiting or read back, revoked partitions are forgotten."""

from __future__ import annotations

from collections.abc import Hashable

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.kafka.backlog import Backlog, OffsetQueue
from shared.kafka.runner import Record

TP = TopicPartition("t", 0)
OTHER = TopicPartition("t", 1)


class Limits:
    def __init__(self) -> None:
        self.limits: dict[Hashable, int] = {"a": 1, "b": 1}

    def lane_of(self, record: Record) -> Hashable | None:
        return None

    def lane_limit(self, lane: Hashable) -> int:
        return self.limits[lane]

    read_ahead_limit = 3


def no_reader() -> AIOKafkaConsumer:
    raise AssertionError("not read back here")


def test_offsets_queue_in_order_and_compact() -> None:
    queue = OffsetQueue()
    for offset in range(10_000):
        queue.append(offset)
    assert queue.peek(3) == [0, 1, 2]
    queue.drop(9_000)
    assert len(queue) == 1_000 and queue.first() == 9_000


def test_a_lane_waits_when_full_and_keeps_its_order_after() -> None:
    limits = Limits()
    backlog = Backlog(limits, "test", no_reader)
    assert not backlog.must_wait(TP, None)  # no lane: never waits
    assert not backlog.must_wait(TP, "a")
    backlog.started("a")
    assert backlog.must_wait(TP, "a")  # full
    backlog.wait(TP, "a", 7)
    limits.limits["a"] = 10
    assert backlog.must_wait(TP, "a")  # room now, but an older record of its lane waits
    assert not backlog.must_wait(OTHER, "a")  # on another partition there is none
    assert not backlog.must_wait(TP, "b")


def test_the_commit_stops_at_the_lowest_record_waiting_or_read_back() -> None:
    backlog = Backlog(Limits(), "test", no_reader)
    assert backlog.first_offset(TP) is None
    backlog.wait(TP, "a", 12)
    backlog.wait(TP, "b", 9)
    backlog.wait(OTHER, "a", 3)
    assert backlog.first_offset(TP) == 9
    backlog._taken[TP] = {5}  # read back, in progress
    assert backlog.first_offset(TP) == 5
    backlog.finished(TP, 5, "b", taken=True)
    assert backlog.first_offset(TP) == 9
    assert backlog.waiting() == 3
    backlog.drop({TP})
    assert backlog.first_offset(TP) is None
    assert backlog.waiting() == 1


def test_the_reader_stops_reading_ahead_at_the_handlers_limit() -> None:
    backlog = Backlog(Limits(), "test", no_reader)
    backlog.wait(TP, "a", 1)
    backlog.wait(TP, "a", 2)
    assert not backlog.full()
    backlog.wait(OTHER, "b", 1)
    assert backlog.full()  # 3 wait: the runner reads no further


def test_a_busy_lane_is_read_back_in_pieces_of_half_its_limit() -> None:
    """Each read back opens a reader: a slot at a time would open one per record."""
    limits = Limits()
    limits.limits["a"] = 10
    backlog = Backlog(limits, "test", no_reader)
    for offset in range(100):
        backlog.wait(TP, "a", offset)
    for _ in range(6):
        backlog.started("a")
    assert list(backlog._picks(budget=100)) == []  # 4 free of 10: wait for more room
    backlog.finished(TP, 0, "a", taken=False)
    assert list(backlog._picks(budget=100)) == [(TP, "a", 5)]  # half free: read them back
    for offset in range(6):
        backlog.finished(TP, offset, "a", taken=False)
    assert list(backlog._picks(budget=3)) == [(TP, "a", 3)]  # idle: whatever the budget allows


def test_a_busy_lane_with_few_records_waiting_takes_them_as_they_fit() -> None:
    limits = Limits()
    limits.limits["a"] = 10
    backlog = Backlog(limits, "test", no_reader)
    backlog.wait(TP, "a", 1)
    backlog.wait(TP, "a", 2)
    for _ in range(8):
        backlog.started("a")
    assert list(backlog._picks(budget=100)) == [(TP, "a", 2)]  # all that waits fits
