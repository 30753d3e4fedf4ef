"""The shared circuit breaker as the reporter configures it per tenant: when requests go, when
only one probe goes, when it closes."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from services.reporter.delivery import AttemptResult, RetryPolicy
from services.reporter.tenant_circuits import TenantCircuit, TenantCircuits
from shared.circuit import Permit

POLICY = RetryPolicy(give_up_after_s=600.0, max_backoff_s=60.0, base_backoff_s=1.0)
FAILED = AttemptResult(status_code=503)
TIMED_OUT = AttemptResult(status_code=None, error="timeout after 1.0s")
OK = AttemptResult(status_code=200)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def circuit(clock: Clock, threshold: int = 3, tenant: str = "acme") -> TenantCircuit:
    # jitter 1.0: the wait is the whole backoff ceiling, so the numbers below are exact.
    return TenantCircuit(
        tenant, failure_threshold=threshold, policy=POLICY, clock=clock, jitter=lambda: 1.0
    )


def fail(breaker: TenantCircuit, result: AttemptResult = FAILED, times: int = 1) -> None:
    for _ in range(times):
        permit = breaker.acquire()
        assert permit is not None
        breaker.release(permit, result)


def gauge(tenant: str) -> float | None:
    return REGISTRY.get_sample_value("smsbridge_optimove_circuit_open", {"tenant": tenant})


def test_closed_lets_every_request_go_at_once() -> None:
    breaker = circuit(Clock())
    permits = [breaker.acquire() for _ in range(5)]
    assert permits == [Permit.NORMAL] * 5
    assert not breaker.is_open


def test_opens_after_the_threshold_of_consecutive_failures() -> None:
    clock = Clock()
    breaker = circuit(clock, threshold=3, tenant="t-open")
    fail(breaker, times=2)
    assert not breaker.is_open
    fail(breaker, TIMED_OUT)

    assert breaker.is_open
    assert gauge("t-open") == 1
    assert breaker.acquire() is None
    assert breaker.next_attempt_at() == pytest.approx(clock.now + 1.0)


def test_a_success_in_between_resets_the_count() -> None:
    breaker = circuit(Clock(), threshold=3)
    fail(breaker, times=2)
    fail(breaker, OK)
    fail(breaker, times=2)
    assert not breaker.is_open


def test_an_open_circuit_lets_one_probe_go_when_its_time_comes() -> None:
    clock = Clock()
    breaker = circuit(clock, threshold=1)
    fail(breaker)
    clock.now += 1.0

    probe = breaker.acquire()

    assert probe is Permit.PROBE
    assert breaker.acquire() is None  # one at a time
    breaker.release(probe, OK)
    assert not breaker.is_open
    assert breaker.acquire() is Permit.NORMAL


def test_failed_probes_wait_longer_and_longer_up_to_the_cap() -> None:
    clock = Clock()
    breaker = circuit(clock, threshold=1)
    fail(breaker)
    waits = []
    for _ in range(8):
        clock.now = breaker.next_attempt_at()
        started = clock.now
        fail(breaker)
        waits.append(breaker.next_attempt_at() - started)
    assert waits == [2, 4, 8, 16, 32, 60, 60, 60]


def test_a_refusal_shows_optimove_is_up_and_closes_it() -> None:
    clock = Clock()
    breaker = circuit(clock, threshold=1, tenant="t-refusal")
    fail(breaker)
    clock.now += 1.0
    fail(breaker, AttemptResult(status_code=401))
    assert not breaker.is_open
    assert gauge("t-refusal") == 0


def test_429_opens_at_once_for_the_retry_after() -> None:
    clock = Clock()
    breaker = circuit(clock, threshold=5)
    fail(breaker, AttemptResult(status_code=429, retry_after_s=7))

    assert breaker.is_open
    assert breaker.next_attempt_at() == pytest.approx(clock.now + 7)
    clock.now += 6.9
    assert breaker.acquire() is None
    clock.now += 0.1
    assert breaker.acquire() is Permit.PROBE


def test_retry_after_is_capped_by_max_backoff() -> None:
    clock = Clock()
    breaker = circuit(clock)
    fail(breaker, AttemptResult(status_code=503, retry_after_s=3600))
    assert breaker.next_attempt_at() == pytest.approx(clock.now + 60)


def test_a_late_retry_after_from_an_earlier_request_pushes_the_probe_back() -> None:
    clock = Clock()
    breaker = circuit(clock, threshold=1)
    early = breaker.acquire()  # sent before the circuit opened
    fail(breaker)
    assert early is not None
    breaker.release(early, AttemptResult(status_code=503, retry_after_s=30))
    assert breaker.next_attempt_at() == pytest.approx(clock.now + 30)


def test_a_probe_that_never_answered_frees_its_place_and_changes_nothing() -> None:
    clock = Clock()
    breaker = circuit(clock, threshold=1)
    fail(breaker)
    clock.now += 1.0
    probe = breaker.acquire()
    assert probe is Permit.PROBE

    breaker.release(probe, None)

    assert breaker.is_open
    assert breaker.acquire() is Permit.PROBE


def test_circuits_are_per_tenant() -> None:
    clock = Clock()
    circuits = TenantCircuits(failure_threshold=1, policy=POLICY, clock=clock, jitter=lambda: 1.0)
    fail(circuits.get("acme"))
    assert circuits.get("acme").is_open
    assert circuits.get("acme") is circuits.get("acme")
    assert circuits.get("beta").acquire() is Permit.NORMAL
