"""Sender benchmark: rate-limit accuracy, raw throughput, and scaling over instances.

The provider simulator and each sender instance run as processes of their own on a fresh broker;
the figures come from the simulator's receive timestamps (what the provider saw). Scenarios:
``limited`` (98% of a 1,000 msg/s limit, no window over it by 2%), ``unlimited``, and
``latency x1`` / ``latency x2`` (two instances reach 1.8x one).
Method: docs/benchmarks.md, "Sender".
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer

from bench.results import Options, Report, markdown_table, text_table
from bench.stack import PROVIDER, TENANT, Stack
from shared.config import Settings
from shared.contract.events import MessageContext, RecipientMessage
from shared.contract.ids import tenant_number_key
from shared.contract.topics import DISPATCHES, RECIPIENTS
from shared.kafka.clients import OutRecord, connection_kwargs
from shared.kafka.service import serve_until_signalled
from simulators.providers import ProviderSimulator

RATE_LIMIT = 1000.0
REQUIRED_SHARE_OF_LIMIT = 0.98
ALLOWED_WINDOW_EXCESS = 0.02
REQUIRED_SCALING = 1.8
# Numbers of the measured campaign and of the warm-up before it.
MEASURED_PREFIX = "4477"
WARM_UP_PREFIX = "4478"


@dataclass(frozen=True)
class Scenario:
    name: str
    messages: int
    instances: int = 1
    latency_ms: float = 100.0
    rate_limit_per_s: float = 0.0
    max_in_flight: int = 200


@dataclass(frozen=True)
class Result:
    scenario: Scenario
    sent: int
    duplicates: int
    rate: float  # messages per second, middle 80% of the run
    busiest_window: int  # most sends the provider received in any one-second window
    cold_busiest_window: int  # the same during the warm-up, from cold connections

    @property
    def per_instance(self) -> float:
        return self.rate / self.scenario.instances


def overrides(scenario: Scenario) -> dict[str, object]:
    """The scenario's settings over the stack's configuration."""
    return {
        "sender": {"runner": {"max_in_flight": 400, "max_poll_records": 500}},
        "providers": {
            PROVIDER: {
                "rate_limit_per_s": scenario.rate_limit_per_s,
                "max_in_flight": scenario.max_in_flight,
            }
        },
    }


def campaign(count: int, prefix: str = MEASURED_PREFIX) -> list[RecipientMessage]:
    """``count`` recipients whose numbers start with ``prefix`` (a warm-up uses another)."""
    now = datetime.now(UTC)
    return [
        RecipientMessage(
            context=MessageContext(
                tenant=TENANT,
                message_id=f"m-bench-{prefix}-{index}",
                batch_id="bench",
                mobile_number=f"{prefix}{index:08d}",
                metadata_json="{}",
            ),
            destination=f"+{prefix}{index:08d}",
            text="Bench message",
            sender_id="BENCH",
            accepted_at=now,
        )
        for index in range(count)
    ]


def dispatch_reader(settings: Settings) -> AIOKafkaConsumer:
    """A consumer of ``sms.dispatches`` from its beginning, for ``read_dispatched``."""
    return AIOKafkaConsumer(
        DISPATCHES.name,
        **connection_kwargs(settings.kafka),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )


async def read_dispatched(consumer: AIOKafkaConsumer, seen: set[str]) -> int:
    """One fetch of dispatch records: their message ids added to ``seen``; how many were new."""
    before = len(seen)
    batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
    for records in batches.values():
        for record in records:
            # Only the id: this process must not take CPU from the one measured.
            seen.add(orjson.loads(record.value or b"{}")["context"]["message_id"])
    return len(seen) - before


async def wait_for_dispatches(settings: Settings, expected: int, timeout_s: float) -> int:
    """Distinct messages with a dispatch record, once ``expected`` arrived (or the time ran out)."""
    consumer = dispatch_reader(settings)
    await consumer.start()
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < expected and time.monotonic() < deadline:
            await read_dispatched(consumer, seen)
    finally:
        await consumer.stop()
    return len(seen)


def busiest_window(timestamps: Sequence[float], window_s: float = 1.0) -> int:
    """Most timestamps inside any half-open window [t, t + window_s), wherever it starts."""
    ordered = sorted(timestamps)
    best, start = 0, 0
    for end, moment in enumerate(ordered):
        while ordered[start] <= moment - window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


def middle_rate(timestamps: Sequence[float]) -> float:
    ordered = sorted(timestamps)
    low, high = int(len(ordered) * 0.1), int(len(ordered) * 0.9)
    span = ordered[high] - ordered[low]
    return (high - low) / span if span > 0 else float("inf")


def publish_campaign(messages: Sequence[RecipientMessage]) -> list[OutRecord]:
    return [
        OutRecord(RECIPIENTS, tenant_number_key(m.context.tenant, m.destination), m)
        for m in messages
    ]


async def receive_times(stack: Stack) -> tuple[dict[str, list[float]], int]:
    """Receive timestamps of every accepted send by number prefix (measured, warm-up), and how
    many sends repeated a number."""
    body = await stack.provider_sends()
    times: dict[str, list[float]] = {MEASURED_PREFIX: [], WARM_UP_PREFIX: []}
    for send in body["sends"]:
        moment = datetime.fromisoformat(send["at"]).timestamp()
        times.setdefault(send["phone"][: len(MEASURED_PREFIX)], []).append(moment)
    duplicates = sum(count["count"] - 1 for count in body["counts"])
    return times, duplicates


async def run_scenario(scenario: Scenario, workdir: Path, broker: str = "kafka") -> Result:
    run_dir = workdir / scenario.name.replace(" ", "-")
    async with Stack(run_dir, overrides=overrides(scenario), broker_kind=broker) as s:
        # The tuned simulator below, in place of `smsbridge simulate providers`.
        port = s.providers_url.rsplit(":", 1)[1]
        await s.start_child(
            "sim-providers",
            [sys.executable, "-m", "bench.sender", "simulator", port, str(scenario.latency_ms)],
            ready_url=f"{s.providers_url}/_simulator/config",
        )
        # The campaign starts once every instance holds its partitions (and its share of the
        # rate limit, given one window after the assignment), as in a running service.
        await asyncio.gather(
            *(
                s.start_service("sender", instance=f"sender-{index}" if index else None)
                for index in range(scenario.instances)
            )
        )
        await asyncio.sleep(2.0)
        # A warm-up first, kept out of the figures: new connections and first-time code paths
        # on both sides delay the first sends unevenly (its busiest window is printed apart).
        warm_up = max(1, scenario.messages // 5)
        await s.publish(publish_campaign(campaign(warm_up, WARM_UP_PREFIX)))
        await wait_for_dispatches(s.settings, warm_up, timeout_s=600)
        await asyncio.sleep(1.5)  # no window holds both
        await s.publish(publish_campaign(campaign(scenario.messages)))
        expected = warm_up + scenario.messages
        done = await wait_for_dispatches(s.settings, expected, timeout_s=600)
        s.check_alive()
        if done < expected:
            raise RuntimeError(f"{scenario.name}: only {done} of {expected} done")
        times, duplicates = await receive_times(s)
    measured = times[MEASURED_PREFIX]
    return Result(
        scenario=scenario,
        sent=len(measured),
        duplicates=duplicates,
        rate=middle_rate(measured),
        busiest_window=busiest_window(measured),
        cold_busiest_window=busiest_window(times[WARM_UP_PREFIX]),
    )


SCENARIOS = (
    # A call holds its slot from booking to recorded outcome (~150 ms here): 1,000 msg/s needs
    # well over 150 slots.
    Scenario("limited", messages=15_000, rate_limit_per_s=RATE_LIMIT, max_in_flight=400),
    Scenario("unlimited", messages=15_000, max_in_flight=500),
    Scenario("latency x1", messages=3_000, max_in_flight=20),
    Scenario("latency x2", messages=6_000, instances=2, max_in_flight=20),
)


HEADER = (
    "scenario",
    "instances",
    "latency",
    "limit/s",
    "in flight",
    "sent",
    "dups",
    "msg/s",
    "per instance",
    "max 1 s",
)


def rows(results: dict[str, Result]) -> list[list[object]]:
    table: list[list[object]] = []
    for result in results.values():
        s = result.scenario
        table.append(
            [
                s.name,
                s.instances,
                f"{s.latency_ms:.0f} ms",
                f"{s.rate_limit_per_s:g}" if s.rate_limit_per_s else "-",
                s.max_in_flight,
                result.sent,
                result.duplicates,
                f"{result.rate:.1f}",
                f"{result.per_instance:.1f}",
                result.busiest_window,
            ]
        )
    return table


def report(results: dict[str, Result], duration_s: float) -> Report:
    """Print the table; the figures, the README's rows and the checks that failed."""
    print()
    print(text_table(HEADER, rows(results)))
    failures: list[str] = []
    limited = results["limited"]
    share = limited.rate / RATE_LIMIT
    excess = limited.busiest_window / RATE_LIMIT - 1
    cold_excess = limited.cold_busiest_window / RATE_LIMIT - 1
    allowed_window = math.floor(RATE_LIMIT * (1 + ALLOWED_WINDOW_EXCESS) + 1e-9)
    one, two = results["latency x1"], results["latency x2"]
    scaling = two.rate / one.rate
    unlimited = results["unlimited"].per_instance
    lines = [
        f"limited: {share:.1%} of the limit (need >= {REQUIRED_SHARE_OF_LIMIT:.0%})",
        f"limited: busiest one-second window {limited.busiest_window} = {excess:+.1%} over the "
        f"limit (allowed {ALLOWED_WINDOW_EXCESS:+.0%}); from cold, during the warm-up: "
        f"{limited.cold_busiest_window} = {cold_excess:+.1%}",
        f"unlimited: {unlimited:.0f} msg/s per instance",
        f"two instances / one on a latency-bound provider: {scaling:.2f}x "
        f"(need >= {REQUIRED_SCALING}x)",
    ]
    print()
    print("\n".join(lines))
    if share < REQUIRED_SHARE_OF_LIMIT:
        failures.append(f"limited run reached only {share:.1%} of the limit")
    if limited.busiest_window > allowed_window:
        failures.append(f"a one-second window exceeded the limit by {excess:.1%}")
    if scaling < REQUIRED_SCALING:
        failures.append(f"two instances reached only {scaling:.2f}x one")
    failures += [
        f"{r.scenario.name}: {r.duplicates} message(s) sent twice"
        for r in results.values()
        if r.duplicates
    ]
    duplicates = sum(r.duplicates for r in results.values())
    return Report(
        benchmark="sender",
        summary=[
            (
                "limited: 1 instance, 100 ms provider latency, account limit 1,000 msg/s",
                f"{limited.rate:,.0f} msg/s = {share:.1%} of the limit; busiest 1 s window "
                f"{limited.busiest_window:,} = {excess:+.1%} (allowed "
                f"{ALLOWED_WINDOW_EXCESS:+.0%}); {duplicates} duplicates",
            ),
            ("unlimited: 1 instance, 100 ms latency", f"{unlimited:,.0f} msg/s per instance"),
            (
                "scale-out: latency-bound provider (20 calls in flight per instance)",
                f"2 instances = {scaling:.2f}x one ({two.rate:,.0f} vs {one.rate:,.0f} msg/s)",
            ),
        ],
        details=markdown_table(HEADER, rows(results)) + "\n\n" + "\n".join(f"- {x}" for x in lines),
        figures={
            "scenarios": {
                name: {
                    **asdict(result.scenario),
                    "sent": result.sent,
                    "duplicates": result.duplicates,
                    "rate_per_s": round(result.rate, 1),
                    "per_instance_per_s": round(result.per_instance, 1),
                    "busiest_window": result.busiest_window,
                    "cold_busiest_window": result.cold_busiest_window,
                }
                for name, result in results.items()
            },
            "limited_share_of_limit": round(share, 4),
            "limited_window_excess": round(excess, 4),
            "scaling_two_over_one": round(scaling, 3),
        },
        failures=failures,
        duration_s=duration_s,
    )


