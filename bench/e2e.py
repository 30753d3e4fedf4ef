"""End-to-end benchmark: a campaign through every service and both simulators.

Every service and both simulators run as processes of their own (``bench.stack``) on a fresh
broker, the provider simulator answering at once. Two phases: throughput (messages per second from
the first post to the last final report, CPU per process) and a latency search: steady runs at
rates chosen by ``bench.latency_search`` find the highest rate whose p99 from acceptance to final
report stays within ``LATENCY_TARGET_P99_S`` (issue 19: at least ``LATENCY_TARGET_RATE``).
``--compare-brokers`` repeats the throughput phase on the other broker. Method:
docs/benchmarks.md, "End to end".
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from bench import load
from bench.latency_search import SearchRules, Tried, best_rate, next_rate
from bench.profiling import Profiler, hot_spots
from bench.results import (
    RESULTS_DIR,
    Options,
    Report,
    broker_info,
    markdown_table,
    percentile,
    text_table,
)
from bench.stack import (
    BROKER,
    OPTIMOVE_SIMULATOR,
    PROVIDER_SIMULATOR,
    SERVICES,
    SIMULATORS,
    ProviderSimulatorOptions,
    Stack,
    process_cpu_seconds,
    process_syscalls,
)

DEFAULT_RECIPIENTS = 100_000
BATCH_SIZE = 1_000
CLIENTS = 4
STEADY_BATCH = 100
STEADY_S = 15.0  # one try of the latency search
# Issue 19: at this rate or more, acceptance to final report within this p99.
LATENCY_TARGET_RATE = 700.0
LATENCY_TARGET_P99_S = 1.5
SEARCH = SearchRules(p99_limit_s=LATENCY_TARGET_P99_S)
WARM_UP = 2_000
SETTLE_S = 5.0  # of the latency phase, left out of its percentiles
# The services a message passes through (the campaigns service only counts them).
PROFILED = tuple(name for name in SERVICES if name != "campaigns")

# The OTPIQ account may send as fast as the simulator answers; the consumers keep their defaults.
OVERRIDES: dict[str, Any] = {}


@dataclass(frozen=True)
class Throughput:
    recipients: int
    first_post: float
    all_accepted: float
    last_final: float
    cpu: dict[str, float]  # CPU seconds per process during the phase
    syscalls: dict[str, int]  # read and write system calls per process during the phase
    tally: dict[str, Any]
    errors: int

    @property
    def seconds(self) -> float:
        return self.last_final - self.first_post

    @property
    def rate(self) -> float:
        return self.recipients / self.seconds

    @property
    def accept_rate(self) -> float:
        return self.recipients / (self.all_accepted - self.first_post)

    def cpu_ms_per_message(self, names: Sequence[str] | None = None) -> float:
        """CPU ms per message of the named processes (every process when None)."""
        chosen = self.cpu if names is None else {n: self.cpu.get(n, 0.0) for n in names}
        return sum(chosen.values()) * 1000 / self.recipients


@dataclass(frozen=True)
class Latency:
    rate: float  # the rate asked for
    seconds: float  # how long it was asked for
    recipients: int
    posted_rate: float  # recipients/s actually posted
    final_rate: float  # final reports/s over the same stretch
    to_first: list[float]  # seconds, sorted
    to_final: list[float]
    tally: dict[str, Any]
    errors: int

    @property
    def keeps_up(self) -> bool:
        return self.final_rate >= 0.97 * self.posted_rate

    @property
    def tried(self) -> Tried:
        """What the latency search decides on."""
        return Tried(self.rate, percentile(self.to_final, 0.99), self.keeps_up)

    @property
    def passed(self) -> bool:
        return SEARCH.passed(self.tried)


T = TypeVar("T")


def per_process(stack: Stack, of_pid: Callable[[int], T]) -> dict[str, T]:
    """``of_pid`` of every running child and of the broker, by name."""
    pids = {name: stack.pid(name) for name in stack.children}
    if stack.broker_pid is not None:
        pids[BROKER] = stack.broker_pid
    return {name: of_pid(pid) for name, pid in pids.items() if pid is not None}


def cpu_now(stack: Stack) -> dict[str, float]:
    now = per_process(stack, process_cpu_seconds)
    now["bench"] = time.process_time()
    return now


async def post_all(
    stack: Stack, batches: Sequence[load.Batch], clients: int
) -> tuple[list[load.Posted], int]:
    """Post every batch with ``clients`` concurrent clients; a 503 is retried after a pause, as
    Optimove would; (answers, batches refused for good)."""
    queue: asyncio.Queue[load.Batch] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)
    answers: list[load.Posted] = []
    errors = 0
    timeout = aiohttp.ClientTimeout(total=120)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while not queue.empty():
            batch = queue.get_nowait()
            for _ in range(10):
                posted = await load.post(session, stack.campaign_url, batch)
                if posted.accepted:
                    answers.append(posted)
                    break
                print(f"  ingress answered {posted.status}: {posted.detail}")
                await asyncio.sleep(1.0)
            else:
                errors += 1

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return answers, errors


def _progress(label: str, expected: int) -> Any:
    last = [0.0]

    def show(tally: Any) -> None:
        if time.monotonic() - last[0] >= 10:
            last[0] = time.monotonic()
            print(f"  {label}: {tally['final']:,} of {expected:,} final reports", flush=True)

    return show


async def throughput(
    stack: Stack, recipients: int, profile_dir: Path | None
) -> tuple[Throughput, dict[str, str]]:
    campaign = f"e2e-{uuid.uuid4().hex[:8]}"
    batches = load.build_batches(campaign, recipients, BATCH_SIZE, first_index=WARM_UP)
    profiler = Profiler(stack, PROFILED, profile_dir) if profile_dir is not None else None
    if profiler is not None:
        await profiler.start()
    before, calls_before = cpu_now(stack), per_process(stack, process_syscalls)
    started = time.time()
    answers, errors = await post_all(stack, batches, CLIENTS)
    all_accepted = time.time()
    print(
        f"  accepted {recipients:,} recipients in {all_accepted - started:.1f} s; "
        "waiting for the final reports ...",
        flush=True,
    )
    tally = await stack.wait_for_final_reports(
        campaign,
        recipients,
        timeout_s=max(600.0, recipients / 50),
        on_progress=_progress("throughput", recipients),
    )
    after, calls_after = cpu_now(stack), per_process(stack, process_syscalls)
    hot: dict[str, str] = {}
    if profiler is not None:
        for name, path in (await profiler.stop()).items():
            hot[name] = hot_spots(path).describe()
    times = await stack.optimove_report_times(campaign)
    last_final = max(times["first_final"].values())
    cpu = {name: round(after[name] - before.get(name, 0.0), 2) for name in after}
    calls = {name: calls_after[name] - calls_before.get(name, 0) for name in calls_after}
    del answers
    phase = Throughput(recipients, started, all_accepted, last_final, cpu, calls, tally, errors)
    return phase, hot


async def steady_latency(stack: Stack, rate: float, seconds: float, first_index: int) -> Latency:
    campaign = f"e2e-steady-{uuid.uuid4().hex[:8]}"
    recipients = max(STEADY_BATCH, round(rate * seconds / STEADY_BATCH) * STEADY_BATCH)
    batches = load.build_batches(campaign, recipients, STEADY_BATCH, first_index=first_index)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        answers = await load.post_paced(session, stack.campaign_url, batches, rate)
    errors = sum(not posted.accepted for posted in answers)
    tally = await stack.wait_for_final_reports(
        campaign,
        recipients - errors * STEADY_BATCH,
        timeout_s=max(600.0, recipients / 20),
        on_progress=_progress(f"latency at {rate:,.0f}/s", recipients),
    )
    times = await stack.optimove_report_times(campaign)
    first, final = times["first_report"], times["first_final"]
    began = answers[0].started
    # A short run (a small --recipients) keeps three quarters of itself.
    settle_s = min(SETTLE_S, seconds / 4)
    to_first: list[float] = []
    to_final: list[float] = []
    for posted in answers:
        if not posted.accepted or posted.started - began < settle_s:
            continue
        for message_id in posted.batch.message_ids:
            if message_id in first:
                to_first.append(first[message_id] - posted.answered)
            if message_id in final:
                to_final.append(final[message_id] - posted.answered)
    measured = [p for p in answers if p.started - began >= settle_s]
    span = measured[-1].started - measured[0].started
    posted_rate = sum(p.batch.recipients for p in measured[:-1]) / span if span > 0 else 0.0
    ids = {m for p in measured for m in p.batch.message_ids}
    finals = sorted(final[m] for m in ids if m in final)
    final_span = percentile(finals, 0.99) - percentile(finals, 0.01)
    final_rate = 0.98 * len(finals) / final_span if final_span > 0 else 0.0
    return Latency(
        rate=rate,
        seconds=seconds,
        recipients=recipients,
        posted_rate=posted_rate,
        final_rate=final_rate,
        to_first=sorted(to_first),
        to_final=sorted(to_final),
        tally=tally,
        errors=errors,
    )


async def latency_search(
    stack: Stack, throughput_rate: float, seconds: float, first_index: int
) -> list[Latency]:
    """Steady runs, each a campaign of its own at the rate ``bench.latency_search`` picks from
    the runs before it, until it is done; every run, in the order run."""
    steady: list[Latency] = []
    rate = next_rate([], throughput_rate, SEARCH)
    while rate is not None:
        print(
            f"e2e bench: latency at {rate:,.0f}/s for {seconds:g} s "
            f"(try {len(steady) + 1} of at most {SEARCH.max_tries}) ...",
            flush=True,
        )
        lat = await steady_latency(stack, rate, seconds, first_index)
        first_index += lat.recipients
        steady.append(lat)
        verdict = "passed" if lat.passed else "failed"
        behind = "" if lat.keeps_up else ", falls behind"
        print(f"  p99 to final report {_ms(lat.tried.p99_s)}{behind}: {verdict}", flush=True)
        rate = next_rate([done.tried for done in steady], throughput_rate, SEARCH)
    return steady


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


@dataclass
class BrokerRun:
    """What one stack (one broker) measured."""

    broker: dict[str, str]  # bench.results.broker_info
    throughput: Throughput
    steady: list[Latency]
    hot: dict[str, str]
    rss: dict[str, int]


async def on_broker(
    run_dir: Path, recipients: int, broker: str, profile_dir: Path | None, latency: bool
) -> BrokerRun:
    """A fresh stack on ``broker``: warm-up, the throughput phase, and the latency phases when
    ``latency``."""
    info = broker_info(broker)
    stack = Stack(
        run_dir,
        overrides=OVERRIDES,
        provider_options=ProviderSimulatorOptions(latency_ms=0, callback_delay_ms=0),
        optimove_max_recorded=1_000,
        broker_kind=broker,
    )
    async with stack:
        await stack.start(*SERVICES, *SIMULATORS)
        # A short warm-up, kept out of the figures: connections, first-time code paths.
        warm_up = f"warm-{uuid.uuid4().hex[:6]}"
        await post_all(stack, load.build_batches(warm_up, WARM_UP, 500), 2)
        await stack.wait_for_final_reports(warm_up, WARM_UP, 300)
        print(f"e2e bench on {info['name']}: throughput, {recipients:,} recipients ...", flush=True)
        phase1, hot = await throughput(stack, recipients, profile_dir)
        # A short run (a small --recipients) keeps its steady runs short too.
        seconds = min(STEADY_S, max(5.0, recipients / 1_000))
        steady: list[Latency] = []
        if latency:
            steady = await latency_search(stack, phase1.rate, seconds, WARM_UP + recipients)
        stack.check_alive()
        rss = {name: stack.rss(name) for name in stack.children}
        if stack.broker_pid is not None:
            rss[BROKER] = stack.rss(BROKER)
    return BrokerRun(info, phase1, steady, hot, rss)


async def run(
    run_dir: Path,
    recipients: int,
    profile: bool,
    broker: str = "kafka",
    compare_brokers: bool = False,
) -> Report:
    began = time.monotonic()
    profile_dir: Path | None = None
    if profile:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        profile_dir = RESULTS_DIR / "profiles" / f"e2e-{stamp}"
    main = await on_broker(run_dir / broker, recipients, broker, profile_dir, latency=True)
    runs = [main]
    if compare_brokers:
        # One stack at a time: the two brokers never compete for the machine's cores.
        other = "tansu" if broker == "kafka" else "kafka"
        runs.append(await on_broker(run_dir / other, recipients, other, None, latency=False))
    return report(
        main.throughput,
        main.steady,
        main.hot,
        main.rss,
        profile_dir,
        time.monotonic() - began,
        compared=runs if compare_brokers else (),
    )


LATENCY_HEADER = (
    "try",
    "rate asked",
    "recipients",
    "posted/s",
    "final reports/s",
    "kept up",
    "to Sent p50 / p99",
    "to final p50",
    "to final p99",
    f"p99 <= {LATENCY_TARGET_P99_S:g} s",
)


def _latency_table(steady: Sequence[Latency]) -> list[list[str]]:
    """One row per try of the latency search, in the order tried."""
    return [
        [
            str(number),
            f"{lat.rate:,.0f}/s",
            f"{lat.recipients:,}",
            f"{lat.posted_rate:,.0f}",
            f"{lat.final_rate:,.0f}",
            "yes" if lat.keeps_up else "NO: falls behind",
            _p50_p99(lat.to_first),
            _ms(percentile(lat.to_final, 0.5)),
            _ms(lat.tried.p99_s),
            "yes" if lat.passed else "no",
        ]
        for number, lat in enumerate(steady, start=1)
    ]


def _tries(steady: Sequence[Latency]) -> str:
    """The rates tried, in order, each with its p99 (the README's one-line account)."""
    return "; ".join(
        f"{lat.rate:,.0f}/s: p99 {_ms(lat.tried.p99_s)}{'' if lat.keeps_up else ', falls behind'}"
        for lat in steady
    )


def _p50_p99(values: list[float]) -> str:
    return f"{_ms(percentile(values, 0.5))} / {_ms(percentile(values, 0.99))}"


def _latency_figures(lat: Latency) -> dict[str, Any]:
    return {
        "rate_per_s": lat.rate,
        "seconds": lat.seconds,
        "recipients": lat.recipients,
        "posted_per_s": round(lat.posted_rate, 1),
        "final_reports_per_s": round(lat.final_rate, 1),
        "keeps_up": lat.keeps_up,
        "passed": lat.passed,
        "to_first_p50_ms": round(percentile(lat.to_first, 0.5) * 1000, 1),
        "to_first_p99_ms": round(percentile(lat.to_first, 0.99) * 1000, 1),
        "to_final_p50_ms": round(percentile(lat.to_final, 0.5) * 1000, 1),
        "to_final_p99_ms": round(percentile(lat.to_final, 0.99) * 1000, 1),
        "to_final_mean_ms": round(statistics.fmean(lat.to_final) * 1000, 1)
        if lat.to_final
        else None,
    }


def report(
    phase1: Throughput,
    steady: list[Latency],
    hot: dict[str, str],
    rss: dict[str, int],
    profile_dir: Path | None,
    duration_s: float,
    compared: Sequence[BrokerRun] = (),
) -> Report:
    """The figures of the main broker's phases, and ``compared`` (every broker's run, the main
    one first) when the brokers were compared."""
    failures: list[str] = []
    phases = [("throughput", phase1.tally, phase1.recipients, phase1.errors)] + [
        (f"latency at {lat.rate:,.0f}/s", lat.tally, lat.recipients, lat.errors) for lat in steady
    ]
    for other in compared[1:]:
        done = other.throughput
        label = f"throughput on {other.broker['name']}"
        phases.append((label, done.tally, done.recipients, done.errors))
    for label, tally, expected, errors in phases:
        if tally["final"] != expected or tally["duplicates"] or errors:
            failures.append(
                f"{label}: {tally['final']:,} final reports for {expected:,} recipients, "
                f"{tally['duplicates']} duplicates, {errors} batches refused"
            )
        if tally["delivered"] != tally["final"]:
            failures.append(f"{label}: {tally['failed']} reported failed: {tally}")
    per_k = 1000 / phase1.recipients
    cpu_rows = [
        [
            name,
            f"{seconds:.1f}",
            f"{seconds * per_k:.2f}",
            f"{seconds / phase1.seconds:.0%}",
            f"{phase1.syscalls[name] / phase1.recipients:.1f}" if name in phase1.syscalls else "",
        ]
        for name, seconds in sorted(phase1.cpu.items(), key=lambda item: -item[1])
    ]
    cpu_header = (
        "process",
        "CPU s",
        "CPU s per 1,000 msgs",
        "share of one core",
        "system calls per msg",
    )
    total_cpu = sum(phase1.cpu.values())
    simulators_ms = phase1.cpu_ms_per_message([OPTIMOVE_SIMULATOR, PROVIDER_SIMULATOR])
    services_per_simulators = phase1.cpu_ms_per_message(SERVICES) / max(1e-9, simulators_ms)
    rows = [
        ("recipients (throughput phase)", f"{phase1.recipients:,}"),
        ("all accepted by ingress after", f"{phase1.all_accepted - phase1.first_post:.1f} s"),
        ("ingress acceptance rate", f"{phase1.accept_rate:,.0f} recipients/s"),
        ("last final report after", f"{phase1.seconds:.1f} s"),
        ("end-to-end rate", f"{phase1.rate:,.0f} msg/s"),
        ("CPU, all processes", f"{total_cpu:.0f} s = {total_cpu / phase1.seconds:.2f} cores"),
        (
            "CPU per message, all processes",
            f"{total_cpu * per_k:.1f} ms: {os.cpu_count()} cores sustain "
            f"~{(os.cpu_count() or 1) * 1000 / max(0.001, total_cpu * per_k):,.0f} msg/s",
        ),
        ("CPU per message, the six services", f"{phase1.cpu_ms_per_message(SERVICES):.1f} ms"),
        ("CPU per message, the broker", f"{phase1.cpu_ms_per_message([BROKER]):.1f} ms"),
        # The machine's speed moves every process's figure alike; our code moves this one.
        ("CPU of the six services per CPU of the simulators", f"{services_per_simulators:.2f}"),
    ]
    found = best_rate([lat.tried for lat in steady], SEARCH)
    target = f"issue 19: >= {LATENCY_TARGET_RATE:,.0f} msg/s"
    if steady:
        rows.append(
            (
                f"highest steady rate with acceptance -> final report p99 <= "
                f"{LATENCY_TARGET_P99_S:g} s",
                f"{found:,.0f} msg/s ({target})"
                if found is not None
                else f"none of the {len(steady)} rates tried ({target})",
            )
        )
        if found is None or found < LATENCY_TARGET_RATE:
            failures.append(
                f"latency: the highest steady rate with p99 <= {LATENCY_TARGET_P99_S:g} s is "
                + (f"{found:,.0f} msg/s" if found is not None else "none of those tried")
                + f", below issue 19's {LATENCY_TARGET_RATE:,.0f} msg/s ({_tries(steady)})"
            )
    latency_table = _latency_table(steady)
    print(f"\ne2e: all services + simulators, zero provider latency, {os.cpu_count()} cores")
    print(text_table(("figure", "value"), rows))
    print()
    print(text_table(cpu_header, cpu_rows))
    if steady:
        print(f"\nlatency search, steady runs of {steady[0].seconds:g} s, in the order tried")
        print(text_table(LATENCY_HEADER, latency_table))
    for name, text in hot.items():
        print(f"\nprofile of {name} (py-spy, throughput phase):\n{text}")
    details = (
        markdown_table(("figure", "value"), rows)
        + "\n\nCPU time per process during the throughput phase:\n\n"
        + markdown_table(cpu_header, cpu_rows)
    )
    if steady:
        details += (
            f"\n\nLatency search: steady runs of {steady[0].seconds:g} s, each a campaign of its "
            "own, in the order tried; p50/p99 from acceptance (ingress's 202) to the report at "
            "the Optimove simulator:\n\n" + markdown_table(LATENCY_HEADER, latency_table)
        )
    if profile_dir is not None:
        details += f"\n\nProfiled with py-spy (its overhead included); stacks in {profile_dir}."
    if compared:
        header, table = _comparison(compared)
        print(f"\nthroughput phase, {phase1.recipients:,} recipients, on each broker in turn")
        print(text_table(header, table))
        details += (
            "\n\nThe throughput phase on each broker, one after the other in this run "
            "(CPU ms per message):\n\n" + markdown_table(header, table)
        )
    summary = [
        (
            f"{phase1.recipients:,}-recipient campaign, all services + simulators, zero "
            "provider latency",
            f"{phase1.rate:,.0f} msg/s from first post to last final report "
            f"({phase1.seconds:.0f} s; ingress accepted all in "
            f"{phase1.all_accepted - phase1.first_post:.0f} s); "
            f"{total_cpu * per_k:.1f} CPU ms per message over all processes",
        )
    ]
    if steady:
        at_best = next((lat for lat in steady if lat.rate == found), None)
        figure = f"none of the rates tried ({target})"
        if at_best is not None:
            figure = (
                f"{at_best.rate:,.0f} msg/s ({target}); there p50 / p99 "
                f"{_p50_p99(at_best.to_final)} (to Sent: {_p50_p99(at_best.to_first)})"
            )
        summary.append(
            (
                "latency: highest steady rate with acceptance to final report p99 <= "
                f"{LATENCY_TARGET_P99_S:g} s ({len(steady)} runs of {steady[0].seconds:g} s)",
                f"{figure}; tried {_tries(steady)}",
            )
        )
    if compared:
        summary.append(
            (
                "throughput phase on each broker, one after the other in one run",
                "; ".join(
                    f"{r.broker['name']}: {r.throughput.rate:,.0f} msg/s, CPU ms per message "
                    f"{r.throughput.cpu_ms_per_message():.1f} all / "
                    f"{r.throughput.cpu_ms_per_message(SERVICES):.1f} services / "
                    f"{r.throughput.cpu_ms_per_message([BROKER]):.1f} broker"
                    for r in compared
                ),
            )
        )
    return Report(
        benchmark="e2e",
        summary=summary,
        details=details,
        figures={
            "recipients": phase1.recipients,
            "batch_size": BATCH_SIZE,
            "clients": CLIENTS,
            "seconds_to_last_final": round(phase1.seconds, 2),
            "seconds_to_all_accepted": round(phase1.all_accepted - phase1.first_post, 2),
            "msgs_per_s": round(phase1.rate, 1),
            "cpu_seconds": phase1.cpu,
            "read_write_syscalls": phase1.syscalls,
            "cpu_ms_per_message": round(total_cpu * per_k, 2),
            "cpu_ms_per_message_services": round(phase1.cpu_ms_per_message(SERVICES), 2),
            "cpu_ms_per_message_broker": round(phase1.cpu_ms_per_message([BROKER]), 2),
            "rss_bytes_at_end": rss,
            "steady": [_latency_figures(lat) for lat in steady],
            "latency_search": {
                "target_rate_per_s": LATENCY_TARGET_RATE,
                "target_p99_ms": LATENCY_TARGET_P99_S * 1000,
                "max_rate_per_s": found,
                "tries": len(steady),
                "max_tries": SEARCH.max_tries,
                "start_share_of_throughput": SEARCH.start_share,
            },
            "profiled": profile_dir is not None,
            "simulators": [OPTIMOVE_SIMULATOR, PROVIDER_SIMULATOR],
            "by_broker": {r.broker["kind"]: _broker_figures(r) for r in compared},
        },
        failures=failures,
        duration_s=duration_s,
    )


def _comparison(compared: Sequence[BrokerRun]) -> tuple[tuple[str, ...], list[list[str]]]:
    header = (
        "broker",
        "msg/s end to end",
        "last final report after",
        "CPU ms/msg, all processes",
        "the six services",
        "the broker alone",
    )
    rows = [
        [
            r.broker["name"],
            f"{r.throughput.rate:,.0f}",
            f"{r.throughput.seconds:.1f} s",
            f"{r.throughput.cpu_ms_per_message():.2f}",
            f"{r.throughput.cpu_ms_per_message(SERVICES):.2f}",
            f"{r.throughput.cpu_ms_per_message([BROKER]):.2f}",
        ]
        for r in compared
    ]
    return header, rows


def _broker_figures(run: BrokerRun) -> dict[str, Any]:
    done = run.throughput
    return {
        "broker": run.broker,
        "recipients": done.recipients,
        "msgs_per_s": round(done.rate, 1),
        "seconds_to_last_final": round(done.seconds, 2),
        "cpu_seconds": done.cpu,
        "cpu_ms_per_message": round(done.cpu_ms_per_message(), 2),
        "cpu_ms_per_message_services": round(done.cpu_ms_per_message(SERVICES), 2),
        "cpu_ms_per_message_broker": round(done.cpu_ms_per_message([BROKER]), 2),
    }


def recipients_from(options: Options, env: str, default: int) -> int:
    if options.recipients is not None:
        return options.recipients
    return int(os.environ.get(env, default))


def bench(options: Options) -> Report:
    recipients = recipients_from(options, "BENCH_E2E_RECIPIENTS", DEFAULT_RECIPIENTS)
    with tempfile.TemporaryDirectory(prefix="smsbridge-bench-e2e-") as directory:
        return asyncio.run(
            run(
                Path(directory),
                recipients,
                options.profile,
                options.broker,
                compare_brokers=options.compare_brokers,
            )
        )
