"""Posting signed requests to Optimove, and the one retry policy for them (decisions.md §7).

``RetryPolicy.decide`` is the single place that turns the result of one attempt into accept /
retry (and after how long) / refuse / give up. ``ReportSender.deliver`` is the in-memory loop
around it; given a ``budget_s`` and a ``gate`` (the tenant's circuit) it stops early with a
``RETRY`` outcome, and the caller parks the report (``services/reporter/parking.py``), whose
timer later calls ``attempt`` and ``decide`` itself with the time of the first attempt carried
along.

Retried: network errors, timeouts, 5xx and 429, with exponential backoff and full jitter (or the
server's ``Retry-After``), each wait capped by ``max_backoff_s``, until ``give_up_after_s`` has
passed since the first attempt. Not retried: any other non-2xx answer.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from shared.config import ReporterSettings
from shared.contract.optimove import SignedRequest
from shared.http_client import HttpClient, HttpError, HttpTimeout
from shared.providers.http import RETRY_AFTER_HEADER, is_retryable_status, parse_retry_after
from shared.retry import RetryPolicy as Waits

EXCERPT_CHARS = 300
# Enough bytes for EXCERPT_CHARS characters of any UTF-8 text.
_EXCERPT_BYTES = EXCERPT_CHARS * 4


@dataclass(frozen=True)
class AttemptResult:
    """What one HTTP attempt produced: an answer (``status_code``) or an error without one."""

    status_code: int | None
    response_excerpt: str = ""
    retry_after_s: float | None = None
    error: str = ""
    duration_s: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def describe(self) -> str:
        if self.status_code is not None:
            return f"HTTP {self.status_code}"
        return self.error or "no answer"

    @property
    def failure_code(self) -> str:
        """A bounded metric label for an attempt that was not accepted."""
        if self.status_code is not None:
            return str(self.status_code)
        return "timeout" if self.error.startswith("timeout") else "network"


# What a report has to show before its first attempt (parked at once: its tenant was failing).
NOT_ATTEMPTED = AttemptResult(
    status_code=None, error="not attempted: the tenant's Optimove is failing (circuit open)"
)


class Action(StrEnum):
    ACCEPTED = "accepted"
    RETRY = "retry"
    REFUSED = "refused"
    GIVE_UP = "give_up"


@dataclass(frozen=True)
class Decision:
    action: Action
    delay_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    give_up_after_s: float
    max_backoff_s: float
    base_backoff_s: float = 1.0

    @classmethod
    def from_settings(cls, settings: ReporterSettings) -> RetryPolicy:
        return cls(give_up_after_s=settings.give_up_after_s, max_backoff_s=settings.max_backoff_s)

    def backoff_ceiling_s(self, attempts: int) -> float:
        """The largest wait after ``attempts`` failed attempts: base * 2^(attempts-1), capped."""
        return Waits(base_s=self.base_backoff_s, cap_s=self.max_backoff_s).ceiling(attempts)

    def decide(
        self,
        result: AttemptResult,
        attempts: int,
        elapsed_s: float,
        jitter: Callable[[], float] = random.random,
    ) -> Decision:
        """What to do after ``attempts`` attempts, ``elapsed_s`` after the first one began.

        ``jitter`` returns a number in [0, 1); the wait is that share of the backoff ceiling
        ("full jitter"), so that many reporters retrying at once spread out.
        """
        if result.accepted:
            return Decision(Action.ACCEPTED)
        if result.status_code is not None and not is_retryable_status(result.status_code):
            return Decision(
                Action.REFUSED, reason=f"Optimove refused the request: {result.describe()}"
            )
        remaining_s = self.give_up_after_s - elapsed_s
        if remaining_s <= 0:
            return Decision(
                Action.GIVE_UP,
                reason=(
                    f"gave up after {attempts} attempts in {elapsed_s:.0f}s; "
                    f"last: {result.describe()}"
                ),
            )
        if result.retry_after_s is not None:
            wait_s = result.retry_after_s
        else:
            wait_s = self.backoff_ceiling_s(attempts) * jitter()
        # The last attempt happens at the give-up age rather than never.
        return Decision(
            Action.RETRY,
            delay_s=max(0.0, min(wait_s, self.max_backoff_s, remaining_s)),
            reason=result.describe(),
        )


@dataclass(frozen=True)
class DeliveryOutcome:
    """The end of a delivery: accepted, refused, given up on, or (``RETRY``) not over yet: the
    budget or the gate stopped it, and ``decision.delay_s`` says when to attempt again."""

    decision: Decision
    attempts: int
    last: AttemptResult
    elapsed_s: float

    @property
    def accepted(self) -> bool:
        return self.decision.action is Action.ACCEPTED


AttemptObserver = Callable[[AttemptResult, Decision], None]


class Gate(Protocol):
    """Whether a request may go now (``services/reporter/tenant_circuits.py``)."""

    def acquire(self) -> object | None:
        """A permit to send one request, or None when none may go now."""
        ...

    def release(self, permit: object, result: AttemptResult | None) -> None:
        """Return the permit with what the request got (None: it never finished)."""
        ...

    def next_attempt_at(self) -> float:
        """When a request may next go, on the sender's clock."""
        ...


