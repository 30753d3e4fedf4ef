"""Secured Kafka: our clients, the command line and Kafka's own tools over a SASL_SSL listener
with SCRAM users, against a certificate authority the test makes itself."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from shared.config import KafkaSettings
from shared.contract.topics import STATUSES, ensure_topics
from shared.kafka.broker import ApacheKafkaBroker, distribution
from shared.kafka.broker.apache_kafka import SaslSslListener
from shared.kafka.clients import connection_problem, make_admin, make_consumer, make_producer
from tests.support.ops import config_data, smsbridge, write_config
from tests.support.tls import make_ca, make_server_certificate

pytestmark = [
    pytest.mark.integration,
    pytest.mark.own_broker,
    pytest.mark.skipif(
        distribution.unavailable_reason(fetch=False) is not None,
        reason="Apache Kafka cannot run here (no Java 17+ or no jars)",
    ),
]

USER, PASSWORD = "alice", "alice-scram-secret"
WRONG_PASSWORD = "not-alices-password"


class SecureBroker:
    def __init__(self, broker: ApacheKafkaBroker, ca: Path) -> None:
        self.broker = broker
        self.ca = ca

    def kafka(self, host: str = "127.0.0.1", **overrides: Any) -> dict[str, Any]:
        """The ``[kafka]`` section that reaches the SASL_SSL listener as ``host``."""
        return {
            "bootstrap_servers": f"{host}:{self.broker.sasl_ssl_port}",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": USER,
            "sasl_password": PASSWORD,
            "ssl_cafile": str(self.ca),
            **overrides,
        }


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    folder = tmp_path_factory.mktemp("tls")
    ca = make_ca(folder / "ca")
    # The certificate names 127.0.0.1 only: reached as "localhost", its name is wrong.
    server = make_server_certificate(folder / "server", ca, "IP:127.0.0.1")
    listener = SaslSslListener(
        keystore_pem=server.keystore, key_password=server.key_password, users={USER: PASSWORD}
    )
    with ApacheKafkaBroker(sasl_ssl=listener) as broker:
        assert isinstance(broker, ApacheKafkaBroker)
        yield SecureBroker(broker, ca[0])


async def test_produce_and_consume_over_sasl_ssl(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    password_file = tmp_path / "kafka-password"
    password_file.write_text(PASSWORD + "\n")
    settings = KafkaSettings(**secure_broker.kafka(sasl_password=f"file:{password_file}"))
    admin = make_admin(settings)
    await admin.start()
    try:
        await ensure_topics(admin)
    finally:
        await admin.close()

    producer = make_producer(settings, "test")
    await producer.start()
    try:
        await producer.send_and_wait(STATUSES.name, b"over-tls", key=b"k", partition=0)
    finally:
        await producer.stop()

    consumer = make_consumer(settings, "secured-group", role="test")
    await consumer.start()
    try:
        consumer.subscribe([STATUSES.name])
        record = await asyncio.wait_for(consumer.getone(), 60)
        assert (record.key, record.value) == (b"k", b"over-tls")
        await consumer.commit()
        assert await consumer.committed(TopicPartition(STATUSES.name, 0)) == record.offset + 1
    finally:
        await consumer.stop()

    # Kafka's own tool, through the passthrough, logs in with the same settings.
    config = tmp_path / "smsbridge.toml"
    write_config(config, config_data(overrides={"kafka": secure_broker.kafka()}))
    code, out, err = await smsbridge(
        "--config", str(config), "broker", "kafka-consumer-groups",
        "--bootstrap-server", secure_broker.kafka()["bootstrap_servers"],
        "--describe", "--group", "secured-group",
    )  # fmt: skip
    assert code == 0, err
    assert STATUSES.name in out


async def test_wrong_password_is_one_clear_line(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    config = tmp_path / "smsbridge.toml"
    kafka = secure_broker.kafka(sasl_password=WRONG_PASSWORD)
    write_config(config, config_data(overrides={"kafka": kafka}))
    code, out, err = await smsbridge("--config", str(config), "topics", "ensure")
    assert code == 1
    assert err.strip().splitlines() == [
        f"Kafka at 127.0.0.1:{secure_broker.broker.sasl_ssl_port} refused the login of 'alice' "
        "(SCRAM-SHA-512): check [kafka] sasl_username and sasl_password"
    ]
    assert WRONG_PASSWORD not in out + err


async def test_a_service_with_a_wrong_password_logs_one_line_and_exits(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    config = tmp_path / "smsbridge.toml"
    kafka = secure_broker.kafka(sasl_password=WRONG_PASSWORD)
    write_config(config, config_data(overrides={"kafka": kafka}))
    code, out, err = await smsbridge("--config", str(config), "run", "normalizer")
    assert code == 1
    [line] = err.strip().splitlines()
    entry = orjson.loads(line)
    assert entry["level"] == "error"
    assert "refused the login of 'alice' (SCRAM-SHA-512)" in entry["msg"]
    assert WRONG_PASSWORD not in out + err


async def test_a_certificate_for_another_name_is_refused(secure_broker: SecureBroker) -> None:
    checked = KafkaSettings(**secure_broker.kafka(host="localhost"))
    admin = make_admin(checked)
    with pytest.raises(KafkaConnectionError):
        await admin.start()
    await admin.close()
    problem = await connection_problem(checked)
    assert problem is not None
    assert "certificate failed verification" in problem
    assert "Hostname mismatch" in problem

    # The same certificate, with hostname checking off: the CA alone vouches for it.
    unchecked = KafkaSettings(**secure_broker.kafka(host="localhost", ssl_check_hostname=False))
    admin = make_admin(unchecked)
    await admin.start()
    try:
        assert isinstance(await admin.list_topics(), list)
    finally:
        await admin.close()
