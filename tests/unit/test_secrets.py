"""Secrets with an overlap (shared/secrets.py): inbound checks accept the current value and the
previous ones until they expire; outbound calls use the current one; bad tables name the key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from shared.config import ConfigError, Settings, load_settings
from shared.contract.signing import constant_time_equals
from shared.secrets import RotatingSecret
from tests.support import TENANT, settings_data
from tests.support.ops import write_config

SOON = datetime.now(UTC) + timedelta(days=3)
PAST = datetime.now(UTC) - timedelta(minutes=1)


def tenant_with(secret_key: object) -> Settings:
    return Settings(**settings_data(overrides={"tenants": {TENANT: {"secret_key": secret_key}}}))


def matched(secret: RotatingSecret, given: str, name: str = "test.secret") -> bool:
    return secret.matches(lambda value: constant_time_equals(given, value), name)


def count(name: str, value: str) -> float:
    found = REGISTRY.get_sample_value(
        "smsbridge_secret_matches_total", {"secret": name, "value": value}
    )
    return found or 0.0


def test_a_plain_value_is_the_only_one_accepted() -> None:
    secret = tenant_with("only").tenants[TENANT].secret_key
    assert secret.get_secret_value() == "only"
    assert matched(secret, "only")
    assert not matched(secret, "other")


def test_previous_values_are_accepted_until_they_expire(tmp_path: Path) -> None:
    old_file = tmp_path / "old"
    old_file.write_text("old-secret\n")
    secret = (
        tenant_with(
            {
                "current": "new-secret",
                "previous": [
                    {"value": f"file:{old_file}", "expires": SOON.isoformat()},
                    {"value": "older-secret", "expires": PAST.isoformat()},
                ],
            }
        )
        .tenants[TENANT]
        .secret_key
    )
    assert secret.get_secret_value() == "new-secret"  # what outbound calls sign with
    name = "tenants.test.secret_key"
    before = count(name, "previous"), count(name, "current")
    assert matched(secret, "old-secret", name)
    assert matched(secret, "new-secret", name)
    assert not matched(secret, "older-secret", name)  # expired a minute ago
    assert (count(name, "previous"), count(name, "current")) == (before[0] + 1, before[1] + 1)
    later = [value for _, value in secret.accepted(SOON + timedelta(seconds=1))]
    assert later == ["new-secret"]


def test_a_previous_value_without_expiry_stays_accepted() -> None:
    secret = tenant_with({"current": "a", "previous": ["b"]}).tenants[TENANT].secret_key
    assert matched(secret, "b")
    assert secret.expiries() == []


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"previous": ["b"]}, "current"),
        ({"current": "a", "extra": 1}, "current"),
        ({"current": "a", "previous": [{"value": "b", "expires": "next week"}]}, "expires"),
        ({"current": "a", "previous": [{"expires": "2026-12-31"}]}, "previous.0"),
        ({"current": ""}, "empty"),
    ],
)
def test_a_bad_rotation_table_names_its_key(tmp_path: Path, value: object, words: str) -> None:
    data = settings_data(overrides={"tenants": {TENANT: {"secret_key": value}}})
    with pytest.raises(ConfigError) as caught:
        write_config(tmp_path / "config.toml", data)
    message = str(caught.value)
    assert f"tenants.{TENANT}.secret_key" in message and words in message
    assert "secret" in message


def test_secrets_never_print(tmp_path: Path) -> None:
    data = settings_data(
        overrides={"tenants": {TENANT: {"secret_key": {"current": "s3cr3t", "previous": ["0ld"]}}}}
    )
    settings = write_config(tmp_path / "config.toml", data)
    printed = repr(settings) + settings.model_dump_json()
    assert "s3cr3t" not in printed and "0ld" not in printed
    assert load_settings(tmp_path / "config.toml").tenants[TENANT].secret_key.previous


def test_the_tenants_check_warns_of_previous_values_expiring_within_a_week() -> None:
    from tools.tenants_check import expiring_secrets

    now = datetime.now(UTC)
    settings = Settings(
        **settings_data(
            overrides={
                "tenants": {
                    TENANT: {
                        "secret_key": {
                            "current": "new",
                            "previous": [
                                {"value": "a", "expires": (now + timedelta(days=2)).isoformat()},
                                {"value": "b", "expires": (now + timedelta(days=30)).isoformat()},
                                {"value": "c", "expires": (now - timedelta(days=1)).isoformat()},
                            ],
                        }
                    }
                },
                "campaigns": {"admin_token": {"current": "t2", "previous": ["t1"]}},
            }
        )
    )
    lines = expiring_secrets(settings, now)
    assert len(lines) == 2
    assert lines[0].startswith(f"tenants.{TENANT}.secret_key: a previous value expires ")
    assert lines[1].startswith(f"tenants.{TENANT}.secret_key: a previous value expired ")
    assert all(value not in "".join(lines) for value in ("new", "t2"))
