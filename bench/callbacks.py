"""Callbacks benchmark: provider webhooks accepted per second, and the answer time under load.

The callbacks service runs as a process of its own (``smsbridge run callbacks``, through
``bench.stack``) on a fresh embedded broker; this process plays the providers: ``CLIENTS``
concurrent connections posting delivery reports for ``DURATION_S`` seconds, half OTPIQ JSON (with
its secret header), half Octopush form bodies (answered with an empty body, which Octopush wants
within 1 s). Every accepted callback is then counted on ``sms.provider-events``: a figure counts
only what reached Kafka, not what the service answered.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.results import Options, Report, markdown_table, percentile, text_table
from bench.stack import CALLBACK_TOKEN, OTPIQ_WEBHOOK_SECRET, PROVIDER, TENANT, Stack
from shared.config import KafkaSettings
from shared.contract.topics import PROVIDER_EVENTS
from shared.kafka.clients import connection_kwargs

CLIENTS = 50
DURATION_S = 20.0
P99_LIMIT_S = 1.0  # Octopush's answer deadline
OCTOPUSH = "octopush-bench"
OCTOPUSH_TOKEN = "cb-octopush"

# The stack's tenant routed to its OTPIQ account and to an Octopush account beside it.
OVERRIDES = {
    "tenants": {TENANT: {"routes": [{"provider": PROVIDER}, {"provider": OCTOPUSH}]}},
    "providers": {
        OCTOPUSH: {
            "kind": "octopush",
            "base_url": "http://127.0.0.1:9/octopush/v1/public",
            "api_key": "octo-key",
            "api_login": "bench@example.com",
            "callback_token": OCTOPUSH_TOKEN,
        }
    },
}


async def _client(
    session: aiohttp.ClientSession, base: str, client: int, stop_at: float
) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    sequence = 0
    while time.monotonic() < stop_at:
        sequence += 1
        ticket = f"{client:04x}{sequence:020x}"
        if sequence % 2:
            url = f"{base}/callbacks/otpiq/{PROVIDER}/{CALLBACK_TOKEN}"
            body: bytes = (
                b'{"smsId":"sms-' + ticket.encode() + b'","deliveryReportType":"all",'
                b'"isFinal":true,"channel":"sms","status":"delivered"}'
            )
            headers = {
                "Content-Type": "application/json",
                "X-OTPIQ-Webhook-Secret": OTPIQ_WEBHOOK_SECRET,
            }
        else:
            url = f"{base}/callbacks/octopush/{OCTOPUSH}/{OCTOPUSH_TOKEN}"
            body = urlencode(
                {
                    "message_id": f"sms_{ticket}",
                    "number": "+33600112233",
                    "status": "DELIVERED",
                    "delivery_date": "2026-11-23 11:46:06",
                }
            ).encode()
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
        started = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                ok = response.status == 200
        except aiohttp.ClientError:
            ok = False
        latencies.append(time.perf_counter() - started)
        errors += not ok
    return latencies, errors


async def _events_on_kafka(settings: KafkaSettings) -> int:
    consumer = AIOKafkaConsumer(**connection_kwargs(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(PROVIDER_EVENTS.name, p) for p in range(PROVIDER_EVENTS.partitions)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        total, quiet_since = 0, time.monotonic()
        while time.monotonic() - quiet_since < 2.0:
            batches = await consumer.getmany(timeout_ms=200, max_records=50_000)
            for records in batches.values():
                total += len(records)
                quiet_since = time.monotonic()
        return total
    finally:
        await consumer.stop()


async def run(run_dir: Path, broker: str = "kafka") -> Report:
    started_run = time.monotonic()
    async with Stack(run_dir, overrides=OVERRIDES, broker_kind=broker) as stack:
        await stack.start("callbacks")
        connector = aiohttp.TCPConnector(limit=CLIENTS)
        async with aiohttp.ClientSession(connector=connector) as session:
            stop_at = time.monotonic() + DURATION_S
            started = time.monotonic()
            results = await asyncio.gather(
                *(
                    _client(session, stack.callbacks_url, client, stop_at)
                    for client in range(CLIENTS)
                )
            )
            elapsed = time.monotonic() - started
        await stack.terminate("callbacks")
        on_kafka = await _events_on_kafka(stack.settings.kafka)
    latencies = sorted(latency for client, _ in results for latency in client)
    errors = sum(client_errors for _, client_errors in results)
    accepted = len(latencies) - errors
    rate = accepted / elapsed
    p50 = statistics.median(latencies)
    p99 = percentile(latencies, 0.99)
    ratio = p99 / P99_LIMIT_S
    failures = []
    if errors:
        failures.append(f"{errors} callbacks were not answered 200")
    if on_kafka != accepted:
        failures.append(f"{on_kafka} events on Kafka for {accepted} accepted callbacks")
    if p99 >= P99_LIMIT_S:
        failures.append(f"p99 answer time {p99 * 1000:.0f} ms is over Octopush's 1 s")
    header = ("figure", "value")
    rows = [
        ("requests answered", f"{len(latencies):,}"),
        ("errors (non-200 or failed)", errors),
        ("events on Kafka (must equal accepted)", f"{on_kafka:,} of {accepted:,}"),
        ("events/s accepted", f"{rate:,.0f}"),
        ("answer time p50", f"{p50 * 1000:.1f} ms"),
        ("answer time p99", f"{p99 * 1000:.1f} ms = {ratio:.3f} of the 1 s limit"),
        ("answer time max", f"{latencies[-1] * 1000:.1f} ms"),
    ]
    print(f"\ncallbacks: {CLIENTS} clients for {DURATION_S:g}s, OTPIQ JSON + Octopush form")
    print(text_table(header, rows))
    print(f"  result: {'PASS' if not failures else 'FAIL'}")
    return Report(
        benchmark="callbacks",
        summary=[
            (
                f"{CLIENTS} clients, {DURATION_S:g} s, OTPIQ JSON + Octopush form",
                f"{rate:,.0f} events/s accepted "
                f"({'all' if on_kafka == accepted else 'NOT all'} on Kafka), "
                f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms = {ratio:.3f} of Octopush's "
                "1 s limit",
            )
        ],
        details=markdown_table(header, rows),
        figures={
            "clients": CLIENTS,
            "duration_s": DURATION_S,
            "answered": len(latencies),
            "errors": errors,
            "on_kafka": on_kafka,
            "events_per_s": round(rate, 1),
            "p50_ms": round(p50 * 1000, 2),
            "p99_ms": round(p99 * 1000, 2),
            "max_ms": round(latencies[-1] * 1000, 2),
            "p99_ratio_to_limit": round(ratio, 4),
        },
        failures=failures,
        duration_s=time.monotonic() - started_run,
    )


def bench(options: Options) -> Report:
    with tempfile.TemporaryDirectory(prefix="smsbridge-bench-callbacks-") as directory:
        return asyncio.run(run(Path(directory), options.broker))
