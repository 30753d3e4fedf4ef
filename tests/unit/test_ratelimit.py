"""The rate limiter: exact over every one-second window (not only aligned ones), paced, shared."""

from __future__ import annotations

import asyncio
import bisect
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.sender.ratelimit import SlidingWindowLimiter


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def limiter(limit: float, clock: FakeClock, **options: float) -> SlidingWindowLimiter:
    return SlidingWindowLimiter(limit, clock=clock, sleep=clock.sleep, **options)


def busiest_window(bookings: list[tuple[float, float]], window_s: float = 1.0) -> float:
    """Most units inside any half-open window [t, t + window_s), wherever it starts.

    The maximum is reached by a window starting at a booking, so those are the ones checked;
    windows are taken both ways round ((t - w, t] too) so that neither boundary hides a unit.
    """
    times = sorted(moment for moment, _ in bookings)
    costs = [cost for _, cost in sorted(bookings)]
    best = 0.0
    for index, start in enumerate(times):
        end = bisect.bisect_left(times, start + window_s)
        best = max(best, sum(costs[index:end]))
        first = bisect.bisect_right(times, start - window_s)
        best = max(best, sum(costs[first : index + 1]))
    return best


def demand(
    clock: FakeClock, limit: SlidingWindowLimiter, gaps: list[float], costs: list[int]
) -> list[tuple[float, float]]:
    """Book one request after each gap; returns the bookings (time, cost)."""
    bookings = []
    for gap, cost in zip(gaps, costs, strict=True):
        clock.now += gap
        moment = limit.book(cost)
        assert moment is not None
        assert moment >= clock.now
        bookings.append((moment, float(cost)))
    return bookings


@settings(max_examples=150, deadline=None)
@given(
    rate=st.integers(min_value=1, max_value=400),
    gaps=st.lists(st.floats(min_value=0.0, max_value=0.3), min_size=1, max_size=600),
    costs=st.data(),
    burst=st.sampled_from([0.0, 0.02, 0.5, 1.0]),
    quantum=st.sampled_from([0.0, 0.005, 0.1]),
)
def test_no_window_of_one_second_ever_holds_more_than_the_limit(
    rate: int, gaps: list[float], costs: st.DataObject, burst: float, quantum: float
) -> None:
    clock = FakeClock()
    limit = limiter(rate, clock, burst_fraction=burst, quantum_s=quantum)
    # Costs above the limit are the documented exception (tested below).
    cost = st.integers(1, min(4, rate))
    sizes = costs.draw(st.lists(cost, min_size=len(gaps), max_size=len(gaps)))
    bookings = demand(clock, limit, gaps, sizes)
    assert busiest_window(bookings) <= rate
    times = [moment for moment, _ in bookings]
    assert times == sorted(times)  # given out in order: a later request never goes first


def test_a_fixed_window_burst_at_the_boundary_is_refused() -> None:
    """A fixed one-second counter would allow 2x the limit across a boundary; this does not."""
    clock = FakeClock(start=10.9)
    limit = limiter(100, clock, burst_fraction=1.0, quantum_s=0)
    first = [limit.book(1) for _ in range(100)]
    assert first == [10.9] * 100  # the whole allowance at once (burst allowed)
    clock.now = 11.0  # a new "second" for a fixed window
    moment = limit.book(1)
    assert moment is not None
    assert moment >= 10.9 + 1.0  # only once the first booking has left the window


def test_saturating_demand_is_served_at_the_limit() -> None:
    clock = FakeClock()
    limit = limiter(1000, clock)
    start = clock.now
    bookings = [limit.book(1) for _ in range(10_000)]
    assert all(moment is not None for moment in bookings)
    last = max(moment for moment in bookings if moment is not None)
    rate = 10_000 / (last - start)
    assert 995 <= rate <= 1000 * 1.021  # the burst allowance is the only head start
    assert busiest_window([(m, 1.0) for m in bookings if m is not None]) <= 1000


