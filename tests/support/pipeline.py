"""Test support for tests of the pipeline as a whole: the simulators, the services, a campaign.

The simulators listen on loopback ports chosen when they are made, so a test can build its
settings from their URLs before anything starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp

from services.callbacks.app import build as build_callbacks
from services.ingress.app import build as build_ingress
from services.normalizer.app import build as build_normalizer
from services.reporter.app import build as build_reporter
from services.sender.app import build as build_sender
from shared.config import Settings
from shared.contract.signing import sign
from shared.kafka.broker import free_port
from shared.kafka.service import Service, Startable
from simulators.optimove import OptimoveSimulator
from simulators.providers import ProviderSimulator
from tests.support import AGGREGATOR_API_KEY, TENANT, TENANT_API_TOKEN, TENANT_SECRET, running

# Consumers first, ingress last: nothing is taken in before the services downstream are up.
EVERY_SERVICE: tuple[Callable[[Settings], Service], ...] = (
    build_normalizer,
    build_reporter,
    build_sender,
    build_callbacks,
    build_ingress,
)


def simulated_optimove() -> OptimoveSimulator:
    """The simulated Optimove for tenant ``acme`` (its API token and secret), not yet started."""
    return OptimoveSimulator(
        "127.0.0.1", free_port(), tenants={TENANT: (TENANT_API_TOKEN, TENANT_SECRET)}
    )


def simulated_providers(**options: Any) -> ProviderSimulator:
    """The provider simulator with ``options`` (fail_rate, callback_delay_ms, seed...), not yet
    started."""
    return ProviderSimulator("127.0.0.1", free_port(), **options)


@contextlib.asynccontextmanager
async def pipeline(
    settings: Settings,
    *simulators: Startable,
    services: Sequence[Callable[[Settings], Service]] = EVERY_SERVICE,
) -> AsyncIterator[None]:
    """The simulators, then ``services`` built from ``settings``, running in this event loop in
    that order for the duration of the block; stopped in the reverse order."""
    async with contextlib.AsyncExitStack() as stack:
        for simulator in simulators:
            await stack.enter_async_context(running(simulator))
        for build in services:
            await stack.enter_async_context(running(build(settings)))
        yield


async def post_campaign(settings: Settings, body: bytes) -> dict[str, Any]:
    """POST ``body`` to ingress as Optimove does for tenant ``acme`` (signed, with the aggregator
    API key); asserts the 202 and returns the answer."""
    url = f"http://{settings.ingress.listen}/optimove/{TENANT}/campaigns"
    headers = {
        "content-type": "application/json",
        "X-API-Key": AGGREGATOR_API_KEY,
        "x-hub-signature": sign(body, TENANT_SECRET),
    }
    async with (
        aiohttp.ClientSession() as client,
        client.post(url, data=body, headers=headers) as response,
    ):
        assert response.status == 202, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer
