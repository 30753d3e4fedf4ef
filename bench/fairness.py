"""Fairness benchmark: a small campaign and auto replies beside a big campaign on one account.

One provider account limited to 500 msg/s, 100 ms provider latency, shared by tenants A and B.
Through ingress (signed Optimove requests over HTTP): a 200,000-recipient campaign for A, 10 s
later a 2,000-recipient campaign for B, and 100 auto replies spread over the run. From the
provider simulator's receive timestamps and ingress's 202s: each campaign's start delay and
completion time, the auto replies' wait, the busiest one-second window, sends per message.
Method and targets: docs/benchmarks.md, "Fairness".
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import load
from bench.closed_window import ClosedWindow, closed_window
from bench.e2e import cpu_now
from bench.memory import GROWTH, MIB, SLACK_MIB
from bench.profiling import Profiler, hot_spots
from bench.results import RESULTS_DIR, Options, Report, markdown_table, percentile, text_table
from bench.sender import ALLOWED_WINDOW_EXCESS, dispatch_reader, read_dispatched
from bench.stack import (
    AGGREGATOR_API_KEY,
    PROVIDER,
    SENDER_ID,
    TENANT,
    TENANT_SECRET,
    ResourceSampler,
    Stack,
)
from shared.kafka.service import serve_until_signalled
from simulators.campaign_load import campaign_metadata, signed_headers
from simulators.providers import PlannedCallback, ProviderSimulator

RATE_LIMIT = 500.0
LATENCY_MS = 100.0
DEFAULT_BIG = 200_000
DEFAULT_SMALL = 2_000
DEFAULT_REPLIES = 100
GAP_S = 10.0  # from A's first post to B's
# The account's allowance for transit jitter ([providers.X] rate_limit_jitter_s): the provider
# stamps each send by its own clock. Here the broker, the sender, ingress, the simulator and this
# process share two cores: each of the sender's and the simulator's event loops stalled for
# 30-100 ms about once a second (measured), holding sends back and letting them arrive together.
# With the default 10 ms the provider's busiest second was 2-4% over the limit while the sender's
# own record of its sends never was. An operator sets it from their network's jitter the same way.
JITTER_ALLOWANCE_S = 0.1
BATCH_SIZE = 1_000
CLIENTS = {"A": 4, "B": 2}
WARM_UP = 200
# Targets (issue 17): B starts within START_TARGET_S and is done within COMPLETION_FACTOR times
# its fair-share time; auto replies wait at most REPLY_P99_TARGET_S at the 99th percentile.
START_TARGET_S = 1.0
COMPLETION_FACTOR = 1.5
REPLY_P99_TARGET_S = 1.0
# Once everything was posted, a run with no new dispatch for this long has lost something.
STALL_S = 120.0

PROFILED = ("sender", "ingress", "sim-providers")

TENANT_A = TENANT
TENANT_B = "bench-b"
TENANT_B_SECRET = "bench-b-shared-secret"
TENANT_B_AGGREGATOR_KEY = "bench-b-aggregator-key"
# Each kind of traffic has its own block of numbers (bench.load.number: a million per block),
# so that the provider's record of a send says which it was.
BLOCKS = {"A": 0, "B": 1, "replies": 2, "warm-up": 3}
_BLOCK_OF_PREFIX = {
    "".join(filter(str.isdigit, load.number(index * 1_000_000)))[-10:-6]: name
    for name, index in BLOCKS.items()
}


@dataclass(frozen=True)
class Tenant:
    name: str
    secret: str
    aggregator_api_key: str


A = Tenant(TENANT_A, TENANT_SECRET, AGGREGATOR_API_KEY)
B = Tenant(TENANT_B, TENANT_B_SECRET, TENANT_B_AGGREGATOR_KEY)


@dataclass(frozen=True)
class Sizes:
    big: int = DEFAULT_BIG
    small: int = DEFAULT_SMALL
    replies: int = DEFAULT_REPLIES

    def __post_init__(self) -> None:
        if not (1 <= self.big <= 1_000_000 and 1 <= self.small <= 1_000_000):
            raise ValueError("campaign sizes run from 1 to 1,000,000")
        if not 0 <= self.replies <= 1_000_000:
            raise ValueError("auto replies run from 0 to 1,000,000")

    @property
    def fair_share_s(self) -> float:
        """B's time at its fair share: half the account's rate (two tenants, equal weights)."""
        return self.small / (RATE_LIMIT / 2)


def overrides() -> dict[str, Any]:
    """The account's limit, and tenant B beside the stack's tenant (A) on the same route."""
    return {
        "providers": {
            PROVIDER: {"rate_limit_per_s": RATE_LIMIT, "rate_limit_jitter_s": JITTER_ALLOWANCE_S}
        },
        "tenants": {
            TENANT_B: {
                # No reporter runs in this benchmark: nothing is ever posted there.
                "optimove_base_url": f"http://127.0.0.1:9/{TENANT_B}",
                "api_token": "bench-b-api-token",
                "secret_key": TENANT_B_SECRET,
                "aggregator_api_key": TENANT_B_AGGREGATOR_KEY,
                "default_sender_id": SENDER_ID,
                "default_region": "GB",
                "routes": [{"provider": PROVIDER}],
            }
        },
    }


# -- requests --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    tenant: Tenant
    body: bytes  # exactly what is signed and posted
    recipients: int
    reply: int | None = None  # the auto reply's index


@dataclass(frozen=True)
class Answer:
    request: Request
    started: float  # time.time() when the first attempt was sent
    accepted: float | None  # time.time() of the 202; None when ingress never accepted it


def campaign_requests(
    tenant: Tenant, campaign_id: str, group: str, count: int, batch_size: int = BATCH_SIZE
) -> list[Request]:
    """The campaign as signed Campaign Transmission requests, numbers from ``group``'s block."""
    metadata = campaign_metadata(tenant.name, campaign_id, 0)
    first = BLOCKS[group] * 1_000_000
    requests: list[Request] = []
    for number, start in enumerate(range(first, first + count, batch_size)):
        indexes = range(start, min(start + batch_size, first + count))
        body = {
            "batchId": f"{campaign_id}-b{number:05d}",
            "metadata": metadata,
            "recipients": [
                {"message": load.text(i), "mobileNumber": load.number(i), "customerId": f"c-{i}"}
                for i in indexes
            ],
            "requestId": f"{campaign_id}-r{number:05d}",
            "senderId": SENDER_ID,
        }
        requests.append(Request(tenant, orjson.dumps(body), len(indexes)))
    return requests


