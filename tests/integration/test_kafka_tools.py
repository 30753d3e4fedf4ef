"""What we say about Kafka, checked against Apache Kafka's own tools on the test broker.

Operators read lag, move offsets and inspect topics with ``kafka-consumer-groups`` and
``kafka-topics`` (and KEDA, Burrow and kafka-exporter compute lag as the first does): our gauge,
``smsbridge replay`` and ``smsbridge topics ensure`` must agree with them.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from prometheus_client import REGISTRY

from shared.config import RunnerSettings, Settings
from shared.contract.topics import ALL_TOPICS, STATUSES, Topic
from shared.kafka.broker import EmbeddedBroker, distribution
from shared.kafka.clients import OutRecord, bootstrap, group_name
from shared.kafka.runner import Record
from shared.kafka.service import ConsumerService
from tests.support import create_topic, make_settings, running, wait_for
from tests.support.ops import commit, committed, config_data, smsbridge, write_config
from tools.replay import ToTime, replay

pytestmark = pytest.mark.integration

LAG_TOPIC = Topic("ops.tools-lag", partitions=2)
REPLAY_TOPIC = Topic("ops.tools-replay", partitions=3)
CONSUMER = "tools-lag"


@pytest.fixture(autouse=True)
def apache_kafka(broker: EmbeddedBroker) -> EmbeddedBroker:
    if broker.kind != "kafka":
        pytest.skip("Apache Kafka's tools need the Apache Kafka broker, not the Tansu fallback")
    return broker


def tool(name: str, *args: str) -> str:
    return distribution.run_tool(
        name, "--bootstrap-server", bootstrap(make_settings().kafka), *args
    )


async def produce(settings: Settings, topic: Topic, values: dict[int, Sequence[bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(settings.kafka), acks="all")
    await producer.start()
    try:
        for partition, items in values.items():
            for index, value in enumerate(items):
                key = f"{partition}-{index}".encode()
                await producer.send_and_wait(topic.name, value, key=key, partition=partition)
    finally:
        await producer.stop()


def described_lag(output: str, group: str, topic: str) -> dict[int, int]:
    """The LAG column of ``kafka-consumer-groups --describe``, per partition."""
    lines = [line.split() for line in output.splitlines() if line.strip()]
    header = next(line for line in lines if "LAG" in line)
    columns = {name: index for index, name in enumerate(header)}
    return {
        int(row[columns["PARTITION"]]): int(row[columns["LAG"]])
        for row in lines
        if row is not header and row[columns["GROUP"]] == group and row[columns["TOPIC"]] == topic
    }


class HoldMarked:
    """Finishes records at once, except those whose value is ``hold``: they wait for ever."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def handle(self, record: Record) -> Sequence[OutRecord]:
        if record.value == b"hold":
            await self.release.wait()
        return []


def our_lag(partition: int) -> float | None:
    labels = {
        "consumer": CONSUMER,
        "consumergroup": group_name(make_settings().kafka, f"smsbridge-{CONSUMER}"),
        "topic": LAG_TOPIC.name,
        "partition": str(partition),
    }
    return REGISTRY.get_sample_value("smsbridge_consumer_lag_messages", labels)


async def test_our_lag_gauge_equals_the_lag_column_of_kafka_consumer_groups() -> None:
    settings = make_settings()
    await create_topic(settings, LAG_TOPIC)
    # Partition 0: 5 done, then 15 held; partition 1: 3 done, then 4 held. The group commits
    # the first unfinished offsets, 5 and 3; the ends are 20 and 7.
    await produce(
        settings, LAG_TOPIC, {0: [b"go"] * 5 + [b"hold"] * 15, 1: [b"go"] * 3 + [b"hold"] * 4}
    )
    handler = HoldMarked()
    service = ConsumerService(
        name=CONSUMER,
        settings=settings,
        runner_settings=RunnerSettings(commit_interval_s=0.2),
        topics=[LAG_TOPIC.name],
        handler=handler,
    )
    async with running(service):
        await wait_for(
            lambda: (our_lag(0), our_lag(1)) == (15.0, 4.0), timeout_s=30, what="the lag to settle"
        )
        group = group_name(settings.kafka, f"smsbridge-{CONSUMER}")
        described = await asyncio.to_thread(
            tool, "kafka-consumer-groups", "--describe", "--group", group
        )
        theirs = described_lag(described, group, LAG_TOPIC.name)
        ours = {partition: our_lag(partition) for partition in range(LAG_TOPIC.partitions)}
        assert theirs == ours == {0: 15, 1: 4}, described
        handler.release.set()
        await wait_for(lambda: (our_lag(0), our_lag(1)) == (0.0, 0.0), what="the lag to drain")
        await asyncio.sleep(0.5)  # the last commit
        described = await asyncio.to_thread(
            tool, "kafka-consumer-groups", "--describe", "--group", group
        )
        assert described_lag(described, group, LAG_TOPIC.name) == {0: 0, 1: 0}, described