class ReportSender:
    """Sends signed requests to Optimove and retries them by ``RetryPolicy``."""

    def __init__(
        self,
        session: HttpClient,
        policy: RetryPolicy,
        request_timeout_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.session = session
        self.policy = policy
        self.timeout_s = request_timeout_s
        self.clock = clock
        self.sleep = sleep
        self.jitter = jitter

    async def attempt(self, request: SignedRequest) -> AttemptResult:
        """One POST of exactly ``request.body``; never raises for HTTP or network trouble."""
        started = time.monotonic()
        try:
            # A redirect is an answer (a configuration problem to see), never followed.
            answer = await self.session.post(
                request.url, request.body, request.headers, timeout_s=self.timeout_s
            )
        except HttpTimeout:
            return AttemptResult(
                status_code=None,
                error=f"timeout after {self.timeout_s:g}s",
                duration_s=time.monotonic() - started,
            )
        except HttpError as exc:
            return AttemptResult(
                status_code=None,
                error=f"{type(exc).__name__}: {exc}",
                duration_s=time.monotonic() - started,
            )
        return AttemptResult(
            status_code=answer.status,
            response_excerpt=answer.body[:_EXCERPT_BYTES].decode("utf-8", "replace")[
                :EXCERPT_CHARS
            ],
            retry_after_s=parse_retry_after(answer.headers.get(RETRY_AFTER_HEADER)),
            duration_s=time.monotonic() - started,
        )

    async def deliver(
        self,
        request: SignedRequest,
        on_attempt: AttemptObserver | None = None,
        *,
        gate: Gate | None = None,
        budget_s: float | None = None,
        first_attempt_at: float | None = None,
    ) -> DeliveryOutcome:
        """Attempt until accepted, refused, or given up on; ``on_attempt`` sees every attempt.

        With a ``gate``, every attempt needs its permit; with a ``budget_s``, no wait may end
        later than that after the call. Either ends the loop early with a ``RETRY`` outcome
        whose ``delay_s`` says when the next attempt is due. ``first_attempt_at`` (on the
        sender's clock) counts the give-up age from an earlier moment than now.
        """
        started = self.clock()
        first = started if first_attempt_at is None else first_attempt_at
        attempts = 0
        last = NOT_ATTEMPTED
        while True:
            permit: object | None = None
            if gate is not None:
                permit = gate.acquire()
                if permit is None:
                    now = self.clock()
                    return DeliveryOutcome(
                        Decision(
                            Action.RETRY,
                            delay_s=max(0.0, gate.next_attempt_at() - now),
                            reason=last.describe() if attempts else NOT_ATTEMPTED.error,
                        ),
                        attempts,
                        last,
                        now - first,
                    )
            result: AttemptResult | None = None
            try:
                result = await self.attempt(request)
            finally:
                if gate is not None:
                    gate.release(permit, result)
            attempts += 1
            last = result
            elapsed_s = self.clock() - first
            decision = self.policy.decide(result, attempts, elapsed_s, self.jitter)
            if on_attempt is not None:
                on_attempt(result, decision)
            if decision.action is not Action.RETRY:
                return DeliveryOutcome(decision, attempts, result, elapsed_s)
            if budget_s is not None and self.clock() + decision.delay_s > started + budget_s:
                return DeliveryOutcome(decision, attempts, result, elapsed_s)
            await self.sleep(decision.delay_s)
