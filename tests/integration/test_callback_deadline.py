"""Octopush's one-second answer when the broker stalls (issue 14, point 13).

Octopush wants its callbacks answered "in under 1 second" (providers.md §3). The broker process is
SIGSTOPped: it keeps its connections and answers nothing, as a broker in a long pause does. The
callbacks service must answer 503 within the deadline, so that Octopush retries, instead of after
the producer's own 5 s. The events it could not confirm in time still reach Kafka once the broker
resumes, and the retry stores them again: the normalizer must turn the two copies (same event ids)
into one status and one forwarded reply each, so that Optimove hears of each once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY

from services.callbacks.app import build as build_callbacks
from services.normalizer.app import build as build_normalizer
from shared.config import CallbacksSettings
from shared.contract.events import (
    DispatchRecord,
    InboundMessage,
    MessageContext,
    ProviderEvent,
    StatusEvent,
)
from shared.contract.topics import DISPATCHES, INBOUND, PROVIDER_EVENTS, STATUSES
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import OutRecord, Publisher, make_producer
from shared.providers import callback_url
from shared.providers.octopush import Octopush
from tests.support import TENANT, read_topic, running, wait_for
from tests.support.providers import OCTOPUSH_ACCOUNT, OPENSMS_ACCOUNT, bulk_provider_settings

pytestmark = pytest.mark.integration

# providers.md §3.2, §3.3 and §3.4, verbatim.
OCTOPUSH_DLR = (
    b'{"channel":"sms","message_id":"sms_0000000000000000000000","list_name":"List Name",\n'
    b' "number":"+33600112233","status":"DELIVERED","unit_price":0.5,\n'
    b' "delivery_date":"2025-01-22 11:46:06","meta_data":{}}'
)
OCTOPUSH_REPLY = (
    b'{"message_id":"sms_5fa275dbf21dc","number":"+33600000000","text":"some reply",\n'
    b' "sim_card_number":"12345","reception_date":"2020-11-04 11:11:45"}'
)
OCTOPUSH_STOP = (
    b'{"message_id":"sms_5fa275dbf21dc","number":"+33600000000","text":"stop",'
    b'"stop_date":"2020-11-04 11:11:45"}'
)
# providers.md §2.2, verbatim: stored before the stall, so that the producer knows the topic.
OPENSMS_WEBHOOK = (
    b'{"event":"sms.failed","message_id":"msg_123456","phone":"+254712345678",\n'
    b' "status":"failed","error":"Invalid phone number","timestamp":"2024-01-13T12:00:00Z"}'
)

DLR_TICKET, DLR_NUMBER = "sms_0000000000000000000000", "+33600112233"
REPLY_TICKET, REPLY_NUMBER = "sms_5fa275dbf21dc", "+33600000000"
# The default (tests/support sets a longer one for every other test).
OCTOPUSH_DEADLINE_S = CallbacksSettings().deadline_by_kind_s["octopush"]


def dispatch(ticket: str, number: str) -> DispatchRecord:
    """What the sender stored when Octopush took the message (the ticket covers the call)."""
    return DispatchRecord(
        context=MessageContext(
            tenant=TENANT,
            message_id=f"m-{ticket}",
            batch_id="batch-1",
            mobile_number=number.lstrip("+"),
            metadata_json="{}",
        ),
        correlation_key=Octopush.correlation_key(OCTOPUSH_ACCOUNT, ticket, number),
        outcome="accepted",
        sub_status="Sent",
        provider_kind="octopush",
        provider_account=OCTOPUSH_ACCOUNT,
        provider_message_id=ticket,
        destination=number,
        sender_id="ACME",
    )


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def duplicates_dropped() -> float:
    return metric("smsbridge_status_dropped_total", reason="duplicate") + metric(
        "smsbridge_inbound_duplicates_total", provider="octopush"
    )


@pytest.fixture
def stall(kafka: EmbeddedBroker) -> Iterator[tuple[Callable[[], None], Callable[[], None]]]:
    """SIGSTOP / SIGCONT the broker process; never leaves it stopped."""
    pid = kafka.pid
    assert pid is not None
    stopped = False

    def stop() -> None:
        nonlocal stopped
        os.kill(pid, signal.SIGSTOP)
        stopped = True

    def resume() -> None:
        nonlocal stopped
        os.kill(pid, signal.SIGCONT)
        stopped = False

    yield stop, resume
    if stopped:
        resume()


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, float, str]:
    started = time.monotonic()
    async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
        await response.read()
        return response.status, time.monotonic() - started, response.headers.get("Retry-After", "")


async def post_until_taken(http: aiohttp.ClientSession, url: str, body: bytes) -> int:
    """POST as a provider does: again after a 503, for up to 30 s."""
    deadline = time.monotonic() + 30
    while True:
        status, _, _ = await post(http, url, body)
        if status != 503 or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.2)


@pytest.mark.own_broker
@pytest.mark.timeout(180)
async def test_a_stalled_broker_gets_octopush_a_503_in_time_and_its_retry_no_duplicate(
    kafka: EmbeddedBroker, stall: tuple[Callable[[], None], Callable[[], None]], tmp_path: Path
) -> None:
    stop_broker, resume_broker = stall
    settings = bulk_provider_settings(
        overrides={
            "callbacks": {"deadline_by_kind_s": {"octopush": OCTOPUSH_DEADLINE_S}},
            "normalizer": {"state_dir": str(tmp_path / "normalizer")},
            "tenants": {TENANT: {"routes": [{"provider": OCTOPUSH_ACCOUNT}]}},
        }
    )
    octopush_url = callback_url(settings, OCTOPUSH_ACCOUNT)
    bodies = [OCTOPUSH_DLR, OCTOPUSH_REPLY, OCTOPUSH_STOP]
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    try:
        await Publisher(producer, 10).publish(
            OutRecord(DISPATCHES, record.correlation_key, record)
            for record in (dispatch(DLR_TICKET, DLR_NUMBER), dispatch(REPLY_TICKET, REPLY_NUMBER))
        )
    finally:
        await producer.stop()

    async with (
        running(build_normalizer(settings)),
        running(build_callbacks(settings)),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
    ):
        await read_topic(settings, STATUSES, StatusEvent, expect=2)  # both dispatches joined
        status, _, _ = await post(http, callback_url(settings, OPENSMS_ACCOUNT), OPENSMS_WEBHOOK)
        assert status == 200
        dropped_before = duplicates_dropped()

        stop_broker()
        answers = await asyncio.gather(*(post(http, octopush_url, body) for body in bodies))
        for status, elapsed, retry_after in answers:
            assert status == 503
            assert retry_after.isdigit()
            assert elapsed < 1.0, f"answered after {elapsed:.2f}s: Octopush gave up at 1 s"
            assert elapsed >= OCTOPUSH_DEADLINE_S * 0.9  # it did wait for Kafka that long
        resume_broker()

        # Octopush tries again (until it gets its 200); the events of the answers it got 503
        # for were meanwhile stored late, so now they are there more than once.
        for body in bodies:
            assert await post_until_taken(http, octopush_url, body) == 200
        stored = await read_topic(settings, PROVIDER_EVENTS, ProviderEvent, expect=7)
        copies = Counter(event.event_id for _, event in stored if event.provider_kind == "octopush")
        assert len(copies) == 3
        assert min(copies.values()) >= 2, copies  # the late writes did happen
        # Every further copy reached the normalizer and was recognised.
        further = sum(copies.values()) - len(copies)
        await wait_for(
            lambda: duplicates_dropped() - dropped_before >= further,
            what=f"the normalizer dropping the {further} further copies",
        )
        statuses = await read_topic(settings, STATUSES, StatusEvent, expect=3, settle_s=2.0)
        inbound = await read_topic(settings, INBOUND, InboundMessage, expect=2, settle_s=1.0)

    assert sorted(
        (event.context.message_id, event.status, event.sub_status) for _, event in statuses
    ) == [
        (f"m-{DLR_TICKET}", "delivered", "Delivered"),
        (f"m-{DLR_TICKET}", "sent", "Sent"),
        (f"m-{REPLY_TICKET}", "sent", "Sent"),
    ]
    assert sorted(message.text for _, message in inbound) == ["some reply", "stop"]
