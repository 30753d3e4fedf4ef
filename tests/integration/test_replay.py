"""``smsbridge replay``: moving a stopped group's offsets, and replaying without double reports."""

from __future__ import annotations

import asyncio
import io
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from services.normalizer.app import build as build_normalizer
from services.reporter.app import build as build_reporter
from shared.config import Settings
from shared.contract.events import StatusEvent
from shared.contract.topics import DISPATCHES, PROVIDER_EVENTS, STATUSES, Topic
from shared.kafka.broker import EmbeddedBroker, free_port
from shared.kafka.clients import bootstrap
from shared.kafka.service import ConsumerService
from simulators.optimove import OptimoveSimulator
from tests.support import (
    TENANT,
    TENANT_API_TOKEN,
    TENANT_SECRET,
    create_topic,
    make_settings,
    running,
    wait_for,
)
from tests.support.ops import (
    QUICK_GROUP,
    TopicTail,
    accepted_dispatch,
    commit,
    committed,
    config_data,
    delivered_callback,
    dispatch_records,
    publisher,
    smsbridge,
    total,
    write_config,
)
from tools.replay import (
    FromBeginning,
    GroupHasLiveMembers,
    ShiftBy,
    Target,
    ToLatest,
    ToOffset,
    ToTime,
    replay,
)

pytestmark = pytest.mark.integration

NORMALIZER_GROUP = "smsbridge-normalizer"
TEST_TOPIC = Topic("ops.replay-test", partitions=3)
OTHER_TOPIC = Topic("ops.replay-other", partitions=2)
TEST_GROUP = "ops-replay-test"
HEADER = "partition     before      after        end    to read"


async def produce_round(settings: Settings, per_partition: int, topic: Topic = TEST_TOPIC) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(settings.kafka), acks="all")
    await producer.start()
    try:
        for partition in range(topic.partitions):
            for _ in range(per_partition):
                await producer.send_and_wait(topic.name, b"x", partition=partition)
    finally:
        await producer.stop()


async def commit_for_test_group(settings: Settings, offset: int) -> None:
    partitions = [TopicPartition(TEST_TOPIC.name, p) for p in range(TEST_TOPIC.partitions)]
    await commit(settings, TEST_GROUP, dict.fromkeys(partitions, offset))


def row(partition: int, before: int | None, after: int, end: int) -> str:
    """A partition's line of the printed plan."""
    shown = "-" if before is None else str(before)
    return f"{partition:>9} {shown:>10} {after:>10} {end:>10} {end - after:>10}"


@pytest.mark.smoke
async def test_targets_move_every_partition(kafka: EmbeddedBroker, tmp_path: Path) -> None:
    settings = write_config(tmp_path / "smsbridge.toml", config_data())
    await create_topic(settings, TEST_TOPIC)
    await produce_round(settings, 4)  # offsets 0-3 of every partition
    await asyncio.sleep(0.05)
    between = time.time()
    await asyncio.sleep(0.05)
    await produce_round(settings, 6)  # offsets 4-9
    await commit_for_test_group(settings, 10)  # as if the group had read everything

    async def moved_to(target: Target) -> dict[int, int | None]:
        await replay(settings, TEST_GROUP, TEST_TOPIC.name, target, execute=True, out=io.StringIO())
        return await committed(settings, TEST_GROUP, TEST_TOPIC)

    everywhere = dict.fromkeys(range(TEST_TOPIC.partitions))
    at = datetime.fromtimestamp(between, UTC)
    assert await moved_to(ToTime(at)) == dict.fromkeys(everywhere, 4)
    assert await moved_to(ToOffset(7)) == dict.fromkeys(everywhere, 7)
    assert await moved_to(ToOffset(1000)) == dict.fromkeys(everywhere, 10)  # clamped to the end
    assert await moved_to(FromBeginning()) == dict.fromkeys(everywhere, 0)
    assert await moved_to(ShiftBy(3)) == dict.fromkeys(everywhere, 3)
    assert await moved_to(ShiftBy(-5)) == dict.fromkeys(everywhere, 0)  # clamped to the start
    assert await moved_to(ToLatest()) == dict.fromkeys(everywhere, 10)
    assert await moved_to(ShiftBy(-4)) == dict.fromkeys(everywhere, 6)
    # After the last record: the end, although Tansu answers offset 0 for such a time.
    future = datetime.fromtimestamp(time.time() + 3600, UTC)
    assert await moved_to(ToTime(future)) == dict.fromkeys(everywhere, 10)


