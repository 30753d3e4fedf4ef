"""Callbacks benchmark: provider webhooks accepted per second, and the answer time under load.

The callbacks service runs as a process of its own (``smsbridge run callbacks``) on a fresh
embedded broker; this process plays the providers: ``CLIENTS`` concurrent connections posting
delivery reports for ``DURATION_S`` seconds, half OTPIQ JSON (with its secret header), half
Octopush form bodies (answered with an empty body, which Octopush wants within 1 s). Every
accepted callback is then counted on ``sms.provider-events``: a figure counts only what reached
Kafka, not what the service answered.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.broker import EmbeddedBroker, free_port
from shared.config import Settings
from shared.kafka import EMBEDDED_BOOTSTRAP_ENV, make_admin
from shared.topics import PROVIDER_EVENTS, ensure_topics

CLIENTS = 50
DURATION_S = 20.0
P99_LIMIT_S = 1.0  # Octopush's answer deadline
OTPIQ_SECRET = "bench-otpiq-secret"

CONFIG = """
[kafka]
bootstrap_servers = "embedded"
[callbacks]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
[tenants.bench]
optimove_base_url = "http://127.0.0.1:9/bench"
api_token = "t"
secret_key = "s"
aggregator_api_key = "k"
routes = [{{ provider = "otpiq-bench" }}, {{ provider = "octopush-bench" }}]
[providers.otpiq-bench]
kind = "otpiq"
base_url = "http://127.0.0.1:9/otpiq/api"
api_key = "sk_bench"
callback_token = "cb-otpiq"
webhook_secret = "{secret}"
[providers.octopush-bench]
kind = "octopush"
base_url = "http://127.0.0.1:9/octopush/v1/public"
api_key = "octo-key"
api_login = "bench@example.com"
callback_token = "cb-octopush"
"""


async def _wait_ready(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready in {timeout_s}s")


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
            url = f"{base}/callbacks/otpiq/otpiq-bench/cb-otpiq"
            body: bytes = (
                b'{"smsId":"sms-' + ticket.encode() + b'","deliveryReportType":"all",'
                b'"isFinal":true,"channel":"sms","status":"delivered"}'
            )
            headers = {"Content-Type": "application/json", "X-OTPIQ-Webhook-Secret": OTPIQ_SECRET}
        else:
            url = f"{base}/callbacks/octopush/octopush-bench/cb-octopush"
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


async def _events_on_kafka(bootstrap: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
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


async def _run(broker: EmbeddedBroker) -> int:
    os.environ[EMBEDDED_BOOTSTRAP_ENV] = broker.bootstrap_servers
    admin = make_admin(Settings().kafka)
    await admin.start()
    try:
        await ensure_topics(admin)
    finally:
        await admin.close()
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "callbacks.toml"
        config.write_text(CONFIG.format(port=port, secret=OTPIQ_SECRET), encoding="utf-8")
        service = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "services.cli", "--config", str(config), "run", "callbacks"),
            env={**os.environ, "SMSBRIDGE_LOG_LEVEL": "WARNING"},
        )
        try:
            base = f"http://127.0.0.1:{port}"
            await _wait_ready(f"{base}/readyz")
            connector = aiohttp.TCPConnector(limit=CLIENTS)
            async with aiohttp.ClientSession(connector=connector) as session:
                stop_at = time.monotonic() + DURATION_S
                started = time.monotonic()
                results = await asyncio.gather(
                    *(_client(session, base, client, stop_at) for client in range(CLIENTS))
                )
                elapsed = time.monotonic() - started
        finally:
            service.terminate()
            await asyncio.wait_for(service.wait(), 30)
    latencies = sorted(latency for client, _ in results for latency in client)
    errors = sum(client_errors for _, client_errors in results)
    on_kafka = await _events_on_kafka(broker.bootstrap_servers)
    accepted = len(latencies) - errors
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    ok = errors == 0 and on_kafka == accepted and p99 < P99_LIMIT_S
    print(f"\ncallbacks: {CLIENTS} clients for {DURATION_S:g}s, OTPIQ JSON + Octopush form")
    print(f"  {'requests answered':28} {len(latencies):>10}")
    print(f"  {'errors (non-200 or failed)':28} {errors:>10}")
    print(f"  {'events on Kafka':28} {on_kafka:>10}  (must equal accepted: {accepted})")
    print(f"  {'events/s accepted':28} {accepted / elapsed:>10.0f}")
    print(f"  {'answer time p50':28} {p50 * 1000:>8.1f}ms")
    ratio = p99 / P99_LIMIT_S
    print(f"  {'answer time p99':28} {p99 * 1000:>8.1f}ms  (ratio to the 1 s limit {ratio:.3f})")
    print(f"  {'answer time max':28} {latencies[-1] * 1000:>8.1f}ms")
    print(f"  result: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main() -> int:
    with EmbeddedBroker() as broker:
        return asyncio.run(_run(broker))


if __name__ == "__main__":
    sys.exit(main())
