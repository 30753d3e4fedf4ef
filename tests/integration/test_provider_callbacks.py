"""The callbacks service with OpenSMS and Octopush: documented payloads in, provider events out."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from services.callbacks.app import build
from shared.contract.events import ProviderEvent
from shared.contract.topics import PROVIDER_EVENTS
from shared.http_client import HttpClient
from shared.kafka.broker import EmbeddedBroker, free_port
from shared.providers import callback_url
from shared.providers import octopush as octopush_module
from shared.providers import opensms as opensms_module
from shared.providers.base import OutboundSms, SendAccepted
from shared.providers.octopush import Octopush
from shared.providers.opensms import OpenSms
from simulators.providers import ProviderSimulator, callback_urls_from_settings
from tests.support import read_topic, running, wait_for
from tests.support.providers import (
    OCTOPUSH_ACCOUNT,
    OCTOPUSH_KEY,
    OPENSMS_ACCOUNT,
    bulk_provider_settings,
)

pytestmark = pytest.mark.integration

OPENSMS = opensms_module.FIXTURES
OCTOPUSH = octopush_module.FIXTURES
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def post(
    http: aiohttp.ClientSession, url: str, body: bytes, content_type: str = JSON
) -> tuple[int, bytes, str | None]:
    async with http.post(url, data=body, headers={"Content-Type": content_type}) as response:
        return response.status, await response.read(), response.headers.get("Content-Type")


def form(payload: dict[str, Any]) -> bytes:
    return urllib.parse.urlencode(
        {k: v for k, v in payload.items() if not isinstance(v, dict)}
    ).encode()


def by_key(records: list[tuple[str | None, ProviderEvent]]) -> dict[str, list[ProviderEvent]]:
    grouped: dict[str, list[ProviderEvent]] = {}
    for key, event in records:
        assert key is not None
        assert key == event.correlation_key
        grouped.setdefault(key, []).append(event)
    return grouped


async def test_documented_payloads_become_events_keyed_for_the_join(
    kafka: EmbeddedBroker, http: aiohttp.ClientSession
) -> None:
    settings = bulk_provider_settings()
    opensms_url = callback_url(settings, OPENSMS_ACCOUNT)
    octopush_url = callback_url(settings, OCTOPUSH_ACCOUNT)
    unsolicited = {k: v for k, v in OCTOPUSH["callback_inbound"].items() if k != "message_id"}
    shouting = {key.upper(): value for key, value in OCTOPUSH["callback_stop"].items()}
    octopush_bodies = [
        (orjson.dumps(OCTOPUSH["callback_delivered"]), JSON),
        (form(OCTOPUSH["callback_delivered"] | {"status": "ACK"}), FORM),
        (orjson.dumps(OCTOPUSH["callback_inbound"]), JSON),
        (form(unsolicited), FORM),
        (orjson.dumps(shouting), JSON),
    ]
    async with running(build(settings)):
        for name in ("callback_pending", "callback_delivered", "callback_failed"):
            status, body, _ = await post(http, opensms_url, orjson.dumps(OPENSMS[name]))
            assert (status, orjson.loads(body)) == (200, {"status": "received"}), name
        for raw, content_type in octopush_bodies:
            status, body, answered_type = await post(http, octopush_url, raw, content_type)
            # Octopush wants nothing displayed: not even a content type.
            assert (status, body, answered_type) == (200, b"", None), raw

    grouped = by_key(await read_topic(settings, PROVIDER_EVENTS, ProviderEvent, expect=8))

    # OpenSMS reports are keyed by number: its send answer may name no message to key them by.
    opensms = grouped.pop(f"{OPENSMS_ACCOUNT}:+254712345678")
    assert [e.provider_status for e in opensms] == ["pending", "delivered", "failed_invalid_number"]
    assert {(e.kind, e.provider_kind, e.provider_account) for e in opensms} == {
        ("status", "opensms", OPENSMS_ACCOUNT)
    }
    assert opensms[2].reason == "Invalid phone number"
    assert OpenSms.canonical(opensms[2].provider_status) == ("failed", "InvalidNumber")

    delivered, acknowledged = grouped.pop(
        f"{OCTOPUSH_ACCOUNT}:sms_0000000000000000000000:+33600112233"
    )
    assert (delivered.kind, delivered.provider_status) == ("status", "DELIVERED")
    assert delivered.raw == OCTOPUSH["callback_delivered"]
    assert (acknowledged.kind, acknowledged.provider_status) == ("status", "ACK")  # the form

    reply, stop = grouped.pop(f"{OCTOPUSH_ACCOUNT}:sms_5fa275dbf21dc:+33600000000")
    assert (reply.kind, reply.text, reply.to) == ("inbound", "some reply", "12345")
    assert (stop.kind, stop.text) == ("opt_out", "stop")
    [unsolicited_event] = grouped.pop(f"{OCTOPUSH_ACCOUNT}:from:+33600000000")
    assert (unsolicited_event.kind, unsolicited_event.provider_message_id) == ("inbound", "")
    assert unsolicited_event.occurred_at is not None
    assert unsolicited_event.occurred_at.isoformat() == "2020-11-04T10:11:45+00:00"
    assert grouped == {}


async def test_refused_callbacks_never_reach_kafka(
    kafka: EmbeddedBroker, http: aiohttp.ClientSession
) -> None:
    settings = bulk_provider_settings()
    opensms_url = callback_url(settings, OPENSMS_ACCOUNT)
    octopush_url = callback_url(settings, OCTOPUSH_ACCOUNT)
    delivered = orjson.dumps(OCTOPUSH["callback_delivered"])
    cases: list[tuple[str, str, bytes, str, int]] = [
        (
            "opensms bad token",
            opensms_url[:-3] + "bad",
            orjson.dumps(OPENSMS["callback_failed"]),
            JSON,
            401,
        ),
        ("octopush bad token", octopush_url[:-3] + "bad", delivered, JSON, 401),
        (
            "octopush token of another account",
            octopush_url.rsplit("/", 1)[0] + "/cb-token-opensms",
            delivered,
            JSON,
            401,
        ),
        (
            "opensms truncated",
            opensms_url,
            orjson.dumps(OPENSMS["callback_failed"])[:-4],
            JSON,
            400,
        ),
        ("opensms not json", opensms_url, b"event=sms.delivered", FORM, 400),
        ("octopush truncated", octopush_url, delivered[:-4], JSON, 400),
        ("octopush not json nor form", octopush_url, b"<xml/>", "text/xml", 400),
        ("octopush unknown shape", octopush_url, b'{"hello": "world"}', JSON, 400),
        ("octopush form without date", octopush_url, b"number=%2B33600000000&text=hi", FORM, 400),
    ]
    async with running(build(settings)):
        for name, url, body, content_type, expected in cases:
            status, answer, _ = await post(http, url, body, content_type)
            assert status == expected, name
            assert orjson.loads(answer)["error"], name

    assert await read_topic(settings, PROVIDER_EVENTS, ProviderEvent, settle_s=1.0) == []


async def test_simulated_providers_call_back_our_service_with_joinable_keys(
    kafka: EmbeddedBroker, http: aiohttp.ClientSession
) -> None:
    simulator = ProviderSimulator("127.0.0.1", free_port(), callback_delay_ms=5, seed=3)
    settings = bulk_provider_settings(simulator.url)
    simulator.configure(callback_urls=callback_urls_from_settings(settings))
    ours = HttpClient(timeout_s=10)
    octopush = Octopush(
        OCTOPUSH_ACCOUNT,
        settings.providers[OCTOPUSH_ACCOUNT],
        ours,
        callback_url(settings, OCTOPUSH_ACCOUNT),
    )
    opensms = OpenSms(
        OPENSMS_ACCOUNT,
        settings.providers[OPENSMS_ACCOUNT],
        ours,
        callback_url(settings, OPENSMS_ACCOUNT),
    )
    french = [OutboundSms(f"m-fr-{i}", f"+3360000000{i}", "Bonjour", "ACME") for i in range(3)]
    kenyan = [OutboundSms(f"m-ke-{i}", f"+25471234567{i}", "Habari", "ACME") for i in range(2)]

    await simulator.start()
    try:
        async with running(build(settings)):
            sent = await octopush.send(french) + await opensms.send(kenyan)
            accepted = [result for result in sent if isinstance(result, SendAccepted)]
            assert len(accepted) == 5, sent
            await wait_for(lambda: len(simulator.callbacks) == 10, 20, "ten delivery reports")
            reply = await simulator.reply("octopush", OCTOPUSH_KEY, "+33600000001", "Merci !")
            stop = await simulator.reply("octopush", OCTOPUSH_KEY, "+33600000002", "STOP")
            assert all(c.delivered for c in [*simulator.callbacks, reply, stop])
    finally:
        await simulator.stop()
        await ours.close()

    grouped = by_key(await read_topic(settings, PROVIDER_EVENTS, ProviderEvent, expect=12))
    for result in accepted:
        events = grouped[result.correlation_key]
        statuses = [e.provider_status for e in events if e.kind == "status"]
        # Our own send key and the callbacks' key meet: the normalizer's join will find them.
        if result.message_id.startswith("m-fr"):
            assert statuses == ["ACK", "DELIVERED"]
        else:
            assert statuses == ["pending", "delivered"]
    first, second = (grouped[accepted[i].correlation_key] for i in (1, 2))
    assert [(e.kind, e.text) for e in first if e.kind != "status"] == [("inbound", "Merci !")]
    assert [(e.kind, e.text) for e in second if e.kind != "status"] == [("opt_out", "STOP")]


async def test_octopush_stop_without_text_is_stored_as_an_opt_out(
    kafka: EmbeddedBroker, http: aiohttp.ClientSession
) -> None:
    # providers.md §3.4's example, verbatim, without its ``text``: stop_date makes it a STOP.
    documented = orjson.loads(
        b'{"message_id":"sms_5fa275dbf21dc","number":"+33600000000","text":"stop",'
        b'"stop_date":"2020-11-04 11:11:45"}'
    )
    without_text = {name: value for name, value in documented.items() if name != "text"}
    settings = bulk_provider_settings()
    url = callback_url(settings, OCTOPUSH_ACCOUNT)
    async with running(build(settings)):
        for body, content_type in ((orjson.dumps(without_text), JSON), (form(without_text), FORM)):
            # A 503 (not stored in time) is retried, as Octopush retries it.
            for _ in range(20):
                answer = await post(http, url, body, content_type)
                if answer[0] != 503:
                    break
                await asyncio.sleep(0.2)
            assert answer == (200, b"", None)

    records = await read_topic(settings, PROVIDER_EVENTS, ProviderEvent, expect=2)
    # A callback answered 503 may still have been stored: its retry is the same event.
    events = {event.event_id: event for _, event in records}
    assert [(e.kind, e.number, e.text) for e in events.values()] == [
        ("opt_out", "+33600000000", "STOP")
    ] * 2
    assert {key for key, _ in records} == {f"{OCTOPUSH_ACCOUNT}:sms_5fa275dbf21dc:+33600000000"}
