"""Chaos: a campaign through the whole pipeline while its processes are killed (issue 7).

Every service and both simulators run as processes of their own on one broker (``bench.stack``);
a campaign is posted while the provider fails a share of sends, each consumer service in turn is
SIGKILLed and restarted, and so is the simulated Optimove. Then every recipient has one final
report at Optimove (repeats only where HTTP delivery cannot avoid them), no route sent a message
twice, and the dead letters are exactly what the faults explain. What each assertion allows, and
why: docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench import load
from bench.stack import (
    OPTIMOVE_SIMULATOR,
    PROVIDER,
    ProviderSimulatorOptions,
    Stack,
    StackError,
    deep_merge,
)
from services import SERVICES
from shared.contract.events import DeadLetter
from shared.contract.statuses import SubStatus
from shared.contract.topics import DEAD_LETTERS
from tests.reliability.profile import current
from tests.reliability.support import (
    FinalReport,
    final_reports,
    own_ports,
    post_campaign,
    start_optimove_with_record,
)
from tests.support import read_topic

pytestmark = pytest.mark.integration

PROFILE = current()
CAMPAIGN = "chaos"
CONSUMERS = tuple(name for name in SERVICES if name not in ("ingress", "callbacks"))
REPEAT_WINDOW_S = 5.0
# After the faults, how long every recipient may take to get its final report: well inside the
# test's own timeout, so that a miss is explained (``why_no_final``), not just timed out.
FINALS_TIMEOUT_S = 300.0 if PROFILE.name == "full" else 200.0
PROVIDER_LATENCY_MS = 50.0  # so that some calls are in flight when the sender is killed
QUICK_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
SENDER_GAVE_UP = f"{SubStatus.PROVIDER_ERROR}: every route failed"
NO_DISPATCH = "no dispatch record for "
_INDEX_IN_TEXT = re.compile(r"^Hello customer (\d+),")


def overrides() -> dict[str, Any]:
    quick = {name: {"runner": dict(QUICK_GROUP)} for name in CONSUMERS}
    return deep_merge(quick, own_ports())


@dataclass(frozen=True)
class Kill:
    name: str
    at: float  # time.time() right before the SIGKILL
    back_after_s: float = 0.0  # until it answered ready again


@dataclass
class Outcome:
    """What the run left behind, read from the simulators and the dead-letter topic."""

    finals: dict[str, list[FinalReport]]
    sends: list[dict[str, Any]]
    dead_letters: list[DeadLetter]
    index_of: dict[str, int]  # message id -> recipient index
    message_of: dict[int, str] = field(init=False)

    def __post_init__(self) -> None:
        self.message_of = {index: m for m, index in self.index_of.items()}

    def sent_message(self, send: Mapping[str, Any]) -> str:
        match = _INDEX_IN_TEXT.match(send["text"])
        assert match is not None, f"a send that is not the campaign's: {send['text']!r}"
        return self.message_of[int(match[1])]

    def failed_provider_error(self) -> set[str]:
        return {
            m
            for m, reports in self.finals.items()
            if (reports[0].status, reports[0].sub_status) == ("Failed", SubStatus.PROVIDER_ERROR)
        }


# -- the faults ----------------------------------------------------------------------------------


async def fail_provider_sends(stack: Stack) -> None:
    await stack.provider_configure(http_error_rate=PROFILE.provider_failure_rate)
    try:
        await asyncio.sleep(PROFILE.provider_failure_seconds)
    finally:
        await stack.provider_configure(http_error_rate=0.0)


async def kill_in_turn(stack: Stack, names: Sequence[str], span_s: float) -> list[Kill]:
    """SIGKILL each of ``names`` in turn, evenly over ``span_s``, each started again at once (a
    restart takes seconds: the next kill does not wait for it); then wait until all are ready."""
    began = time.monotonic()

    async def kill(number: int, name: str) -> Kill:
        await asyncio.sleep(max(0.0, began + number * span_s / (len(names) + 1) - time.monotonic()))
        at = time.time()
        assert await stack.kill(name, signal.SIGKILL) == -signal.SIGKILL
        await stack.restart(name)
        return Kill(name, at, time.time() - at)

    return list(await asyncio.gather(*(kill(n, name) for n, name in enumerate(names, start=1))))


# -- reading what happened ---------------------------------------------------------------------


@dataclass(frozen=True)
class Repeat:
    first: FinalReport
    again: FinalReport
    explained_by: str | None  # the kill that explains it


def repeated_finals(outcome: Outcome, kills: Sequence[Kill]) -> list[Repeat]:
    """Every repeat of a final report, with the kill (reporter or Optimove) that explains it: its
    first copy arrived at most ``REPEAT_WINDOW_S`` before that kill, or after it but before the
    killed process was back (a request the dead reporter had sent, read late by a busy Optimove),
    and the repeat after the kill."""
    explaining = [k for k in kills if k.name in ("reporter", OPTIMOVE_SIMULATOR)]
    repeats: list[Repeat] = []
    for reports in outcome.finals.values():
        first, *again = reports
        for repeat in again:
            kill = next(
                (
                    k
                    for k in explaining
                    if k.at - REPEAT_WINDOW_S <= first.at < k.at + k.back_after_s
                    and repeat.at > k.at
                ),
                None,
            )
            explained = kill.name if kill is not None and repeat.body == first.body else None
            repeats.append(Repeat(first, repeat, explained))
    return repeats


def describe(repeats: Sequence[Repeat], kills: Sequence[Kill], began: float) -> str:
    """The unexplained repeats, with times relative to the start, beside the kill times."""
    kill_times = ", ".join(f"{k.name} at {k.at - began:.1f} s" for k in kills)
    lines = [f"kills: {kill_times}"]
    for repeat in repeats:
        if repeat.explained_by is None:
            same = repeat.first.body == repeat.again.body
            lines.append(
                f"{repeat.first.message_id}: first at {repeat.first.at - began:.2f} s, again at "
                f"{repeat.again.at - began:.2f} s; identical: {same}"
            )
    return "\n".join(lines[:30])


def expected_dead_letters(outcome: Outcome) -> list[str]:
    """Every dead letter the faults do not explain (see the module docstring); [] is the aim."""
    failed = outcome.failed_provider_error()
    sent_messages = {outcome.sent_message(send) for send in outcome.sends}
    sends_by_id = {send["provider_message_id"]: send for send in outcome.sends}
    unexplained: list[str] = []
    for letter in outcome.dead_letters:
        if letter.stage == "sender" and letter.reason.startswith(SENDER_GAVE_UP):
            message_id = orjson.loads(letter.payload)["context"]["message_id"]
            if message_id not in failed or message_id in sent_messages:
                unexplained.append(f"sender gave up on {message_id}, yet it was sent or not failed")
        elif letter.stage == "normalizer" and letter.reason.startswith(NO_DISPATCH + PROVIDER):
            provider_id = orjson.loads(letter.payload)["provider_message_id"]
            send = sends_by_id.get(provider_id)
            if send is None or outcome.sent_message(send) not in failed:
                unexplained.append(f"callback of {provider_id} unmatched, yet its outcome is known")
        else:
            unexplained.append(f"{letter.stage}: {letter.reason}")
    return unexplained


def lost_outcomes(outcome: Outcome) -> set[str]:
    """Provider ids of sends the provider accepted but whose message was reported failed: their
    outcome was lost with the killed sender."""
    failed = outcome.failed_provider_error()
    return {s["provider_message_id"] for s in outcome.sends if outcome.sent_message(s) in failed}


def why_no_final(
    stack: Stack,
    record: Path,
    index_of: Mapping[str, int],
    sends: Sequence[Mapping[str, Any]],
    began: float,
) -> str:
    """What is known of the recipients still without a final report, and what the services
    logged about them and their last errors: the evidence a failed run leaves for the next
    reader."""
    reports: dict[str, list[str]] = defaultdict(list)
    for line in record.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
            entry = orjson.loads(line)
            body = orjson.loads(entry["body"])
            if entry["endpoint"] == "delivery-report":
                status = f"{body['type']['status']}/{body['type']['subStatus']}"
                reports[body["messageId"]].append(f"{status} at {entry['at'] - began:.1f} s")
    finals = final_reports(record, CAMPAIGN, {"Delivered", "Failed"})
    missing = sorted(set(index_of) - set(finals), key=index_of.__getitem__)
    sent = Counter(int(match[1]) for send in sends if (match := _INDEX_IN_TEXT.match(send["text"])))
    lines = [f"{len(missing)} recipients without a final report; the first of them:"]
    for message_id in missing[:10]:
        seen = ", ".join(reports.get(message_id, [])) or "no report"
        lines.append(
            f"  {message_id} (recipient {index_of[message_id]}): {seen}; "
            f"provider accepted {sent[index_of[message_id]]} send(s)"
        )
    wanted = set(missing[:10])
    for name, child in stack.children.items():
        with contextlib.suppress(OSError):
            logged = child.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
            about = [line for line in logged if any(m in line for m in wanted)][:10]
            errors = [line for line in logged if '"level":"error"' in line][-10:]
            if about or errors:
                lines.append(f"-- {name} ({child.log_path}): lines about them, then errors:")
                lines += [f"  {line[:400]}" for line in [*about, *errors]]
    return "\n".join(lines)


# -- the test ------------------------------------------------------------------------------------


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    options = ProviderSimulatorOptions(latency_ms=PROVIDER_LATENCY_MS, callback_delay_ms=20.0)
    async with Stack(tmp_path, overrides=overrides(), provider_options=options) as started:
        yield started


@pytest.mark.timeout(1_200 if PROFILE.name == "full" else 360)
async def test_a_campaign_survives_killed_services_and_failing_peers(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = tmp_path / "optimove-record.jsonl"
    await start_optimove_with_record(stack, record)
    await stack.start("providers", *SERVICES)
    batches = load.build_batches(CAMPAIGN, PROFILE.chaos_recipients, PROFILE.chaos_batch)
    index_of = {m: i for i, m in enumerate(m for b in batches for m in b.message_ids)}

    began, began_wall = time.monotonic(), time.time()
    # The sender last: it sends through the provider's failures first, and is killed while
    # batches still arrive, so that calls are in flight.
    victims = [*(n for n in CONSUMERS if n != "sender"), OPTIMOVE_SIMULATOR, "sender"]
    posting = asyncio.create_task(post_campaign(stack, batches, PROFILE.chaos_post_seconds))
    failing = asyncio.create_task(fail_provider_sends(stack))
    kills = await kill_in_turn(stack, victims, PROFILE.chaos_post_seconds)
    await asyncio.gather(posting, failing)
    chaos_s = time.monotonic() - began

    try:
        tally = await stack.wait_for_final_reports(
            CAMPAIGN, len(index_of), timeout_s=FINALS_TIMEOUT_S
        )
    except StackError as exc:
        sends = (await stack.provider_sends())["sends"]
        pytest.fail(f"{exc}\n{why_no_final(stack, record, index_of, sends, began_wall)}")
    provider = await stack.provider_sends()
    outcome = Outcome(
        final_reports(record, CAMPAIGN, {"Delivered", "Failed"}), provider["sends"], [], index_of
    )
    lost = lost_outcomes(outcome)
    outcome.dead_letters = [
        m for _, m in await read_topic(stack.settings, DEAD_LETTERS, DeadLetter)
    ]
    tally = await stack.optimove_tally(CAMPAIGN)  # late repeats included
    outcome.finals = final_reports(record, CAMPAIGN, {"Delivered", "Failed"})
    stack.check_alive()

    repeats = repeated_finals(outcome, kills)
    by_stage = Counter(f"{letter.stage}: {letter.reason[:40]}" for letter in outcome.dead_letters)
    with capsys.disabled():
        print(
            f"\nchaos ({PROFILE.name}): {len(index_of)} recipients over {chaos_s:.0f} s, killed "
            f"{', '.join(f'{k.name} (back in {k.back_after_s:.0f} s)' for k in kills)}; "
            "provider 500s for "
            f"{PROFILE.provider_failure_seconds:g} s at {PROFILE.provider_failure_rate:.0%}: "
            f"answers {provider['answers']}\n"
            f"  Optimove tally: {tally}\n"
            f"  repeated final reports: {Counter(r.explained_by for r in repeats)}; "
            f"outcomes lost with the killed sender: {len(lost)}\n"
            f"  dead letters: {dict(by_stage) or 'none'}"
        )

    # Every recipient: a final report, and only the campaign's recipients.
    assert set(outcome.finals) == set(index_of)
    assert tally["final"] == len(index_of)
    reporter = stack.settings.reporter
    bound = reporter.runner.max_in_flight + reporter.parked_max_in_flight
    explaining = sum(1 for k in kills if k.name in ("reporter", OPTIMOVE_SIMULATOR))
    assert all(r.explained_by for r in repeats), describe(repeats, kills, began_wall)
    assert len(repeats) <= explaining * bound
    # At most once per route.
    per_route = Counter((s["account"], s["phone"], s["text"]) for s in outcome.sends)
    assert max(per_route.values()) == 1
    # Dead letters: exactly what the faults explain.
    assert expected_dead_letters(outcome) == []
    in_flight_per_kill = stack.settings.providers[PROVIDER].max_in_flight
    assert len(lost) <= in_flight_per_kill * sum(1 for k in kills if k.name == "sender")