def auto_reply(tenant: Tenant, index: int) -> Request:
    """An auto reply (optimove-sms-api.md §3.4): ``batchId``, ``brandId`` and ``campaignId`` are
    ``""``, and no ``requestId``; its words differ from every other's, so it is a new message."""
    metadata = {**campaign_metadata(tenant.name, "", 0), "brandId": "", "campaignId": ""}
    body = {
        "batchId": "",
        "metadata": metadata,
        "recipients": [
            {
                "message": f"Thanks for your message ({index}). You will get no more messages.",
                "mobileNumber": load.number(BLOCKS["replies"] * 1_000_000 + index),
                "customerId": "",
            }
        ],
        "senderId": SENDER_ID,
    }
    return Request(tenant, orjson.dumps(body), 1, reply=index)


async def post(session: aiohttp.ClientSession, ingress_url: str, request: Request) -> Answer:
    """POST until ingress answers 202 (a refusal is retried after a pause, as Optimove would)."""
    url = f"{ingress_url}/optimove/{request.tenant.name}/campaigns"
    headers = signed_headers(request.body, request.tenant.secret, request.tenant.aggregator_api_key)
    started = time.time()
    for _ in range(10):
        try:
            async with session.post(url, data=request.body, headers=headers) as response:
                detail = (await response.read())[:200].decode("utf-8", "replace")
                if response.status == 202:
                    return Answer(request, started, time.time())
                print(f"  ingress answered {response.status}: {detail}", flush=True)
        except (aiohttp.ClientError, TimeoutError) as exc:
            print(f"  posting failed: {type(exc).__name__}: {exc}", flush=True)
        await asyncio.sleep(1.0)
    return Answer(request, started, None)


