"""The one circuit breaker with the reporter's rules (consecutive failures, growing waits, any
success closing it), driven directly: the same class the sender uses with a failure rate."""

from __future__ import annotations

import pytest

from shared.circuit import CircuitBreaker, CircuitState, ConsecutiveFailures, Permit


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, changes: list[CircuitState] | None = None) -> CircuitBreaker:
    return CircuitBreaker(
        trip=ConsecutiveFailures(2),
        open_wait=lambda opening, retry_after: retry_after or 2.0**opening,
        success_while_open_closes=True,
        clock=clock,
        on_change=changes.append if changes is not None else None,
    )


def test_consecutive_failures_trip_it_and_a_success_between_resets_the_count() -> None:
    clock = Clock()
    circuit = breaker(clock)
    circuit.settle(Permit.NORMAL, False)
    circuit.settle(Permit.NORMAL, True)
    circuit.settle(Permit.NORMAL, False)
    assert not circuit.is_open
    circuit.settle(Permit.NORMAL, False)
    assert circuit.is_open
    assert circuit.next_attempt_at() == pytest.approx(52.0)


def test_each_failed_probe_waits_longer() -> None:
    clock = Clock()
    circuit = breaker(clock)
    circuit.settle(Permit.NORMAL, False, urgent=True)
    waits = []
    for _ in range(3):
        clock.now = circuit.next_attempt_at()
        probe = circuit.acquire()
        assert probe is Permit.PROBE
        assert circuit.acquire() is None
        circuit.settle(probe, False)
        waits.append(circuit.next_attempt_at() - clock.now)
    assert waits == [4.0, 8.0, 16.0]


def test_a_late_retry_after_pushes_the_probe_back_and_a_late_success_closes_it() -> None:
    clock = Clock()
    changes: list[CircuitState] = []
    circuit = breaker(clock, changes)
    circuit.settle(Permit.NORMAL, False, retry_after_s=5.0)
    assert circuit.next_attempt_at() == pytest.approx(55.0)
    circuit.settle(Permit.NORMAL, False, retry_after_s=20.0)
    assert circuit.next_attempt_at() == pytest.approx(70.0)
    circuit.settle(Permit.NORMAL, True)
    assert not circuit.is_open
    assert circuit.recoveries == 1
    assert changes == ["open", "closed"]


def test_a_probe_given_back_frees_its_place() -> None:
    clock = Clock()
    circuit = breaker(clock)
    circuit.settle(Permit.NORMAL, False, urgent=True)
    clock.now += 2.0
    probe = circuit.acquire()
    assert probe is Permit.PROBE
    circuit.give_back(probe)
    assert circuit.is_open
    assert circuit.acquire() is Permit.PROBE
