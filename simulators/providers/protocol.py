"""What every simulated provider API shares: the records it makes, faults on each answer."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from aiohttp import web

from shared.contract.events import utcnow

if TYPE_CHECKING:
    from simulators.providers.server import ProviderSimulator


@dataclass(frozen=True)
class AcceptedSend:
    provider: str
    account: str
    phone: str
    text: str
    sender: str
    provider_message_id: str
    at: datetime

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "at": self.at.isoformat()}


@dataclass(frozen=True)
class PlannedCallback:
    """One HTTP callback a provider makes, in the provider's own shape."""

    url: str
    payload: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CallbackDelivery:
    provider: str
    provider_message_id: str
    url: str
    payload: dict[str, Any]
    attempts: int
    http_status: int | None  # the last answer; None when the receiver was unreachable
    delivered: bool
    at: datetime

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "at": self.at.isoformat()}


GARBLED_BODY = "<html><body><h1>200 OK</h1>upstream answered</body></html>"


def retry_after(wait_s: float) -> str:
    """A Retry-After header value: whole seconds, rounded up."""
    return str(max(0, math.ceil(wait_s)))


class ProviderProtocol(ABC):
    """One provider's API as the simulator serves it."""

    kind: ClassVar[str]

    def __init__(self, simulator: ProviderSimulator) -> None:
        self.simulator = simulator

    @abstractmethod
    def add_routes(self, app: web.Application) -> None: ...

    @abstractmethod
    def rate_limited(self, wait_s: float) -> web.Response:
        """The provider's 429, asking to wait ``wait_s``."""

    def counted(
        self, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """Wrap a provider endpoint: the latency and injected faults apply, every answer counts.

        A 429 comes before anything else, as from a gateway in front of the API; a garbled
        answer replaces a successful one, after the send was accepted.
        """

        async def wrapped(request: web.Request) -> web.Response:
            simulator = self.simulator
            await simulator.simulate_latency()
            if simulator.draw(simulator.options.rate_limited_rate):
                response = self.rate_limited(simulator.options.rate_limited_wait_s)
            else:
                response = await handler(request)
                if response.status < 300 and simulator.draw(simulator.options.garbled_rate):
                    response = web.Response(text=GARBLED_BODY, content_type="text/html")
            simulator.answers[self.kind][str(response.status)] += 1
            return response

        return wrapped


def bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme == "Bearer" and token.strip() else None


def recipients_of(body: Mapping[str, Any]) -> list[str]:
    return [number.strip() for number in str(body["recipient"]).split(",")]


def iso_now() -> str:
    return utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
