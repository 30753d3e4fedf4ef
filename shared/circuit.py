"""A circuit breaker per provider account: stop calling a provider that keeps failing.

Closed: every call goes; outcomes are kept for ``window_s``. Once at least ``min_calls`` calls
were seen in the window and the share of failures reaches ``failure_rate``, the circuit opens.

Open: no call goes for ``cool_down_s``; callers route around the provider (or wait, when there is
no other route). After the cool-down the circuit is half-open.

Half-open: exactly one call, the probe, goes. Its success closes the circuit (with an empty
window); its failure opens it for another cool-down. A caller that was allowed a call and then
did not make it gives the permission back with ``release``, so the probe is never lost.

A failure is an outcome that says the provider is unwell (5xx, 429, network errors, timeouts),
not a message the provider refused for its own reasons (an invalid number is a healthy answer).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Literal

CircuitState = Literal["closed", "open", "half_open"]
Clock = Callable[[], float]


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_rate: float = 0.5,
        min_calls: int = 20,
        window_s: float = 30.0,
        cool_down_s: float = 30.0,
        clock: Clock = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        if not 0.0 < failure_rate <= 1.0:
            raise ValueError("failure_rate must be in (0, 1]")
        if min_calls < 1:
            raise ValueError("min_calls must be at least 1")
        self.failure_rate = failure_rate
        self.min_calls = min_calls
        self.window_s = window_s
        self.cool_down_s = cool_down_s
        self.clock = clock
        self.on_change = on_change
        self._state: CircuitState = "closed"
        self._outcomes: deque[tuple[float, bool]] = deque()  # (at, ok)
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False

    @property
    def state(self) -> CircuitState:
        self._cool_down_over(self.clock())
        return self._state

    def blocked_until(self, now: float | None = None) -> float | None:
        """None when ``allow`` would let a call go now, else when to look again (clock time)."""
        now = self.clock() if now is None else now
        self._cool_down_over(now)
        if self._state == "closed":
            return None
        if self._state == "open":
            return self._opened_at + self.cool_down_s
        if self._probe_out:
            # The probe's answer decides; it cannot take longer than a cool-down to matter.
            return now + min(self.cool_down_s, 1.0)
        return None

    def allow(self) -> bool:
        """May a call go now? In half-open state a True is the probe and must be answered."""
        now = self.clock()
        if self.blocked_until(now) is not None:
            return False
        if self._state == "half_open":
            self._probe_out = True
        return True

    def release(self) -> None:
        """An allowed call was not made after all."""
        self._probe_out = False

    def record(self, ok: bool) -> None:
        now = self.clock()
        self._cool_down_over(now)
        if self._state == "half_open":
            self._probe_out = False
            if ok:
                self._outcomes.clear()
                self._failures = 0
                self._set("closed")
            else:
                self._open(now)
            return
        if self._state == "open":
            return  # a call that left before the circuit opened; it changes nothing now
        self._outcomes.append((now, ok))
        if not ok:
            self._failures += 1
        self._expire(now)
        calls = len(self._outcomes)
        if calls >= self.min_calls and self._failures >= self.failure_rate * calls:
            self._open(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._outcomes.clear()
        self._failures = 0
        self._set("open")

    def _cool_down_over(self, now: float) -> None:
        if self._state == "open" and now >= self._opened_at + self.cool_down_s:
            self._probe_out = False
            self._set("half_open")

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._outcomes and self._outcomes[0][0] <= horizon:
            _, ok = self._outcomes.popleft()
            if not ok:
                self._failures -= 1

    def _set(self, state: CircuitState) -> None:
        if state != self._state:
            self._state = state
            if self.on_change is not None:
                self.on_change(state)
