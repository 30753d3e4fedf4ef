"""The e2e benchmark's latency search (bench/latency_search.py), run against fake pipelines: each
try of the real one costs a stack run, so the decision must be right before it spends them."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from bench import e2e
from bench.latency_search import RULES, SearchRules, Tried, best_rate, next_rate

Outcome = Callable[[float], Tried]


def search(outcome: Outcome, throughput: float, rules: SearchRules = RULES) -> list[Tried]:
    """The benchmark's loop without the benchmark: every try, in order."""
    tried: list[Tried] = []
    rate = next_rate(tried, throughput, rules)
    while rate is not None:
        tried.append(outcome(rate))
        assert len(tried) <= rules.max_tries + 1, "the search does not end"
        rate = next_rate(tried, throughput, rules)
    return tried


def threshold(limit: float) -> Outcome:
    """A pipeline whose p99 stays at 0.5 s up to ``limit`` msg/s, then climbs past 1.5 s."""

    def outcome(rate: float) -> Tried:
        return Tried(rate, 0.5 if rate <= limit else 2.0 + (rate - limit) / 100, True)

    return outcome


@pytest.mark.parametrize(
    ("throughput", "limit"),
    [(1_200.0, 950.0), (1_000.0, 700.0), (240.0, 190.0), (2_000.0, 1_530.0)],
)
def test_the_search_converges_on_the_threshold_within_its_tolerance(
    throughput: float, limit: float
) -> None:
    tried = search(threshold(limit), throughput)

    found = best_rate(tried)
    assert found is not None
    assert found <= limit
    # The best passing rate and the lowest failing one bracket the threshold closely.
    lowest_failing = min(t.rate for t in tried if not RULES.passed(t))
    assert lowest_failing > limit
    assert lowest_failing - found <= max(RULES.tolerance * found, RULES.min_gap)
    assert len(tried) <= RULES.max_tries
    assert all(t.rate % RULES.step == 0 for t in tried)
    assert len({t.rate for t in tried}) == len(tried)  # never the same rate twice


def test_it_starts_at_a_share_of_the_throughput_and_goes_up_then_bisects() -> None:
    tried = search(threshold(950.0), 1_200.0)

    assert [t.rate for t in tried] == [720.0, 1_080.0, 900.0, 990.0]
    assert best_rate(tried) == 900.0


def test_it_never_exceeds_the_try_limit_even_far_from_converging() -> None:
    rules = SearchRules(max_tries=3, tolerance=0.0, min_gap=0.0)
    tried = search(threshold(5_000.0), 10_000.0, rules)
    assert len(tried) == 3

    # A threshold well above the throughput takes the climb, then the tries run out: the result
    # is still a rate that passed, below the lowest that failed.
    far = search(threshold(1_100.0), 800.0)
    assert [t.rate for t in far] == [480.0, 720.0, 1_080.0, 1_620.0, 1_350.0, 1_220.0]
    assert best_rate(far) == 1_080.0

    # A flaky pipeline (each rate passes or fails at random-looking turns) does not escape it.
    flaky = search(lambda rate: Tried(rate, 0.5 if int(rate) % 20 else 3.0, True), 1_000.0)
    assert len(flaky) <= RULES.max_tries


def test_when_even_the_first_rate_fails_it_goes_down() -> None:
    tried = search(threshold(100.0), 1_000.0)

    rates = [t.rate for t in tried]
    assert rates[0] == 600.0
    assert rates[1] == 300.0  # halved
    assert rates[2] == 150.0
    assert best_rate(tried) is not None
    assert best_rate(tried) <= 100.0  # type: ignore[operator]
    assert len(tried) <= RULES.max_tries


def test_when_nothing_passes_it_stops_at_the_floor_or_the_try_limit() -> None:
    def hopeless(rate: float) -> Tried:
        return Tried(rate, 9.0, False)

    tried = search(hopeless, 1_000.0)
    assert len(tried) == RULES.max_tries
    assert best_rate(tried) is None

    # On a slow machine the floor comes first: a rate is never tried twice, never below a step.
    slow = search(hopeless, 40.0)
    assert [t.rate for t in slow] == [20.0, 10.0]


def test_when_everything_passes_it_goes_up_to_three_times_the_throughput_and_no_further() -> None:
    tried = search(threshold(math.inf), 500.0)

    rates = [t.rate for t in tried]
    assert rates == sorted(rates)
    assert max(rates) == 1_500.0  # 3 x 500
    assert best_rate(tried) == 1_500.0
    assert len(tried) <= RULES.max_tries


def test_falling_behind_fails_a_rate_whatever_its_p99_and_so_does_no_report_at_all() -> None:
    assert not RULES.passed(Tried(500.0, 0.2, keeps_up=False))
    assert not RULES.passed(Tried(500.0, float("nan"), keeps_up=True))
    assert RULES.passed(Tried(500.0, 1.5, keeps_up=True))
    assert not RULES.passed(Tried(500.0, 1.51, keeps_up=True))


def test_a_failure_below_a_pass_does_not_shrink_the_bracket() -> None:
    tried = [Tried(600.0, 0.5, True), Tried(400.0, 3.0, True), Tried(900.0, 3.0, True)]

    assert next_rate(tried, 1_000.0) == 750.0
    assert best_rate(tried) == 600.0


def test_the_benchmark_searches_with_issue_19s_limit() -> None:
    assert e2e.SEARCH.p99_limit_s == e2e.LATENCY_TARGET_P99_S == 1.5
    assert e2e.LATENCY_TARGET_RATE == 700.0


def latency(rate: float, p99_s: float, keeps_up: bool = True) -> e2e.Latency:
    recipients = int(rate * 15)
    tally = {"final": recipients, "delivered": recipients, "failed": 0, "duplicates": 0}
    to_final = sorted([0.2] * 98 + [p99_s, p99_s + 0.1])
    return e2e.Latency(
        rate=rate,
        seconds=15.0,
        recipients=recipients,
        posted_rate=rate,
        final_rate=rate if keeps_up else rate / 2,
        to_first=[x / 2 for x in to_final],
        to_final=to_final,
        tally=tally,
        errors=0,
    )


def throughput_phase() -> e2e.Throughput:
    tally = {"final": 1_000, "delivered": 1_000, "failed": 0, "duplicates": 0}
    return e2e.Throughput(1_000, 0.0, 0.5, 1.0, {"ingress": 0.5}, {"ingress": 10}, tally, 0)


@pytest.mark.parametrize(("limit", "ok"), [(950.0, True), (650.0, False)])
def test_the_report_carries_the_rate_found_and_fails_below_issue_19s_target(
    limit: float, ok: bool
) -> None:
    steady = [latency(t.rate, t.p99_s) for t in search(threshold(limit), 1_200.0)]

    report = e2e.report(throughput_phase(), steady, {}, {}, None, 60.0)

    found = best_rate([lat.tried for lat in steady])
    assert found is not None
    assert report.figures["latency_search"]["max_rate_per_s"] == found
    assert len(report.figures["steady"]) == len(steady)
    assert any(f"{found:,.0f} msg/s" in value for _, value in report.summary)
    assert report.ok is ok
    if not ok:
        assert "below issue 19's 700 msg/s" in report.failures[0]