async def post_all(
    session: aiohttp.ClientSession, ingress_url: str, requests: Sequence[Request], clients: int
) -> list[Answer]:
    """Every request, ``clients`` at a time, in order."""
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    answers: list[Answer] = []

    async def client() -> None:
        while not queue.empty():
            answers.append(await post(session, ingress_url, queue.get_nowait()))

    await asyncio.gather(*(client() for _ in range(clients)))
    return answers


async def post_replies(
    session: aiohttp.ClientSession, ingress_url: str, count: int, began: float, span_s: float
) -> list[Answer]:
    """``count`` auto replies, tenants A and B in turn, evenly over ``span_s`` from ``began``
    (each at its time, whatever the answers to earlier ones)."""
    tasks: list[asyncio.Task[Answer]] = []
    for index in range(count):
        at = began + (index + 0.5) * span_s / count
        await asyncio.sleep(max(0.0, at - time.time()))
        request = auto_reply(A if index % 2 == 0 else B, index)
        tasks.append(asyncio.create_task(post(session, ingress_url, request)))
    return list(await asyncio.gather(*tasks))


# -- following the run -----------------------------------------------------------------------------


async def follow_dispatches(
    stack: Stack, expected: int, posted: asyncio.Event, timeout_s: float
) -> int:
    """Distinct messages with a dispatch record, once ``expected`` arrived, or the time ran out,
    or nothing moved for ``STALL_S`` after everything was posted. A child that died fails it."""
    consumer = dispatch_reader(stack.settings)
    await consumer.start()
    seen: set[str] = set()
    began = last_change = last_print = time.monotonic()
    try:
        while len(seen) < expected:
            added = await read_dispatched(consumer, seen)
            now = time.monotonic()
            if added:
                last_change = now
            if now - last_print >= 10:
                last_print = now
                stack.check_alive()
                print(f"  {len(seen):,} of {expected:,} messages sent", flush=True)
            if now - began > timeout_s:
                break
            if posted.is_set() and now - last_change > STALL_S:
                break
    finally:
        await consumer.stop()
    return len(seen)


def busiest_window(ordered: Sequence[float], window_s: float = 1.0) -> tuple[int, float]:
    """As ``bench.sender.busiest_window`` (most sorted timestamps in any half-open window
    [t, t + window_s)), and where that window starts: whether it is B's arrival, say."""
    best, best_at, start = 0, math.nan, 0
    for end, moment in enumerate(ordered):
        while ordered[start] <= moment - window_s:
            start += 1
        if end - start + 1 > best:
            best, best_at = end - start + 1, ordered[start]
    return best, best_at


def group_of(phone: str) -> tuple[str, int]:
    """Which traffic a send was (by its number's block) and its index there."""
    national = phone.lstrip("+")[-10:]
    return _BLOCK_OF_PREFIX.get(national[:4], "other"), int(national[4:] or 0)


@dataclass
class Sends:
    """What the provider received, by kind of traffic: receive times and sends per number."""

    times: dict[str, list[float]] = field(default_factory=dict)
    per_number: dict[str, Counter[int]] = field(default_factory=dict)
    reply_times: dict[int, float] = field(default_factory=dict)  # first send of each reply

    def add(self, phone: str, at: float) -> None:
        group, index = group_of(phone)
        self.times.setdefault(group, []).append(at)
        self.per_number.setdefault(group, Counter())[index] += 1
        if group == "replies":
            self.reply_times[index] = min(at, self.reply_times.get(index, at))


