"""The internet-facing services keep ``/metrics``, ``/healthz`` and ``/readyz`` off their public
ports (issue 14, point 11): the public listener of ingress serves Optimove's campaign route only,
that of callbacks the providers' callback route only; the ops endpoints answer on ``ops_listen``.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from services.callbacks.app import build as build_callbacks
from services.ingress.app import build as build_ingress
from shared.config import Settings
from shared.kafka.broker import EmbeddedBroker
from tests.support import make_settings, running
from tests.support.ops import config_data, start_service, stop_service, wait_ready, write_config

pytestmark = pytest.mark.integration

OPS_PATHS = ("/metrics", "/healthz", "/readyz")


async def answers(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


async def assert_ops_apart(settings: Settings, service: str) -> None:
    section = getattr(settings, service)
    async with aiohttp.ClientSession() as session:
        for path in OPS_PATHS:
            status, _ = await answers(session, f"http://{section.listen}{path}")
            assert status == 404, f"{service} answers {path} on its public port"
        metrics = await answers(session, f"http://{section.ops_listen}/metrics")
        health = await answers(session, f"http://{section.ops_listen}/healthz")
        ready = await answers(session, f"http://{section.ops_listen}/readyz")
    assert metrics[0] == 200 and "smsbridge_" in metrics[1]
    assert health == (200, '{"status": "alive"}')
    assert ready == (200, '{"status": "ready"}')


async def test_ingress_and_callbacks_serve_ops_endpoints_on_ops_listen_only(
    kafka: EmbeddedBroker,
) -> None:
    settings = make_settings()
    async with running(build_ingress(settings)), running(build_callbacks(settings)):
        await assert_ops_apart(settings, "ingress")
        await assert_ops_apart(settings, "callbacks")


async def test_smsbridge_run_serves_them_apart_too(kafka: EmbeddedBroker, tmp_path: Path) -> None:
    settings = write_config(tmp_path / "smsbridge.toml", config_data())
    process = await start_service(tmp_path / "smsbridge.toml", "callbacks")
    try:
        await wait_ready(f"http://{settings.callbacks.ops_listen}/readyz", process, 60)
        await assert_ops_apart(settings, "callbacks")
    finally:
        await stop_service(process)
