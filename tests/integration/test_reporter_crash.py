"""The reporter SIGKILLed in the middle of a campaign, then started again: nothing is lost, and
what is repeated is bounded by what was in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import orjson
import pytest

from shared.config import Settings, load_settings
from shared.contract.events import MessageContext, StatusEvent
from shared.contract.topics import STATUSES
from shared.kafka.broker import EmbeddedBroker, free_port
from shared.kafka.clients import EMBEDDED_BOOTSTRAP_ENV, OutRecord, Publisher, make_producer
from simulators.optimove import OptimoveSimulator
from tests.support import TENANT, TENANT_API_TOKEN, TENANT_SECRET, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MESSAGES = 1500  # two reports each: 3000 status events


def write_config(path: Path, simulator_port: int) -> None:
    path.write_text(
        f"""
log_level = "WARNING"
allow_plain_http = true

[kafka]
bootstrap_servers = "embedded"

[reporter]
metrics_listen = "127.0.0.1:{free_port()}"

[reporter.runner]
# The reporter's own defaults otherwise; a shorter session moves the killed member's partitions
# to the new one sooner.
session_timeout_ms = 6000
heartbeat_interval_ms = 1000

[tenants.{TENANT}]
optimove_base_url = "http://127.0.0.1:{simulator_port}/{TENANT}"
api_token = "{TENANT_API_TOKEN}"
secret_key = "{TENANT_SECRET}"
aggregator_api_key = "aggregator-key"
routes = [{{ provider = "otpiq-main" }}]

[providers.otpiq-main]
kind = "otpiq"
base_url = "http://127.0.0.1:9/otpiq/api"
api_key = "sk_test"
callback_token = "cb-token"
""",
        encoding="utf-8",
    )


def events() -> list[StatusEvent]:
    contexts = [
        MessageContext(
            tenant=TENANT,
            message_id=f"m-{i:05d}",
            batch_id="batch-1",
            campaign_id="crash",
            mobile_number=f"+4479111{i:05d}",
            metadata_json='{"campaignId": "crash"}',
        )
        for i in range(MESSAGES)
    ]
    sent = [
        StatusEvent(event_id=f"e-{c.message_id}-s", context=c, status="sent", sub_status="Sent")
        for c in contexts
    ]
    delivered = [
        StatusEvent(
            event_id=f"e-{c.message_id}-d", context=c, status="delivered", sub_status="Delivered"
        )
        for c in contexts
    ]
    return sent + delivered


class Reporter:
    """``smsbridge run reporter`` as its own process, its log in a file."""

    def __init__(self, config: Path, log: IO[bytes]) -> None:
        self.config = config
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tools.cli",
            "--config",
            str(self.config),
            "run",
            "reporter",
            cwd=REPO,
            env={**os.environ, EMBEDDED_BOOTSTRAP_ENV: os.environ[EMBEDDED_BOOTSTRAP_ENV]},
            stdout=self.log,
            stderr=self.log,
        )

    async def signal(self, signum: int) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signum)
        return await asyncio.wait_for(self.process.wait(), 60)


@pytest.fixture
async def simulator() -> AsyncIterator[OptimoveSimulator]:
    started = OptimoveSimulator(
        "127.0.0.1", free_port(), {TENANT: (TENANT_API_TOKEN, TENANT_SECRET)}
    )
    await started.start()
    yield started
    await started.stop()


async def publish(settings: Settings, statuses: list[StatusEvent]) -> None:
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    try:
        await Publisher(producer, 30).publish(
            OutRecord(STATUSES, e.context.message_id, e) for e in statuses
        )
    finally:
        await producer.stop()


def accepted_reports(simulator: OptimoveSimulator) -> list[tuple[str, str]]:
    found = []
    for request in simulator.received(endpoint="delivery-report", tenant=TENANT):
        if not request["rejected"]:
            body = orjson.loads(request["body"])
            found.append((body["messageId"], body["type"]["status"]))
    return found


async def test_a_killed_reporter_loses_nothing_and_repeats_little(
    kafka: EmbeddedBroker, simulator: OptimoveSimulator, tmp_path: Path
) -> None:
    config = tmp_path / "smsbridge.toml"
    write_config(config, simulator.port)
    settings = load_settings(config)
    campaign = events()
    expected = {(e.context.message_id, e.status.capitalize()) for e in campaign}

    with (tmp_path / "reporter.log").open("wb") as log:
        first = Reporter(config, log)
        await first.start()
        await publish(settings, campaign)
        try:
            await wait_for(
                lambda: len(accepted_reports(simulator)) >= len(campaign) // 5,
                timeout_s=120,
                what="a fifth of the campaign reported",
            )
        finally:
            assert await first.signal(signal.SIGKILL) == -signal.SIGKILL
        reported_before_kill = len(accepted_reports(simulator))
        assert reported_before_kill < len(campaign), "the campaign ended before the kill"

        second = Reporter(config, log)
        await second.start()
        try:
            await wait_for(
                lambda: set(accepted_reports(simulator)) >= expected,
                timeout_s=180,
                what="every report after the restart",
            )
        finally:
            assert await second.signal(signal.SIGTERM) == 0

    reports = accepted_reports(simulator)
    duplicates = len(reports) - len(set(reports))
    print(
        f"killed after {reported_before_kill} of {len(campaign)} reports; "
        f"{duplicates} sent twice after the restart"
    )
    assert set(reports) == expected
    assert 0 <= duplicates <= settings.reporter.runner.max_in_flight
    assert max(Counter(reports).values()) <= 2
    # The order per message held across the crash: each message's first Sent came first.
    first_seen: dict[tuple[str, str], int] = {}
    for index, report in enumerate(reports):
        first_seen.setdefault(report, index)
    for message_id, _ in expected:
        assert first_seen[(message_id, "Sent")] < first_seen[(message_id, "Delivered")]
