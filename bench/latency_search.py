"""Which steady rate the e2e benchmark tries next in its latency search: a decision without I/O.

The e2e benchmark (``bench/e2e.py``) looks for the highest steady rate at which the p99 from
acceptance to final report stays within a limit while the pipeline keeps up. Each try costs a
stack run of its own, so the decision is kept apart from the runs: it is tested with a fake outcome
(tests/unit/test_bench_e2e_search.py), and the benchmark only feeds it what each run measured.

A bracketing search: start at a share of the measured throughput, go up while rates pass, down
while none has, then bisect between the best passing rate and the lowest failing one above it
until the two are close or the tries are used up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Tried:
    """What one steady run measured: the rate asked for (msg/s), the p99 from acceptance to final
    report (seconds; NaN when nothing arrived) and whether the final reports kept up."""

    rate: float
    p99_s: float
    keeps_up: bool


@dataclass(frozen=True)
class SearchRules:
    """The search's knobs; the defaults are the e2e benchmark's."""

    p99_limit_s: float = 1.5
    start_share: float = 0.6  # first try: this share of the measured throughput
    max_share: float = 3.0  # never above this multiple of the measured throughput
    up_factor: float = 1.5  # while every rate passed
    down_factor: float = 0.5  # while none passed
    tolerance: float = 0.10  # done when the bracket is within this share of the best rate ...
    min_gap: float = 50.0  # ... or within this many msg/s (what matters at low rates)
    step: float = 10.0  # rates are multiples of this (and never below it)
    max_tries: int = 6  # each try is a run of its own: about 15 s, plus the backlog it leaves

    def passed(self, tried: Tried) -> bool:
        """Within the limit and kept up (a NaN p99, no final report at all, fails)."""
        return tried.keeps_up and tried.p99_s <= self.p99_limit_s

    def rounded(self, rate: float) -> float:
        """The nearest multiple of ``step``, at least ``step``: readable rates, and a bisection
        that ends when the midpoint rounds onto a rate already tried."""
        return max(self.step, math.floor(rate / self.step + 0.5) * self.step)

    def ceiling(self, throughput: float) -> float:
        """The highest rate the search tries: ``max_share`` of the throughput, rounded down."""
        highest = self.max_share * max(0.0, throughput)
        return max(self.step, math.floor(highest / self.step) * self.step)


RULES = SearchRules()


def next_rate(
    tried: Sequence[Tried], throughput: float, rules: SearchRules = RULES
) -> float | None:
    """The next rate to try after ``tried`` (in the order tried), or None when the search is done.

    ``throughput`` (msg/s, the benchmark's throughput phase) sets the first rate and the ceiling.
    The bracket is the best passing rate and the lowest failing rate above it: a failure below a
    pass (noise) does not shrink it, and the result stays the best rate that passed.
    """
    ceiling = rules.ceiling(throughput)
    if not tried:
        return min(rules.rounded(rules.start_share * throughput), ceiling)
    if len(tried) >= rules.max_tries:
        return None
    passing = [t.rate for t in tried if rules.passed(t)]
    best = max(passing, default=None)
    failing = [t.rate for t in tried if not rules.passed(t) and (best is None or t.rate > best)]
    lowest_failing = min(failing, default=None)
    if best is None:
        assert lowest_failing is not None  # something was tried and nothing passed
        candidate = rules.rounded(lowest_failing * rules.down_factor)
    elif lowest_failing is None:
        candidate = min(rules.rounded(best * rules.up_factor), ceiling)
    elif lowest_failing - best <= max(rules.tolerance * best, rules.min_gap):
        return None
    else:
        candidate = rules.rounded((best + lowest_failing) / 2)
    # At the floor, at the ceiling, or a midpoint that rounds onto a bound: nothing new to learn.
    return None if any(candidate == t.rate for t in tried) else candidate


def best_rate(tried: Sequence[Tried], rules: SearchRules = RULES) -> float | None:
    """The highest rate that passed, or None when none did."""
    return max((t.rate for t in tried if rules.passed(t)), default=None)