@pytest.mark.smoke
async def test_the_command_plans_by_default_and_commits_only_with_execute(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    config = tmp_path / "smsbridge.toml"
    settings = write_config(config, config_data())
    await create_topic(settings, TEST_TOPIC)
    await produce_round(settings, 10)
    await commit_for_test_group(settings, 10)
    everywhere = dict.fromkeys(range(TEST_TOPIC.partitions))
    # The command line, as an operator runs it; --shift-by takes a negative number as is.
    args = ["--config", str(config), "replay", "--group", TEST_GROUP, "--topic", TEST_TOPIC.base]
    move = [*args, "--shift-by", "-6"]

    for plan_only in ([], ["--dry-run"]):  # --dry-run: the default, as in Kafka's tool
        code, out, err = await smsbridge(*move, *plan_only)
        assert code == 0, err
        lines = out.splitlines()
        assert HEADER in lines
        for partition in range(TEST_TOPIC.partitions):
            assert row(partition, 10, 4, 10) in lines
        assert "plan only, nothing committed: add --execute to commit it" in lines
        assert await committed(settings, TEST_GROUP, TEST_TOPIC) == dict.fromkeys(everywhere, 10)

    code, out, err = await smsbridge(*move, "--execute")
    assert code == 0, err
    lines = out.splitlines()
    for partition in range(TEST_TOPIC.partitions):
        assert row(partition, 10, 4, 10) in lines  # "after" as read back from Kafka
    assert "committed: 18 records to read again" in lines
    assert await committed(settings, TEST_GROUP, TEST_TOPIC) == dict.fromkeys(everywhere, 4)

    # Both modes at once is a usage error, as in Kafka's tool; nothing moves.
    code, _, err = await smsbridge(*move, "--execute", "--dry-run")
    assert code == 2 and "not allowed with" in err
    assert await committed(settings, TEST_GROUP, TEST_TOPIC) == dict.fromkeys(everywhere, 4)


@pytest.mark.smoke
async def test_export_then_from_file_puts_back_every_offset_of_several_topics(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    config = tmp_path / "smsbridge.toml"
    settings = write_config(config, config_data())
    for topic in (TEST_TOPIC, OTHER_TOPIC):
        await create_topic(settings, topic)
        await produce_round(settings, 9, topic)
    tp = TopicPartition
    start = {
        tp(TEST_TOPIC.name, 0): 2,
        tp(TEST_TOPIC.name, 1): 9,
        tp(TEST_TOPIC.name, 2): 5,
        tp(OTHER_TOPIC.name, 0): 0,
        tp(OTHER_TOPIC.name, 1): 7,
    }
    await commit(settings, TEST_GROUP, start)

    async def offsets() -> dict[TopicPartition, int | None]:
        found: dict[TopicPartition, int | None] = {}
        for topic in (TEST_TOPIC, OTHER_TOPIC):
            for partition, offset in (await committed(settings, TEST_GROUP, topic)).items():
                found[tp(topic.name, partition)] = offset
        return found

    base = ["--config", str(config), "replay", "--group", TEST_GROUP]
    both = ["--topic", TEST_TOPIC.base, "--topic", OTHER_TOPIC.base]
    saved = tmp_path / "before.csv"
    code, out, err = await smsbridge(
        *base, *both, "--from-beginning", "--export", str(saved), "--execute"
    )
    assert code == 0, err
    assert f"group {TEST_GROUP}, topic {OTHER_TOPIC.name}: to the earliest offsets" in out
    assert row(1, 7, 0, 9) in out.splitlines()
    assert await offsets() == dict.fromkeys(start, 0)
    # kafka-consumer-groups' CSV: topic,partition,offset, the topics as the broker names them.
    assert sorted(saved.read_text().splitlines()) == sorted(
        f"{p.topic},{p.partition},{offset}" for p, offset in start.items()
    )

    # A second export never overwrites the first (the undo), and then nothing moves.
    code, _, err = await smsbridge(*base, *both, "--to-latest", "--export", str(saved), "--execute")
    assert code == 1 and "exists and is kept" in err
    assert await offsets() == dict.fromkeys(start, 0)

    code, out, err = await smsbridge(*base, "--from-file", str(saved))  # plan only
    assert code == 0, err
    assert await offsets() == dict.fromkeys(start, 0)
    code, out, err = await smsbridge(*base, "--from-file", str(saved), "--execute")
    assert code == 0, err
    assert await offsets() == start


async def test_replaying_the_normalizers_input_reports_nothing_twice(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    port = free_port()
    simulator = OptimoveSimulator("127.0.0.1", port, {TENANT: (TENANT_API_TOKEN, TENANT_SECRET)})
    runner = dict(QUICK_GROUP)
    settings = make_settings(
        optimove_url=f"http://127.0.0.1:{port}",
        overrides={
            "normalizer": {"state_dir": str(tmp_path / "first"), "runner": runner},
            "reporter": {"runner": runner},
        },
    )
    message_ids = [f"m-{i:03d}" for i in range(40)]
    inputs = dispatch_records(
        item
        for m in message_ids
        for item in (accepted_dispatch(m, f"sms-{m}"), delivered_callback(f"sms-{m}"))
    )

    def final_reports() -> int:
        tally: int = simulator.tally(TENANT)[TENANT]["final"]
        return tally

    await simulator.start()
    try:
        async with (
            TopicTail(settings, STATUSES, StatusEvent) as statuses,
            running(build_reporter(settings)),
        ):
            first = build_normalizer(settings)
            async with running(first):
                async with publisher(settings) as out:
                    await out.publish(inputs)
                await wait_for(
                    lambda: final_reports() == len(message_ids), what="every final report"
                )
                # While the normalizer runs, its offsets are not to be moved.
                with pytest.raises(GroupHasLiveMembers):
                    await replay(
                        settings,
                        NORMALIZER_GROUP,
                        DISPATCHES.name,
                        FromBeginning(),
                        execute=True,
                        out=io.StringIO(),
                    )
                # Not even planned from the command line: the plan would be stale at once.
                config = tmp_path / "smsbridge.toml"
                write_config(config, config_data())
                code, shown, err = await smsbridge(
                    *("--config", str(config), "replay", "--group", NORMALIZER_GROUP),
                    *("--all-topics", "--from-beginning", "--execute"),
                )
                assert code == 1 and "live member(s)" in err and not shown, err
                assert isinstance(first, ConsumerService)
                await wait_for(
                    lambda: first.runner.finished_records == len(inputs),
                    what="the normalizer to finish",
                )
            await statuses.settle()
            statuses_before = len(statuses.records)
            reports_before = len(simulator.received(endpoint="delivery-report"))
            assert statuses_before == 2 * len(message_ids)
            consumed = total(await committed(settings, NORMALIZER_GROUP, DISPATCHES))
            assert consumed == len(message_ids)

            printed = io.StringIO()
            await replay(
                settings,
                NORMALIZER_GROUP,
                [DISPATCHES.name, PROVIDER_EVENTS.name],
                FromBeginning(),
                execute=True,
                out=printed,
            )
            assert total(await committed(settings, NORMALIZER_GROUP, DISPATCHES)) == 0
            assert total(await committed(settings, NORMALIZER_GROUP, PROVIDER_EVENTS)) == 0
            assert f"committed: {len(inputs)} records to read again" in printed.getvalue()

            # A new instance on a new disk: what it knows comes from the changelog.
            replayed = make_settings(
                optimove_url=f"http://127.0.0.1:{port}",
                overrides={"normalizer": {"state_dir": str(tmp_path / "second"), "runner": runner}},
            )
            second = build_normalizer(replayed)
            assert isinstance(second, ConsumerService)
            async with running(second):
                await wait_for(
                    lambda: second.runner.finished_records == len(inputs),
                    what="the replayed records to be read again",
                )
                await statuses.settle(quiet_s=2.0)
            assert total(await committed(settings, NORMALIZER_GROUP, DISPATCHES)) == len(
                message_ids
            )
            await asyncio.sleep(1.0)  # a report caused by the replay would reach Optimove now
            tally = simulator.tally(TENANT)[TENANT]
    finally:
        await simulator.stop()

    assert len(statuses.records) == statuses_before  # the monotonic guard emitted nothing
    assert len(simulator.received(endpoint="delivery-report")) == reports_before
    assert tally["final"] == len(message_ids)
    assert tally["duplicates"] == 0
