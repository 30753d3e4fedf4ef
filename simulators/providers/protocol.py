"""What every simulated provider API shares: the records it makes, faults on each answer."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from shared.contract.events import utcnow
from shared.http_server import Handler, Request, Response, Route

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
JSON = "application/json; charset=utf-8"  # what aiohttp's json_response said


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(status, orjson.dumps(data), JSON, headers or {})


def retry_after(wait_s: float) -> str:
    """A Retry-After header value: whole seconds, rounded up."""
    return str(max(0, math.ceil(wait_s)))


class ProviderProtocol(ABC):
    """One provider's API as the simulator serves it."""

    kind: ClassVar[str]
    send_path: ClassVar[str]

    def __init__(self, simulator: ProviderSimulator) -> None:
        self.simulator = simulator

    def routes(self) -> list[Route]:
        """The provider's send endpoint, with its latency and faults."""
        return [Route("POST", self.send_path, self.counted(self.send))]

    @abstractmethod
    async def send(self, request: Request) -> Response:
        """Accept (or refuse) one send request, in the provider's own shapes."""

    @abstractmethod
    def rate_limited(self, wait_s: float) -> Response:
        """The provider's 429, asking to wait ``wait_s``."""

    def counted(self, handler: Handler) -> Handler:
        """Wrap a provider endpoint: the latency and injected faults apply, every answer counts.

        A 429 comes before anything else, as from a gateway in front of the API; a garbled
        answer replaces a successful one, after the send was accepted.
        """

        async def wrapped(request: Request) -> Response:
            simulator = self.simulator
            await simulator.simulate_latency()
            if simulator.draw(simulator.options.rate_limited_rate):
                response = self.rate_limited(simulator.options.rate_limited_wait_s)
            else:
                response = await handler(request)
                if response.status < 300 and simulator.draw(simulator.options.garbled_rate):
                    response = Response(200, GARBLED_BODY.encode(), "text/html; charset=utf-8")
            simulator.answers[self.kind][str(response.status)] += 1
            return response

        return wrapped


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme == "Bearer" and token.strip() else None


def recipients_of(body: Mapping[str, Any]) -> list[str]:
    return [number.strip() for number in str(body["recipient"]).split(",")]


def iso_now() -> str:
    return utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
