from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from services.callbacks.app import provider_events
from services.normalizer.app import build
from shared.config import Settings
from shared.contract.events import (
    DeadLetter,
    DispatchRecord,
    InboundMessage,
    MessageContext,
    ProviderEvent,
    StatusEvent,
    utcnow,
)
from shared.contract.topics import DEAD_LETTERS, DISPATCHES, INBOUND, PROVIDER_EVENTS, STATUSES
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import OutRecord, Publisher, make_producer
from shared.providers.opensms import OpenSms
from shared.providers.otpiq import FIXTURES, Otpiq
from tests.support import TENANT, make_settings, read_topic, running, wait_for

pytestmark = pytest.mark.integration

ACCOUNT = "otpiq-main"


def normalizer_settings(state_dir: Path, **normalizer: Any) -> Settings:
    return make_settings(overrides={"normalizer": {"state_dir": str(state_dir), **normalizer}})


def dispatch(message_id: str, sms_id: str, *, failed_as: str = "") -> DispatchRecord:
    return DispatchRecord(
        context=MessageContext(
            tenant=TENANT,
            message_id=message_id,
            batch_id="batch-1",
            mobile_number="447700900123",
            metadata_json="{}",
        ),
        correlation_key=Otpiq.correlation_key(ACCOUNT, sms_id, ""),
        outcome="failed" if failed_as else "accepted",
        sub_status=failed_as or "Sent",
        provider_kind="otpiq",
        provider_account=ACCOUNT,
        provider_message_id=sms_id,
        destination="+447700900123",
    )


def callback(fixture: str, sms_id: str) -> ProviderEvent:
    """The event the callbacks service stores for this OTPIQ callback."""
    body = orjson.dumps({**FIXTURES[fixture], "smsId": sms_id})
    [event] = provider_events(
        Otpiq, ACCOUNT, body, Otpiq.parse_callback(body, "application/json"), utcnow()
    )
    return event


@pytest.fixture
async def publisher(kafka: EmbeddedBroker) -> AsyncIterator[Publisher]:
    producer = make_producer(make_settings().kafka, "test")
    await producer.start()
    try:
        yield Publisher(producer, 10.0)
    finally:
        await producer.stop()


async def publish(publisher: Publisher, *items: DispatchRecord | ProviderEvent) -> None:
    await publisher.publish(
        OutRecord(
            DISPATCHES if isinstance(item, DispatchRecord) else PROVIDER_EVENTS,
            item.correlation_key,
            item,
        )
        for item in items
    )


def status_dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("smsbridge_status_dropped_total", {"reason": reason}) or 0.0


def dlr_received(status: str) -> float:
    labels = {"provider": "otpiq", "status": status}
    return REGISTRY.get_sample_value("smsbridge_dlr_received_total", labels) or 0.0


async def statuses_by_message(settings: Settings, expect: int) -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key, status in await read_topic(settings, STATUSES, StatusEvent, expect=expect):
        assert key == status.context.message_id
        found[status.context.message_id].append((status.status, status.sub_status))
    return dict(found)


