"""TLS and SASL: ``[kafka] security_protocol``, ``sasl_*`` and ``ssl_*`` as aiokafka's keyword
arguments and as a Java client's properties (for Kafka's own tools), from one place."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from aiokafka.helpers import create_ssl_context

from shared.config import ConfigError, KafkaSettings


def security_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """aiokafka's TLS and SASL arguments (none for PLAINTEXT)."""
    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return {}
    kwargs: dict[str, Any] = {"security_protocol": protocol}
    if protocol.endswith("SSL"):
        kwargs["ssl_context"] = ssl_context(settings)
    if protocol.startswith("SASL_"):
        password = settings.sasl_password
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = password.get_secret_value() if password else None
    return kwargs


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    """The TLS context of ``[kafka] ssl_*``; a file that is not a usable PEM is a ConfigError."""
    password = settings.ssl_key_password
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.ssl_cafile,
            certfile=settings.ssl_certfile,
            keyfile=settings.ssl_keyfile,
            password=password.get_secret_value() if password else None,
        )
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"[kafka] ssl_cafile/ssl_certfile/ssl_keyfile: cannot load ({exc})"
        ) from None
    if not settings.ssl_check_hostname:  # the certificate is still verified against the CA
        context.check_hostname = False
    return context


# The JAAS login module of each SASL mechanism, for Kafka's own (Java) tools.
JAAS_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


def java_client_properties(settings: KafkaSettings) -> dict[str, str]:
    """The same TLS and SASL settings as a Java client's properties (``smsbridge broker
    kafka-consumer-groups ...`` gets them as ``--command-config``); empty for PLAINTEXT."""
    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return {}
    properties: dict[str, str] = {"security.protocol": protocol}
    if protocol.startswith("SASL_") and settings.sasl_mechanism in JAAS_MODULES:
        password = settings.sasl_password.get_secret_value() if settings.sasl_password else ""
        properties["sasl.mechanism"] = settings.sasl_mechanism
        properties["sasl.jaas.config"] = (
            f"{JAAS_MODULES[settings.sasl_mechanism]} required "
            f"username={_jaas_quoted(settings.sasl_username or '')} "
            f"password={_jaas_quoted(password)};"
        )
    if protocol.endswith("SSL"):
        if settings.ssl_cafile:
            properties["ssl.truststore.type"] = "PEM"
            properties["ssl.truststore.location"] = settings.ssl_cafile
        if settings.ssl_certfile:
            # Inline PEM: Java reads key and chain from one file, ours may be two.
            properties["ssl.keystore.type"] = "PEM"
            chain = Path(settings.ssl_certfile).read_text("utf-8")
            key_file = Path(settings.ssl_keyfile or settings.ssl_certfile).read_text("utf-8")
            properties["ssl.keystore.certificate.chain"] = chain
            properties["ssl.keystore.key"] = key_file
            if settings.ssl_key_password is not None:
                properties["ssl.key.password"] = settings.ssl_key_password.get_secret_value()
        if not settings.ssl_check_hostname:
            properties["ssl.endpoint.identification.algorithm"] = ""
    return properties


def _jaas_quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