async def test_replay_to_a_time_leaves_the_offsets_reset_offsets_to_datetime_leaves(
    tmp_path: Path,
) -> None:
    settings = write_config(tmp_path / "smsbridge.toml", config_data())
    await create_topic(settings, REPLAY_TOPIC)
    instants = [time.time() - 3600]  # before every record: the earliest offsets
    for round_size in (2, 3, 4):
        await produce(settings, REPLAY_TOPIC, dict.fromkeys(range(3), [b"x"] * round_size))
        await asyncio.sleep(0.05)
        instants.append(time.time())
        await asyncio.sleep(0.05)
    instants.append(time.time() + 3600)  # after every record: the ends
    # Uneven partitions: partition 2 gets more records in between.
    await produce(settings, REPLAY_TOPIC, {2: [b"y"] * 5})

    for index, instant in enumerate(instants):
        at = datetime.fromtimestamp(instant, UTC)
        ours, theirs = f"ops-ours-{index}", f"ops-theirs-{index}"
        await replay(settings, ours, REPLAY_TOPIC.name, ToTime(at), execute=True, out=io.StringIO())
        await asyncio.to_thread(
            tool,
            "kafka-consumer-groups",
            "--reset-offsets",
            "--group",
            group_name(settings.kafka, theirs),
            "--topic",
            REPLAY_TOPIC.name,
            "--to-datetime",
            at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z",
            "--execute",
        )
        mine = await committed(settings, ours, REPLAY_TOPIC)
        kafkas = await committed(settings, theirs, REPLAY_TOPIC)
        assert mine == kafkas, f"at {at.isoformat()}: replay {mine}, kafka-consumer-groups {kafkas}"
    # The instants told the rounds apart: the check compared moves, not one answer.
    assert (await committed(settings, "ops-ours-2", REPLAY_TOPIC))[0] == 5


# Two topics whose records were written 3 h, 1 h and 10 min ago (their own timestamps): the
# eras stay apart however long Kafka's tool takes to start. Per partition, records per era.
ERA_AGES_S = (3 * 3600, 3600, 600)
ERA_TOPICS = (Topic("ops.tools-eras-a", partitions=3), Topic("ops.tools-eras-b", partitions=2))
ERAS = {
    "ops.tools-eras-a": ((2, 1, 3), (2, 2, 0), (1, 3, 2)),
    "ops.tools-eras-b": ((1, 0), (0, 2), (2, 1)),
}
# Where each group starts, before the move: somewhere inside every partition.
ERA_START = {"ops.tools-eras-a": (4, 6, 2), "ops.tools-eras-b": (3, 1)}


async def produce_eras(settings: Settings) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(settings.kafka), acks="all")
    await producer.start()
    try:
        now_ms = int(time.time() * 1000)
        for topic in ERA_TOPICS:
            for age_s, counts in zip(ERA_AGES_S, ERAS[topic.base], strict=True):
                for partition, count in enumerate(counts):
                    for _ in range(count):
                        await producer.send_and_wait(
                            topic.name,
                            b"x",
                            partition=partition,
                            timestamp_ms=now_ms - age_s * 1000,
                        )
    finally:
        await producer.stop()


def era_start() -> dict[TopicPartition, int]:
    return {
        TopicPartition(topic.name, partition): offset
        for topic in ERA_TOPICS
        for partition, offset in enumerate(ERA_START[topic.base])
    }


async def era_offsets(settings: Settings, group: str) -> dict[str, list[int | None]]:
    return {
        topic.base: list((await committed(settings, group, topic)).values()) for topic in ERA_TOPICS
    }


