"""Stage benchmark: CPU per message of the normalizer and the reporter, each alone (not part of
``make bench`` unless named: ``python -m bench stages``).

In the e2e benchmark every process shares the machine, so a service's CPU per message depends on
how busy the others kept it. Here each stage runs alone on a fresh broker whose input topics
already hold a campaign's worth of records, and drains them: the figure is the CPU time the
service's process used per message, and its rate (``BENCH_SOURCE_DIR=DIR`` runs the services of
another checkout; ``bench.stack.code_under_test``).

- normalizer: per message one accepted OTPIQ dispatch record and two provider events (``sent``,
  ``delivered``); done when ``sms.statuses`` holds the two status events of every message.
- reporter: per message a ``Sent`` and a ``Delivered`` status event; done when the Optimove
  simulator holds every final report.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.results import Options, Report, markdown_table, text_table
from bench.stack import PROVIDER, TENANT, Stack, code_under_test, count_records, wait_until
from shared.contract.events import DispatchRecord, MessageContext, ProviderEvent, StatusEvent
from shared.contract.topics import DISPATCHES, PROVIDER_EVENTS, STATUSES
from shared.kafka.clients import OutRecord

DEFAULT_MESSAGES = 20_000


def context(index: int, campaign: str) -> MessageContext:
    return MessageContext(
        tenant=TENANT,
        message_id=f"m-stage-{campaign}-{index}",
        batch_id=f"{campaign}-b0",
        request_id=f"r-{campaign}",
        campaign_id=campaign,
        customer_id=f"cust-{index}",
        mobile_number=f"07400{index:06d}",
        metadata_json=f'{{"appId":7,"campaignId":"{campaign}"}}',
    )


def normalizer_input(messages: int, campaign: str) -> list[OutRecord]:
    records: list[OutRecord] = []
    now = datetime.now(UTC)
    for index in range(messages):
        sms_id = f"sms-{campaign}-{index:08d}"
        key = f"{PROVIDER}:{sms_id}"
        records.append(
            OutRecord(
                DISPATCHES,
                key,
                DispatchRecord(
                    context=context(index, campaign),
                    correlation_key=key,
                    outcome="accepted",
                    sub_status="",
                    provider_kind="otpiq",
                    provider_account=PROVIDER,
                    provider_message_id=sms_id,
                    destination=f"+447400{index:06d}",
                    segments=1,
                    dispatched_at=now,
                    sender_id="BENCH",
                ),
            )
        )
        for status in ("sent", "delivered"):
            records.append(
                OutRecord(
                    PROVIDER_EVENTS,
                    key,
                    ProviderEvent(
                        event_id=f"e-{sms_id}-{status}",
                        kind="status",
                        provider_kind="otpiq",
                        provider_account=PROVIDER,
                        correlation_key=key,
                        provider_message_id=sms_id,
                        provider_status=status,
                        raw={"smsId": sms_id, "status": status},
                    ),
                )
            )
    return records


def reporter_input(messages: int, campaign: str) -> list[OutRecord]:
    records: list[OutRecord] = []
    for index in range(messages):
        message = context(index, campaign)
        for status, sub_status in (("sent", "Sent"), ("delivered", "Delivered")):
            records.append(
                OutRecord(
                    STATUSES,
                    message.message_id,
                    StatusEvent(
                        event_id=f"e-{message.message_id}-{status}",
                        context=message,
                        status=status,
                        sub_status=sub_status,
                        provider_account=PROVIDER,
                    ),
                )
            )
    return records


async def drain(stack: Stack, service: str, done: object, timeout_s: float) -> tuple[float, float]:
    """Start ``service``, wait for ``done()``; (seconds, CPU seconds) from when it was ready
    (its start-up, imports above all, is left out)."""
    await stack.start(service)
    started, cpu_at_start = time.monotonic(), stack.cpu_seconds(service)
    assert callable(done)
    await wait_until(done, timeout_s, f"{service} to drain its input", interval_s=0.5)
    return time.monotonic() - started, stack.cpu_seconds(service) - cpu_at_start


async def normalizer(
    run_dir: Path, messages: int, source: Path, broker: str = "kafka"
) -> tuple[float, float]:
    async with Stack(run_dir, source_dir=source, broker_kind=broker) as stack:
        await stack.publish(normalizer_input(messages, "stage-n"))

        async def statuses_written() -> bool:
            stack.check_alive()
            return await count_records(stack.settings, STATUSES.name) >= 2 * messages

        return await drain(stack, "normalizer", statuses_written, 1800)


async def reporter(
    run_dir: Path, messages: int, source: Path, broker: str = "kafka"
) -> tuple[float, float]:
    stack = Stack(run_dir, source_dir=source, optimove_max_recorded=1_000, broker_kind=broker)
    async with stack:
        await stack.start("optimove")
        await stack.publish(reporter_input(messages, "stage-r"))

        async def reported() -> bool:
            stack.check_alive()
            return int((await stack.optimove_tally("stage-r"))["final"]) >= messages

        return await drain(stack, "reporter", reported, 1800)


async def run(run_dir: Path, messages: int, source: Path, broker: str = "kafka") -> Report:
    began = time.monotonic()
    results = {
        "normalizer": await normalizer(run_dir / "normalizer", messages, source, broker),
        "reporter": await reporter(run_dir / "reporter", messages, source, broker),
    }
    header = ("stage", "messages", "seconds", "msg/s", "CPU ms per message")
    rows = [
        [
            name,
            f"{messages:,}",
            f"{seconds:.1f}",
            f"{messages / seconds:,.0f}",
            f"{cpu / messages * 1000:.2f}",
        ]
        for name, (seconds, cpu) in results.items()
    ]
    print(f"\nstages, each alone, code of {source}")
    print(text_table(header, rows))
    return Report(
        benchmark="stages",
        summary=[
            (
                f"{name} alone, {messages:,} messages",
                f"{cpu / messages * 1000:.2f} CPU ms per message, {messages / seconds:,.0f} msg/s",
            )
            for name, (seconds, cpu) in results.items()
        ],
        details=markdown_table(header, rows) + f"\n\nCode of {source}.",
        figures={
            "messages": messages,
            "source": str(source),
            **{
                name: {
                    "seconds": round(seconds, 2),
                    "cpu_ms_per_message": round(cpu / messages * 1000, 3),
                }
                for name, (seconds, cpu) in results.items()
            },
        },
        duration_s=time.monotonic() - began,
    )


def bench(options: Options) -> Report:
    messages = options.recipients or DEFAULT_MESSAGES
    source = code_under_test()
    with tempfile.TemporaryDirectory(prefix="smsbridge-bench-stages-") as directory:
        return asyncio.run(run(Path(directory), messages, source, options.broker))