async def provider_sends(stack: Stack) -> Sends:
    body = await stack.provider_sends()
    sends = Sends()
    for send in body["sends"]:
        sends.add(send["phone"], datetime.fromisoformat(send["at"]).timestamp())
    for times in sends.times.values():
        times.sort()
    return sends


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Campaign:
    name: str  # "A" or "B"
    messages: int
    posted: float  # first request sent (Unix s)
    accepted: float  # last 202
    refused: int  # recipients ingress never accepted
    times: list[float]  # provider receive times, sorted

    @property
    def start_delay(self) -> float:
        return self.times[0] - self.posted if self.times else math.inf

    @property
    def completion(self) -> float:
        return self.times[-1] - self.posted if self.times else math.inf

    @property
    def rate(self) -> float:
        span = self.times[-1] - self.times[0] if len(self.times) > 1 else 0.0
        return (len(self.times) - 1) / span if span > 0 else 0.0


@dataclass
class Outcome:
    sizes: Sizes
    began: float  # A's first post
    campaigns: dict[str, Campaign]
    reply_waits: list[float]  # seconds, sorted
    replies_refused: int
    replies_unsent: int
    busiest_window: int
    busiest_window_at: float  # when it starts, Unix s
    duplicates: dict[str, int]
    missing: dict[str, int]
    other_sends: int  # sends to numbers of no request of this run
    account_rate: float  # every measured send over the time from the first to the last, msg/s
    dispatched: int
    expected: int
    # The sender's RSS (bytes): its peak over the run and over the run's first half.
    sender_peak: int = 0
    sender_peak_by_half: int = 0
    closed_window: ClosedWindow | None = None  # the second scenario (bench/closed_window.py)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process, the run
    hot: dict[str, str] = field(default_factory=dict)  # py-spy's hot spots (--profile)

    def memory_flat(self) -> bool:
        """The memory benchmark's rule (``bench/memory.py``), for the sender reading ahead of
        two campaigns of very different sizes."""
        return self.sender_peak <= GROWTH * self.sender_peak_by_half + SLACK_MIB * MIB

    def share_while_b(self) -> tuple[float, float]:
        """A's and B's msg/s between B's first and last send."""
        b = self.campaigns["B"].times
        if len(b) < 2 or b[-1] <= b[0]:
            return 0.0, 0.0
        span = b[-1] - b[0]
        a = sum(1 for t in self.campaigns["A"].times if b[0] <= t <= b[-1])
        return a / span, (len(b) - 1) / span


def campaign_of(name: str, answers: Sequence[Answer], times: list[float]) -> Campaign:
    accepted = [a.accepted for a in answers if a.accepted is not None]
    return Campaign(
        name=name,
        messages=sum(a.request.recipients for a in answers),
        posted=min(a.started for a in answers),
        accepted=max(accepted, default=math.inf),
        refused=sum(a.request.recipients for a in answers if a.accepted is None),
        times=times,
    )


async def scenario(stack: Stack, sizes: Sizes) -> Outcome:
    big = campaign_requests(A, "fair-a", "A", sizes.big)
    small = campaign_requests(B, "fair-b", "B", sizes.small)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        # A short warm-up, kept out of the figures: connections and first-time code paths.
        warm_up = await post_all(
            session, stack.ingress_url, campaign_requests(A, "warm-up", "warm-up", WARM_UP), 1
        )
        warmed = sum(a.request.recipients for a in warm_up if a.accepted is not None)
        await follow_dispatches(stack, warmed, asyncio.Event(), timeout_s=300)
        await asyncio.sleep(1.5)  # no window holds both
        expected = warmed + sizes.big + sizes.small + sizes.replies
        posted = asyncio.Event()
        follower = asyncio.create_task(
            follow_dispatches(stack, expected, posted, timeout_s=3 * expected / RATE_LIMIT + 300)
        )
        began = time.time()
        print(
            f"fairness bench: A {sizes.big:,} now, B {sizes.small:,} in {GAP_S:g} s, "
            f"{sizes.replies} auto replies over {sizes.big / RATE_LIMIT:.0f} s ...",
            flush=True,
        )

        async def later(delay_s: float) -> list[Answer]:
            await asyncio.sleep(delay_s)
            return await post_all(session, stack.ingress_url, small, CLIENTS["B"])

        posting = await asyncio.gather(
            post_all(session, stack.ingress_url, big, CLIENTS["A"]),
            later(GAP_S),
            post_replies(session, stack.ingress_url, sizes.replies, began, sizes.big / RATE_LIMIT),
        )
        posted.set()
        a_answers, b_answers, reply_answers = posting
        print(
            f"  A accepted after {max(a.accepted or 0 for a in a_answers) - began:.1f} s; "
            "waiting for every message to be sent ...",
            flush=True,
        )
        dispatched = await follower
    stack.check_alive()
    await asyncio.sleep(1.0)  # a late repeated send would show now
    sends = await provider_sends(stack)
    return outcome(sizes, began, (a_answers, b_answers, reply_answers), sends, dispatched, expected)


