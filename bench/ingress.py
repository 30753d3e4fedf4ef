"""Ingress benchmark: recipients/s one ingress process puts on Kafka, beside raw aiokafka.

For batches of 100, 1,000 and 10,000 recipients, concurrent clients post signed Campaign
Transmission requests to one ingress process; the rate counts to the last 202 (every record on
Kafka). Beside it, the raw aiokafka produce rate of the same records (``send()`` per record, the
baseline: ingress reaches >= 0.7 of it, and ``send_batch()``).
Method: docs/benchmarks.md, "Ingress".
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from bench import load
from bench.results import Options, Report, markdown_table, percentile, text_table
from bench.stack import TENANT, Stack, count_records, process_cpu_seconds
from services.ingress.batch import build_records, parse_campaign
from services.ingress.e164 import reader
from shared.contract.events import utcnow
from shared.contract.topics import RECIPIENTS
from shared.kafka.clients import make_producer

BATCH_SIZES = (100, 1_000, 10_000)
# Recipients per batch size and round: enough requests per client that the ramp and the tail
# (the last requests, when fewer clients are busy) weigh little.
PER_ROUND = {100: 40_000, 1_000: 100_000, 10_000: 200_000}
CLIENTS = {100: 32, 1_000: 16, 10_000: 8}
ROUNDS = 2
REQUIRED_RATIO = 0.7
RAW_TOPIC = "bench.raw-recipients"
RAW_WAYS = ("send", "send_batch")


@dataclass
class Run:
    """One measured pass: ``recipients`` in ``seconds``; answer (or ack) time per batch."""

    what: str
    size: int
    recipients: int
    seconds: float
    latencies: list[float]
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process meanwhile
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.recipients / self.seconds


async def _drain(
    work: Sequence[Any], clients: int, one: Callable[[Any], Awaitable[tuple[bool, float]]]
) -> tuple[float, list[float], int]:
    """``clients`` workers taking ``work`` in order; (elapsed, per-item latencies, errors)."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    latencies: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        while not queue.empty():
            ok, seconds = await one(queue.get_nowait())
            latencies.append(seconds)
            errors += not ok

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - started, latencies, errors


class Measure:
    """CPU seconds the ingress, the broker and this process used during one pass."""

    def __init__(self, stack: Stack) -> None:
        self.pids = {"ingress": stack.pid("ingress"), "broker": stack.broker_pid}
        self.before = self._now()

    def _now(self) -> dict[str, float]:
        now = {name: process_cpu_seconds(pid) for name, pid in self.pids.items() if pid}
        return {**now, "bench": time.process_time()}

    def spent(self) -> dict[str, float]:
        after = self._now()
        return {name: round(after[name] - self.before.get(name, 0.0), 2) for name in after}


async def ingress_pass(
    stack: Stack, session: aiohttp.ClientSession, size: int, batches: Sequence[load.Batch]
) -> Run:
    async def one(batch: load.Batch) -> tuple[bool, float]:
        posted = await load.post(session, stack.campaign_url, batch)
        if not posted.accepted:
            print(f"  ingress answered {posted.status}: {posted.detail}")
        return posted.accepted, posted.seconds

    measure = Measure(stack)
    elapsed, latencies, errors = await _drain(batches, CLIENTS.get(size, 8), one)
    recipients = sum(batch.recipients for batch in batches)
    return Run("ingress", size, recipients, elapsed, latencies, measure.spent(), errors)


Records = list[tuple[bytes, bytes]]


def records_of(stack: Stack, batches: Sequence[load.Batch]) -> list[Records]:
    """What ingress writes to sms.recipients for each batch, byte for byte."""
    tenant = stack.settings.tenants[TENANT]
    read = reader(tenant.default_region, tenant.bare_digits)
    return [
        build_records(
            tenant=TENANT,
            settings=tenant,
            campaign=parse_campaign(batch.body),
            read=read,
            accepted_at=utcnow(),
        ).recipients
        for batch in batches
    ]


