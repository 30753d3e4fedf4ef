"""[kafka] TLS and SASL settings: refused when half-configured, and what every client is given."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shared.config import ConfigError, KafkaSettings
from shared.kafka.broker.distribution import properties_text
from shared.kafka.clients import connection_kwargs
from shared.kafka.security import java_client_properties
from tests.support.tls import make_ca

SASL = {
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_username": "alice",
    "sasl_password": "s3cret-pw",
}


def refusal(**values: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        KafkaSettings(**values)
    return str(caught.value)


def test_sasl_protocol_names_every_missing_setting() -> None:
    message = refusal(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN")
    assert "security_protocol SASL_PLAINTEXT needs sasl_username, sasl_password" in message


def test_oauthbearer_is_refused_with_the_reason() -> None:
    message = refusal(**{**SASL, "sasl_mechanism": "OAUTHBEARER"})
    assert "OAUTHBEARER is not supported" in message
    assert "SCRAM-SHA-512" in message


def test_sasl_settings_without_a_sasl_protocol_are_refused() -> None:
    message = refusal(**{**SASL, "security_protocol": "SSL"})
    assert "uses no SASL" in message


def test_tls_files_without_tls_are_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert "ssl_cafile set, but security_protocol SASL_PLAINTEXT uses no TLS" in refusal(
        **{**SASL, "security_protocol": "SASL_PLAINTEXT", "ssl_cafile": str(ca)}
    )


def test_tls_files_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    assert f"ssl_cafile: no such file {missing}" in refusal(**SASL, ssl_cafile=str(missing))


def test_a_key_needs_its_certificate(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("x")
    assert "ssl_keyfile needs ssl_certfile" in refusal(**SASL, ssl_keyfile=str(key))


def test_password_from_env_and_file_and_never_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_PW", "from-env")
    from_env = KafkaSettings(**{**SASL, "sasl_password": "env:KAFKA_PW"})
    secret_file = tmp_path / "pw"
    secret_file.write_text("from-file\n")
    from_file = KafkaSettings(**{**SASL, "sasl_password": f"file:{secret_file}"})
    assert from_env.sasl_password is not None and from_file.sasl_password is not None
    assert from_env.sasl_password.get_secret_value() == "from-env"
    assert from_file.sasl_password.get_secret_value() == "from-file"
    assert "from-env" not in repr(from_env)


def test_plaintext_clients_get_only_the_address() -> None:
    assert connection_kwargs(KafkaSettings(bootstrap_servers="k:9092")) == {
        "bootstrap_servers": "k:9092"
    }
    assert java_client_properties(KafkaSettings(bootstrap_servers="k:9092")) == {}


def test_sasl_ssl_clients_get_the_login_and_a_verifying_tls_context(tmp_path: Path) -> None:
    ca, _ = make_ca(tmp_path)
    settings = KafkaSettings(bootstrap_servers="k:9093", ssl_cafile=str(ca), **SASL)
    kwargs = connection_kwargs(settings)
    context = kwargs.pop("ssl_context")
    assert kwargs == {
        "bootstrap_servers": "k:9093",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "alice",
        "sasl_plain_password": "s3cret-pw",
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1
    unchecked = KafkaSettings(**{**settings.model_dump(), **SASL, "ssl_check_hostname": False})
    relaxed = connection_kwargs(unchecked)["ssl_context"]
    assert not relaxed.check_hostname and relaxed.verify_mode == ssl.CERT_REQUIRED


def test_a_ca_file_that_is_no_certificate_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot load"):
        connection_kwargs(KafkaSettings(ssl_cafile=str(bad), **SASL))


def test_kafka_tools_get_the_same_login(tmp_path: Path) -> None:
    ca, _ = make_ca(tmp_path)
    settings = KafkaSettings(
        ssl_cafile=str(ca), ssl_check_hostname=False, **{**SASL, "sasl_password": 'p"w\\x'}
    )
    properties = java_client_properties(settings)
    assert properties == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.jaas.config": "org.apache.kafka.common.security.scram.ScramLoginModule required "
        'username="alice" password="p\\"w\\\\x";',
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(ca),
        "ssl.endpoint.identification.algorithm": "",
    }
    # Java's .properties reading undoes the escapes: a backslash doubled, a line break as \n.
    assert properties_text({"a": "x\\y\nz"}) == "a=x\\\\y\\nz\n"
