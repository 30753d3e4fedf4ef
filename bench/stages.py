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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import load
from bench.e2e import post_all
from bench.profiling import Profiler, hot_spots
from bench.results import RESULTS_DIR, Options, Report, markdown_table, text_table
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
from shared.http_client import HttpClient
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


@dataclass(frozen=True)
class StageRun:
    """What every stage is run with: where, how many messages, whose code, on which broker, and
    where py-spy profiles go (None: not profiled)."""

    run_dir: Path
    messages: int
    source: Path
    broker: str = "kafka"
    profile_dir: Path | None = None
    hot_spots: dict[str, str] = field(default_factory=dict)

    def stack(self, stage: str, **options: Any) -> Stack:
        return Stack(
            self.run_dir / stage, source_dir=self.source, broker_kind=self.broker, **options
        )

    async def measure(
        self, stack: Stack, service: str, work: Callable[[], Awaitable[object]]
    ) -> tuple[float, float]:
        """Start ``service``, then do ``work``; (seconds, CPU seconds of the service) from when it
        was ready (its start-up, imports above all, is left out)."""
        await stack.start(service)
        profiler = None
        if self.profile_dir is not None:
            profiler = Profiler(stack, [service], self.profile_dir)
            await profiler.start()
        started, cpu_at_start = time.monotonic(), stack.cpu_seconds(service)
        await work()
        seconds, cpu = time.monotonic() - started, stack.cpu_seconds(service) - cpu_at_start
        if profiler is not None:
            for name, path in (await profiler.stop()).items():
                self.hot_spots[name] = hot_spots(path).describe(top=25)
        return seconds, cpu

    async def drain(
        self, stack: Stack, service: str, done: Callable[[], Awaitable[bool]]
    ) -> tuple[float, float]:
        """``measure`` until ``done()``: the service drains input that is already on Kafka."""

        async def drained() -> None:
            await wait_until(done, 1800, f"{service} to drain its input", interval_s=0.5)

        return await self.measure(stack, service, drained)


async def ingress(
    run: StageRun,
) -> tuple[float, float]:
    async with run.stack("ingress") as stack:
        batches = load.build_batches("stage-i", run.messages, INGRESS_BATCH)

        async def post() -> None:
            answers, refused = await post_all(stack, batches, INGRESS_CLIENTS)
            if refused or len(answers) != len(batches):
                raise StackError(f"ingress refused {refused} of {len(batches)} batches")

        return await run.measure(stack, "ingress", post)


async def sender(
    run: StageRun,
) -> tuple[float, float]:
    # No delivery reports: the callbacks service does not run here.
    quiet = ProviderSimulatorOptions(callback_delay_ms=3_600_000, callback_attempts=1)
    async with run.stack("sender", provider_options=quiet) as stack:
        await stack.start("providers")
        await stack.publish(
            OutRecord(RECIPIENTS, f"{m.context.tenant}:{m.destination}", m)
            for m in campaign(run.messages)
        )

        async def dispatched() -> bool:
            stack.check_alive()
            return await count_records(stack.settings, DISPATCHES.name) >= run.messages

        return await run.drain(stack, "sender", dispatched)


async def callbacks(
    run: StageRun,
) -> tuple[float, float]:
    async with run.stack("callbacks") as stack:
        url = f"{stack.callbacks_url}/callbacks/otpiq/{PROVIDER}/{CALLBACK_TOKEN}"
        headers = {WEBHOOK_SECRET_HEADER: OTPIQ_WEBHOOK_SECRET, "Content-Type": "application/json"}
        bodies = [
            orjson.dumps({**FIXTURES[f"callback_{status}"], "smsId": f"sms-stage-{index:08d}"})
            for index in range(run.messages)
            for status in ("sent", "delivered")
        ]

        async def post() -> None:
            queue = iter(bodies)
            refused = 0

            async def client(session: HttpClient) -> None:
                nonlocal refused
                for body in queue:
                    answer = await session.post(url, body, headers)
                    refused += answer.status != 200

            # Our client: aiohttp's cost this process (on the same two cores) twice the CPU.
            async with HttpClient(limit=None) as session:
                await asyncio.gather(*(client(session) for _ in range(CALLBACK_CLIENTS)))
            if refused:
                raise StackError(f"callbacks refused {refused} of {len(bodies):,} reports")
            stored = await count_records(stack.settings, PROVIDER_EVENTS.name)
            if stored < len(bodies):
                raise StackError(f"only {stored:,} of {len(bodies):,} reports on Kafka")

        return await run.measure(stack, "callbacks", post)


async def normalizer(
    run: StageRun,
) -> tuple[float, float]:
    async with run.stack("normalizer") as stack:
        await stack.publish(normalizer_input(run.messages, "stage-n"))

        async def statuses_written() -> bool:
            stack.check_alive()
            return await count_records(stack.settings, STATUSES.name) >= 2 * run.messages

        return await run.drain(stack, "normalizer", statuses_written)


async def reporter(
    run: StageRun,
) -> tuple[float, float]:
    async with run.stack("reporter", optimove_max_recorded=1_000) as stack:
        await stack.start("optimove")
        await stack.publish(reporter_input(run.messages, "stage-r"))

        async def reported() -> bool:
            stack.check_alive()
            return int((await stack.optimove_tally("stage-r"))["final"]) >= run.messages

        return await run.drain(stack, "reporter", reported)


def within(stage: str, cpu_s: float, messages: int) -> bool:
    return cpu_s / messages * 1000 <= BUDGET_MS[stage]


async def campaigns(
    run: StageRun,
) -> tuple[float, float]:
    token = "bench-admin-token"
    overrides = {"campaigns": {"admin_token": token}}
    async with run.stack("campaigns", overrides=overrides) as stack:
        # What the pipeline gives it per message: the recipient, then Sent and Delivered.
        await stack.publish(
            OutRecord(RECIPIENTS, f"{m.context.tenant}:{m.destination}", m)
            for m in campaign(run.messages)
        )
        await stack.publish(reporter_input(run.messages, "stage-c"))
        url = f"http://{stack.settings.campaigns.listen}/admin/campaigns/{TENANT}/stage-c"
        headers = {"Authorization": f"Bearer {token}"}

        async def counted() -> bool:
            stack.check_alive()
            async with stack.session.get(url, headers=headers) as answer:
                if answer.status != 200:
                    return False
                return int((await answer.json())["delivered"]) >= run.messages

        return await run.drain(stack, "campaigns", counted)


async def run(stage_run: StageRun, chosen: Sequence[str]) -> Report:
    began = time.monotonic()
    messages, source = stage_run.messages, stage_run.source
    results = {name: await STAGES[name](stage_run) for name in chosen}
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
    for name, text in stage_run.hot_spots.items():
        print(f"\nprofile of {name} (py-spy, while measured):\n{text}")
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


STAGES: dict[str, Callable[[StageRun], Awaitable[tuple[float, float]]]] = {
    "ingress": ingress,
    "sender": sender,
    "callbacks": callbacks,
    "normalizer": normalizer,
    "reporter": reporter,
    "campaigns": campaigns,
}


def bench(options: Options) -> Report:
    profile_dir = None
    if options.profile:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        profile_dir = RESULTS_DIR / "profiles" / f"stages-{stamp}"
    with tempfile.TemporaryDirectory(prefix="smsbridge-bench-stages-") as directory:
        stage_run = StageRun(
            Path(directory),
            options.recipients or DEFAULT_MESSAGES,
            code_under_test(),
            options.broker,
            profile_dir,
        )
        return asyncio.run(run(stage_run, options.stages or list(STAGES)))
