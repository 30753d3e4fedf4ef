"""The simulated Optimove's ``--record`` file: its tally survives a restart (the chaos test kills
it in the middle of a campaign)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson
import pytest

from shared.config import OptimoveContractSettings
from shared.contract.events import MessageContext, StatusEvent
from shared.contract.optimove import OptimoveContract
from shared.kafka.broker import free_port
from simulators.optimove import OptimoveSimulator
from tests.support import TENANT, TENANT_API_TOKEN, TENANT_SECRET, make_settings

pytestmark = pytest.mark.integration

CONTRACT = OptimoveContract(OptimoveContractSettings())


def simulator(port: int, record: Path) -> OptimoveSimulator:
    return OptimoveSimulator(
        "127.0.0.1", port, {TENANT: (TENANT_API_TOKEN, TENANT_SECRET)}, record_path=record
    )


def final_report(message_id: str) -> StatusEvent:
    return StatusEvent(
        event_id=f"e-{message_id}",
        context=MessageContext(
            tenant=TENANT,
            message_id=message_id,
            batch_id="b",
            campaign_id="spring",
            mobile_number="447911123456",
            metadata_json='{"appId": 1, "campaignId": "spring"}',
        ),
        status="delivered",
        sub_status="Delivered",
    )


async def post_reports(port: int, message_ids: list[str]) -> None:
    tenant = make_settings(optimove_url=f"http://127.0.0.1:{port}").tenants[TENANT]
    async with aiohttp.ClientSession() as client:
        for message_id in message_ids:
            request = CONTRACT.delivery_report(tenant, final_report(message_id))
            async with client.post(request.url, data=request.body, headers=request.headers) as r:
                assert r.status == 200


async def test_the_tally_is_read_back_from_the_record_file_after_a_restart(tmp_path: Path) -> None:
    record, port = tmp_path / "optimove.jsonl", free_port()
    first = simulator(port, record)
    await first.start()
    try:
        await post_reports(port, ["m-1", "m-2"])
    finally:
        await first.stop()
    # A line cut short (the process was killed while writing it) is skipped, not fatal.
    with record.open("ab") as torn:
        torn.write(b'{"tenant": "acme", "endp')

    second = simulator(port, record)
    await second.start()
    try:
        await post_reports(port, ["m-2", "m-3"])
        tally = second.tally(TENANT, "spring")[TENANT]
    finally:
        await second.stop()

    assert (tally["final"], tally["duplicates"], tally["reports"]) == (3, 1, 4)
    third = simulator(port, record)
    await third.start()
    try:
        assert third.tally(TENANT, "spring")[TENANT] == tally
    finally:
        await third.stop()
    lines = record.read_bytes().splitlines()
    assert [orjson.loads(line)["endpoint"] for line in lines[:2]] == ["delivery-report"] * 2


async def test_reset_forgets_the_record_file_too(tmp_path: Path) -> None:
    record, port = tmp_path / "optimove.jsonl", free_port()
    started = simulator(port, record)
    await started.start()
    try:
        await post_reports(port, ["m-1"])
        started.reset()
        await post_reports(port, ["m-2"])
    finally:
        await started.stop()
    again = simulator(port, record)
    await again.start()
    try:
        assert again.tally(TENANT, "spring")[TENANT]["final"] == 1
    finally:
        await again.stop()
