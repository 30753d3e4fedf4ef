"""Live configuration end to end (issue 18): a running ingress takes a new tenant and a rotated
secret from its file, without a restart. Real HTTP on loopback, a real broker; the watcher polls
as in production (shared/live_config.py, every second)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.ingress.app import build
from shared.contract.signing import sign
from shared.kafka.broker import EmbeddedBroker
from shared.live_config import LiveConfig
from tests.support import AGGREGATOR_API_KEY, TENANT, TENANT_SECRET, running
from tests.support.ops import config_data, write_config
from tests.support.optimove_bodies import campaign_body

pytestmark = pytest.mark.integration

NEW_TENANT = "globex"
NEW_KEY = "globex-aggregator-key"
NEW_SECRET = "globex-secret"
ANN = {"message": "Hello Ann", "mobileNumber": "447911123456", "customerId": "cust-1"}


async def post(
    client: aiohttp.ClientSession, listen: str, slug: str, key: str, secret: str, batch: str
) -> int:
    body = campaign_body([ANN], batch_id=batch, request_id=f"req-{batch}")
    headers = {
        "content-type": "application/json",
        "X-API-Key": key,
        "x-hub-signature": sign(body, secret),
    }
    url = f"http://{listen}/optimove/{slug}/campaigns"
    async with client.post(url, data=body, headers=headers) as response:
        return response.status


async def test_a_tenant_added_while_running_is_served_within_five_seconds(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    path = tmp_path / "smsbridge.toml"
    data = config_data()
    settings = write_config(path, data)
    live = LiveConfig(settings, path, "ingress-live-test")
    async with running(build(settings)), aiohttp.ClientSession() as client:
        watcher = asyncio.create_task(live.watch())
        try:
            listen = settings.ingress.listen
            assert await post(client, listen, NEW_TENANT, NEW_KEY, NEW_SECRET, "b0") == 401
            tenant: dict[str, Any] = {
                **data["tenants"][TENANT],
                "secret_key": NEW_SECRET,
                "aggregator_api_key": NEW_KEY,
            }
            write_config(path, {**data, "tenants": {**data["tenants"], NEW_TENANT: tenant}})
            written = time.monotonic()
            status = 0
            while time.monotonic() - written < 10:
                status = await post(client, listen, NEW_TENANT, NEW_KEY, NEW_SECRET, "b1")
                if status == 202:
                    break
                await asyncio.sleep(0.1)
            assert status == 202
            assert time.monotonic() - written < 5.0
            # The tenant of the start keeps working throughout.
            assert (
                await post(client, listen, TENANT, AGGREGATOR_API_KEY, TENANT_SECRET, "b2") == 202
            )
        finally:
            watcher.cancel()


async def test_a_secret_rotated_with_an_overlap_accepts_both_until_the_old_one_expires(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    path = tmp_path / "smsbridge.toml"
    data = config_data()
    settings = write_config(path, data)
    live = LiveConfig(settings, path, "ingress-rotation-test")
    expires = datetime.now(UTC) + timedelta(seconds=4)
    rotated = {
        **data["tenants"][TENANT],
        "secret_key": {
            "current": "the-new-secret",
            "previous": [{"value": TENANT_SECRET, "expires": expires.isoformat()}],
        },
    }
    async with running(build(settings)), aiohttp.ClientSession() as client:
        listen = settings.ingress.listen
        write_config(path, {**data, "tenants": {TENANT: rotated}})
        assert live.reload("test")
        key = AGGREGATOR_API_KEY
        assert await post(client, listen, TENANT, key, TENANT_SECRET, "old") == 202
        assert await post(client, listen, TENANT, key, "the-new-secret", "new") == 202
        assert await post(client, listen, TENANT, key, "a-wrong-secret", "wrong") == 401
        await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.2)
        assert await post(client, listen, TENANT, key, TENANT_SECRET, "old-2") == 401
        assert await post(client, listen, TENANT, key, "the-new-secret", "new-2") == 202
