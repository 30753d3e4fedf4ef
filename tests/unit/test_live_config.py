"""Live configuration (shared/live_config.py): a changed file is validated and taken without a
restart; an invalid one is refused and the old one stays; a Kubernetes symlink swap of a secret
is seen; what cannot change live is named and left alone."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from shared.config import Settings
from shared.live_config import LiveConfig, needs_restart, on_reload
from tests.support import TENANT
from tests.support.ops import config_data, write_config

NEW_TENANT = "globex"


def gauge(name: str, service: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"service": service})


def with_tenant(data: dict[str, Any], slug: str, **changes: Any) -> dict[str, Any]:
    tenants = {**data["tenants"], slug: {**data["tenants"][TENANT], **changes}}
    return {**data, "tenants": tenants}


@pytest.fixture
def config(tmp_path: Path) -> tuple[Path, dict[str, Any], Settings]:
    path = tmp_path / "smsbridge.toml"
    data = config_data()
    return path, data, write_config(path, data)


def test_a_new_tenant_is_taken_on_the_object_every_component_holds(
    config: tuple[Path, dict[str, Any], Settings],
) -> None:
    path, data, settings = config
    live = LiveConfig(settings, path, "unit-add")
    tenants_before = settings.tenants
    write_config(path, with_tenant(data, NEW_TENANT, secret_key="globex-secret"))
    assert live.reload("test")
    assert NEW_TENANT in settings.tenants and settings.tenants is not tenants_before
    assert settings.tenants[NEW_TENANT].secret_key.get_secret_value() == "globex-secret"
    assert live.generation == 2 and gauge("smsbridge_config_generation", "unit-add") == 2


def test_an_invalid_file_is_refused_and_the_old_configuration_stays(
    config: tuple[Path, dict[str, Any], Settings], caplog: pytest.LogCaptureFixture
) -> None:
    path, data, settings = config
    live = LiveConfig(settings, path, "unit-invalid")
    path.write_text(path.read_text() + f"\n[tenants.{NEW_TENANT}]\nvalidity_s = -5\n")
    with caplog.at_level(logging.ERROR, logger="shared.live_config"):
        assert not live.reload("test")
    assert NEW_TENANT not in settings.tenants and TENANT in settings.tenants
    assert f"tenants.{NEW_TENANT}" in caplog.text and "refused" in caplog.text
    assert gauge("smsbridge_config_last_reload_failed", "unit-invalid") == 1
    assert live.generation == 1
    write_config(path, with_tenant(data, NEW_TENANT))
    assert live.reload("fixed")
    assert gauge("smsbridge_config_last_reload_failed", "unit-invalid") == 0


def test_what_cannot_change_live_is_named_and_left_alone(
    config: tuple[Path, dict[str, Any], Settings], caplog: pytest.LogCaptureFixture
) -> None:
    path, data, settings = config
    live = LiveConfig(settings, path, "unit-restart")
    listen = settings.ingress.listen
    changed = {
        **data,
        "ingress": {**data["ingress"], "listen": "127.0.0.1:1"},
        "log_level": "DEBUG",
    }
    write_config(path, changed)
    with caplog.at_level(logging.WARNING, logger="shared.live_config"):
        assert live.reload("test")
    assert "needs a restart" in caplog.text and "ingress.listen" in caplog.text
    assert settings.ingress.listen == listen
    assert settings.log_level == "DEBUG"  # the log level is live
    assert logging.getLogger().level == logging.DEBUG
    logging.getLogger().setLevel(logging.INFO)


def test_a_changed_kafka_password_needs_a_restart_and_is_named_not_printed(
    config: tuple[Path, dict[str, Any], Settings],
) -> None:
    path, data, _ = config
    kafka = {**data["kafka"], "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"}
    first = write_config(
        path, {**data, "kafka": {**kafka, "sasl_username": "u", "sasl_password": "p1"}}
    )
    second = write_config(
        path, {**data, "kafka": {**kafka, "sasl_username": "u", "sasl_password": "p2"}}
    )
    assert needs_restart(first, second) == ["kafka.sasl_password"]
    assert needs_restart(first, first) == []


def test_the_admin_token_rotates_live(config: tuple[Path, dict[str, Any], Settings]) -> None:
    path, data, settings = config
    live = LiveConfig(settings, path, "unit-admin")
    write_config(path, {**data, "campaigns": {**data["campaigns"], "admin_token": "t2"}})
    assert live.reload("test")
    assert settings.campaigns.admin_token is not None
    assert settings.campaigns.admin_token.get_secret_value() == "t2"


class Listener:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def changed(self, settings: Settings) -> None:
        self.seen.append(len(settings.tenants))


def test_listeners_hear_each_reload_taken_and_are_held_weakly(
    config: tuple[Path, dict[str, Any], Settings],
) -> None:
    path, data, settings = config
    live = LiveConfig(settings, path, "unit-listen")
    listener = Listener()
    on_reload(listener.changed)
    write_config(path, with_tenant(data, NEW_TENANT))
    live.reload("test")
    assert listener.seen == [2]
    del listener  # gone: the next reload does not keep it alive or call it
    assert live.reload("again")


def test_the_watcher_sees_a_changed_file_and_sighup(
    config: tuple[Path, dict[str, Any], Settings],
) -> None:
    path, data, settings = config
    live = LiveConfig(settings, path, "unit-watch")

    async def scenario() -> tuple[float, int]:
        watcher = asyncio.create_task(live.watch(poll_s=0.05))
        await asyncio.sleep(0.1)
        started = asyncio.get_running_loop().time()
        write_config(path, with_tenant(data, NEW_TENANT))
        for _ in range(1_000):
            if NEW_TENANT in settings.tenants:
                break
            await asyncio.sleep(0.01)
        seen_after = asyncio.get_running_loop().time() - started
        os.kill(os.getpid(), signal.SIGHUP)  # unchanged file: reloaded all the same
        for _ in range(100):
            if live.generation == 3:
                break
            await asyncio.sleep(0.01)
        watcher.cancel()
        return seen_after, live.generation

    seen_after, generation = asyncio.run(scenario())
    assert seen_after < 5.0
    assert generation == 3


def test_a_kubernetes_style_symlink_swap_of_a_secret_is_seen(tmp_path: Path) -> None:
    """A mounted Secret: name -> ..data/name, ..data -> ..<timestamp>/; an update writes a new
    timestamped folder and swaps the ..data link: the file's path, size and time may not change."""
    mount = tmp_path / "secret"
    mount.mkdir()
    (mount / "..2026_12_07_1").mkdir()
    (mount / "..2026_12_07_1" / "secret_key").write_text("first")
    (mount / "..data").symlink_to("..2026_12_07_1")
    (mount / "secret_key").symlink_to("..data/secret_key")
    path = tmp_path / "smsbridge.toml"
    data = config_data()
    data["tenants"][TENANT]["secret_key"] = f"file:{mount / 'secret_key'}"
    settings = write_config(path, data)
    live = LiveConfig(settings, path, "unit-symlink")
    before = live.fingerprint()
    (mount / "..2026_12_07_2").mkdir()
    (mount / "..2026_12_07_2" / "secret_key").write_text("other")  # same size
    (mount / "..data_tmp").symlink_to("..2026_12_07_2")
    os.replace(mount / "..data_tmp", mount / "..data")
    assert live.fingerprint() != before
    assert live.reload("file changed")
    assert settings.tenants[TENANT].secret_key.get_secret_value() == "other"


def test_the_sender_takes_a_changed_rate_limit_and_a_new_account_live(
    config: tuple[Path, dict[str, Any], Settings],
) -> None:
    from services.sender.handler import SenderHandler
    from shared.contract.topics import RECIPIENTS

    path, data, _ = config
    account = next(iter(data["providers"]))
    providers = {
        **data["providers"],
        account: {**data["providers"][account], "rate_limit_per_s": 100},
    }
    settings = write_config(path, {**data, "providers": providers})
    handler = SenderHandler(settings)
    handler.take_partitions(range(RECIPIENTS.partitions))
    limiter = handler.attempts.limits.by_account[account]
    assert limiter.account_limit == 100
    second = {**providers[account], "rate_limit_per_s": 30}
    lowered = {account: {**providers[account], "rate_limit_per_s": 20}, "second": second}
    write_config(path, {**data, "providers": lowered})
    assert LiveConfig(settings, path, "unit-sender").reload("test")
    assert handler.attempts.limits.by_account[account] is limiter  # its record of sends is kept
    assert limiter.account_limit == 20
    assert handler.attempts.limits.by_account["second"].limit == 30  # with this instance's share
    assert handler.attempts.blocked_until("second") is None
    handler.store.close()