async def test_dispatches_and_provider_events_become_one_status_sequence(
    kafka: EmbeddedBroker, publisher: Publisher, tmp_path: Path
) -> None:
    settings = normalizer_settings(tmp_path)
    duplicates_before, after_final_before = (
        status_dropped("duplicate"),
        status_dropped("after_final"),
    )
    async with running(build(settings)):
        await publish(
            publisher,
            # m-1: the usual life of a message, with a repeated delivery report
            dispatch("m-1", "sms-1"),
            callback("callback_sent", "sms-1"),
            callback("callback_delivered", "sms-1"),
            callback("callback_delivered", "sms-1"),
            # m-3: refused at send time; a stray report afterwards changes nothing
            dispatch("m-3", "sms-3", failed_as="InvalidNumber"),
            callback("callback_delivered", "sms-3"),
            # m-4: the sent report arrives after the delivered one
            dispatch("m-4", "sms-4"),
            callback("callback_delivered", "sms-4"),
            callback("callback_sent", "sms-4"),
            callback("callback_failed", "sms-4"),
        )
        # m-2: the delivery report overtakes the dispatch record
        delivered_before = dlr_received("delivered")
        await publish(publisher, callback("callback_delivered", "sms-2"))
        await wait_for(
            lambda: dlr_received("delivered") > delivered_before,
            what="the early report to be processed",
        )
        await publish(publisher, dispatch("m-2", "sms-2"))

        found = await statuses_by_message(settings, expect=7)
        # Every event that changed nothing is counted by why: one repeat (m-1) and three
        # reports after a final status (m-3's stray, m-4's sent and failed).
        await wait_for(
            lambda: (
                status_dropped("duplicate") - duplicates_before >= 1
                and status_dropped("after_final") - after_final_before >= 3
            ),
            what="the dropped events to be counted",
        )

    assert status_dropped("duplicate") - duplicates_before == 1
    assert status_dropped("after_final") - after_final_before == 3
    assert found == {
        "m-1": [("sent", "Sent"), ("delivered", "Delivered")],
        "m-2": [("sent", "Sent"), ("delivered", "Delivered")],
        "m-3": [("failed", "InvalidNumber")],
        "m-4": [("sent", "Sent"), ("delivered", "Delivered")],
    }


async def test_state_survives_a_restart_from_the_changelog(
    kafka: EmbeddedBroker, publisher: Publisher, tmp_path: Path
) -> None:
    # Tansu numbers the first generation 0, for which aiokafka sends no LeaveGroup: the second
    # instance waits for the first one's session to expire, so keep that short.
    quick = {"max_in_flight": 1, "session_timeout_ms": 3000, "heartbeat_interval_ms": 500}
    first = normalizer_settings(tmp_path / "first", runner=quick)
    async with running(build(first)):
        held_before = dlr_received("delivered")
        await publish(
            publisher,
            dispatch("m-5", "sms-5"),
            callback("callback_delivered", "sms-6"),  # held: no dispatch yet
        )
        await wait_for(lambda: dlr_received("delivered") > held_before, what="the held report")
        assert await statuses_by_message(first, expect=1) == {"m-5": [("sent", "Sent")]}

    # A new instance on another disk: all it knows comes from sms.normalizer-state.
    second = normalizer_settings(tmp_path / "second", runner=quick)
    async with running(build(second)):
        await publish(
            publisher,
            dispatch("m-5", "sms-5"),  # replayed: must not report Sent again
            callback("callback_delivered", "sms-5"),  # needs m-5's dispatch from the changelog
            dispatch("m-6", "sms-6"),  # joins the report held by the first instance
        )
        found = await statuses_by_message(second, expect=4)

    assert found == {
        "m-5": [("sent", "Sent"), ("delivered", "Delivered")],
        "m-6": [("sent", "Sent"), ("delivered", "Delivered")],
    }


OPENSMS_ACCOUNT = "opensms-ke"
KENYAN = "+254712345678"


def opensms_dispatch(message_id: str) -> DispatchRecord:
    """An OpenSMS send answered with the documented success body: no provider id."""
    return DispatchRecord(
        context=MessageContext(
            tenant=TENANT,
            message_id=message_id,
            batch_id="batch-ke",
            mobile_number=KENYAN,
            metadata_json="{}",
        ),
        correlation_key=OpenSms.correlation_key(OPENSMS_ACCOUNT, "", KENYAN),
        outcome="accepted",
        sub_status="Sent",
        provider_kind="opensms",
        provider_account=OPENSMS_ACCOUNT,
        destination=KENYAN,
    )


def opensms_report(status: str, message_id: str) -> ProviderEvent:
    """The event the callbacks service stores for an OpenSMS webhook (providers.md §2.2)."""
    body = orjson.dumps(
        {
            "event": f"sms.{status}",
            "message_id": message_id,
            "phone": KENYAN,
            "status": status,
            "timestamp": "2024-01-13T12:00:00Z",
        }
    )
    parsed = OpenSms.parse_callback(body, "application/json")
    [event] = provider_events(OpenSms, OPENSMS_ACCOUNT, body, parsed, utcnow())
    return event


