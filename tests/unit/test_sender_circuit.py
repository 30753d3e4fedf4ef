"""The circuit breaker per provider account: trip on an error rate, probe after a cool-down."""

from __future__ import annotations

import pytest

from shared.circuit import CircuitBreaker, CircuitState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state_of(circuit: CircuitBreaker) -> CircuitState:
    return circuit.state


def breaker(clock: Clock, changes: list[CircuitState] | None = None) -> CircuitBreaker:
    return CircuitBreaker(
        failure_rate=0.5,
        min_calls=4,
        window_s=10.0,
        cool_down_s=30.0,
        clock=clock,
        on_change=changes.append if changes is not None else None,
    )


def test_failures_below_the_minimum_number_of_calls_do_not_trip_it() -> None:
    clock = Clock()
    circuit = breaker(clock)
    for _ in range(3):
        assert circuit.allow()
        circuit.record(False)
    assert state_of(circuit) == "closed"
    assert circuit.blocked_until() is None


def test_it_opens_at_the_failure_rate_and_refuses_calls_for_the_cool_down() -> None:
    clock = Clock()
    changes: list[CircuitState] = []
    circuit = breaker(clock, changes)
    for ok in (True, True, False, True, False):  # 2 of 5: below half
        circuit.record(ok)
    assert state_of(circuit) == "closed"
    circuit.record(False)  # 3 of 6: half
    assert state_of(circuit) == "open"
    assert changes == ["open"]
    assert not circuit.allow()
    assert circuit.blocked_until() == pytest.approx(130.0)
    clock.now = 129.9
    assert not circuit.allow()


def test_old_outcomes_leave_the_window() -> None:
    clock = Clock()
    circuit = breaker(clock)
    for _ in range(3):
        circuit.record(False)
    clock.now += 10.0  # those three are older than the window now
    circuit.record(False)
    for _ in range(3):
        circuit.record(True)
    assert state_of(circuit) == "closed"  # 1 failure of 4 in the window


def test_half_open_lets_one_probe_through_and_its_success_closes_it() -> None:
    clock = Clock()
    changes: list[CircuitState] = []
    circuit = breaker(clock, changes)
    for _ in range(4):
        circuit.record(False)
    clock.now += 30.0
    assert state_of(circuit) == "half_open"
    assert circuit.allow()  # the probe
    assert not circuit.allow()  # only one at a time
    assert circuit.blocked_until() is not None
    circuit.record(True)
    assert state_of(circuit) == "closed"
    assert changes == ["open", "half_open", "closed"]
    # A fresh window: earlier failures do not count against the recovered provider.
    for _ in range(3):
        circuit.record(False)
    assert state_of(circuit) == "closed"


def test_a_failed_probe_opens_it_for_another_cool_down() -> None:
    clock = Clock()
    circuit = breaker(clock)
    for _ in range(4):
        circuit.record(False)
    clock.now += 30.0
    assert circuit.allow()
    clock.now += 2.0
    circuit.record(False)
    assert state_of(circuit) == "open"
    assert circuit.blocked_until() == pytest.approx(clock.now + 30.0)


def test_a_probe_given_back_lets_the_next_caller_probe() -> None:
    clock = Clock()
    circuit = breaker(clock)
    for _ in range(4):
        circuit.record(False)
    clock.now += 30.0
    assert circuit.allow()
    circuit.release()  # the caller did not make the call after all
    assert circuit.allow()


def test_a_late_answer_of_a_call_made_before_it_opened_changes_nothing() -> None:
    clock = Clock()
    circuit = breaker(clock)
    for _ in range(4):
        circuit.record(False)
    circuit.record(True)
    assert state_of(circuit) == "open"


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_rate=0)
    with pytest.raises(ValueError):
        CircuitBreaker(min_calls=0)
