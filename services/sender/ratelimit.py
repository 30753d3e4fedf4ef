"""Rate limits per provider account: exact over any window, paced inside it.

A sliding-window log keeps every send (time and cost, in messages or segments): a send goes only
if the units sent during the window that ends with it, plus its cost, stay within the limit, so
the bound holds for every window of that length wherever it starts. ``SlidingWindowLimiter``
books a send time paced by GCRA (``acquire``/``book``), then checks the actual send against the
log at that time (``keep``): late sends wait until they fit. ``set_share`` scales the limit to
this instance's share of the traffic (lowered at once, raised one window later). The proof, the
two steps in detail and the sharing rule: docs/sending.md, "Rate limits".
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class _Log:
    """Times in order with the running total of units up to each: the window's content and
    "how far back must the window start for ``cost`` more to fit" are binary searches."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.totals: list[float] = []
        self.head = 0  # entries before it have left every window that still matters

    def expire(self, now: float, window_s: float) -> None:
        self.head = bisect.bisect_right(self.times, now - window_s, lo=self.head)
        if self.head > 1024 and self.head * 2 > len(self.times):
            left = self._left()
            del self.times[: self.head]
            del self.totals[: self.head]
            self.totals = [total - left for total in self.totals]
            self.head = 0

    def last(self) -> float | None:
        return self.times[-1] if self.head < len(self.times) else None

    def add(self, moment: float, cost: float) -> None:
        self.times.append(moment)
        self.totals.append((self.totals[-1] if self.totals else 0.0) + cost)

    def remove(self, moment: float, cost: float) -> bool:
        index = bisect.bisect_left(self.times, moment, lo=self.head)
        while index < len(self.times) and self.times[index] == moment:
            before = self.totals[index - 1] if index > 0 else 0.0
            if self.totals[index] - before == cost:
                del self.times[index]
                del self.totals[index]
                for later in range(index, len(self.totals)):
                    self.totals[later] -= cost
                return True
            index += 1
        return False

    def units(self, start: float, end: float) -> float:
        """Units in (start, end]."""
        low = bisect.bisect_right(self.times, start, lo=self.head)
        high = bisect.bisect_right(self.times, end, lo=self.head)
        if high <= low:
            return 0.0
        return self.totals[high - 1] - (self.totals[low - 1] if low > 0 else 0.0)

    def room_from(self, cost: float, limit: float, window_s: float) -> float:
        """The earliest time from which ``cost`` more units fit in the window ending there
        (given that nothing is added before it); -inf when they fit now."""
        in_window = (self.totals[-1] if self.totals else 0.0) - self._left()
        excess = in_window + cost - limit
        if excess <= 0 or self.head == len(self.times):
            return float("-inf")
        # The first entry whose leaving makes room; past the whole log the window is empty
        # (an oversized cost goes then).
        target = self._left() + min(excess, in_window)
        index = bisect.bisect_left(self.totals, target, lo=self.head)
        return self.times[min(index, len(self.times) - 1)] + window_s

    def _left(self) -> float:
        return self.totals[self.head - 1] if self.head > 0 else 0.0


