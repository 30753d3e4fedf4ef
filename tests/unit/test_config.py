"""Configuration: TOML + environment, secrets by reference, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import (
    CONFIG_ENV_VAR,
    DEV_CONFIG_PATH,
    ConfigError,
    Settings,
    dev_config_path,
    load_settings,
)

TENANT = """
[tenants.acme]
optimove_base_url = "https://optimove.example/acme/"
api_token = "env:ACME_TOKEN"
secret_key = "file:{secret_file}"
aggregator_api_key = "inline-key"
routes = [{{ provider = "otpiq-main" }}]

[providers.otpiq-main]
kind = "otpiq"
base_url = "https://api.otpiq.com/api"
api_key = "sk_live_x"
callback_token = "cb"
"""


def write_config(tmp_path: Path, extra: str = "") -> Path:
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cret\n", encoding="utf-8")
    path = tmp_path / "smsbridge.toml"
    path.write_text(TENANT.format(secret_file=secret_file) + extra, encoding="utf-8")
    return path


def test_secrets_resolve_from_env_file_and_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_TOKEN", "token-from-env")
    settings = load_settings(write_config(tmp_path))
    tenant = settings.tenants["acme"]
    assert tenant.api_token.get_secret_value() == "token-from-env"
    assert tenant.secret_key.get_secret_value() == "s3cret"  # file contents, stripped
    assert tenant.aggregator_api_key.get_secret_value() == "inline-key"
    assert tenant.optimove_base_url == "https://optimove.example/acme"
    assert "token-from-env" not in repr(settings)


def test_missing_env_secret_is_named_with_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ACME_TOKEN", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path))
    message = str(caught.value)
    assert "tenants.acme.api_token" in message
    assert "ACME_TOKEN is not set" in message


def test_route_to_unknown_provider_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_TOKEN", "t")
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('provider = "otpiq-main"', 'provider = "nope"'))
    with pytest.raises(ConfigError, match=r"tenants\.acme\.routes\.0\.provider: unknown"):
        load_settings(path)


def test_unknown_key_and_bad_toml_are_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[ingress]\nlisten = '127.0.0.1:1'\nlisen = 'typo'\n")
    with pytest.raises(ConfigError, match=r"ingress\.lisen"):
        load_settings(path)
    path.write_text("[ingress\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)
    path.write_text("[ingress]\nlisten = 'no-port'\n")
    with pytest.raises(ConfigError, match=r"ingress\.listen.*host:port"):
        load_settings(path)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_TOKEN", "t")
    monkeypatch.setenv("SMSBRIDGE_KAFKA__BOOTSTRAP_SERVERS", "kafka:9092")
    path = write_config(tmp_path, '\n[kafka]\nbootstrap_servers = "file:9092"\n')
    assert load_settings(path).kafka.bootstrap_servers == "kafka:9092"


def test_partial_runner_table_keeps_the_services_own_defaults() -> None:
    settings = Settings(
        normalizer={"runner": {"shutdown_deadline_s": 5}},
        reporter={"runner": {"max_in_flight": 50}},
    )
    defaults = Settings()
    assert settings.normalizer.runner.shutdown_deadline_s == 5
    assert settings.normalizer.runner.max_in_flight == defaults.normalizer.runner.max_in_flight
    assert settings.reporter.runner.max_in_flight == 50
    assert settings.reporter.runner.hold_slots_until_committed is True
    assert settings.reporter.runner.commit_interval_s == defaults.reporter.runner.commit_interval_s


def test_dev_commands_fall_back_to_the_dev_stack_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    assert dev_config_path(None) == DEV_CONFIG_PATH
    assert "dev" in load_settings(dev_config_path(None)).tenants
    monkeypatch.setenv(CONFIG_ENV_VAR, "/etc/smsbridge.toml")
    assert dev_config_path(None) == "/etc/smsbridge.toml"
    assert dev_config_path("mine.toml") == "mine.toml"
