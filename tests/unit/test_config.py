"""Configuration: TOML + environment, secrets by reference, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.config import (
    CONFIG_ENV_VAR,
    DEV_CONFIG_PATH,
    ConfigError,
    Settings,
    dev_config_path,
    load_settings,
)

TENANT = """
[ingress]
public_url = "https://sms.example.com"

[callbacks]
public_url = "https://callbacks.example.com"

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


# -- HTTPS (issue 14, point 12) --------------------------------------------------------------------


def test_a_plain_http_optimove_url_is_refused_naming_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_TOKEN", "t")
    path = write_config(tmp_path)
    text = path.read_text()
    path.write_text(text.replace("https://optimove.example", "http://optimove.example"))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.endswith(
        "tenants.acme.optimove_base_url: must be https:// (allow_plain_http = true permits "
        "http://, for development and tests only)"
    )

    path.write_text("allow_plain_http = true\n" + path.read_text())
    assert load_settings(path).tenants["acme"].optimove_base_url == "http://optimove.example/acme"


@pytest.mark.parametrize("key", ["ingress.public_url", "callbacks.public_url"])
def test_a_plain_http_public_url_is_refused_naming_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("ACME_TOKEN", "t")
    url = {"ingress.public_url": "sms.example.com", "callbacks.public_url": "callbacks.example.com"}
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace(f"https://{url[key]}", f"http://{url[key]}"))
    with pytest.raises(ConfigError, match=rf"^invalid configuration in .*: {key}: must be https"):
        load_settings(path)
    monkeypatch.setenv("SMSBRIDGE_ALLOW_PLAIN_HTTP", "true")
    assert load_settings(path).allow_plain_http


def test_public_url_defaults_count_only_where_they_are_used(tmp_path: Path) -> None:
    # Without tenants and providers nobody is told the loopback defaults: a Kafka-only
    # configuration (topics ensure, replay) needs no public_url.
    path = tmp_path / "kafka-only.toml"
    path.write_text('[kafka]\nbootstrap_servers = "kafka:9092"\n')
    assert load_settings(path).ingress.public_url.startswith("http://")
    # With a tenant, the forgotten public_url is what its Optimove would be told.
    with pytest.raises(ValidationError, match=r"ingress\.public_url: must be https://"):
        Settings(
            callbacks={"public_url": "https://callbacks.example.com"},
            tenants={
                "acme": {
                    "optimove_base_url": "https://optimove.example/acme",
                    "api_token": "t",
                    "secret_key": "s",
                    "aggregator_api_key": "k",
                    "routes": [{"provider": "p"}],
                }
            },
            providers={
                "p": {
                    "kind": "otpiq",
                    "base_url": "https://p.example",
                    "api_key": "k",
                    "callback_token": "c",
                }
            },
        )


def test_the_dev_configurations_allow_plain_http() -> None:
    root = Path(__file__).resolve().parents[2]
    for path in ("deploy/dev/smsbridge.toml", "deploy/compose/smsbridge.toml"):
        assert "\nallow_plain_http = true\n" in (root / path).read_text(), path


# -- small ones ----------------------------------------------------------------------------------


def test_an_unknown_log_level_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "smsbridge.toml"
    path.write_text('log_level = "LOUD"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == (
        f"invalid configuration in {path}: log_level: unknown log level 'LOUD' "
        "(one of DEBUG, INFO, WARNING, ERROR, CRITICAL)"
    )
    path.write_text('log_level = "debug"\n')
    assert load_settings(path).log_level == "DEBUG"


def test_ops_listen_must_be_apart_from_the_public_listener() -> None:
    with pytest.raises(ValueError, match="ops_listen must use another port than listen"):
        Settings(ingress={"listen": "0.0.0.0:8080", "ops_listen": "127.0.0.1:8080"})
    assert Settings().ingress.ops_listen != Settings().ingress.listen