async def run(scenarios: Sequence[Scenario] = SCENARIOS, broker: str = "kafka") -> Report:
    started = time.monotonic()
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="smsbridge-bench-sender-") as workdir:
        for scenario in scenarios:
            print(f"sender bench: {scenario.name} ...", flush=True)
            results[scenario.name] = await run_scenario(scenario, Path(workdir), broker)
    return report(results, time.monotonic() - started)


def bench(options: Options) -> Report:
    return asyncio.run(run(broker=options.broker))


async def serve_simulator(port: int, latency_ms: float) -> None:
    """The provider simulator, tuned to be a faithful clock rather than a realistic peer.

    Its receive timestamps are the measurement, so its own pauses must not bunch them: no log
    line per send, and no garbage collection (a scenario lives for seconds; its record of every
    send would make each collection a stop-the-world pause of tens to hundreds of milliseconds).
    Delivery reports are planned an hour out: nobody listens for them here.
    """
    logging.basicConfig(level=logging.WARNING)
    simulator = ProviderSimulator(
        "127.0.0.1", port, latency_ms=latency_ms, callback_delay_ms=3_600_000, callback_attempts=1
    )
    gc.collect()
    gc.disable()
    await serve_until_signalled(simulator)


if __name__ == "__main__":
    # `python -m bench.sender simulator PORT LATENCY_MS`: the tuned simulator of run_scenario.
    asyncio.run(serve_simulator(int(sys.argv[2]), float(sys.argv[3])))