async def raw_pass(
    stack: Stack, producer: AIOKafkaProducer, way: str, size: int, work: Sequence[Records]
) -> Run:
    partitions = sorted(await producer.partitions_for(RAW_TOPIC))
    partitioner = DefaultPartitioner()
    # aiokafka's batch hand-over fails concurrent waiters for one partition early (see
    # shared/kafka/batches.py): one waiter per partition at a time, as ingress does.
    locks = {partition: asyncio.Lock() for partition in partitions}

    async def hand_over(partition: int, chain: list[Any]) -> list[asyncio.Future[Any]]:
        async with locks[partition]:
            futures = []
            for builder in chain:
                builder.close()
                futures.append(await producer.send_batch(builder, RAW_TOPIC, partition=partition))
            return futures

    async def by_send(records: Records) -> tuple[bool, float]:
        started = time.perf_counter()
        futures = [await producer.send(RAW_TOPIC, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
        return True, time.perf_counter() - started

    async def by_send_batch(records: Records) -> tuple[bool, float]:
        started = time.perf_counter()
        timestamp_ms = int(time.time() * 1000)
        builders: dict[int, list[Any]] = {}
        for key, value in records:
            partition = partitioner(key, partitions, partitions)
            chain = builders.setdefault(partition, [producer.create_batch()])
            if chain[-1].append(key=key, value=value, timestamp=timestamp_ms) is None:
                chain.append(producer.create_batch())
                chain[-1].append(key=key, value=value, timestamp=timestamp_ms)
        handed = await asyncio.gather(*(hand_over(p, chain) for p, chain in builders.items()))
        await asyncio.gather(*(future for futures in handed for future in futures))
        return True, time.perf_counter() - started

    measure = Measure(stack)
    elapsed, latencies, errors = await _drain(
        work, CLIENTS.get(size, 8), by_send if way == "send" else by_send_batch
    )
    recipients = sum(len(records) for records in work)
    return Run(f"raw {way}", size, recipients, elapsed, latencies, measure.spent(), errors)


async def measure_all(stack: Stack) -> list[Run]:
    runs: list[Run] = []
    producer = make_producer(stack.settings.kafka, "bench-raw")
    await producer.start()
    timeout = aiohttp.ClientTimeout(total=120)
    try:
        async with aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=max(CLIENTS.values()))
        ) as session:
            # Warm-up, kept out of the figures: connections, first-time code paths on all sides.
            # (size 0: counted on Kafka, not in the figures)
            warm = load.build_batches(f"warm-{uuid.uuid4().hex[:6]}", 4_000, 100)
            runs.append(await ingress_pass(stack, session, 0, warm))
            for way in RAW_WAYS:
                runs.append(await raw_pass(stack, producer, way, 0, records_of(stack, warm)))
            next_index = len(warm) * 100
            for size in BATCH_SIZES:
                for round_number in range(ROUNDS):
                    count = PER_ROUND[size]
                    # New numbers and request ids each round: a repeated request publishes nothing.
                    campaign = f"ingress-{size}-{round_number}-{uuid.uuid4().hex[:6]}"
                    batches = load.build_batches(campaign, count, size, first_index=next_index)
                    next_index = (next_index + count) % (load.MAX_NUMBERS - count)
                    work = records_of(stack, batches)
                    print(f"ingress bench: {size:>6} per batch, round {round_number + 1} ...")
                    runs.append(await ingress_pass(stack, session, size, batches))
                    for way in RAW_WAYS:
                        runs.append(await raw_pass(stack, producer, way, size, work))
                    del batches, work
    finally:
        await producer.stop()
    return runs


def best(runs: Sequence[Run], what: str, size: int) -> Run:
    return max((r for r in runs if r.what == what and r.size == size), key=lambda r: r.rate)


