"""One circuit per tenant's Optimove: how its answers feed the shared ``CircuitBreaker``.

Configured as ``ConsecutiveFailures``: a 429 or any ``Retry-After`` opens it at once; a failed
probe waits twice as long as the last, up to ``max_backoff_s`` (or the ``Retry-After``); any answer
that shows Optimove is up (2xx, or a refusal such as 400 or 401) closes it. While a tenant's
circuit is open its new reports are parked at once (``docs/reporter.md``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from services.reporter.delivery import AttemptResult, RetryPolicy
from services.reporter.metrics import CIRCUIT_OPEN
from shared.circuit import CircuitBreaker, ConsecutiveFailures, Permit
from shared.providers.http import is_retryable_status

log = logging.getLogger(__name__)


class TenantCircuit:
    """A tenant's breaker, fed with ``AttemptResult``s; a ``Gate`` for ``ReportSender``."""

    def __init__(
        self,
        tenant: str,
        *,
        failure_threshold: int,
        policy: RetryPolicy,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.tenant = tenant
        self.policy = policy
        self.jitter = jitter
        self._failures = ConsecutiveFailures(failure_threshold)
        self.breaker = CircuitBreaker(
            trip=self._failures,
            open_wait=self._wait_s,
            success_while_open_closes=True,
            clock=clock,
        )
        CIRCUIT_OPEN.labels(tenant).set(0)

    @property
    def is_open(self) -> bool:
        return self.breaker.is_open

    @property
    def recoveries(self) -> int:
        return self.breaker.recoveries

    def next_attempt_at(self) -> float:
        return self.breaker.next_attempt_at()

    def acquire(self) -> Permit | None:
        return self.breaker.acquire()

    def release(self, permit: object, result: AttemptResult | None) -> None:
        if not isinstance(permit, Permit):
            return
        if result is None:
            self.breaker.give_back(permit)  # cancelled before an answer: it tells nothing
            return
        was_open = self.breaker.is_open
        healthy = result.status_code is not None and not is_retryable_status(result.status_code)
        self.breaker.settle(
            permit,
            healthy,
            retry_after_s=None if healthy else result.retry_after_s,
            urgent=result.status_code == 429,
        )
        if self.breaker.is_open and not was_open:
            CIRCUIT_OPEN.labels(self.tenant).set(1)
            log.warning(
                "Optimove of tenant %s is failing (%s, %d in a row): probing it one request "
                "at a time, parking its reports meanwhile",
                self.tenant,
                result.describe(),
                self._failures.count,
                extra={"tenant": self.tenant},
            )
        elif was_open and not self.breaker.is_open:
            CIRCUIT_OPEN.labels(self.tenant).set(0)
            log.info(
                "Optimove of tenant %s answers again", self.tenant, extra={"tenant": self.tenant}
            )

    def _wait_s(self, probe: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            wait = retry_after_s
        else:
            # Half fixed, half jitter: probes neither hammer nor all wait the full ceiling.
            wait = self.policy.backoff_ceiling_s(probe) * (0.5 + 0.5 * self.jitter())
        return min(wait, self.policy.max_backoff_s)


class TenantCircuits:
    """The circuits of every tenant, made on first use."""

    def __init__(
        self,
        *,
        failure_threshold: int,
        policy: RetryPolicy,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.policy = policy
        self.clock = clock
        self.jitter = jitter
        self._circuits: dict[str, TenantCircuit] = {}

    def get(self, tenant: str) -> TenantCircuit:
        circuit = self._circuits.get(tenant)
        if circuit is None:
            circuit = TenantCircuit(
                tenant,
                failure_threshold=self.failure_threshold,
                policy=self.policy,
                clock=self.clock,
                jitter=self.jitter,
            )
            self._circuits[tenant] = circuit
        return circuit

    def recoveries(self) -> dict[str, int]:
        """Per tenant asked about so far, how often its circuit closed after being open."""
        return {tenant: circuit.recoveries for tenant, circuit in self._circuits.items()}