def outcome(
    sizes: Sizes,
    began: float,
    answers: tuple[list[Answer], list[Answer], list[Answer]],
    sends: Sends,
    dispatched: int,
    expected: int,
) -> Outcome:
    a_answers, b_answers, reply_answers = answers
    campaigns = {
        "A": campaign_of("A", a_answers, sends.times.get("A", [])),
        "B": campaign_of("B", b_answers, sends.times.get("B", [])),
    }
    waits = sorted(
        sends.reply_times[a.request.reply] - a.accepted
        for a in reply_answers
        if a.accepted is not None and a.request.reply in sends.reply_times
    )
    accepted_replies = [a for a in reply_answers if a.accepted is not None]
    wanted = {"A": sizes.big, "B": sizes.small, "replies": sizes.replies}
    duplicates = {
        g: sum(c - 1 for c in sends.per_number.get(g, Counter()).values()) for g in wanted
    }
    missing = {g: n - len(sends.per_number.get(g, Counter())) for g, n in wanted.items()}
    measured = sorted(t for g in ("A", "B", "replies") for t in sends.times.get(g, []))
    span = measured[-1] - measured[0] if len(measured) > 1 else 0.0
    busiest = busiest_window(measured)
    return Outcome(
        sizes=sizes,
        began=began,
        campaigns=campaigns,
        reply_waits=waits,
        replies_refused=len(reply_answers) - len(accepted_replies),
        replies_unsent=len(accepted_replies) - len(waits),
        busiest_window=busiest[0],
        busiest_window_at=busiest[1],
        duplicates=duplicates,
        missing=missing,
        other_sends=len(sends.times.get("other", [])),
        account_rate=(len(measured) - 1) / span if span > 0 else 0.0,
        dispatched=dispatched,
        expected=expected,
    )


# -- the report ------------------------------------------------------------------------------------

HEADER = (
    "traffic",
    "messages",
    "posted at",
    "all accepted at",
    "first send",
    "last send",
    "start delay",
    "completion",
    "msg/s",
    "dups",
    "missing",
)


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s" if math.isfinite(seconds) else "-"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if math.isfinite(seconds) else "-"


def rows(result: Outcome) -> list[list[object]]:
    table: list[list[object]] = []
    for name, c in result.campaigns.items():
        first = c.times[0] - result.began if c.times else math.inf
        last = c.times[-1] - result.began if c.times else math.inf
        table.append(
            [
                f"campaign {name} (tenant {A.name if name == 'A' else B.name})",
                f"{c.messages:,}",
                _s(c.posted - result.began),
                _s(c.accepted - result.began),
                _s(first),
                _s(last),
                _s(c.start_delay),
                _s(c.completion),
                f"{c.rate:,.0f}",
                result.duplicates[name],
                result.missing[name],
            ]
        )
    waits = result.reply_waits
    table.append(
        [
            "auto replies (A and B in turn)",
            f"{result.sizes.replies:,}",
            "spread",
            "-",
            "-",
            "-",
            f"p50 {_ms(percentile(waits, 0.5))}",
            f"p99 {_ms(percentile(waits, 0.99))}",
            "-",
            result.duplicates["replies"],
            result.missing["replies"],
        ]
    )
    return table