async def run(run_dir: Path, broker: str = "kafka") -> Report:
    began = time.monotonic()
    async with Stack(run_dir, broker_kind=broker) as stack:
        await stack.create_topic(RAW_TOPIC, RECIPIENTS.partitions)
        await stack.start("ingress")
        runs = await measure_all(stack)
        stack.check_alive()
        on_kafka = await count_records(stack.settings, RECIPIENTS.name)
        raw_on_kafka = await count_records(stack.settings, RAW_TOPIC)
    posted = sum(r.recipients for r in runs if r.what == "ingress")
    raw_posted = sum(r.recipients for r in runs if r.what != "ingress")
    header = (
        "batch",
        "clients",
        "ingress rec/s",
        "raw send() rec/s",
        "ratio",
        "raw send_batch() rec/s",
        "ratio",
        "answer p50",
        "answer p99",
        "raw send() ack p50 / p99",
        "ingress CPU s per 100k",
    )
    rows: list[list[object]] = []
    figures: dict[str, Any] = {"clients": CLIENTS, "rounds": ROUNDS, "sizes": {}}
    failures: list[str] = []
    for size in BATCH_SIZES:
        ours = best(runs, "ingress", size)
        raws = {way: best(runs, f"raw {way}", size) for way in RAW_WAYS}
        ratio = ours.rate / raws["send"].rate
        batch_ratio = ours.rate / raws["send_batch"].rate
        answers = sorted(
            x for r in runs if r.what == "ingress" and r.size == size for x in r.latencies
        )
        acks = sorted(
            x for r in runs if r.what == "raw send" and r.size == size for x in r.latencies
        )
        cpu_per_100k = ours.cpu.get("ingress", 0.0) / ours.recipients * 100_000
        rows.append(
            [
                f"{size:,}",
                CLIENTS[size],
                f"{ours.rate:,.0f}",
                f"{raws['send'].rate:,.0f}",
                f"{ratio:.2f}",
                f"{raws['send_batch'].rate:,.0f}",
                f"{batch_ratio:.2f}",
                f"{percentile(answers, 0.5) * 1000:,.0f} ms",
                f"{percentile(answers, 0.99) * 1000:,.0f} ms",
                f"{percentile(acks, 0.5) * 1000:,.0f} / {percentile(acks, 0.99) * 1000:,.0f} ms",
                f"{cpu_per_100k:.2f}",
            ]
        )
        figures["sizes"][str(size)] = {
            "clients": CLIENTS[size],
            "ingress_per_s": round(ours.rate),
            "raw_send_per_s": round(raws["send"].rate),
            "raw_send_batch_per_s": round(raws["send_batch"].rate),
            "ratio_to_raw_send": round(ratio, 3),
            "ratio_to_raw_send_batch": round(batch_ratio, 3),
            "answer_p50_ms": round(percentile(answers, 0.5) * 1000, 1),
            "answer_p99_ms": round(percentile(answers, 0.99) * 1000, 1),
            "raw_send_ack_p50_ms": round(percentile(acks, 0.5) * 1000, 1),
            "raw_send_ack_p99_ms": round(percentile(acks, 0.99) * 1000, 1),
            "ingress_cpu_s_per_100k": round(cpu_per_100k, 3),
            "cpu_seconds": {r.what: r.cpu for r in (ours, *raws.values())},
            "rounds": [
                {"what": r.what, "per_s": round(r.rate), "seconds": round(r.seconds, 2)}
                for r in runs
                if r.size == size
            ],
        }
        if ratio < REQUIRED_RATIO:
            failures.append(
                f"batches of {size}: {ratio:.2f} of raw send() (need >= {REQUIRED_RATIO})"
            )
    errors = sum(r.errors for r in runs)
    if errors:
        failures.append(f"{errors} batches were not answered 202")
    if on_kafka != posted or raw_on_kafka != raw_posted:
        failures.append(
            f"on Kafka: {on_kafka:,} of {posted:,} ingress records, "
            f"{raw_on_kafka:,} of {raw_posted:,} raw ones"
        )
    figures.update(on_kafka=on_kafka, posted=posted, errors=errors)
    print(f"\ningress: best of {ROUNDS} rounds per batch size")
    print(text_table(header, rows))
    print(f"records on Kafka: {on_kafka:,} of {posted:,} accepted (warm-up included)")
    summary = [
        (
            f"one process, batches of {size:,} recipients, {CLIENTS[size]} clients",
            f"{row[2]} recipients/s = {row[4]} of raw aiokafka send() ({row[3]}/s), "
            f"{row[6]} of send_batch() ({row[5]}/s); answer p50 {row[7]}, p99 {row[8]}",
        )
        for size, row in zip(BATCH_SIZES, rows, strict=True)
    ]
    return Report(
        benchmark="ingress",
        summary=summary,
        details=markdown_table(header, rows)
        + f"\n\nBest of {ROUNDS} alternating rounds. The target (>= {REQUIRED_RATIO}) is against "
        "send(); send_batch() does no work per record but append it. Answer times include "
        "waiting behind the other clients' requests (the ingress is saturated).",
        figures=figures,
        failures=failures,
        duration_s=time.monotonic() - began,
    )


def bench(options: Options) -> Report:
    with tempfile.TemporaryDirectory(prefix="smsbridge-bench-ingress-") as directory:
        return asyncio.run(run(Path(directory), options.broker))
