"""Memory benchmark: peak RSS per service during a 1,000,000-recipient campaign; it must stay flat.

The campaign is posted in signed batches, the RSS of every service sampled from ``/proc``; per
service, the peak over the whole campaign must be at most ``GROWTH`` times the peak over its first
half plus ``SLACK_MIB``. ``--max-minutes`` bounds the posting, ``--dry-run`` uses a dry-run tenant,
``--broker`` picks the broker. Method, allowances and broker figures: docs/benchmarks.md, "Memory".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bench import load
from bench.e2e import recipients_from
from bench.results import Options, Report, broker_info, markdown_table, text_table
from bench.stack import (
    BROKER,
    SERVICES,
    SIMULATORS,
    TENANT,
    ProviderSimulatorOptions,
    ResourceSampler,
    Sample,
    Stack,
)
from shared.kafka.broker import ApacheKafkaBroker
from shared.providers.dryrun import is_marked

DEFAULT_RECIPIENTS = 1_000_000
BATCH_SIZE = 5_000
WINDOW = 40_000
INTERVAL_S = 2.0
GROWTH = 1.1
SLACK_MIB = 32
MARKS = (0.1, 0.5, 1.0)
MIB = 2**20
# What the memory-only embedded broker (Tansu) holds per message of the pipeline (measured: 15.5 KB
# at 300,000 messages, 18.3 KB at 385,000). Apache Kafka keeps it on disk instead.
BROKER_BYTES_PER_MESSAGE = 18_500
HEADROOM_BYTES = 2 * 2**30
# What Apache Kafka's data folder holds per message (measured: 10.2 KB at 20,000 messages), in
# the temporary folder: a campaign that would fill the disk is refused before it starts.
KAFKA_DISK_BYTES_PER_MESSAGE = 12_000
# What a ``--dry-run`` run is, in its summary, details and figures.
DRY_RUN_NOTE = (
    "DRY-RUN tenant: no provider HTTP calls, no callbacks "
    "(the callbacks service and the provider simulator idle)"
)


class Progress:
    """The campaign's final reports so far, polled in the background."""

    def __init__(self, stack: Stack, campaign: str, total: int) -> None:
        self.stack = stack
        self.campaign = campaign
        self.total = total
        self.final = 0
        self._task: asyncio.Task[None] | None = None

    async def _poll(self) -> None:
        while True:
            tally = await self.stack.optimove_tally(self.campaign)
            self.final = int(tally["final"])
            await asyncio.sleep(1.0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def feed(
    stack: Stack, progress: Progress, recipients: int, deadline: float | None = None
) -> tuple[int, int]:
    """Post the campaign, never more than ``WINDOW`` ahead of the final reports, and no batch
    once ``deadline`` (monotonic) has passed: (recipients posted, batches refused for good)."""
    refused = 0
    posted = 0
    started = time.monotonic()
    shown = started
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for start in range(0, recipients, BATCH_SIZE):
            if deadline is not None and time.monotonic() >= deadline:
                print(f"  time budget reached: {posted:,} of {recipients:,} posted", flush=True)
                break
            size = min(BATCH_SIZE, recipients - start)
            # Built batch by batch: a million recipients' bodies at once would be the biggest
            # thing in this process.
            (batch,) = load.build_batches(
                progress.campaign, size, size, first_index=start, first_batch=start // BATCH_SIZE
            )
            while posted - progress.final >= WINDOW:
                stack.check_alive()
                await asyncio.sleep(0.25)
            for _ in range(10):
                answer = await load.post(session, stack.campaign_url, batch)
                if answer.accepted:
                    break
                await asyncio.sleep(1.0)
            else:
                refused += 1
            posted += size
            if time.monotonic() - shown >= 30:
                shown = time.monotonic()
                rate = progress.final / (shown - started)
                left = (recipients - progress.final) / rate if rate else float("inf")
                print(
                    f"  {progress.final:,} of {recipients:,} final reports, {rate:,.0f}/s, "
                    f"about {left / 60:.0f} min left",
                    flush=True,
                )
    return posted, refused


# Each sample's progress is the number of final reports so far; ``reports`` below is that.


def rss_at(samples: list[Sample], name: str, reports: float) -> int:
    """RSS at the first sample taken once ``reports`` final reports were in (else the last)."""
    for sample in samples:
        if sample.progress is not None and sample.progress >= reports:
            return sample.rss.get(name, 0)
    return samples[-1].rss.get(name, 0) if samples else 0


def peak_until(samples: list[Sample], name: str, reports: float) -> int:
    peak = 0
    for sample in samples:
        peak = max(peak, sample.rss.get(name, 0))
        if sample.progress is not None and sample.progress >= reports:
            break
    return peak


def available_memory() -> int:
    """MemAvailable of /proc/meminfo, in bytes (0 when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def too_big(recipients: int, broker: str = "tansu") -> str | None:
    """Why this machine cannot run a campaign this size on ``broker``, if it cannot: the
    memory-only Tansu keeps the campaign in RAM, Apache Kafka on disk."""
    if broker != "tansu":
        needed = recipients * KAFKA_DISK_BYTES_PER_MESSAGE + HEADROOM_BYTES
        free = shutil.disk_usage(tempfile.gettempdir()).free
        if needed <= free:
            return None
        return (
            f"{recipients:,} recipients need about {needed / 2**30:.1f} GiB of disk for Apache "
            f"Kafka's data (~12 KB per message) in {tempfile.gettempdir()}, "
            f"{free / 2**30:.1f} GiB are free: run fewer, or point TMPDIR elsewhere"
        )
    needed = recipients * BROKER_BYTES_PER_MESSAGE + HEADROOM_BYTES
    available = available_memory()
    if available and needed > available:
        fits = max(0, (available - HEADROOM_BYTES) // BROKER_BYTES_PER_MESSAGE)
        return (
            f"{recipients:,} recipients need about {needed / 2**30:.1f} GiB of RAM (the "
            f"memory-only Tansu broker keeps ~18 KB per message), {available / 2**30:.1f} GiB "
            f"are available: run fewer (--recipients / BENCH_MEMORY_RECIPIENTS, at most "
            f"~{fits:,} here), or run on Apache Kafka (--broker kafka), which keeps it on disk"
        )
    return None


def broker_disk_bytes(stack: Stack) -> int | None:
    """What the broker's data folder holds on disk now (None for a broker without one)."""
    if not isinstance(stack.broker, ApacheKafkaBroker):
        return None
    total = 0
    for path in stack.broker.root.rglob("*"):
        with contextlib.suppress(OSError):  # a segment deleted or rolled meanwhile
            total += path.stat().st_blocks * 512
    return total


def unmarked_final_reports(tally: dict[str, Any]) -> int:
    """Final reports in ``tally`` whose sub-status lacks the dry run's ``DryRun:`` mark."""
    by_status: dict[str, dict[str, int]] = tally.get("final_by_status", {})
    return sum(
        count
        for sub_statuses in by_status.values()
        for sub_status, count in sub_statuses.items()
        if not is_marked(sub_status)
    )


async def run(
    run_dir: Path,
    recipients: int,
    max_minutes: float | None = None,
    broker: str = "kafka",
    dry_run: bool = False,
) -> Report:
    began = time.monotonic()
    refusal = too_big(recipients, broker)
    if refusal is not None:
        print(f"memory bench: {refusal}")
        return Report("memory", [], "", {"recipients": recipients}, failures=[refusal])
    stack = Stack(
        run_dir,
        overrides={"tenants": {TENANT: {"dry_run": True}}} if dry_run else None,
        provider_options=ProviderSimulatorOptions(latency_ms=0, callback_delay_ms=0),
        optimove_max_recorded=1_000,
        broker_kind=broker,
    )
    async with stack:
        await stack.start(*SERVICES, *SIMULATORS)
        campaign = f"memory-{uuid.uuid4().hex[:8]}"
        progress = Progress(stack, campaign, recipients)
        names = [*SERVICES, *(f"sim-{name}" for name in SIMULATORS), BROKER]
        sampler = ResourceSampler(stack, names, INTERVAL_S, progress=lambda: float(progress.final))
        progress.start()
        sampler.start()
        tenant = f", {DRY_RUN_NOTE}" if dry_run else ""
        print(
            f"memory bench on {broker_info(broker)['name']}: {recipients:,} recipients{tenant} ...",
            flush=True,
        )
        campaign_started = time.monotonic()
        deadline = None if max_minutes is None else campaign_started + max_minutes * 60
        posted, refused = await feed(stack, progress, recipients, deadline)
        tally = await stack.wait_for_final_reports(campaign, posted, timeout_s=3600)
        campaign_s = time.monotonic() - campaign_started
        await sampler.stop()
        await progress.stop()
        stack.check_alive()
        disk = broker_disk_bytes(stack)
        # A dry run makes no provider call: the provider simulator must have seen no send.
        provider_sends = int((await stack.provider_sends())["total"]) if dry_run else None
    return report(
        posted,
        sampler.samples,
        names,
        tally,
        refused,
        campaign_s,
        began,
        recipients,
        broker_disk=disk,
        dry_run=dry_run,
        provider_sends=provider_sends,
    )


def report(
    recipients: int,
    samples: list[Sample],
    names: list[str],
    tally: dict[str, Any],
    refused: int,
    campaign_s: float,
    began: float,
    planned: int | None = None,
    broker_disk: int | None = None,
    dry_run: bool = False,
    provider_sends: int | None = None,
) -> Report:
    """The figures of a campaign of ``recipients`` (of ``planned``, when a time budget cut the
    posting short); ``broker_disk``: bytes in the broker's data folder at the end, if it has one.
    ``dry_run``: the tenant was a dry-run one (said in the summary, details and figures; every
    final report must carry the ``DryRun:`` mark, and ``provider_sends``, the sends the provider
    simulator received, must be 0)."""
    planned = planned or recipients
    header = ("process", "RSS at 10%", "at 50%", "at 100%", "peak", "peak / peak by 50%", "check")
    rows: list[list[object]] = []
    failures: list[str] = []
    figures: dict[str, Any] = {
        "recipients": recipients,
        "planned_recipients": planned,
        "campaign_seconds": round(campaign_s, 1),
        "msgs_per_s": round(recipients / campaign_s, 1),
        "rule": f"peak <= {GROWTH} x peak by 50% + {SLACK_MIB} MiB",
        "dry_run": dry_run,
        "final_reports": {
            "delivered": tally.get("delivered"),
            "failed": tally.get("failed"),
            "by_status": tally.get("final_by_status", {}),
        },
        "services": {},
    }
    if dry_run:
        figures["tenant"] = DRY_RUN_NOTE
        figures["provider_sends"] = provider_sends
    if broker_disk is not None:
        figures["broker_disk_mib"] = round(broker_disk / MIB, 1)
    for name in names:
        at = [rss_at(samples, name, mark * recipients) for mark in MARKS]
        peak = peak_until(samples, name, recipients)
        early = peak_until(samples, name, 0.5 * recipients)
        checked = name in SERVICES
        allowed = GROWTH * early + SLACK_MIB * MIB
        ok = not checked or peak <= allowed
        if not ok:
            failures.append(
                f"{name}: peak RSS {peak / MIB:.0f} MiB > {GROWTH} x {early / MIB:.0f} MiB "
                f"+ {SLACK_MIB} MiB: it grows with the campaign"
            )
        rows.append(
            [
                name,
                *(f"{value / MIB:.0f} MiB" for value in at),
                f"{peak / MIB:.0f} MiB",
                f"{peak / early:.2f}" if early else "-",
                ("ok" if ok else "GROWS") if checked else "not checked",
            ]
        )
        figures["services"][name] = {
            "rss_mib_at": {
                f"{mark:.0%}": round(value / MIB, 1) for mark, value in zip(MARKS, at, strict=True)
            },
            "peak_mib": round(peak / MIB, 1),
            "peak_by_50pct_mib": round(early / MIB, 1),
            "checked": checked,
        }
    if tally["final"] != recipients or tally["duplicates"] or refused:
        failures.append(
            f"{tally['final']:,} final reports for {recipients:,} recipients, "
            f"{tally['duplicates']} duplicates, {refused} batches refused"
        )
    if dry_run:
        unmarked = unmarked_final_reports(tally)
        if unmarked:
            failures.append(
                f"{unmarked:,} final reports without the DryRun: mark: "
                "the dry run was not in effect"
            )
        if provider_sends:
            failures.append(
                f"the provider simulator received {provider_sends:,} sends in a dry run"
            )
    tenant = f", {DRY_RUN_NOTE}" if dry_run else ""
    print(
        f"\nmemory: {recipients:,} recipients in {campaign_s / 60:.1f} min "
        f"({recipients / campaign_s:,.0f} msg/s), RSS sampled every {INTERVAL_S:g} s{tenant}"
    )
    outcomes = ", ".join(
        f"{status} {sub_status} {count:,}"
        for status, sub_statuses in figures["final_reports"]["by_status"].items()
        for sub_status, count in sub_statuses.items()
    )
    if outcomes:
        print(f"final reports: {outcomes}")
    print(text_table(header, rows))
    on_disk = ""
    if broker_disk is not None:
        on_disk = (
            f" The broker's data on disk at the end: {broker_disk / MIB:,.0f} MiB "
            f"({broker_disk / max(1, recipients):,.0f} bytes per message)."
        )
        print(on_disk.strip())
    services = [n for n in names if n in SERVICES]
    peaks = {n: figures["services"][n] for n in services}
    described = ", ".join(
        f"{n} {peaks[n]['peak_mib']:.0f} MiB "
        f"({peaks[n]['peak_mib'] / max(1.0, peaks[n]['peak_by_50pct_mib']):.2f}x by 50%)"
        for n in services
    )
    flat = "yes" if not failures else "NO"
    size = (
        f"{recipients:,}-recipient campaign"
        if recipients == planned
        else f"{recipients:,} recipients of a {planned:,}-recipient campaign cut by its time budget"
    )
    if dry_run:
        size += f" on a {DRY_RUN_NOTE}"
    outcome_line = f" Final reports: {outcomes}." if outcomes else ""
    dry_run_line = (
        f"**{DRY_RUN_NOTE}**: not a full run; the provider simulator received "
        f"{provider_sends or 0:,} sends.\n\n"
        if dry_run
        else ""
    )
    return Report(
        benchmark="memory",
        summary=[
            (
                f"peak RSS per service, {size} ({campaign_s / 60:.0f} min on this machine)",
                f"{described}; flat: {flat}",
            )
        ],
        details=dry_run_line
        + markdown_table(header, rows)
        + f"\n\nCheck: {figures['rule']}, per service. {recipients:,} recipients took "
        f"{campaign_s / 60:.1f} min ({recipients / campaign_s:,.0f} msg/s).{outcome_line}"
        f"{on_disk}",
        figures=figures,
        failures=failures,
        duration_s=time.monotonic() - began,
    )


def bench(options: Options) -> Report:
    recipients = recipients_from(options, "BENCH_MEMORY_RECIPIENTS", DEFAULT_RECIPIENTS)
    max_minutes = options.max_minutes
    if max_minutes is None and os.environ.get("BENCH_MEMORY_MAX_MINUTES"):
        max_minutes = float(os.environ["BENCH_MEMORY_MAX_MINUTES"])
    with tempfile.TemporaryDirectory(prefix="smsbridge-bench-memory-") as directory:
        return asyncio.run(
            run(Path(directory), recipients, max_minutes, options.broker, options.dry_run)
        )
