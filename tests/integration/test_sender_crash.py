"""A sender process killed with SIGKILL in the middle of a campaign, then restarted.

The sender runs as a real child process (``smsbridge run sender``) against the embedded broker
and an in-process provider simulator with some latency, so that calls are in flight when the
kill lands. Afterwards: the provider saw no message twice, and every message has exactly one
outcome: accepted (the provider has it), or "outcome unknown after restart" — the documented
outcome of a call in flight at the crash, never resent — and those are few (at most the calls
in flight).
"""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from shared.config import Settings
from shared.contract import topics
from shared.contract.events import DispatchRecord, decode
from shared.kafka.broker import EmbeddedBroker, free_port
from shared.kafka.clients import bootstrap
from simulators.providers import ProviderSimulator
from tests.integration.test_sender import publish
from tests.support import (
    AGGREGATOR_API_KEY,
    CALLBACK_TOKEN,
    TENANT,
    TENANT_API_TOKEN,
    TENANT_SECRET,
    wait_for,
)
from tests.support.ops import recipient, start_service, stop_service

pytestmark = pytest.mark.integration

CAMPAIGN = 5000
IN_FLIGHT = 100
UNKNOWN = "outcome unknown after restart"


def sender_config(path: Path, provider_url: str) -> Path:
    path.write_text(
        f"""
log_level = "INFO"
allow_plain_http = true

[kafka]
bootstrap_servers = "embedded"

[callbacks]
listen = "127.0.0.1:{free_port()}"
public_url = "http://127.0.0.1:9"

[sender]
metrics_listen = "127.0.0.1:{free_port()}"
state_dir = "{path.parent / "sender-state"}"

[sender.runner]
# The replacement joins once the killed member's session has expired.
session_timeout_ms = 6000
heartbeat_interval_ms = 1000
commit_interval_s = 0.5

[tenants.{TENANT}]
optimove_base_url = "http://127.0.0.1:9/{TENANT}"
api_token = "{TENANT_API_TOKEN}"
secret_key = "{TENANT_SECRET}"
aggregator_api_key = "{AGGREGATOR_API_KEY}"
default_sender_id = "ACME"
routes = [{{ provider = "otpiq-main" }}]

[providers.otpiq-main]
kind = "otpiq"
base_url = "{provider_url}/otpiq/api"
api_key = "sk_test_otpiq"
callback_token = "{CALLBACK_TOKEN}"
max_in_flight = {IN_FLIGHT}
"""
    )
    return path


async def collect_dispatches(
    settings: Settings, expected: int, timeout_s: float
) -> dict[str, list[DispatchRecord]]:
    """Every dispatch record by message id, once ``expected`` messages have one."""
    consumer = AIOKafkaConsumer(
        topics.DISPATCHES.name,
        bootstrap_servers=bootstrap(settings.kafka),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: dict[str, list[DispatchRecord]] = defaultdict(list)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while len(found) < expected:
            if loop.time() > deadline:
                raise AssertionError(f"{len(found)} of {expected} messages have a dispatch")
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for records in batches.values():
                for record in records:
                    dispatch = decode(DispatchRecord, record.value)
                    found[dispatch.context.message_id].append(dispatch)
        # Whatever the restart republished for records it saw again arrives meanwhile too.
        await asyncio.sleep(2)
        for records in (await consumer.getmany(timeout_ms=1000, max_records=100_000)).values():
            for record in records:
                dispatch = decode(DispatchRecord, record.value)
                found[dispatch.context.message_id].append(dispatch)
    finally:
        await consumer.stop()
    return found


async def test_a_sender_killed_mid_campaign_and_restarted_sends_every_message_at_most_once(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    simulator = ProviderSimulator(
        "127.0.0.1", free_port(), latency_ms=30, callback_attempts=1, callback_delay_ms=600_000
    )
    await simulator.start()
    try:
        config = sender_config(tmp_path / "sender.toml", simulator.url)
        settings = Settings()
        messages = [recipient(index, f"+4477{index:08d}") for index in range(CAMPAIGN)]
        await publish(settings, messages)

        first = await start_service(
            config, "sender", log=tmp_path / "sender-first.log", tmp_dir=tmp_path
        )
        try:
            await wait_for(lambda: len(simulator.sends) >= CAMPAIGN // 2, 180, "half the sends")
        finally:
            first.send_signal(signal.SIGKILL)
            await first.wait()
        sent_before_kill = len(simulator.sends)
        assert sent_before_kill < CAMPAIGN, "the kill came after the whole campaign"

        second = await start_service(
            config, "sender", log=tmp_path / "sender-second.log", tmp_dir=tmp_path
        )
        try:
            outcomes = await collect_dispatches(settings, CAMPAIGN, timeout_s=240)
        finally:
            await stop_service(second)
    finally:
        await simulator.stop()

    # The provider saw no message twice.
    counts = simulator.counts()
    assert [count for count in counts if count["count"] != 1] == []
    assert len(simulator.sends) > sent_before_kill, "the restart sent nothing"
    sent_ids = {send.provider_message_id: send.phone for send in simulator.sends}

    # Every message has one outcome (republished copies are identical).
    accepted: dict[str, DispatchRecord] = {}
    unknown: dict[str, DispatchRecord] = {}
    for message in messages:
        records = outcomes[message.context.message_id]
        assert records, f"{message.context.message_id} has no dispatch"
        assert all(record == records[0] for record in records), records
        record = records[0]
        if record.outcome == "accepted":
            assert sent_ids[record.provider_message_id] == message.destination.lstrip("+")
            accepted[message.destination.lstrip("+")] = record
        else:
            assert (record.sub_status, record.detail[: len(UNKNOWN)]) == ("ProviderError", UNKNOWN)
            unknown[message.destination.lstrip("+")] = record
    assert len(accepted) + len(unknown) == CAMPAIGN
    # Only calls in flight at the kill can have an unknown outcome; whatever the provider took
    # without an accepted dispatch is among them, and nothing unsent is left unreported.
    assert len(unknown) <= IN_FLIGHT
    assert set(sent_ids.values()) - set(accepted) <= set(unknown)
    print(
        f"\nsent before the kill: {sent_before_kill}; accepted: {len(accepted)}; "
        f"unknown after restart: {len(unknown)} "
        f"(of which the provider had {len(set(unknown) & set(sent_ids.values()))})"
    )
