"""Pure decisions of the sender: which route, when a message is due, how long to wait to retry.

Nothing here touches Kafka, HTTP or a clock of its own: the dispatcher passes the time in.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import backoff

from shared.config import Route, TenantSettings
from shared.events import RecipientMessage


def routes_for(tenant: TenantSettings, destination: str) -> list[Route]:
    """The tenant's routes that serve ``destination``, best first.

    A route with prefixes serves only destinations whose E.164 digits start with one of them.
    Lower ``priority`` comes first; equal priorities keep their configured order.
    """
    digits = destination.lstrip("+")
    serving = [
        route
        for route in tenant.routes
        if not route.prefixes or any(digits.startswith(prefix) for prefix in route.prefixes)
    ]
    return sorted(serving, key=lambda route: route.priority)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def due_at(message: RecipientMessage) -> datetime:
    """When the message may be sent: its scheduled time, else when it was accepted."""
    return _aware(message.scheduled_at or message.accepted_at)


def expires_at(message: RecipientMessage, validity_s: float) -> datetime:
    return due_at(message) + timedelta(seconds=validity_s)


def is_expired(message: RecipientMessage, validity_s: float, now: datetime) -> bool:
    return now > expires_at(message, validity_s)


@dataclass(frozen=True)
class RetrySchedule:
    """Waits between attempts on one route: exponential, capped, with full jitter."""

    max_attempts: int = 3
    base_delay_s: float = 1.0
    max_delay_s: float = 300.0

    def ceiling(self, attempt: int) -> float:
        """The longest wait after failed attempt number ``attempt`` (1-based)."""
        waits = backoff.expo(base=2, factor=self.base_delay_s, max_value=self.max_delay_s)
        next(waits)  # backoff's generators are primed by one next()
        wait = 0.0
        for _ in range(max(1, attempt)):
            wait = float(next(waits))
        return wait

    def delay(
        self,
        attempt: int,
        retry_after_s: float | None = None,
        jitter: Callable[[float], float] = backoff.full_jitter,
    ) -> float:
        """How long to wait after failed attempt ``attempt``; a provider's Retry-After wins."""
        wait = float(jitter(self.ceiling(attempt)))
        if retry_after_s is not None:
            wait = max(wait, retry_after_s)
        return wait

    def may_retry(self, attempt: int) -> bool:
        return attempt < self.max_attempts


@dataclass(frozen=True)
class UseRoute:
    route: Route


@dataclass(frozen=True)
class WaitForCircuit:
    """Every route left is skipped by its circuit breaker; look again at ``until``."""

    until: float


@dataclass(frozen=True)
class Exhausted:
    """Every route has been given up on."""


RouteChoice = UseRoute | WaitForCircuit | Exhausted


def choose_route(
    routes: list[Route],
    given_up: Collection[str],
    blocked_until: Callable[[str], float | None],
) -> RouteChoice:
    """The first route not given up on whose circuit lets a call go.

    ``blocked_until(account)`` is None when the account's circuit lets a call go now, else when
    to look again. A route skipped for its circuit is not given up on: the message waits for it
    when no other route is left.
    """
    earliest: float | None = None
    for route in routes:
        if route.provider in given_up:
            continue
        until = blocked_until(route.provider)
        if until is None:
            return UseRoute(route)
        earliest = until if earliest is None else min(earliest, until)
    if earliest is None:
        return Exhausted()
    return WaitForCircuit(earliest)
