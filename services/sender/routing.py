"""Pure decisions of the sender: which route, when a message is due, when it expires.

Nothing here touches Kafka, HTTP or a clock of its own: the handler passes the time in. How long
to wait before a retry is ``shared.retry.RetryPolicy``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from shared.config import Route, TenantSettings
from shared.contract.events import RecipientMessage


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
