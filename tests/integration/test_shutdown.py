"""Graceful shutdown: SIGTERM stops intake, finishes or hands back in-flight work, commits, exits
within ``runner.shutdown_deadline_s``, and a successor continues from the committed offsets."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from services.normalizer.app import build as build_normalizer
from shared.config import RunnerSettings, Settings
from shared.contract.events import StatusEvent
from shared.contract.topics import DISPATCHES, STATUSES, Topic
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import OutRecord, bootstrap
from shared.kafka.runner import Record
from shared.kafka.service import ConsumerService
from tests.support import create_topic, make_settings, running, wait_for
from tests.support.ops import (
    QUICK_GROUP,
    TopicTail,
    accepted_dispatch,
    committed,
    config_data,
    dispatch_records,
    group_members,
    publisher,
    start_service,
    total,
    wait_ready,
    write_config,
)

pytestmark = pytest.mark.integration

NORMALIZER_GROUP = "smsbridge-normalizer"
DEADLINE_S = 10.0


async def publish_stream(settings: Settings, message_ids: Sequence[str], chunk: int) -> None:
    """Publish accepted dispatches a chunk at a time, so the stream outlives the first instance."""
    async with publisher(settings) as out:
        for start in range(0, len(message_ids), chunk):
            records = dispatch_records(
                accepted_dispatch(m, f"sms-{m}") for m in message_ids[start : start + chunk]
            )
            await out.publish(records)
            await asyncio.sleep(0.05)


async def test_sigterm_mid_stream_commits_and_a_successor_continues(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    runner = {"shutdown_deadline_s": DEADLINE_S, "max_in_flight": 200, **QUICK_GROUP}
    data = config_data(
        overrides={"normalizer": {"state_dir": str(tmp_path / "first"), "runner": runner}}
    )
    config = tmp_path / "smsbridge.toml"
    settings = write_config(config, data)
    message_ids = [f"m-{i:05d}" for i in range(3000)]
    log_path = tmp_path / "normalizer.log"

    async with TopicTail(settings, STATUSES, StatusEvent) as statuses:
        process = await start_service(config, "normalizer", log=log_path)
        try:
            ops = f"http://{settings.normalizer.metrics_listen}/readyz"
            await wait_ready(ops, process, timeout_s=60)
            stream = asyncio.create_task(publish_stream(settings, message_ids, chunk=100))
            await statuses.wait_count(300)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = await asyncio.wait_for(process.wait(), DEADLINE_S + 20)
            took = time.monotonic() - signalled
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await stream
        logs = log_path.read_text(errors="replace")
        assert code == 0, logs[-3000:]
        assert took <= DEADLINE_S, f"stopped in {took:.1f}s, deadline {DEADLINE_S}s"
        assert "left consumer group" in logs or "LeaveGroup request succeeded" in logs

        # The group is empty at once (no session timeout to wait for) and its commits stand.
        assert await group_members(settings, NORMALIZER_GROUP) == []
        done_by_first = total(await committed(settings, NORMALIZER_GROUP, DISPATCHES))
        assert 0 < done_by_first < len(message_ids)  # stopped mid-stream

        successor_settings = make_settings(
            overrides={"normalizer": {"state_dir": str(tmp_path / "second"), "runner": runner}}
        )
        successor = build_normalizer(successor_settings)
        assert isinstance(successor, ConsumerService)
        async with running(successor):
            await statuses.wait_count(len(message_ids))
            await wait_for(
                lambda: successor.runner.finished_records >= len(message_ids) - done_by_first,
                what="the successor to finish the rest",
            )
            await statuses.settle()
            # Exactly the uncommitted rest: the successor started from the committed offsets.
            assert successor.runner.finished_records == len(message_ids) - done_by_first

    emitted = Counter(status.context.message_id for _, status in statuses.records)
    assert set(emitted) == set(message_ids)  # nothing lost
    assert max(emitted.values()) == 1  # nothing twice
    assert all(status.status == "sent" for _, status in statuses.records)


class HangsOnSomeRecords:
    """Finishes every record at once except those whose value is b"hang", which never end."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self.never = asyncio.Event()

    async def handle(self, record: Record) -> Sequence[OutRecord]:
        if record.value == b"hang":
            await self.never.wait()
        self.seen.append((record.partition, record.offset))
        return []


async def test_work_that_cannot_finish_is_handed_back_within_the_deadline(
    kafka: EmbeddedBroker,
) -> None:
    topic = Topic("ops.shutdown-test", partitions=2)
    settings = make_settings()
    await create_topic(settings, topic)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(settings.kafka), acks="all")
    await producer.start()
    try:
        for offset in range(10):  # partition 0: offset 4 never finishes
            value = b"hang" if offset == 4 else b"ok"
            await producer.send_and_wait(topic.name, value, key=f"k{offset}".encode(), partition=0)
        for offset in range(6):
            await producer.send_and_wait(topic.name, b"ok", key=f"k{offset}".encode(), partition=1)
    finally:
        await producer.stop()

    deadline_s = 4.0
    runner_settings = RunnerSettings(shutdown_deadline_s=deadline_s, **QUICK_GROUP)
    first_handler = HangsOnSomeRecords()
    first = ConsumerService(
        name="shutdown-test",
        settings=settings,
        runner_settings=runner_settings,
        topics=[topic.name],
        handler=first_handler,
    )
    await first.start()
    try:
        await wait_for(lambda: len(first_handler.seen) == 15, what="every record but one")
    finally:
        started = time.monotonic()
        await first.stop()
        took = time.monotonic() - started
    assert took <= deadline_s + 0.5, f"stopped in {took:.1f}s, deadline {deadline_s}s"
    # The unfinished record holds its partition's commit back; the rest of partition 0 is
    # finished but comes after it, so it is read again (at least once, never lost).
    assert await committed(settings, "smsbridge-shutdown-test", topic) == {0: 4, 1: 6}

    second_handler = HangsOnSomeRecords()
    second_handler.never.set()
    second = ConsumerService(
        name="shutdown-test",
        settings=settings,
        runner_settings=runner_settings,
        topics=[topic.name],
        handler=second_handler,
    )
    async with running(second):
        await wait_for(lambda: len(second_handler.seen) >= 6, what="the handed-back records")
        await asyncio.sleep(1.0)  # anything more would show up now
        positions = {
            tp.partition: await second.consumer.position(tp)
            for tp in (TopicPartition(topic.name, 0), TopicPartition(topic.name, 1))
        }
    assert sorted(second_handler.seen) == [(0, offset) for offset in range(4, 10)]
    assert positions == {0: 10, 1: 6}
