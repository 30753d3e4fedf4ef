"""``smsbridge topics ensure`` on topics that already exist: it prints how they differ from ours
(partition count, cleanup.policy, min.insync.replicas), changes nothing without ``--fix``, never
lowers a partition count nor raises one that would move keys away from their state, and exits
non-zero while a difference remains. Checked with Kafka's own ``kafka-topics --describe``."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from aiokafka.admin import NewTopic

from shared.config import Settings
from shared.contract.topics import (
    DEAD_LETTERS,
    NUMBER_FORMATS,
    OPT_OUTS,
    RECIPIENTS,
    STATUSES,
    Topic,
    wait_for_leaders,
)
from shared.kafka.broker import EmbeddedBroker, distribution
from shared.kafka.clients import bootstrap, make_admin
from tests.support import make_settings
from tests.support.ops import config_data, smsbridge, write_config

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def apache_kafka(broker: EmbeddedBroker) -> EmbeddedBroker:
    if broker.kind != "kafka":
        pytest.skip("Apache Kafka's tools need the Apache Kafka broker, not the Tansu fallback")
    return broker


async def create(
    settings: Settings, topic: Topic, partitions: int, configs: dict[str, str]
) -> None:
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic.name, partitions, 1, topic_configs=configs)])
        await wait_for_leaders(admin, [topic.name])
    finally:
        await admin.close()


async def described(topic: Topic) -> tuple[int, str]:
    """(partition count, the Configs column) as ``kafka-topics --describe`` shows them."""
    output = await asyncio.to_thread(
        distribution.run_tool,
        "kafka-topics",
        "--bootstrap-server",
        bootstrap(make_settings().kafka),
        "--describe",
        "--topic",
        topic.name,
    )
    summary = next(line for line in output.splitlines() if "PartitionCount" in line)
    found = re.search(r"PartitionCount:\s*(\d+)", summary)
    assert found is not None, summary
    return int(found.group(1)), summary.split("Configs:", 1)[-1].strip()


def rows(printed: str) -> dict[str, str]:
    """{topic: state} of the table."""
    table = {}
    for line in printed.splitlines()[1:]:
        parts = line.split()
        if len(parts) == 5 and parts[1].isdigit():
            table[parts[0]] = parts[4]
    return table


def drift_lines(printed: str, topic: Topic) -> list[str]:
    return [line for line in printed.splitlines() if line.startswith(f"drift: {topic.name}: ")]


async def test_drift_is_printed_changed_only_with_fix_and_never_unsafely(tmp_path: Path) -> None:
    config = tmp_path / "smsbridge.toml"
    settings = write_config(config, config_data())
    # A co-partitioned topic with too few partitions, one with more than ours, a plain one with
    # too few, a compacted table made with delete, and one whose min.insync.replicas differs and
    # that carries the operator's own retention.ms.
    await create(settings, STATUSES, 3, {})
    await create(settings, RECIPIENTS, 16, {})
    await create(settings, DEAD_LETTERS, 4, {})
    await create(settings, OPT_OUTS, 1, {"cleanup.policy": "delete"})
    await create(
        settings,
        NUMBER_FORMATS,
        1,
        {"cleanup.policy": "compact", "min.insync.replicas": "2", "retention.ms": "123456789"},
    )

    code, printed, err = await smsbridge("--config", str(config), "topics", "ensure")
    assert code == 1, printed + err
    table = rows(printed)
    for topic in (STATUSES, RECIPIENTS, DEAD_LETTERS, OPT_OUTS, NUMBER_FORMATS):
        assert table[topic.name] == "drift", printed
    assert list(table.values()).count("created") == len(table) - 5
    [statuses] = drift_lines(printed, STATUSES)
    assert "partitions is 3, want 12; not fixed: co-partitioned with" in statuses
    [recipients] = drift_lines(printed, RECIPIENTS)
    assert "partitions is 16, want 12; not fixed: Kafka never lowers" in recipients
    assert drift_lines(printed, DEAD_LETTERS) == [
        f"drift: {DEAD_LETTERS.name}: partitions is 4, want 12"
    ]
    assert drift_lines(printed, OPT_OUTS) == [
        f"drift: {OPT_OUTS.name}: cleanup.policy is delete, want compact"
    ]
    assert drift_lines(printed, NUMBER_FORMATS) == [
        f"drift: {NUMBER_FORMATS.name}: min.insync.replicas is 2, want 1"
    ]
    # Nothing changed without --fix.
    assert (await described(DEAD_LETTERS))[0] == 4
    assert "cleanup.policy=delete" in (await described(OPT_OUTS))[1]
    assert "min.insync.replicas=2" in (await described(NUMBER_FORMATS))[1]

    code, printed, err = await smsbridge("--config", str(config), "topics", "ensure", "--fix")
    assert code == 1, printed + err  # the two partition counts it must not touch remain
    table = rows(printed)
    assert [table[t.name] for t in (DEAD_LETTERS, OPT_OUTS, NUMBER_FORMATS)] == ["fixed"] * 3
    assert [table[t.name] for t in (STATUSES, RECIPIENTS)] == ["drift"] * 2
    assert (await described(DEAD_LETTERS))[0] == 12
    assert (await described(STATUSES))[0] == 3
    assert (await described(RECIPIENTS))[0] == 16
    assert "cleanup.policy=compact" in (await described(OPT_OUTS))[1]
    configs = (await described(NUMBER_FORMATS))[1]
    assert "min.insync.replicas=1" in configs
    assert "retention.ms=123456789" in configs  # the operator's own setting survives

    # What is left is only what --fix refused; nothing more to do.
    code, printed, _ = await smsbridge("--config", str(config), "topics", "ensure", "--fix")
    assert code == 1
    assert {
        line.split(":")[1].strip() for line in printed.splitlines() if line.startswith("drift:")
    } == {
        STATUSES.name,
        RECIPIENTS.name,
    }
    assert not [line for line in printed.splitlines() if line.startswith("fixed:")]


async def test_a_fixed_cluster_checks_clean(tmp_path: Path) -> None:
    config = tmp_path / "smsbridge.toml"
    settings = write_config(config, config_data())
    await create(settings, DEAD_LETTERS, 2, {"cleanup.policy": "compact"})
    code, printed, _ = await smsbridge("--config", str(config), "topics", "ensure", "--fix")
    assert code == 0, printed
    assert rows(printed)[DEAD_LETTERS.name] == "fixed"
    code, printed, _ = await smsbridge("--config", str(config), "topics", "ensure")
    assert code == 0, printed
    assert set(rows(printed).values()) == {"ok"}
    assert not [line for line in printed.splitlines() if line.startswith("drift:")]