async def test_messages_matched_by_number_survive_a_restart(
    kafka: EmbeddedBroker, publisher: Publisher, tmp_path: Path
) -> None:
    quick = {"max_in_flight": 1, "session_timeout_ms": 3000, "heartbeat_interval_ms": 500}
    first = normalizer_settings(tmp_path / "first", runner=quick)
    pending = {"provider": "opensms", "status": "sent"}
    async with running(build(first)):
        await publish(publisher, opensms_dispatch("m-ke-1"), opensms_dispatch("m-ke-2"))
        assert await statuses_by_message(first, expect=2) == {
            "m-ke-1": [("sent", "Sent")],
            "m-ke-2": [("sent", "Sent")],
        }
        before = REGISTRY.get_sample_value("smsbridge_dlr_received_total", pending) or 0.0
        # The latest send without an id takes it, and keeps its id from now on.
        await publish(publisher, opensms_report("pending", "msg_b"))
        await wait_for(
            lambda: (
                (REGISTRY.get_sample_value("smsbridge_dlr_received_total", pending) or 0.0) > before
            ),
            what="the pending report",
        )

    second = normalizer_settings(tmp_path / "second", runner=quick)
    async with running(build(second)):
        await publish(
            publisher,
            opensms_dispatch("m-ke-1"),  # replayed: not Sent again
            opensms_report("failed", "msg_a"),  # an id no message has: m-ke-1, the one left
            opensms_report("delivered", "msg_b"),  # m-ke-2's id, learned before the restart
        )
        found = await statuses_by_message(second, expect=4)

    assert found == {
        "m-ke-1": [("sent", "Sent"), ("failed", "Undeliverable")],
        "m-ke-2": [("sent", "Sent"), ("delivered", "Delivered")],
    }


async def test_unmatched_reports_inbound_events_and_silent_messages(
    kafka: EmbeddedBroker, publisher: Publisher, tmp_path: Path
) -> None:
    settings = normalizer_settings(tmp_path, unmatched_after_s=1.0, dlr_timeout_s=2.0)
    unmatched = callback("callback_delivered", "sms-nobody-sent")
    inbound = ProviderEvent(
        event_id="e-inbound-1",
        kind="inbound",
        provider_kind="otpiq",
        provider_account=ACCOUNT,
        correlation_key=f"{ACCOUNT}:from:+447700900123",
        number="+447700900123",
        text="STOP",
    )
    unmatched_metric = {"provider": "otpiq"}
    unmatched_before = REGISTRY.get_sample_value("smsbridge_dlr_unmatched_total", unmatched_metric)
    async with running(build(settings)):
        await publish(publisher, unmatched, inbound, dispatch("m-7", "sms-7"))

        letters = await read_topic(settings, DEAD_LETTERS, DeadLetter, expect=1, timeout_s=30)
        # m-7 never hears from its provider: Failed/Expired after dlr_timeout_s.
        found = await statuses_by_message(settings, expect=2)
        # A reply is not held for a dispatch: forwarded (tests/integration/test_normalizer_replies).
        [(_, forwarded)] = await read_topic(settings, INBOUND, InboundMessage, expect=1)

    [(_, dead)] = letters
    assert dead.reason == f"no dispatch record for {ACCOUNT}:sms-nobody-sent"
    assert dead.redrive_topic == PROVIDER_EVENTS.name
    assert dead.stage == "normalizer"
    assert ProviderEvent.model_validate_json(dead.payload) == unmatched
    assert (forwarded.tenant, forwarded.from_number, forwarded.opt_out) == (
        TENANT,
        "447700900123",
        True,
    )
    after = REGISTRY.get_sample_value("smsbridge_dlr_unmatched_total", unmatched_metric)
    assert (after or 0.0) == (unmatched_before or 0.0) + 1

    assert found == {"m-7": [("sent", "Sent"), ("failed", "Expired")]}
