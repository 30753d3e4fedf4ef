"""Live configuration end to end (issue 18): a running ingress takes a new tenant and a rotated
secret from its file, without a restart. Real HTTP on loopback, a real broker; the watcher polls
as in production (shared/live_config.py, every second)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.ingress.app import build
from services.sender.app import build as build_sender
from shared.config import Settings
from shared.contract.signing import sign
from shared.kafka.broker import EmbeddedBroker
from shared.live_config import LiveConfig
from tests.integration.test_sender import publish, simulator
from tests.support import AGGREGATOR_API_KEY, TENANT, TENANT_SECRET, running, wait_for
from tests.support.ops import (
    config_data,
    recipient,
    start_service,
    stop_service,
    wait_ready,
    write_config,
)
from tests.support.optimove_bodies import campaign_body

pytestmark = pytest.mark.integration

NEW_TENANT = "globex"
NEW_KEY = "globex-aggregator-key"
NEW_SECRET = "globex-secret"
ACCOUNT = "otpiq-main"


def rate_limited(provider_url: str, per_second: float) -> dict[str, Any]:
    return {
        "providers": {
            ACCOUNT: {"base_url": f"{provider_url}/otpiq/api", "rate_limit_per_s": per_second}
        }
    }


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


def configured(
    tmp_path: Path, name: str, overrides: dict[str, Any] | None = None
) -> tuple[Path, dict[str, Any], Settings, LiveConfig]:
    """A configuration file, its data, its settings and their watcher (not started)."""
    path = tmp_path / "smsbridge.toml"
    data = config_data(overrides=overrides)
    settings = write_config(path, data)
    return path, data, settings, LiveConfig(settings, path, name)


async def test_a_tenant_added_while_running_is_served_within_five_seconds(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    path, data, settings, live = configured(tmp_path, "ingress-live-test")
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
    path, data, settings, live = configured(tmp_path, "ingress-rotation-test")
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


async def test_a_rate_limit_lowered_live_holds_from_the_next_second(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    """The account runs at 40/s; the file lowers it to 10/s while messages wait: from then on
    the provider sees no second with more than 10, and nothing is sent twice or lost."""
    async with simulator() as provider:
        overrides = rate_limited(provider.url, 40)
        path, data, settings, live = configured(tmp_path, "sender-live-test", overrides)
        messages = [recipient(index, f"+4477009{index:05d}") for index in range(100)]
        await publish(settings, messages)
        async with running(build_sender(settings)):
            await wait_for(lambda: len(provider.sends) >= 40, 30, "sends at 40/s")
            data["providers"][ACCOUNT]["rate_limit_per_s"] = 10
            write_config(path, data)
            assert live.reload("test")
            changed = datetime.now(UTC)
            await wait_for(lambda: len(provider.sends) >= 100, 60, "every message")
        later = sorted(send.at for send in provider.sends if send.at >= changed)
        assert len(later) >= 40
        for index, start in enumerate(later):
            within = [at for at in later[index:] if at < start + timedelta(seconds=1)]
            assert len(within) <= 10, f"{len(within)} sends in the second from {start}"
        assert len({send.phone for send in provider.sends}) == 100 == len(provider.sends)


def kubernetes_secret(mount: Path, name: str, value: str, version: int) -> None:
    """What kubelet does to a mounted Secret: a new timestamped folder, the ..data link swapped."""
    folder = mount / f"..2026_12_07_{version}"
    folder.mkdir(parents=True)
    (folder / name).write_text(value)
    link = mount / "..data_tmp"
    link.symlink_to(folder.name)
    os.replace(link, mount / "..data")
    if not (mount / name).is_symlink():
        (mount / name).symlink_to(f"..data/{name}")


async def metric(client: aiohttp.ClientSession, ops: str, name: str) -> float | None:
    async with client.get(f"http://{ops}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(f"{name}{{"):
                return float(line.rsplit(" ", 1)[1])
    return None


async def test_the_command_line_service_takes_a_swapped_secret_and_refuses_a_broken_file(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    """``smsbridge run ingress`` in its own process: a Kubernetes-style swap of the mounted key
    is taken within 5 s, a broken file is refused while the service keeps serving, SIGHUP after
    the fix takes it."""
    mount = tmp_path / "secret"
    kubernetes_secret(mount, "key", "key-one", 1)
    path = tmp_path / "smsbridge.toml"
    data = config_data()
    data["tenants"][TENANT]["aggregator_api_key"] = f"file:{mount / 'key'}"
    settings = write_config(path, data)
    listen, ops = settings.ingress.listen, settings.ingress.ops_listen
    process = await start_service(path, "ingress", log=tmp_path / "ingress.log")
    try:
        await wait_ready(f"http://{ops}/readyz", process, 60)
        async with aiohttp.ClientSession() as client:
            assert await post(client, listen, TENANT, "key-one", TENANT_SECRET, "c1") == 202
            kubernetes_secret(mount, "key", "key-two", 2)
            swapped = time.monotonic()
            while await post(client, listen, TENANT, "key-two", TENANT_SECRET, "c2") != 202:
                assert time.monotonic() - swapped < 5.0, "the new key was not taken in 5 s"
                await asyncio.sleep(0.1)
            assert await post(client, listen, TENANT, "key-one", TENANT_SECRET, "c3") == 401
            generation = await metric(client, ops, "smsbridge_config_generation")
            path.write_text(path.read_text() + "\n[tenants.broken]\nvalidity_s = -1\n")
            await wait_for_metric(client, ops, "smsbridge_config_last_reload_failed", 1.0)
            assert await post(client, listen, TENANT, "key-two", TENANT_SECRET, "c4") == 202
            write_config(path, data)
            process.send_signal(signal.SIGHUP)
            await wait_for_metric(client, ops, "smsbridge_config_last_reload_failed", 0.0)
            assert (await metric(client, ops, "smsbridge_config_generation") or 0) > (
                generation or 0
            )
        log = (tmp_path / "ingress.log").read_text()
        assert "tenants.broken.api_token" in log and "refused" in log
        assert "key-one" not in log and "key-two" not in log
    finally:
        await stop_service(process)


async def wait_for_metric(
    client: aiohttp.ClientSession, ops: str, name: str, wanted: float
) -> None:
    async def reached() -> bool:
        return await metric(client, ops, name) == wanted

    await wait_for(reached, 10, f"{name} = {wanted}")