class SlidingWindowLimiter:
    def __init__(
        self,
        limit: float,
        *,
        window_s: float = 1.0,
        burst_fraction: float = 0.01,
        catch_up_fraction: float = 0.03,
        quantum_s: float = 0.005,
        share: float = 1.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        if not 0.0 <= burst_fraction <= 1.0 or not 0.0 <= catch_up_fraction <= 1.0:
            raise ValueError("burst_fraction and catch_up_fraction must be between 0 and 1")
        if quantum_s < 0:
            raise ValueError("quantum_s must not be negative")
        self.account_limit = float(limit)
        self.window_s = float(window_s)
        self.burst_fraction = float(burst_fraction)
        self.catch_up_fraction = float(catch_up_fraction)
        self.quantum_s = float(quantum_s)
        self.clock = clock
        self.sleep = sleep
        self._share = _clamp(share)
        self._pending_share: tuple[float, float] | None = None  # (share, in force from)
        self._bookings = _Log()
        self._sends = _Log()
        self._theoretical_arrival = float("-inf")  # GCRA's TAT for bookings
        self._sends_theoretical_arrival = float("-inf")  # and for actual sends
        # Bookings made under a share are honoured after the share is lowered or gone: the
        # next owner of that share waits a window before using it (``set_share``).
        self._last_limit = self.account_limit * self._share

    # -- sharing -----------------------------------------------------------------------------

    def set_limit(self, limit: float, window_s: float | None = None) -> None:
        """A new account limit (a live reload), in force at once: the sends already in the log
        count against it, so a lower limit holds from the next send."""
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.account_limit = float(limit)
        if window_s is not None:
            self.window_s = float(window_s)
        if self._share > 0:
            self._last_limit = self.account_limit * self._share

    def set_share(self, share: float) -> None:
        """Take ``share`` (0..1) of the account's limit: lower at once, higher after a window."""
        share = _clamp(share)
        now = self.clock()
        current = self._share_at(now)
        if share <= current:
            self._share = share
            self._pending_share = None
        else:
            self._pending_share = (share, now + self.window_s)

    def limit_at(self, now: float) -> float:
        """Units this instance may send per window at ``now``."""
        limit = self.account_limit * self._share_at(now)
        if limit > 0:
            self._last_limit = limit
        return limit

    @property
    def limit(self) -> float:
        return self.limit_at(self.clock())

    def _share_at(self, now: float) -> float:
        if self._pending_share is not None and now >= self._pending_share[1]:
            self._share = self._pending_share[0]
            self._pending_share = None
        return self._share

    # -- booking -----------------------------------------------------------------------------

    def book(self, cost: float, now: float | None = None) -> float | None:
        """Plan ``cost`` units at the earliest time allowed (>= now) and return that time;
        None when this instance has no share of the limit at the moment."""
        if now is None:
            now = self.clock()
        if cost <= 0:
            return now
        limit = self.limit_at(now)
        if limit <= 0:
            return None
        self._bookings.expire(now, self.window_s)
        paced = max(
            now,
            self._theoretical_arrival - self.burst_fraction * self.window_s,
            self._bookings.room_from(cost, limit, self.window_s),
        )
        # The grid only delays the send; the pacing keeps its own schedule, or every rounding
        # would cost capacity.
        moment = self._on_grid(paced)
        last = self._bookings.last()
        if last is not None:
            moment = max(moment, last)  # the log stays in time order
        self._bookings.add(moment, cost)
        interval = self.window_s / limit
        self._theoretical_arrival = max(self._theoretical_arrival, paced) + cost * interval
        return moment

    async def acquire(self, cost: float, lead_s: float = 0.0) -> float:
        """Book ``cost`` units; return ``lead_s`` before the booked time, which is returned."""
        while True:
            moment = self.book(cost)
            if moment is not None:
                break
            await self.sleep(self.window_s)  # no share yet: look again later
        wait = moment - lead_s - self.clock()
        if wait > 0:
            await self.sleep(wait)
        return moment

    def cancel(self, moment: float, cost: float) -> None:
        """Forget a booking that will not be used (fewer bookings never break the bound)."""
        self._bookings.remove(moment, cost)

    def booked(self, start: float, end: float) -> float:
        """Units booked in the window (start, end]."""
        return self._bookings.units(start, end)

    # -- sending -----------------------------------------------------------------------------

    async def keep(self, moment: float, cost: float) -> float:
        """Wait for a booked time, then until the send fits the log of actual sends and its
        pace; record the send and return when it goes (``moment`` unless it came late)."""
        while True:
            now = self.clock()
            self._sends.expire(now, self.window_s)
            limit = self.limit_at(now) or self._last_limit
            ready = max(
                moment,
                self._sends.room_from(cost, limit, self.window_s),
                self._sends_theoretical_arrival - self.catch_up_fraction * self.window_s,
            )
            if ready <= now:
                self._sends.add(now, cost)
                interval = self.window_s / limit
                self._sends_theoretical_arrival = (
                    max(self._sends_theoretical_arrival, now) + cost * interval
                )
                return now
            # Others may send meanwhile (which only moves it later): look again then.
            await self.sleep(self._on_grid(ready) - now)

    def sent(self, start: float, end: float) -> float:
        """Units sent in the window (start, end]."""
        return self._sends.units(start, end)

    def _on_grid(self, moment: float) -> float:
        if self.quantum_s <= 0:
            return moment
        # A later time never breaks the bound (fewer sends share its window); an earlier one
        # could, so float rounding is only ever allowed to push it later.
        return max(moment, math.ceil(moment / self.quantum_s) * self.quantum_s)


def _clamp(share: float) -> float:
    return min(1.0, max(0.0, float(share)))
