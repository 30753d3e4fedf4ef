"""A campaign through the whole pipeline (ingress, sender, callbacks, normalizer, reporter and
campaigns, with the provider and Optimove simulators): at the end the admin API and
``smsbridge campaign status`` agree with what the simulated Optimove tallied; and a campaigns
service killed in the middle of the campaign and replaced ends with the same, exact numbers.

300 recipients: 15 with numbers ingress rejects, 10 opted out beforehand on sms.opt-outs, and the
provider simulator fails about a tenth of the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import REGISTRY

from services.campaigns.app import build as build_campaigns
from services.campaigns.client import COLUMNS
from shared.config import Settings
from shared.contract.events import OptOutChange
from shared.contract.numbers import to_e164
from shared.contract.topics import INGRESS_REQUESTS, OPT_OUTS, REPORT_OUTCOMES, STATUSES
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import OutRecord
from simulators.campaign_load import sample_numbers
from simulators.optimove import OptimoveSimulator
from tests.support import TENANT, make_settings, running, wait_for
from tests.support.campaigns_api import ADMIN_TOKEN, campaign_status, campaigns_section
from tests.support.ops import config_data, publisher, start_service, write_config
from tests.support.pipeline import pipeline, post_campaign, simulated_optimove, simulated_providers
from tools.cli import main as smsbridge

pytestmark = pytest.mark.integration

CAMPAIGN = "autumn-sale"
BATCH = 150
INVALID = [f"12{i}" for i in range(15)]  # no country's mobile numbers: rejected by ingress
OPTED_OUT = 10


def recipients() -> tuple[list[str], list[str]]:
    """(every number as posted, in order; the valid numbers opted out beforehand)."""
    valid = sample_numbers(300 - len(INVALID), seed=23)
    numbers = list(valid)
    for index, number in enumerate(INVALID):
        numbers.insert(index * 19 + 3, number)
    return numbers, valid[5 : 5 + OPTED_OUT]


def bodies(numbers: list[str]) -> list[bytes]:
    found = []
    for start in range(0, len(numbers), BATCH):
        found.append(
            orjson.dumps(
                {
                    "batchId": f"b-{start}",
                    "requestId": f"r-{start}",
                    "metadata": {"appId": 7, "campaignId": CAMPAIGN, "tenantId": 9},
                    "recipients": [
                        {
                            "message": f"Autumn offer {start + i}",
                            "mobileNumber": number,
                            "customerId": f"c-{start + i}",
                        }
                        for i, number in enumerate(numbers[start : start + BATCH])
                    ],
                }
            )
        )
    return found


@contextlib.asynccontextmanager
async def campaign_pipeline() -> AsyncIterator[tuple[Settings, OptimoveSimulator]]:
    """The simulators and every service but campaigns, running; the opt-outs recorded first."""
    optimove = simulated_optimove()
    providers = simulated_providers(fail_rate=0.1, callback_delay_ms=5, seed=5)
    settings = make_settings(
        optimove_url=optimove.url,
        provider_url=providers.url,
        overrides={"campaigns": campaigns_section()},
    )
    _, opted_out = recipients()
    async with publisher(settings) as out:
        await out.publish(
            [
                OutRecord(
                    OPT_OUTS,
                    f"{TENANT}:{to_e164(number, 'GB')}",
                    OptOutChange(
                        tenant=TENANT, number=to_e164(number, "GB"), opted_out=True, source="test"
                    ),
                )
                for number in opted_out
            ]
        )
    async with pipeline(settings, optimove, providers):
        yield settings, optimove


def tally(optimove: OptimoveSimulator) -> dict[str, Any]:
    found: dict[str, Any] = optimove.tally(tenant=TENANT, campaign_id=CAMPAIGN)[TENANT]
    return found


async def settled_status(settings: Settings, optimove: OptimoveSimulator) -> dict[str, Any]:
    """The campaign's status once every report Optimove took is counted (then a little more, so
    that a double count would show)."""
    await wait_for(lambda: tally(optimove)["final"] >= 300, 60, "every final report at Optimove")

    async def caught_up() -> bool:
        status = await campaign_status(settings, TENANT, CAMPAIGN)
        if status is None:
            return False
        expected = tally(optimove)
        counted = (status["delivered"] + status["failed"], status["reports_acknowledged"])
        wanted = (expected["final"], expected["reports"])
        assert all(c <= w for c, w in zip(counted, wanted, strict=True)), (
            f"counted more than Optimove took: {counted} > {wanted}"
        )
        return counted == wanted

    await wait_for(caught_up, what="the campaign's counts to catch up with Optimove")
    await asyncio.sleep(1.0)
    status = await campaign_status(settings, TENANT, CAMPAIGN)
    assert status is not None
    return status


def assert_agrees_with_optimove(status: dict[str, Any], optimove: OptimoveSimulator) -> None:
    expected = tally(optimove)
    sent_reports = sum(
        1
        for request in optimove.received(endpoint="delivery-report", tenant=TENANT)
        if orjson.loads(request["body"])["type"]["status"] == "Sent"
    )
    assert expected["duplicates"] == 0 and expected["messages"] == 300
    assert (status["accepted"], status["rejected"]) == (300 - len(INVALID), len(INVALID))
    assert status["delivered"] == expected["delivered"]
    assert status["failed"] == expected["failed"]
    assert status["failed_by_sub_status"] == expected["final_by_status"]["Failed"]
    assert status["failed_by_sub_status"]["InvalidNumber"] == len(INVALID)
    assert status["opted_out"] == OPTED_OUT
    assert status["reports_acknowledged"] == expected["reports"]
    assert status["sent"] == sent_reports
    assert (status["held_for_schedule"], status["dead_lettered"]) == (0, 0)
    assert status["first_activity_at"] <= status["last_activity_at"]
    assert expected["failed"] - len(INVALID) - OPTED_OUT > 0  # the provider failed some too


def cli_status(settings: Settings) -> str:
    """``smsbridge campaign status`` as an operator runs it (config, token from the env)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = smsbridge(
            [
                "campaign",
                "status",
                "--url",
                f"http://{settings.campaigns.listen}",
                "--token",
                "env:TEST_CAMPAIGNS_ADMIN_TOKEN",
                "--tenant",
                TENANT,
                "--campaign",
                CAMPAIGN,
            ]
        )
    assert code == 0, out.getvalue()
    return out.getvalue()


