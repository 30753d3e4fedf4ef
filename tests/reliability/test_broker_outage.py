"""The broker goes away for 30 s in the middle of a campaign and comes back on its own data.

Every service and both simulators run as processes (``bench.stack``) on Apache Kafka with its data
on disk. Halfway through the posting the broker is stopped for ``OUTAGE_S``; meanwhile ingress
answers 503 (Optimove retries, as ``post_campaign`` does) and the services wait. Then the broker
starts again on the same data folder. Afterwards: every recipient has exactly one final report at
Optimove, the provider took each message once, and nothing was dead-lettered.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bench import load
from bench.stack import ProviderSimulatorOptions, Stack
from services import SERVICES
from shared.contract.events import DeadLetter
from shared.contract.topics import DEAD_LETTERS
from tests.reliability.profile import current
from tests.reliability.support import (
    final_reports,
    own_ports,
    post_campaign,
    start_optimove_with_record,
)
from tests.support import read_topic

pytestmark = pytest.mark.integration

PROFILE = current()
CAMPAIGN = "outage"
OUTAGE_S = 30.0
RECIPIENTS = 20_000 if PROFILE.name == "full" else 2_000
BATCH = 100
POST_SECONDS = 40.0


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    # Providers retry a callback answered 503 for hours; the simulator's default 4 attempts (each
    # answered after the 5 s produce timeout) end within the outage, and a delivery report given
    # up on leaves its recipient without a final report. 30 attempts outlast it.
    options = ProviderSimulatorOptions(
        latency_ms=20.0, callback_delay_ms=20.0, callback_attempts=30
    )
    async with Stack(tmp_path, overrides=own_ports(), provider_options=options) as started:
        if not started.broker.persistent:
            pytest.skip("a broker outage needs a broker that keeps its data (Apache Kafka)")
        yield started


async def ingress_answers_503(stack: Stack, batch: load.Batch) -> list[int]:
    """What ingress answers while the broker is away (sampled once a second)."""
    answers: list[int] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for _ in range(3):
            posted = await load.post(session, stack.campaign_url, batch)
            answers.append(posted.status)
            await asyncio.sleep(1.0)
    return answers


@pytest.mark.timeout(900)
async def test_a_campaign_survives_the_broker_stopping_for_30_seconds(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = tmp_path / "optimove-record.jsonl"
    await start_optimove_with_record(stack, record)
    await stack.start("providers", *SERVICES)
    batches = load.build_batches(CAMPAIGN, RECIPIENTS, BATCH)
    index_of = {m: i for i, m in enumerate(m for b in batches for m in b.message_ids)}

    posting = asyncio.create_task(post_campaign(stack, batches, POST_SECONDS))
    await asyncio.sleep(POST_SECONDS / 2)
    stopped_at = time.monotonic()
    await asyncio.to_thread(stack.broker.stop)
    during = await ingress_answers_503(stack, batches[-1])
    await asyncio.sleep(max(0.0, stopped_at + OUTAGE_S - time.monotonic()))
    await asyncio.to_thread(stack.broker.start)
    outage_s = time.monotonic() - stopped_at
    await posting

    tally = await stack.wait_for_final_reports(CAMPAIGN, len(index_of), timeout_s=600)
    stack.check_alive()
    finals = final_reports(record, CAMPAIGN, {"Delivered", "Failed"})
    sends = (await stack.provider_sends())["sends"]
    dead = [m for _, m in await read_topic(stack.settings, DEAD_LETTERS, DeadLetter)]
    with capsys.disabled():
        print(
            f"\nbroker outage: {len(index_of)} recipients, broker away {outage_s:.0f} s; ingress "
            f"meanwhile answered {during}; Optimove tally {tally}; {len(sends)} sends; "
            f"dead letters: {Counter(f'{d.stage}: {d.reason[:40]}' for d in dead) or 'none'}"
        )

    assert set(during) == {503}, during
    assert set(finals) == set(index_of)
    twice = {m: len(r) for m, r in finals.items() if len(r) > 1}
    assert not twice, f"{len(twice)} recipients with more than one final report"
    per_recipient = Counter((send["phone"], send["text"]) for send in sends)
    assert len(per_recipient) == len(index_of)
    assert max(per_recipient.values()) == 1
    assert dead == []
