"""``smsbridge replay``: moving a stopped group's offsets, and replaying without double reports."""

from __future__ import annotations

import asyncio
import io
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

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
    committed,
    config_data,
    delivered_callback,
    dispatch_records,
    publisher,
    total,
    write_config,
)
from tools.replay import (
    FromBeginning,
    GroupHasLiveMembers,
    ToOffset,
    ToTime,
    offsets_consumer,
    replay,
)

pytestmark = pytest.mark.integration

NORMALIZER_GROUP = "smsbridge-normalizer"
TEST_TOPIC = Topic("ops.replay-test", partitions=3)
TEST_GROUP = "ops-replay-test"


async def produce_round(settings: Settings, per_partition: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(settings.kafka), acks="all")
    await producer.start()
    try:
        for partition in range(TEST_TOPIC.partitions):
            for _ in range(per_partition):
                await producer.send_and_wait(TEST_TOPIC.name, b"x", partition=partition)
    finally:
        await producer.stop()


async def commit_for_test_group(settings: Settings, offset: int) -> None:
    consumer = offsets_consumer(settings.kafka, TEST_GROUP)
    await consumer.start()
    try:
        partitions = [TopicPartition(TEST_TOPIC.name, p) for p in range(TEST_TOPIC.partitions)]
        consumer.assign(partitions)
        await consumer.commit({tp: OffsetAndMetadata(offset, "") for tp in partitions})
    finally:
        await consumer.stop()


@pytest.mark.smoke
async def test_targets_move_every_partition_and_dry_run_changes_nothing(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    settings = write_config(tmp_path / "smsbridge.toml", config_data())
    await create_topic(settings, TEST_TOPIC)
    await produce_round(settings, 4)  # offsets 0-3 of every partition
    await asyncio.sleep(0.05)
    between = time.time()
    await asyncio.sleep(0.05)
    await produce_round(settings, 6)  # offsets 4-9
    await commit_for_test_group(settings, 10)  # as if the group had read everything

    async def moved_to(target: FromBeginning | ToOffset | ToTime) -> dict[int, int | None]:
        await replay(settings, TEST_GROUP, TEST_TOPIC.name, target, out=io.StringIO())
        return await committed(settings, TEST_GROUP, TEST_TOPIC)

    everywhere = dict.fromkeys(range(TEST_TOPIC.partitions))
    at = datetime.fromtimestamp(between, UTC)
    assert await moved_to(ToTime(at)) == dict.fromkeys(everywhere, 4)
    assert await moved_to(ToOffset(7)) == dict.fromkeys(everywhere, 7)
    assert await moved_to(ToOffset(1000)) == dict.fromkeys(everywhere, 10)  # clamped to the end
    assert await moved_to(FromBeginning()) == dict.fromkeys(everywhere, 0)
    # After the last record: the end, although Tansu answers offset 0 for such a time.
    future = datetime.fromtimestamp(time.time() + 3600, UTC)
    assert await moved_to(ToTime(future)) == dict.fromkeys(everywhere, 10)

    # The command line, as an operator runs it: a dry run prints the move and commits nothing.
    base = [sys.executable, "-m", "tools.cli", "--config", str(tmp_path / "smsbridge.toml")]
    args = ["replay", "--group", TEST_GROUP, "--topic", TEST_TOPIC.base]
    dry = await asyncio.create_subprocess_exec(
        *base,
        *args,
        "--to-time",
        at.isoformat(),
        "--dry-run",
        env=dict(os.environ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(dry.communicate(), 60)
    assert dry.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert "partition     before      after        end    to read" in lines
    for partition in range(TEST_TOPIC.partitions):
        assert f"{partition:>9} {10:>10} {4:>10} {10:>10} {6:>10}" in lines
    assert "dry run: nothing committed" in lines
    assert await committed(settings, TEST_GROUP, TEST_TOPIC) == dict.fromkeys(everywhere, 10)


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
                        out=io.StringIO(),
                    )
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
            for topic in (DISPATCHES, PROVIDER_EVENTS):
                await replay(settings, NORMALIZER_GROUP, topic.name, FromBeginning(), out=printed)
            assert total(await committed(settings, NORMALIZER_GROUP, DISPATCHES)) == 0
            assert total(await committed(settings, NORMALIZER_GROUP, PROVIDER_EVENTS)) == 0
            assert f"committed: {len(message_ids)} records to read again" in printed.getvalue()

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