def table_row(table: str) -> dict[str, str]:
    """The campaign's row of the status table, by column title."""
    header, row, *_ = table.splitlines()
    assert [title.strip() for title in header.split("  ") if title.strip()] == list(COLUMNS)
    cells = [cell.strip() for cell in row.split("  ") if cell.strip()]
    return dict(zip(COLUMNS, cells, strict=True))


async def test_campaign_status_agrees_with_the_optimove_tally(
    kafka: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    numbers, _ = recipients()
    async with campaign_pipeline() as (settings, optimove), running(build_campaigns(settings)):
        for body in bodies(numbers):
            await post_campaign(settings, body)
        status = await settled_status(settings, optimove)
        assert_agrees_with_optimove(status, optimove)

        monkeypatch.setenv("TEST_CAMPAIGNS_ADMIN_TOKEN", ADMIN_TOKEN)
        table = await asyncio.to_thread(cli_status, settings)
    expected = tally(optimove)
    row = table_row(table)
    assert (row["TENANT"], row["CAMPAIGN"], row["DONE"]) == (TENANT, CAMPAIGN, "100%")
    assert int(row["ACCEPTED"]) + int(row["REJECTED"]) == 300
    assert int(row["DELIVERED"]) == expected["delivered"]
    assert int(row["FAILED"]) == expected["failed"]
    assert int(row["OPTED-OUT"]) == OPTED_OUT
    assert int(row["REPORTED"]) == expected["reports"]
    failures = {
        sub_status: int(n)
        for sub_status, n in (
            item.rsplit(" ", 1) for item in table.splitlines()[2].split("failed:")[1].split(",")
        )
    }
    assert {k.strip(): v for k, v in failures.items()} == expected["final_by_status"]["Failed"]


def write_campaigns_config(tmp_path: Path, settings: Settings) -> Path:
    path = tmp_path / "campaigns.toml"
    write_config(
        path,
        config_data(
            overrides={
                "log_level": "WARNING",
                "campaigns": {
                    "listen": settings.campaigns.listen,
                    "admin_token": ADMIN_TOKEN,
                    # Nothing committed before the kill: every record is read again after it.
                    "runner": {
                        "commit_interval_s": 600.0,
                        "session_timeout_ms": 6000,
                        "heartbeat_interval_ms": 1000,
                    },
                },
            }
        ),
    )
    return path


def already_counted() -> float:
    return sum(
        REGISTRY.get_sample_value(
            "smsbridge_campaign_inputs_already_counted_total", {"topic": topic}
        )
        or 0.0
        for topic in (INGRESS_REQUESTS.name, STATUSES.name, REPORT_OUTCOMES.name)
    )


async def test_a_campaigns_service_killed_mid_campaign_is_replaced_without_double_counting(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    numbers, _ = recipients()
    first, second = bodies(numbers)
    async with campaign_pipeline() as (settings, optimove):
        config = write_campaigns_config(tmp_path, settings)
        killed = await start_service(config, "campaigns")
        try:
            await post_campaign(settings, first)

            async def counting() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    status = await campaign_status(settings, TENANT, CAMPAIGN)
                    return status is not None and status["sent"] >= 40
                return False

            await wait_for(counting, 45, "the first instance counting")
        finally:
            killed.send_signal(signal.SIGKILL)
            await asyncio.wait_for(killed.wait(), 10)

        before = already_counted()
        async with running(build_campaigns(settings)):
            await post_campaign(settings, second)
            status = await settled_status(settings, optimove)
            assert_agrees_with_optimove(status, optimove)
        # The new instance read the killed one's uncommitted records again and skipped them.
        assert already_counted() - before > 0
