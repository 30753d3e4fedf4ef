"""A circuit breaker: stop calling a peer that keeps failing, probe it one call at a time.

Closed, every call goes; its ``TripRule`` decides when failures open it (``FailureRate`` over a
window for the sender's provider accounts, ``ConsecutiveFailures`` for the reporter's Optimove).
Open, no call goes until its wait is over (``OpenWait``: a fixed cool-down, or growing per failed
probe); then it is half-open and exactly one call, the probe, goes. The probe's success closes it,
its failure opens it again. A failure is an answer that says the peer is unwell (5xx, 429, network
errors, timeouts), not a refusal about the request itself.
The reporter's configuration is explained in ``docs/reporter.md``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Literal, Protocol

CircuitState = Literal["closed", "open", "half_open"]
Clock = Callable[[], float]
# Seconds to stay open: given the opening's number (1 when it trips; n + 1 after n failed probes)
# and the peer's Retry-After, if it sent one.
OpenWait = Callable[[int, float | None], float]


class Permit(Enum):
    """What ``acquire`` handed out: a call while closed, or the one probe while half-open."""

    NORMAL = "normal"
    PROBE = "probe"


class TripRule(Protocol):
    """When the failures of a closed circuit open it."""

    def record(self, now: float, ok: bool) -> bool:
        """Take one answer; True when the circuit should open now."""
        ...

    def reset(self) -> None: ...


class FailureRate:
    """Open once ``min_calls`` calls were seen within ``window_s`` and ``failure_rate`` of them
    failed."""

    def __init__(
        self, failure_rate: float = 0.5, min_calls: int = 20, window_s: float = 30.0
    ) -> None:
        if not 0.0 < failure_rate <= 1.0:
            raise ValueError("failure_rate must be in (0, 1]")
        if min_calls < 1:
            raise ValueError("min_calls must be at least 1")
        self.failure_rate = failure_rate
        self.min_calls = min_calls
        self.window_s = window_s
        self._outcomes: deque[tuple[float, bool]] = deque()  # (at, ok)
        self._failures = 0

    def record(self, now: float, ok: bool) -> bool:
        self._outcomes.append((now, ok))
        if not ok:
            self._failures += 1
        horizon = now - self.window_s
        while self._outcomes and self._outcomes[0][0] <= horizon:
            _, old_ok = self._outcomes.popleft()
            if not old_ok:
                self._failures -= 1
        calls = len(self._outcomes)
        return calls >= self.min_calls and self._failures >= self.failure_rate * calls

    def reset(self) -> None:
        self._outcomes.clear()
        self._failures = 0


class ConsecutiveFailures:
    """Open after ``threshold`` failures in a row."""

    def __init__(self, threshold: int) -> None:
        self.threshold = max(1, threshold)
        self.count = 0

    def record(self, now: float, ok: bool) -> bool:
        self.count = 0 if ok else self.count + 1
        return self.count >= self.threshold

    def reset(self) -> None:
        self.count = 0


class CircuitBreaker:
    """One peer's circuit. ``allow``/``record``/``release`` for callers that hold no permit (a
    late answer while open changes nothing; one while half-open is taken as the probe's);
    ``acquire``/``settle``/``give_back`` for callers that know which call was the probe."""

    def __init__(
        self,
        *,
        failure_rate: float = 0.5,
        min_calls: int = 20,
        window_s: float = 30.0,
        cool_down_s: float = 30.0,
        trip: TripRule | None = None,
        open_wait: OpenWait | None = None,
        success_while_open_closes: bool = False,
        clock: Clock = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        self.trip: TripRule = trip or FailureRate(failure_rate, min_calls, window_s)
        self.cool_down_s = cool_down_s
        self.open_wait: OpenWait = open_wait or (lambda _opening, _retry_after: cool_down_s)
        # The reporter's Optimove: any answer that shows it is up closes the circuit.
        self.success_while_open_closes = success_while_open_closes
        self.clock = clock
        self.on_change = on_change
        self._open = False
        self._retry_at = 0.0
        self._probe_out = False
        self._failed_probes = 0
        self._reported: CircuitState = "closed"
        # Times the circuit closed after being open.
        self.recoveries = 0

    @property
    def state(self) -> CircuitState:
        return self._state(self.clock())

    @property
    def is_open(self) -> bool:
        """Open or half-open: not every call may go."""
        return self._open

    def next_attempt_at(self) -> float:
        return self._retry_at if self._open else self.clock()

    def blocked_until(self, now: float | None = None) -> float | None:
        """None when ``allow`` would let a call go now, else when to look again (clock time)."""
        now = self.clock() if now is None else now
        state = self._state(now)
        if state == "closed":
            return None
        if state == "open":
            return self._retry_at
        if self._probe_out:
            # The probe's answer decides; it cannot take longer than a cool-down to matter.
            return now + min(self.cool_down_s, 1.0)
        return None

    def acquire(self) -> Permit | None:
        """A permit for one call, or None when none may go now."""
        state = self._state(self.clock())
        if state == "closed":
            return Permit.NORMAL
        if state == "open" or self._probe_out:
            return None
        self._probe_out = True
        return Permit.PROBE

    def give_back(self, permit: Permit) -> None:
        """A call acquired but never answered: it tells nothing about the peer."""
        if permit is Permit.PROBE:
            self._probe_out = False

    def settle(
        self,
        permit: Permit,
        ok: bool,
        *,
        retry_after_s: float | None = None,
        urgent: bool = False,
    ) -> None:
        """The answer to a call made with ``permit``. ``urgent`` (a 429, say) opens at once."""
        now = self.clock()
        probe = permit is Permit.PROBE
        if probe:
            self._probe_out = False
        if not self._open:
            if self.trip.record(now, ok) or (not ok and (urgent or retry_after_s is not None)):
                self._failed_probes = 0
                self._open_until(now + self.open_wait(1, retry_after_s), now)
            return
        if ok:
            if probe or self.success_while_open_closes:
                self._close(now)
        elif probe:
            self._failed_probes += 1
            self._open_until(now + self.open_wait(self._failed_probes + 1, retry_after_s), now)
        elif retry_after_s is not None:
            # A call made before the circuit opened may still bring a longer Retry-After.
            self._retry_at = max(self._retry_at, now + self.open_wait(1, retry_after_s))

    def allow(self) -> bool:
        """May a call go now? In half-open state a True is the probe and must be answered."""
        return self.acquire() is not None

    def release(self) -> None:
        """An allowed call was not made after all."""
        self._probe_out = False

    def record(self, ok: bool) -> None:
        now = self.clock()
        state = self._state(now)
        if state == "open":
            return  # a call that left before the circuit opened; it changes nothing now
        self.settle(Permit.PROBE if state == "half_open" else Permit.NORMAL, ok)

    def _open_until(self, retry_at: float, now: float) -> None:
        self._open = True
        self._retry_at = retry_at
        self._state(now)

    def _close(self, now: float) -> None:
        self._open = False
        self._failed_probes = 0
        self.trip.reset()
        self.recoveries += 1
        self._state(now)

    def _state(self, now: float) -> CircuitState:
        if not self._open:
            state: CircuitState = "closed"
        elif now < self._retry_at:
            state = "open"
        else:
            state = "half_open"
        if state != self._reported:
            self._reported = state
            if self.on_change is not None:
                self.on_change(state)
        return state
