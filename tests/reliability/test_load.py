"""Load: concurrent clients posting signed campaign batches to one ingress process (issue 7).

``load_clients`` connections (50 in the full form) post batches of ``load_batch`` recipients for
``load_seconds`` (60 s), each client one request at a time, as fast as ingress answers. Every
answer must be 202, or 503 with ``Retry-After`` (Kafka could not take the batch in time; the
client then posts the same batch again, as Optimove does, and the 503s are counted and printed
apart). Afterwards every recipient of every accepted batch is read back from ``sms.recipients``:
each is there, and only a batch that was answered 503 before its 202 may have left a recipient
there twice (a 503 promises nothing about what reached Kafka; consumers de-duplicate by message
id). The answer times (p50, p99, max) are printed.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench import load
from bench.results import percentile
from bench.stack import Stack
from shared.contract.topics import RECIPIENTS
from shared.kafka.clients import bootstrap
from tests.reliability.profile import current

pytestmark = pytest.mark.integration

PROFILE = current()
RETRY_503_AFTER_S = 0.5  # shorter than the Retry-After ingress asks for: the test is bounded


@dataclass
class LoadRun:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    accepted: list[load.Batch] = field(default_factory=list)
    retried: set[str] = field(default_factory=set)  # batch ids answered 503 before their 202


def batches(campaign: str, size: int) -> Iterator[load.Batch]:
    """Signed batches of distinct numbers, built as the clients ask for them."""
    for number in itertools.count():
        [batch] = load.build_batches(campaign, size, size, first_index=number * size)
        yield batch


async def client(
    session: aiohttp.ClientSession,
    url: str,
    source: Iterator[load.Batch],
    stop_at: float,
    run: LoadRun,
) -> None:
    while time.monotonic() < stop_at:
        batch = next(source)
        while True:
            posted = await load.post(session, url, batch)
            run.latencies.append(posted.seconds)
            run.statuses[posted.status] += 1
            if posted.status == 202:
                run.accepted.append(batch)
                break
            if posted.status == 503 and posted.detail:
                run.retried.add(batch.batch_id)
                await asyncio.sleep(RETRY_503_AFTER_S)
                continue
            run.unexpected.append(f"{posted.status}: {posted.detail}")
            break


async def recipient_ids(stack: Stack, expected: int, timeout_s: float) -> Counter[str]:
    """Message ids on ``sms.recipients``, read until ``expected`` records came (or time ran out)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap(stack.settings.kafka),
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    found: Counter[str] = Counter()
    try:
        partitions = [TopicPartition(RECIPIENTS.name, p) for p in range(RECIPIENTS.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            fetched = await consumer.getmany(timeout_ms=200, max_records=20_000)
            for records in fetched.values():
                for record in records:
                    found[orjson.loads(record.value)["context"]["message_id"]] += 1
                quiet_since = time.monotonic()
            if sum(found.values()) >= expected and time.monotonic() - quiet_since > 1.0:
                break
        return found
    finally:
        await consumer.stop()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with Stack(tmp_path) as started:
        await started.start("ingress")
        yield started


@pytest.mark.timeout(600 if PROFILE.name == "full" else 300)
async def test_concurrent_signed_batches_are_all_accepted_and_all_on_kafka(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    run = LoadRun()
    source = batches("load", PROFILE.load_batch)
    connector = aiohttp.TCPConnector(limit=PROFILE.load_clients)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        began = time.monotonic()
        stop_at = began + PROFILE.load_seconds
        await asyncio.gather(
            *(
                client(session, stack.campaign_url, source, stop_at, run)
                for _ in range(PROFILE.load_clients)
            )
        )
        elapsed = time.monotonic() - began
    stack.check_alive()

    accepted_ids = [m for batch in run.accepted for m in batch.message_ids]
    on_kafka = await recipient_ids(stack, len(accepted_ids), timeout_s=120)
    ordered = sorted(run.latencies)
    with capsys.disabled():
        print(
            f"\nload ({PROFILE.name}): {PROFILE.load_clients} clients x {elapsed:.1f} s, "
            f"batches of {PROFILE.load_batch}: {len(run.accepted)} batches = "
            f"{len(accepted_ids)} recipients accepted ({len(accepted_ids) / elapsed:,.0f}/s); "
            f"answers {dict(run.statuses)}; answer time p50 {percentile(ordered, 0.5) * 1000:.1f}"
            f" ms, p99 {percentile(ordered, 0.99) * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms;"
            f" 503 then retried: {len(run.retried)} batches"
        )

    assert not run.unexpected, run.unexpected[:5]
    assert set(run.statuses) <= {202, 503}
    assert run.accepted, "no batch was accepted"
    missing = [m for m in accepted_ids if m not in on_kafka]
    assert not missing, f"{len(missing)} accepted recipients are not on {RECIPIENTS.name}"
    retried_ids = {m for b in run.accepted if b.batch_id in run.retried for m in b.message_ids}
    twice = [m for m, n in on_kafka.items() if n > 1 and m not in retried_ids]
    assert not twice, f"{len(twice)} recipients of batches answered 202 at once are there twice"
    assert set(on_kafka) == set(accepted_ids), "recipients on Kafka that no 202 accepted"
