"""The runner's lag arithmetic: messages behind the end, age of the oldest unfinished record."""

from __future__ import annotations

from shared.kafka.lag import HIGHWATER_HISTORY, PartitionLag, PartitionProgress

NOW = 1_800_000_000.0


def taken(*offsets_and_ages: tuple[int, float]) -> PartitionProgress:
    """Progress with these (offset, age in seconds at NOW) records taken, none finished."""
    progress = PartitionProgress()
    for offset, age in offsets_and_ages:
        progress.add(offset, int((NOW - age) * 1000))
    return progress


def test_idle_partition_reads_zero() -> None:
    progress = taken((0, 30.0), (1, 20.0))
    progress.finish(0)
    progress.finish(1)
    assert progress.lag(2, NOW) == PartitionLag(0, 0.0)


def test_age_is_the_oldest_unfinished_record_even_if_later_ones_are_done() -> None:
    progress = taken((10, 40.0), (11, 30.0), (12, 5.0))
    progress.finish(11)
    progress.finish(12)  # done, but offset 10 holds the partition
    assert progress.lag(13, NOW) == PartitionLag(3, 40.0)
    progress.finish(10)
    assert progress.lag(13, NOW) == PartitionLag(0, 0.0)


def test_records_taken_but_not_started_count() -> None:
    # Waiting for a slot or for their key's predecessor: pending with their own timestamps.
    progress = taken((0, 12.0), (1, 11.0))
    assert progress.lag(2, NOW) == PartitionLag(2, 12.0)


def test_records_not_taken_yet_are_aged_from_when_the_end_passed_the_position() -> None:
    progress = PartitionProgress(next_offset=100)
    progress.observe_highwater(100, NOW - 60)  # caught up then
    progress.observe_highwater(105, NOW - 25)  # five new records seen 25 s ago
    progress.observe_highwater(120, NOW - 5)
    lag = progress.lag(120, NOW)
    assert lag.messages == 20
    assert lag.seconds == 25.0
    # Taking and finishing the first five moves the age to the next mark.
    for offset in range(100, 105):
        progress.add(offset, int((NOW - 25) * 1000))
        progress.finish(offset)
    progress.observe_highwater(120, NOW)
    assert progress.lag(120, NOW) == PartitionLag(15, 5.0)


def test_the_age_keeps_growing_while_nothing_moves() -> None:
    progress = PartitionProgress(next_offset=0)
    progress.observe_highwater(3, NOW)
    first = progress.lag(3, NOW + 10)
    later = progress.lag(3, NOW + 70)
    assert (first.seconds, later.seconds) == (10.0, 70.0)
    assert first.messages == later.messages == 3


def test_a_long_history_keeps_its_oldest_mark() -> None:
    progress = PartitionProgress(next_offset=0)
    for step in range(HIGHWATER_HISTORY * 3):
        progress.observe_highwater(step + 1, NOW - 1000 + step)
    assert len(progress.highwater_seen) <= HIGHWATER_HISTORY
    assert progress.lag(HIGHWATER_HISTORY * 3, NOW).seconds == 1000.0


def test_unknown_end_gives_no_message_count_but_still_an_age() -> None:
    progress = taken((7, 9.0))
    assert progress.lag(None, NOW) == PartitionLag(0, 9.0)


def test_from_committed_counts_finished_records_until_their_offsets_are_committed() -> None:
    # As kafka-consumer-groups computes LAG: end offset minus the group's committed offset.
    progress = taken((5, 3.0), (6, 2.0))
    progress.committed = 5
    progress.finish(5)
    progress.finish(6)
    assert progress.lag(7, NOW, from_committed=True) == PartitionLag(2, 0.0)
    assert progress.lag(7, NOW) == PartitionLag(0, 0.0)
    progress.committed = 7
    assert progress.lag(7, NOW, from_committed=True) == PartitionLag(0, 0.0)