def test_bookings_are_paced_evenly_on_the_grid() -> None:
    clock = FakeClock()
    limit = limiter(100, clock, burst_fraction=0.0, quantum_s=0.05)
    moments = [limit.book(1) for _ in range(20)]
    # One unit every 10 ms, placed on a 50 ms grid: five per grid point.
    assert moments == [pytest.approx(1000.0 + 0.05 * ((index + 4) // 5)) for index in range(20)]


def test_segments_count_against_the_limit_and_an_oversized_call_waits_for_an_empty_window() -> None:
    clock = FakeClock()
    limit = limiter(10, clock, burst_fraction=1.0, quantum_s=0)
    assert limit.book(6) == 1000.0
    assert limit.book(4) == 1000.0
    # 25 units can never fit in a window of 10: it goes alone, into an empty window.
    oversized = limit.book(25)
    assert oversized is not None and oversized == pytest.approx(1001.0)
    assert limit.booked(oversized - 1.0, oversized) == 25
    follower = limit.book(1)
    assert follower is not None and follower >= oversized + 1.0  # the window is used up


def test_a_lower_share_applies_at_once_a_higher_one_after_a_window() -> None:
    clock = FakeClock()
    limit = limiter(1000, clock, share=1.0)
    limit.set_share(0.5)
    assert limit.limit == 500
    limit.set_share(1.0)
    assert limit.limit == 500  # the partitions' previous owner may still be in this window
    clock.now += 0.999
    assert limit.limit == 500
    clock.now += 0.002
    assert limit.limit == 1000
    limit.set_share(0.0)
    assert limit.limit == 0
    assert limit.book(1) is None


def test_two_instances_sharing_an_account_stay_within_it_across_a_rebalance() -> None:
    clock = FakeClock()
    first = limiter(100, clock, share=1.0, quantum_s=0)
    second = limiter(100, clock, share=0.0, quantum_s=0)
    bookings: list[tuple[float, float]] = []
    rng = random.Random(7)
    for step in range(4000):
        clock.now += rng.uniform(0, 0.004)
        if step == 1500:  # the second instance joins: six of twelve partitions move
            first.set_share(0.5)
            second.set_share(0.5)
        for limit in (first, second):
            moment = limit.book(1)
            if moment is not None and moment <= clock.now + 0.05:
                bookings.append((moment, 1.0))
            elif moment is not None:
                limit.cancel(moment, 1)
    assert busiest_window(bookings) <= 100


async def test_acquire_returns_a_lead_before_the_booked_time() -> None:
    clock = FakeClock()
    limit = limiter(10, clock, burst_fraction=0.0, quantum_s=0)
    assert await limit.acquire(1, lead_s=0.05) == 1000.0
    second = await limit.acquire(1, lead_s=0.05)
    assert second == pytest.approx(1000.1)
    assert clock.now == pytest.approx(1000.05)  # back early, to prepare the send
    assert await limit.keep(second, 1) == pytest.approx(1000.1)  # then on time
    assert clock.now == pytest.approx(1000.1)


async def test_acquire_waits_for_a_share() -> None:
    clock = FakeClock()
    limit = limiter(10, clock, share=0.0)
    limit.set_share(1.0)
    moment = await limit.acquire(1)
    assert moment >= 1001.0  # the raised share applies after one window
    assert clock.slept == [1.0]


async def test_late_sends_are_held_back_instead_of_piling_onto_punctual_ones() -> None:
    clock = FakeClock()
    limit = limiter(3, clock, burst_fraction=0.0, catch_up_fraction=0.0, quantum_s=0)
    moments = [limit.book(1) for _ in range(6)]
    third = 1 / 3
    assert moments == pytest.approx([1000 + n * third for n in range(6)])
    # The process stalls: the first three are ready only at 1000.9, together. They go at the
    # pace, not in a burst.
    clock.now = 1000.9
    late = [await limit.keep(moment, 1) for moment in moments[:3] if moment is not None]
    assert late == pytest.approx([1000.9, 1000.9 + third, 1000.9 + 2 * third])
    # The next three were due at 1001.0, 1001.33 and 1001.67: then, they would make more than
    # three sends within one second. They follow a second behind the late ones.
    sent = [await limit.keep(moment, 1) for moment in moments[3:] if moment is not None]
    assert sent == pytest.approx([moment + 1 for moment in late])
    assert busiest_window([(moment, 1.0) for moment in [*late, *sent]]) <= 3


async def test_a_short_stall_is_made_up_at_once_a_long_one_at_the_pace() -> None:
    clock = FakeClock()
    limit = limiter(100, clock, burst_fraction=0.0, catch_up_fraction=0.05, quantum_s=0)
    moments = [limit.book(1) for _ in range(20)]  # one every 10 ms
    assert [await limit.keep(m, 1) for m in moments[:5] if m is not None] == pytest.approx(
        moments[:5]
    )
    clock.now = 1000.08  # stalled 30 ms: three sends behind, within the 50 ms allowance
    caught_up = [await limit.keep(m, 1) for m in moments[5:9] if m is not None]
    assert caught_up[:3] == pytest.approx([1000.08] * 3)  # made up at once
    clock.now = 1000.4  # stalled 310 ms: far behind
    late = [await limit.keep(m, 1) for m in moments[9:] if m is not None]
    # The allowance (five) plus the one due go at once; the rest at the limit's pace.
    assert late == pytest.approx([1000.4] * 6 + [1000.41, 1000.42, 1000.43, 1000.44, 1000.45])


@settings(max_examples=100, deadline=None)
@given(
    delays=st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=1, max_size=300),
    rate=st.integers(min_value=1, max_value=50),
)
def test_sends_stay_within_the_limit_however_late_they_come(delays: list[float], rate: int) -> None:
    clock = FakeClock()
    limit = limiter(rate, clock, quantum_s=0.005)
    moments = [limit.book(1) for _ in delays]
    sent: list[tuple[float, float]] = []

    async def send_all() -> None:
        # Each send is late by its own delay (a stalled process, a slow Kafka write).
        for moment, delay in sorted(zip(moments, delays, strict=True), key=lambda p: p[0] or 0):
            assert moment is not None
            clock.now = max(clock.now, moment + delay)
            sent.append((await limit.keep(moment, 1), 1.0))

    asyncio.run(send_all())
    assert busiest_window(sent) <= rate


def test_cancelling_frees_room_and_never_breaks_the_order() -> None:
    clock = FakeClock()
    limit = limiter(3, clock, burst_fraction=1.0, quantum_s=0)
    moments = [limit.book(1) for _ in range(3)]
    assert moments == [1000.0] * 3
    limit.cancel(1000.0, 1)
    assert limit.booked(999.0, 1000.0) == 2
    assert limit.book(1) == pytest.approx(1000.0)  # the room it gave back
    assert limit.book(1) == pytest.approx(1001.0)


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        SlidingWindowLimiter(0)
    with pytest.raises(ValueError):
        SlidingWindowLimiter(10, window_s=0)
    with pytest.raises(ValueError):
        SlidingWindowLimiter(10, burst_fraction=2)


async def test_a_limit_lowered_live_holds_from_the_next_send() -> None:
    """A reload lowers the account's limit (issue 18): the sends already counted count against
    the new limit, so no window that ends after the change holds more than it."""
    clock = FakeClock()
    limit = limiter(100, clock, burst_fraction=0.0, catch_up_fraction=0.0, quantum_s=0)
    sent = []
    for _ in range(150):  # a second and a half at 100/s
        moment = limit.book(1)
        assert moment is not None
        clock.now = max(clock.now, moment)
        sent.append(await limit.keep(moment, 1))
    changed_at = clock.now
    limit.set_limit(20)
    after = []
    for _ in range(60):
        moment = limit.book(1)
        assert moment is not None
        clock.now = max(clock.now, moment)
        after.append(await limit.keep(moment, 1))
    # Every one-second window that ends at a send made after the change holds at most 20.
    everything = sorted([*sent, *after])
    for end in after:
        start = end - 1.0
        assert sum(1 for moment in everything if start < moment <= end) <= 20
    assert after[0] >= changed_at
    rate = (len(after) - 1) / (after[-1] - after[0])
    assert rate == pytest.approx(20, rel=0.05)  # and it runs at the new limit
