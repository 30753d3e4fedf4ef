"""Which embedded broker runs, and the pieces of the Apache Kafka launcher that need no JVM."""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path

import pytest

from shared.kafka import broker
from shared.kafka.broker import BrokerError, apache_kafka, choose_kind, distribution, free_port


@pytest.fixture
def no_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distribution, "java_major", lambda java="java": None)


def test_an_unknown_forced_kind_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(broker.EMBEDDED_BROKER_ENV, "redpanda")
    with pytest.raises(BrokerError, match="redpanda"):
        choose_kind()


@pytest.mark.usefixtures("no_java")
def test_forced_kafka_without_java_is_an_error_never_a_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(broker.EMBEDDED_BROKER_ENV, "kafka")
    with pytest.raises(BrokerError, match="Java is not installed"):
        choose_kind()


@pytest.mark.usefixtures("no_java")
def test_without_java_the_choice_is_tansu_and_one_line_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(broker.EMBEDDED_BROKER_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="shared.kafka.broker"):
        assert choose_kind() == "tansu"
    [line] = [r.getMessage() for r in caplog.records if r.name == "shared.kafka.broker"]
    assert "Tansu" in line and "Java is not installed" in line


def test_old_java_is_refused_with_its_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distribution, "java_major", lambda java="java": 11)
    assert distribution.unavailable_reason(fetch=False) == (
        "Java 11 is too old (Apache Kafka needs Java 17 or later)"
    )


def test_the_pinned_version_is_the_poms() -> None:
    pom = distribution.POM.read_text("utf-8")
    assert f"<kafka.version>{distribution.kafka_version()}</kafka.version>" in pom
    assert distribution.libs_dir().parent.name == distribution.kafka_version()


def test_cluster_ids_are_kafka_uuids() -> None:
    for _ in range(200):
        cluster_id = apache_kafka.new_cluster_id()
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id)
        assert not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_one_node_is_broker_and_controller_on_loopback(tmp_path: Path) -> None:
    text = apache_kafka.server_properties(9092, 9093, tmp_path / "data", "127.0.0.1")
    config = dict(line.split("=", 1) for line in text.splitlines())
    assert config["process.roles"] == "broker,controller"
    assert config["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert config["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert config["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert config["log.dirs"] == str(tmp_path / "data")
    assert config["offsets.topic.replication.factor"] == "1"
    assert config["auto.create.topics.enable"] == "false"


def test_nothing_listening_is_no_metadata_answer() -> None:
    assert apache_kafka.answering_cluster("127.0.0.1", free_port(), timeout_s=0.5) is None