def report(result: Outcome, duration_s: float) -> Report:
    """Print the table; the figures, the README's rows and the checks that failed."""
    sizes, b = result.sizes, result.campaigns["B"]
    completion_target = COMPLETION_FACTOR * sizes.fair_share_s
    waits = result.reply_waits
    p50, p99 = percentile(waits, 0.5), percentile(waits, 0.99)
    allowed_window = math.floor(RATE_LIMIT * (1 + ALLOWED_WINDOW_EXCESS) + 1e-9)
    excess = result.busiest_window / RATE_LIMIT - 1
    a_rate, b_rate = result.share_while_b()
    duplicates = sum(result.duplicates.values())
    missing = sum(result.missing.values())
    lines = [
        f"B: first send {_s(b.start_delay)} after its post (target <= {START_TARGET_S:g} s), last "
        f"{_s(b.completion)} after it (target <= {completion_target:g} s = {COMPLETION_FACTOR}x "
        f"{sizes.fair_share_s:g} s, its fair share of {RATE_LIMIT / 2:g} msg/s)",
        f"while B was sending: A {a_rate:,.0f} msg/s, B {b_rate:,.0f} msg/s (equal weights: "
        f"{RATE_LIMIT / 2:g} each)",
        f"auto replies, 202 to the provider's receipt (100 ms latency included): p50 {_ms(p50)}, "
        f"p99 {_ms(p99)}, max {_ms(waits[-1] if waits else math.inf)} (target p99 <= "
        f"{REPLY_P99_TARGET_S:g} s); {result.replies_unsent} accepted but never sent",
        f"busiest one-second window {result.busiest_window} = {excess:+.1%} against the limit "
        f"of {RATE_LIMIT:g} (allowed {ALLOWED_WINDOW_EXCESS:+.0%}; the account allows "
        f"{JITTER_ALLOWANCE_S * 1000:.0f} ms of transit jitter), from "
        f"{_s(result.busiest_window_at - result.began)}; the account's mean rate from "
        f"the first send to the last {result.account_rate:,.0f} msg/s "
        f"({result.account_rate / RATE_LIMIT:.0%} of the limit)",
        f"sender RSS: peak {result.sender_peak / MIB:.0f} MiB, by half the run "
        f"{result.sender_peak_by_half / MIB:.0f} MiB (flat: peak <= {GROWTH} x that + "
        f"{SLACK_MIB} MiB, as in the memory benchmark): {'yes' if result.memory_flat() else 'NO'}",
        closed_window_line(result.closed_window),
        f"sends per message: {duplicates} sent twice, {missing} never sent, "
        f"{result.other_sends} sends to no number of this run; {result.dispatched:,} of "
        f"{result.expected:,} messages with a dispatch record (warm-up included)",
    ]
    print()
    print(text_table(HEADER, rows(result)))
    print()
    print("\n".join(lines))
    cpu = ", ".join(f"{name} {seconds:.1f}" for name, seconds in sorted(result.cpu_s.items()))
    print(f"CPU seconds during the scenario: {cpu}")
    for name, text in result.hot.items():
        print(f"\nprofile of {name} (py-spy):\n{text}")
    failures: list[str] = []
    if not b.start_delay <= START_TARGET_S:
        failures.append(f"B started {_s(b.start_delay)} after its post (target {START_TARGET_S} s)")
    if not b.completion <= completion_target:
        failures.append(f"B completed after {_s(b.completion)} (target {completion_target:g} s)")
    if not p99 <= REPLY_P99_TARGET_S:
        failures.append(f"auto replies waited {_ms(p99)} at p99 (target {REPLY_P99_TARGET_S} s)")
    if result.busiest_window > allowed_window:
        failures.append(f"a one-second window exceeded the limit by {excess:.1%}")
    if duplicates or missing or result.other_sends:
        failures.append(
            f"not one send per message: {duplicates} duplicates, {missing} missing, "
            f"{result.other_sends} unexpected"
        )
    if result.closed_window is not None and not result.closed_window.ok:
        failures.append(f"the closed window was not kept: {result.closed_window}")
    if not result.memory_flat():
        failures.append(
            f"the sender's RSS grew: peak {result.sender_peak / MIB:.0f} MiB > {GROWTH} x "
            f"{result.sender_peak_by_half / MIB:.0f} MiB + {SLACK_MIB} MiB"
        )
    refused = sum(c.refused for c in result.campaigns.values()) + result.replies_refused
    if refused:
        failures.append(f"ingress never accepted {refused} recipient(s)")
    summary = [
        (
            f"{sizes.big:,} recipients (tenant A), {GAP_S:g} s later {sizes.small:,} (tenant B), "
            f"{sizes.replies} auto replies; one account at {RATE_LIMIT:g} msg/s, 100 ms latency, "
            f"{JITTER_ALLOWANCE_S * 1000:.0f} ms jitter allowance",
            f"B starts after {_s(b.start_delay)}, done after {_s(b.completion)} (targets "
            f"{START_TARGET_S:g} s, {completion_target:g} s); auto replies p50 {_ms(p50)}, p99 "
            f"{_ms(p99)} (target {REPLY_P99_TARGET_S:g} s); busiest 1 s window "
            f"{result.busiest_window:,} = {excess:+.1%} (allowed {ALLOWED_WINDOW_EXCESS:+.0%}); "
            f"{duplicates} duplicates, {missing} unsent; sender RSS peak "
            f"{result.sender_peak / MIB:.0f} MiB, flat: {'yes' if result.memory_flat() else 'NO'}",
        )
    ]
    figures: dict[str, Any] = {
        "sizes": {"big": sizes.big, "small": sizes.small, "replies": sizes.replies},
        "rate_limit_per_s": RATE_LIMIT,
        "rate_limit_jitter_s": JITTER_ALLOWANCE_S,
        "latency_ms": LATENCY_MS,
        "gap_s": GAP_S,
        "campaigns": {
            name: {
                "messages": c.messages,
                "posted_at_s": round(c.posted - result.began, 3),
                "all_accepted_at_s": round(c.accepted - result.began, 3),
                "start_delay_s": round(c.start_delay, 3),
                "completion_s": round(c.completion, 3),
                "rate_per_s": round(c.rate, 1),
            }
            for name, c in result.campaigns.items()
        },
        "b_fair_share_s": sizes.fair_share_s,
        "b_completion_target_s": completion_target,
        "rates_while_b_per_s": {"A": round(a_rate, 1), "B": round(b_rate, 1)},
        "reply_wait_p50_ms": round(p50 * 1000, 1),
        "reply_wait_p99_ms": round(p99 * 1000, 1),
        "reply_wait_max_ms": round(waits[-1] * 1000, 1) if waits else None,
        "busiest_window": result.busiest_window,
        "window_excess": round(excess, 4),
        "busiest_window_at_s": round(result.busiest_window_at - result.began, 3),
        "account_rate_per_s": round(result.account_rate, 1),
        "duplicates": result.duplicates,
        "missing": result.missing,
        "other_sends": result.other_sends,
        "closed_window": asdict(result.closed_window) if result.closed_window else None,
        "sender_rss_mib": {
            "peak": round(result.sender_peak / MIB, 1),
            "peak_by_half": round(result.sender_peak_by_half / MIB, 1),
            "flat": result.memory_flat(),
        },
    }
    return Report(
        benchmark="fairness",
        summary=summary,
        details=markdown_table(HEADER, rows(result)) + "\n\n" + "\n".join(f"- {x}" for x in lines),
        figures=_finite(figures),
        failures=failures,
        duration_s=duration_s,
    )


