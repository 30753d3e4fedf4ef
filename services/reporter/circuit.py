"""One circuit per tenant: a failing Optimove is probed one request at a time.

Closed, every request goes. After ``failure_threshold`` consecutive failed requests (network
errors, timeouts, 5xx; a 429 or any ``Retry-After`` at once) the circuit opens: no request goes
until ``next_attempt_at``, then exactly one (the probe). An answer that shows Optimove is up (2xx,
or a refusal such as 400 or 401, which is about the request, not the endpoint) closes it; a failed
probe keeps it open for a wait that doubles up to ``max_backoff_s`` (or the ``Retry-After``).
Each time it closes again ``recoveries`` grows: the reporter then sends the tenant's parked
reports at once instead of at their backoff-spread turns.

While a tenant's circuit is open its new reports are parked at once instead of taking a slot of
the runner, which is what keeps one tenant's outage from slowing the others.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from enum import Enum

from services.reporter.delivery import AttemptResult, RetryPolicy, is_retryable_status
from services.reporter.metrics import CIRCUIT_OPEN

log = logging.getLogger(__name__)


class Permit(Enum):
    NORMAL = "normal"
    PROBE = "probe"


class TenantCircuit:
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
        self.failure_threshold = max(1, failure_threshold)
        self.policy = policy
        self.clock = clock
        self.jitter = jitter
        self._open = False
        self._consecutive_failures = 0
        self._failed_probes = 0
        self._next_probe_at = 0.0
        self._probing = False
        # Times the circuit closed after being open.
        self.recoveries = 0
        CIRCUIT_OPEN.labels(tenant).set(0)

    @property
    def is_open(self) -> bool:
        return self._open

    def next_attempt_at(self) -> float:
        return self._next_probe_at if self._open else self.clock()

    def acquire(self) -> Permit | None:
        if not self._open:
            return Permit.NORMAL
        if self._probing or self.clock() < self._next_probe_at:
            return None
        self._probing = True
        return Permit.PROBE

    def release(self, permit: object, result: AttemptResult | None) -> None:
        if permit is Permit.PROBE:
            self._probing = False
        if result is None:
            return  # cancelled before an answer: it tells nothing about Optimove
        if result.status_code is not None and not is_retryable_status(result.status_code):
            self._close()
            return
        self._consecutive_failures += 1
        now = self.clock()
        if self._open:
            if permit is Permit.PROBE:
                self._failed_probes += 1
                self._next_probe_at = now + self._wait_s(result, self._failed_probes + 1)
            elif result.retry_after_s is not None:
                # A request sent before the circuit opened may still bring a longer Retry-After.
                self._next_probe_at = max(self._next_probe_at, now + self._wait_s(result, 1))
            return
        if (
            self._consecutive_failures >= self.failure_threshold
            or result.status_code == 429
            or result.retry_after_s is not None
        ):
            self._open = True
            self._failed_probes = 0
            self._next_probe_at = now + self._wait_s(result, 1)
            CIRCUIT_OPEN.labels(self.tenant).set(1)
            log.warning(
                "Optimove of tenant %s is failing (%s, %d in a row): probing it one request "
                "at a time, parking its reports meanwhile",
                self.tenant,
                result.describe(),
                self._consecutive_failures,
                extra={"tenant": self.tenant},
            )

    def _wait_s(self, result: AttemptResult, probe: int) -> float:
        if result.retry_after_s is not None:
            wait = result.retry_after_s
        else:
            # Half fixed, half jitter: probes neither hammer nor all wait the full ceiling.
            wait = self.policy.backoff_ceiling_s(probe) * (0.5 + 0.5 * self.jitter())
        return min(wait, self.policy.max_backoff_s)

    def _close(self) -> None:
        self._consecutive_failures = 0
        if not self._open:
            return
        self._open = False
        self._failed_probes = 0
        self.recoveries += 1
        CIRCUIT_OPEN.labels(self.tenant).set(0)
        log.info("Optimove of tenant %s answers again", self.tenant, extra={"tenant": self.tenant})


class Circuits:
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
