"""A delivery-report field Optimove refuses is switched off by configuration (issue 14, point 8).

Only ``type`` and ``metadata`` of the delivery report are documented; the extra fields are our
guess (decisions.md §4). Here Optimove turns out to answer 400 to a report that carries
``providerMessageId``: the reporter dead-letters those reports (a 400 is final). The operator
writes ``[optimove.report_fields] providerMessageId = ""`` in the configuration file, restarts the
reporter and re-drives the dead letters: every report is accepted, and no release was needed.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.reporter.app import build
from shared.config import Settings
from shared.contract.events import CanonicalStatus, DeadLetter, MessageContext, StatusEvent
from shared.contract.topics import DEAD_LETTERS, STATUSES
from shared.http_server import Request
from shared.kafka.broker import EmbeddedBroker, free_port
from shared.kafka.clients import OutRecord, Publisher, make_producer
from simulators.optimove import (
    DELIVERY_REPORT,
    OptimoveSimulator,
    RejectedRequest,
)
from tests.support import TENANT, TENANT_API_TOKEN, TENANT_SECRET, read_topic, running, wait_for
from tests.support.ops import config_data, write_config
from tools.dead_letters import redrive

pytestmark = pytest.mark.integration

REFUSED_FIELD = "providerMessageId"


class OptimoveRefusingAField(OptimoveSimulator):
    """The simulated Optimove, stricter: a delivery report carrying ``providerMessageId`` gets
    400, as the real one may answer for a field it does not know."""

    async def _check(self, request: Request, slug: str, endpoint: str, raw: bytes) -> None:
        if endpoint == DELIVERY_REPORT:
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict) and REFUSED_FIELD in parsed:
                raise RejectedRequest(400, f"unknown field {REFUSED_FIELD}")
        await super()._check(request, slug, endpoint, raw)


def status(message_id: str, canonical: CanonicalStatus, sub_status: str) -> StatusEvent:
    return StatusEvent(
        event_id=f"e-{message_id}-{canonical}",
        context=MessageContext(
            tenant=TENANT,
            message_id=message_id,
            batch_id="batch-1",
            request_id="req-1",
            campaign_id="spring",
            customer_id=f"cust-{message_id}",
            mobile_number="447911123456",
            metadata_json='{"campaignId": "spring"}',
        ),
        status=canonical,
        sub_status=sub_status,
        provider_message_id=f"p-{message_id}",
    )


async def publish(settings: Settings, events: list[StatusEvent]) -> None:
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    try:
        await Publisher(producer, 10).publish(
            OutRecord(STATUSES, e.context.message_id, e) for e in events
        )
    finally:
        await producer.stop()


def accepted_reports(simulator: OptimoveSimulator) -> list[dict[str, Any]]:
    return [
        orjson.loads(r["body"])
        for r in simulator.received(endpoint=DELIVERY_REPORT, tenant=TENANT)
        if not r["rejected"]
    ]


async def test_a_refused_report_field_is_left_out_by_a_configuration_change(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    port = free_port()
    simulator = OptimoveRefusingAField(
        "127.0.0.1", port, {TENANT: (TENANT_API_TOKEN, TENANT_SECRET)}
    )
    data = config_data(optimove_url=f"http://127.0.0.1:{port}")
    as_released = write_config(tmp_path / "smsbridge.toml", data)
    # The operator's change: one field left out (and, while at it, one sub-status renamed).
    changed = {
        **data,
        "optimove": {
            "report_fields": {REFUSED_FIELD: ""},
            "sub_status_names": {"OptedOut": "Unsubscribed"},
        },
    }
    reconfigured = write_config(tmp_path / "smsbridge-changed.toml", changed)
    refused = [
        status("m-1", "sent", "Sent"),
        status("m-1", "delivered", "Delivered"),
        status("m-2", "failed", "OptedOut"),
    ]

    await simulator.start()
    try:
        async with running(build(as_released)):
            await publish(as_released, refused)
            dead = await read_topic(as_released, DEAD_LETTERS, DeadLetter, expect=3, timeout_s=30)
        assert accepted_reports(simulator) == []
        for _, letter in dead:
            assert letter.status_code == 400
            assert f"unknown field {REFUSED_FIELD}" in letter.response_excerpt

        async with running(build(reconfigured)):
            summary = await redrive(reconfigured, source_topic=STATUSES.name)
            await publish(reconfigured, [status("m-3", "delivered", "Delivered")])
            await wait_for(
                lambda: len(accepted_reports(simulator)) >= 4,
                timeout_s=30,
                what="the re-driven and the new reports accepted",
            )
            dead_after = await read_topic(reconfigured, DEAD_LETTERS, DeadLetter, settle_s=0.5)
    finally:
        await simulator.stop()

    assert summary.redriven == 3
    reports = accepted_reports(simulator)
    assert len(reports) == 4
    assert all(REFUSED_FIELD not in report for report in reports)
    assert all(report["messageId"] and report["customerId"] for report in reports)
    by_message: dict[str, list[str]] = defaultdict(list)
    for report in reports:
        by_message[report["messageId"]].append(
            f"{report['type']['status']}/{report['type']['subStatus']}"
        )
    assert by_message == {
        "m-1": ["Sent/Sent", "Delivered/Delivered"],
        "m-2": ["Failed/Unsubscribed"],
        "m-3": ["Delivered/Delivered"],
    }
    assert len(dead_after) == 3  # the first three only: nothing refused after the change