def closed_window_line(window: ClosedWindow | None) -> str:
    if window is None:
        return "closed window: not run"
    return (
        f"closed window (clock moved through it, bench/closed_window.py): {window.parked:,} "
        f"parked, {window.sent_while_closed} sent inside it, {window.sent_after:,} sent once it "
        f"opened; {window.expired} of {window.short_lived} expiring inside it reported "
        f"OutsideSendWindow"
    )


def _finite(value: Any) -> Any:
    """The figures with inf / nan as None: JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    return value


async def run(
    sizes: Sizes, run_dir: Path, broker: str = "kafka", profile_dir: Path | None = None
) -> Report:
    started = time.monotonic()
    async with Stack(run_dir, overrides=overrides(), broker_kind=broker) as stack:
        # The tuned simulator below, in place of `smsbridge simulate providers`.
        port = stack.providers_url.rsplit(":", 1)[1]
        await stack.start_child(
            "sim-providers",
            [sys.executable, "-m", "bench.fairness", "simulator", port, str(LATENCY_MS)],
            ready_url=f"{stack.providers_url}/_simulator/config",
        )
        await stack.start("ingress")
        await stack.start_service("sender")
        await asyncio.sleep(2.0)  # the sender holds its partitions and its rate limit
        sampler = ResourceSampler(stack, ["sender"], interval_s=1.0)
        sampler.start()
        profiler = Profiler(stack, PROFILED, profile_dir) if profile_dir is not None else None
        if profiler is not None:
            await profiler.start()
        before = cpu_now(stack)
        result = await scenario(stack, sizes)
        after = cpu_now(stack)
        await sampler.stop()
        result.cpu_s = {name: after[name] - before.get(name, 0.0) for name in after}
        if profiler is not None:
            for name, path in (await profiler.stop()).items():
                result.hot[name] = hot_spots(path).describe()
        result.closed_window = await closed_window(stack.settings)
    half = sampler.samples[-1].at / 2 if sampler.samples else 0.0
    result.sender_peak = sampler.peak("sender")
    result.sender_peak_by_half = max(
        (s.rss.get("sender", 0) for s in sampler.samples if s.at <= half), default=0
    )
    return report(result, time.monotonic() - started)


def bench(options: Options) -> Report:
    sizes = Sizes(
        big=options.big_campaign or DEFAULT_BIG,
        small=options.small_campaign or DEFAULT_SMALL,
        replies=DEFAULT_REPLIES if options.auto_replies is None else options.auto_replies,
    )
    with tempfile.TemporaryDirectory(prefix="smsbridge-bench-fairness-") as directory:
        profile_dir = None
        if options.profile:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            profile_dir = RESULTS_DIR / "profiles" / f"fairness-{stamp}"
        return asyncio.run(run(sizes, Path(directory), options.broker, profile_dir))


# -- the provider simulator ------------------------------------------------------------------------


class QuietSimulator(ProviderSimulator):
    """The provider simulator without delivery reports: no callbacks service runs here, and
    hundreds of thousands of pending callbacks would only weigh on the clock being measured."""

    def deliver_callbacks(
        self, provider: str, provider_message_id: str, planned: list[PlannedCallback]
    ) -> None:
        return None


async def _freeze_survivors(interval_s: float = 1.0) -> None:
    while True:
        gc.freeze()
        await asyncio.sleep(interval_s)


async def serve_simulator(port: int, latency_ms: float) -> None:
    """The provider simulator as a faithful clock: its receive timestamps are the measurement.

    A full garbage collection over a record of 200,000 sends would pause it long enough to bunch
    them, so whatever survives a second is frozen (``gc.freeze``): collections only ever look at
    the last second's objects. (bench/sender.py turns collection off instead: its runs are short.)
    """
    logging.basicConfig(level=logging.WARNING)
    simulator = QuietSimulator("127.0.0.1", port, latency_ms=latency_ms)
    freezer = asyncio.create_task(_freeze_survivors())
    try:
        await serve_until_signalled(simulator)
    finally:
        freezer.cancel()


if __name__ == "__main__":
    # `python -m bench.fairness simulator PORT LATENCY_MS`: the tuned simulator of run().
    asyncio.run(serve_simulator(int(sys.argv[2]), float(sys.argv[3])))
