"""The Apache Kafka launcher: data that outlives a restart, and a failed start that says why."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import OffsetAndMetadata

from shared.kafka.broker import ApacheKafkaBroker, BrokerError, distribution
from shared.kafka.broker.apache_kafka import answering_cluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        distribution.unavailable_reason(fetch=False) is not None,
        reason="Apache Kafka cannot run here (no Java 17+ or no jars)",
    ),
]

TOPIC = "restart-test"
GROUP = "restart-test-group"


async def write_and_commit(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, 2, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for index in range(5):
            await producer.send_and_wait(TOPIC, f"v{index}".encode(), partition=index % 2)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=GROUP, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(TOPIC, 0)])
        await consumer.commit({TopicPartition(TOPIC, 0): OffsetAndMetadata(2, "")})
    finally:
        await consumer.stop()


async def read_back(bootstrap: str) -> tuple[int | None, list[bytes]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=GROUP,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)]
        consumer.assign(partitions)
        committed = await consumer.committed(partitions[0])
        await consumer.seek_to_beginning(*partitions)
        values: list[bytes] = []
        while len(values) < 5:
            batches = await consumer.getmany(timeout_ms=1000)
            if not batches:
                break
            values += [r.value for records in batches.values() for r in records if r.value]
        return committed, sorted(values)
    finally:
        await consumer.stop()


async def test_a_restart_on_the_same_folder_keeps_topics_records_and_offsets(
    tmp_path: Path,
) -> None:
    broker = ApacheKafkaBroker(data_dir=tmp_path / "kafka")
    try:
        broker.start()
        first_cluster = answering_cluster(broker.host, broker.port)
        await write_and_commit(broker.bootstrap_servers)
        broker.stop()
        assert not broker.running
        broker.start()
        # The group coordinator reloads its offsets after a start; aiokafka reads "none" meanwhile.
        for _ in range(30):
            committed, values = await read_back(broker.bootstrap_servers)
            if committed is not None:
                break
            await asyncio.sleep(1.0)
        cluster = answering_cluster(broker.host, broker.port)
    finally:
        broker.close()
    assert cluster == first_cluster  # the same cluster, not a fresh one
    assert committed == 2
    assert values == [f"v{index}".encode() for index in range(5)]
    assert (tmp_path / "kafka" / "broker.log").stat().st_size > 0  # its own log, in its folder
    assert (tmp_path / "kafka" / "data" / "meta.properties").exists()  # close keeps given data


def test_a_broker_that_cannot_start_says_why_with_its_log(tmp_path: Path) -> None:
    with ApacheKafkaBroker(data_dir=tmp_path / "first") as first:
        second = ApacheKafkaBroker(port=first.port, data_dir=tmp_path / "second")
        with pytest.raises(BrokerError) as refused:
            second.start(timeout_s=60)
        assert not second.running
    message = str(refused.value)
    assert "exited with code" in message or "did not answer" in message
    assert f"--- {tmp_path / 'second' / 'broker.log'} ---" in message
    assert "Address already in use" in message or "bind" in message.lower()
