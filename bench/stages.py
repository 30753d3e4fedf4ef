"""Stage benchmark: CPU per message of each service, alone, beside its budget (not part of
``make bench`` unless named: ``python -m bench stages``).

In the e2e benchmark every process shares the machine, so a service's CPU per message depends on
how busy the others kept it. Here each stage runs alone on a fresh broker whose input topics
already hold a campaign's worth of records, and drains them: the figure is the CPU time the
service's process used per message, and its rate (``BENCH_SOURCE_DIR=DIR`` runs the services of
another checkout; ``bench.stack.code_under_test``).

- ingress: signed campaign requests of 1,000 recipients, posted by this process; done when every
  one was accepted (202: on Kafka).
- sender: one ``RecipientMessage`` per message on ``sms.recipients``, an OTPIQ simulator without
  latency or rate limit (its CPU is not counted); done when ``sms.dispatches`` holds every send.
- callbacks: two OTPIQ delivery reports per message (``sent``, ``delivered``), posted by this
  process; done when ``sms.provider-events`` holds them all.
- normalizer: per message one accepted OTPIQ dispatch record and two provider events (``sent``,
  ``delivered``); done when ``sms.statuses`` holds the two status events of every message.
- reporter: per message a ``Sent`` and a ``Delivered`` status event; done when the Optimove
  simulator holds every final report.
- campaigns: per message a recipient, a ``Sent`` and a ``Delivered`` status event; done when the
  admin API counts every message delivered.

``BUDGET_MS`` is each stage's share of issue 19's target: 1.7 CPU ms per message for the six
services together.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson

from bench import load
from bench.e2e import post_all
from bench.results import Options, Report, markdown_table, text_table
from bench.sender import campaign
from bench.stack import (
    CALLBACK_TOKEN,
    OTPIQ_WEBHOOK_SECRET,
    PROVIDER,
    TENANT,
    ProviderSimulatorOptions,
    Stack,
    StackError,
    code_under_test,
    count_records,
    wait_until,
)
from shared.contract.events import DispatchRecord, MessageContext, ProviderEvent, StatusEvent
from shared.contract.topics import DISPATCHES, PROVIDER_EVENTS, RECIPIENTS, STATUSES
from shared.kafka.clients import OutRecord
from shared.providers.otpiq import FIXTURES, WEBHOOK_SECRET_HEADER

DEFAULT_MESSAGES = 20_000
INGRESS_BATCH = 1_000
INGRESS_CLIENTS = 8
CALLBACK_CLIENTS = 32
# CPU ms per message: issue 19's 1.7 for the six services, shared out.
BUDGET_MS = {
    "ingress": 0.05,
    "sender": 0.40,
    "callbacks": 0.30,
    "normalizer": 0.35,
    "reporter": 0.40,
    "campaigns": 0.20,
}
TARGET_MS = sum(BUDGET_MS.values())


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


async def measure(
    stack: Stack, service: str, work: Callable[[], Awaitable[object]]
) -> tuple[float, float]:
    """Start ``service``, then do ``work`` (this process drives it); (seconds, CPU seconds of the
    service) from when it was ready."""
    await stack.start(service)
    started, cpu_at_start = time.monotonic(), stack.cpu_seconds(service)
    await work()
    return time.monotonic() - started, stack.cpu_seconds(service) - cpu_at_start


async def ingress(
    run_dir: Path, messages: int, source: Path, broker: str = "kafka"
) -> tuple[float, float]:
    async with Stack(run_dir, source_dir=source, broker_kind=broker) as stack:
        batches = load.build_batches("stage-i", messages, INGRESS_BATCH)

        async def post() -> None:
            answers, refused = await post_all(stack, batches, INGRESS_CLIENTS)
            if refused or len(answers) != len(batches):
                raise StackError(f"ingress refused {refused} of {len(batches)} batches")

        return await measure(stack, "ingress", post)


async def sender(
    run_dir: Path, messages: int, source: Path, broker: str = "kafka"
) -> tuple[float, float]:
    # No delivery reports: the callbacks service does not run here.
    quiet = ProviderSimulatorOptions(callback_delay_ms=3_600_000, callback_attempts=1)
    async with Stack(
        run_dir, source_dir=source, broker_kind=broker, provider_options=quiet
    ) as stack:
        await stack.start("providers")
        await stack.publish(
            OutRecord(RECIPIENTS, f"{m.context.tenant}:{m.destination}", m)
            for m in campaign(messages)
        )

        async def dispatched() -> bool:
            stack.check_alive()
            return await count_records(stack.settings, DISPATCHES.name) >= messages

        return await drain(stack, "sender", dispatched, 1800)


async def callbacks(
    run_dir: Path, messages: int, source: Path, broker: str = "kafka"
) -> tuple[float, float]:
    async with Stack(run_dir, source_dir=source, broker_kind=broker) as stack:
        url = f"{stack.callbacks_url}/callbacks/otpiq/{PROVIDER}/{CALLBACK_TOKEN}"
        headers = {WEBHOOK_SECRET_HEADER: OTPIQ_WEBHOOK_SECRET, "Content-Type": "application/json"}
        bodies = [
            orjson.dumps({**FIXTURES[f"callback_{status}"], "smsId": f"sms-stage-{index:08d}"})
            for index in range(messages)
            for status in ("sent", "delivered")
        ]

        async def post() -> None:
            queue = iter(bodies)
            refused = 0

            async def client(session: aiohttp.ClientSession) -> None:
                nonlocal refused
                for body in queue:
                    async with session.post(url, data=body, headers=headers) as answer:
                        refused += answer.status != 200

            async with aiohttp.ClientSession() as session:
                await asyncio.gather(*(client(session) for _ in range(CALLBACK_CLIENTS)))
            if refused:
                raise StackError(f"callbacks refused {refused} of {len(bodies):,} reports")
            stored = await count_records(stack.settings, PROVIDER_EVENTS.name)
            if stored < len(bodies):
                raise StackError(f"only {stored:,} of {len(bodies):,} reports on Kafka")

        return await measure(stack, "callbacks", post)


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


def within(stage: str, cpu_s: float, messages: int) -> bool:
    return cpu_s / messages * 1000 <= BUDGET_MS[stage]


async def campaigns(
    run_dir: Path, messages: int, source: Path, broker: str = "kafka"
) -> tuple[float, float]:
    token = "bench-admin-token"
    overrides = {"campaigns": {"admin_token": token}}
    async with Stack(run_dir, source_dir=source, broker_kind=broker, overrides=overrides) as stack:
        # What the pipeline gives it per message: the recipient, then Sent and Delivered.
        await stack.publish(
            OutRecord(RECIPIENTS, f"{m.context.tenant}:{m.destination}", m)
            for m in campaign(messages)
        )
        await stack.publish(reporter_input(messages, "stage-c"))
        url = f"http://{stack.settings.campaigns.listen}/admin/campaigns/{TENANT}/stage-c"
        headers = {"Authorization": f"Bearer {token}"}

        async def counted() -> bool:
            stack.check_alive()
            async with stack.session.get(url, headers=headers) as answer:
                if answer.status != 200:
                    return False
                return int((await answer.json())["delivered"]) >= messages

        return await drain(stack, "campaigns", counted, 1800)


async def run(run_dir: Path, messages: int, source: Path, broker: str = "kafka") -> Report:
    began = time.monotonic()
    stages = {
        "ingress": ingress,
        "sender": sender,
        "callbacks": callbacks,
        "normalizer": normalizer,
        "reporter": reporter,
        "campaigns": campaigns,
    }
    results = {
        name: await stage(run_dir / name, messages, source, broker)
        for name, stage in stages.items()
    }
    header = ("stage", "messages", "seconds", "msg/s", "CPU ms per message", "budget")
    rows = [
        [
            name,
            f"{messages:,}",
            f"{seconds:.1f}",
            f"{messages / seconds:,.0f}",
            f"{cpu / messages * 1000:.2f}",
            f"{BUDGET_MS[name]:.2f} ({'within' if within(name, cpu, messages) else 'OVER'})",
        ]
        for name, (seconds, cpu) in results.items()
    ]
    total = sum(cpu for _, cpu in results.values()) / messages * 1000
    measured_budget = sum(BUDGET_MS[name] for name in results)
    print(f"\nstages, each alone, code of {source}")
    print(text_table(header, rows))
    print(
        f"the {len(results)} stages measured: {total:.2f} CPU ms per message (their budget "
        f"{measured_budget:.2f}; issue 19's target for all six services: {TARGET_MS:.2f})"
    )
    return Report(
        benchmark="stages",
        summary=[
            (
                f"{name} alone, {messages:,} messages",
                f"{cpu / messages * 1000:.2f} CPU ms per message (budget {BUDGET_MS[name]:.2f}), "
                f"{messages / seconds:,.0f} msg/s",
            )
            for name, (seconds, cpu) in results.items()
        ],
        # Issue 19's target is the six services' total; a stage over its own budget is shown,
        # not failed: the budget is a plan for where the savings come from.
        failures=(
            [f"the six services take {total:.2f} CPU ms per message (target {TARGET_MS:.2f})"]
            if len(results) == len(BUDGET_MS) and total > TARGET_MS
            else []
        ),
        details=markdown_table(header, rows) + f"\n\nCode of {source}.",
        figures={
            "messages": messages,
            "source": str(source),
            **{
                name: {
                    "seconds": round(seconds, 2),
                    "cpu_ms_per_message": round(cpu / messages * 1000, 3),
                    "budget_ms": BUDGET_MS[name],
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