async def test_each_replay_option_leaves_the_offsets_reset_offsets_leaves(
    tmp_path: Path,
) -> None:
    config = tmp_path / "smsbridge.toml"
    settings = write_config(config, config_data())
    for topic in ERA_TOPICS:
        await create_topic(settings, topic)
    await produce_eras(settings)
    a, b = ERA_TOPICS
    cases: dict[str, tuple[list[Topic] | None, list[str]]] = {
        "two-hours": ([a, b], ["--by-duration", "PT2H"]),
        "half-hour": (None, ["--by-duration", "PT30M"]),
        "day": ([b], ["--by-duration", "P1D"]),
        "latest": (None, ["--to-latest"]),
        "back": ([a], ["--shift-by", "-3"]),
        "on": ([a, b], ["--shift-by", "2"]),
        "earliest": ([b], ["--to-earliest"]),
    }
    moved: dict[str, dict[str, list[int | None]]] = {}
    for name, (topics, option) in cases.items():
        ours, theirs = f"ops-ours-{name}", f"ops-theirs-{name}"
        for group in (ours, theirs):
            await commit(settings, group, era_start())
        export = tmp_path / f"{name}.csv"
        our_scope = ["--all-topics"] if topics is None else []
        their_scope = ["--all-topics"] if topics is None else []
        for topic in topics or []:
            our_scope += ["--topic", topic.base]
            their_scope += ["--topic", topic.name]
        code, _, err = await smsbridge(
            *("--config", str(config), "replay", "--group", ours, *our_scope, *option),
            *("--export", str(export), "--execute"),
        )
        assert code == 0, err
        await asyncio.to_thread(
            tool,
            *("kafka-consumer-groups", "--reset-offsets", "--group"),
            group_name(settings.kafka, theirs),
            *their_scope,
            *option,
            "--execute",
        )
        moved[name] = await era_offsets(settings, ours)
        kafkas = await era_offsets(settings, theirs)
        assert moved[name] == kafkas, f"{option}: replay {moved[name]}, kafka {kafkas}"
        # Our export is the undo, in a form Kafka's own tool reads.
        await asyncio.to_thread(
            tool,
            *("kafka-consumer-groups", "--reset-offsets", "--group"),
            group_name(settings.kafka, ours),
            *("--from-file", str(export), "--execute"),
        )
        assert await era_offsets(settings, ours) == {
            topic.base: list(ERA_START[topic.base]) for topic in ERA_TOPICS
        }, f"{option}: undone by kafka-consumer-groups --from-file"
    # The cases moved somewhere, and apart: the eras and the clamps were exercised.
    assert moved["two-hours"] == {"ops.tools-eras-a": [2, 1, 3], "ops.tools-eras-b": [1, 0]}
    assert moved["half-hour"] == {"ops.tools-eras-a": [4, 3, 3], "ops.tools-eras-b": [1, 2]}
    assert moved["day"]["ops.tools-eras-b"] == [0, 0]
    assert moved["back"]["ops.tools-eras-a"] == [1, 3, 0]
    assert moved["on"] == {"ops.tools-eras-a": [5, 6, 4], "ops.tools-eras-b": [3, 3]}

    # Kafka's own plan, exported (with --export a dry run prints only the CSV), as --from-file.
    ours, theirs = "ops-ours-file", "ops-theirs-file"
    for group in (ours, theirs):
        await commit(settings, group, era_start())
    plan = tmp_path / "kafka-plan.csv"
    plan.write_text(
        await asyncio.to_thread(
            tool,
            *("kafka-consumer-groups", "--reset-offsets", "--group"),
            group_name(settings.kafka, theirs),
            *("--all-topics", "--shift-by", "-1", "--dry-run", "--export"),
        )
    )
    code, _, err = await smsbridge(
        *("--config", str(config), "replay", "--group", ours),
        *("--from-file", str(plan), "--execute"),
    )
    assert code == 0, err
    await asyncio.to_thread(
        tool,
        *("kafka-consumer-groups", "--reset-offsets", "--group"),
        group_name(settings.kafka, theirs),
        *("--from-file", str(plan), "--execute"),
    )
    expected = {"ops.tools-eras-a": [3, 5, 1], "ops.tools-eras-b": [2, 0]}
    assert await era_offsets(settings, ours) == await era_offsets(settings, theirs) == expected


async def test_kafka_topics_describe_shows_what_topics_ensure_promised(tmp_path: Path) -> None:
    config = tmp_path / "smsbridge.toml"
    write_config(config, config_data())
    code, printed, err = await smsbridge("--config", str(config), "topics", "ensure")
    assert code == 0, err
    promised = {}
    for line in printed.splitlines()[1:]:
        name, partitions, policy, min_isr, state = line.split()
        assert state == "created"
        promised[name] = (int(partitions), policy, min_isr)
    assert set(promised) == {topic.name for topic in ALL_TOPICS}

    for name, (partitions, policy, min_isr) in promised.items():
        described = await asyncio.to_thread(tool, "kafka-topics", "--describe", "--topic", name)
        summary = next(line for line in described.splitlines() if "PartitionCount" in line)
        assert re.search(rf"PartitionCount:\s*{partitions}\b", summary), summary
        assert f"cleanup.policy={policy}" in summary, summary
        assert f"min.insync.replicas={min_isr}" in summary, summary
        assert len(re.findall(r"\tPartition: \d+", described)) == partitions


async def test_topics_ensure_names_an_existing_topic_whose_partitions_differ(
    tmp_path: Path,
) -> None:
    config = tmp_path / "smsbridge.toml"
    settings = write_config(config, config_data())
    await create_topic(settings, Topic(STATUSES.base, partitions=3))
    code, printed, _ = await smsbridge("--config", str(config), "topics", "ensure")
    assert code == 1  # the joins need the partition counts we chose
    [line] = [line for line in printed.splitlines() if line.startswith(f"{STATUSES.name} ")]
    assert line.endswith("drift")
    assert f"drift: {STATUSES.name}: partitions is 3, want 12;" in printed
    created = [line for line in printed.splitlines()[1:] if line.endswith("created")]
    assert len(created) == len(ALL_TOPICS) - 1
