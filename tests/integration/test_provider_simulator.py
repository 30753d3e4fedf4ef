"""The provider simulator against real HTTP clients and a real callback receiver."""

from __future__ import annotations

import argparse
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from shared.contract.statuses import SubStatus
from shared.http_client import Answer, HttpClient
from shared.kafka.broker import free_port
from shared.kafka.service import serve
from shared.providers import callback_url
from shared.providers.base import OutboundSms, SendAccepted, SendError
from shared.providers.octopush import FIXTURES as OCTOPUSH_FIXTURES
from shared.providers.octopush import Octopush
from shared.providers.opensms import FIXTURES as OPENSMS_FIXTURES
from shared.providers.opensms import OpenSms
from shared.providers.otpiq import FIXTURES, WEBHOOK_SECRET_HEADER, Otpiq
from simulators.providers import (
    OpenSmsProtocol,
    OptionsError,
    ProviderSimulator,
    add_arguments,
    callback_urls_from_args,
    callback_urls_from_settings,
    options_from_args,
)
from tests.support import OTPIQ_WEBHOOK_SECRET, make_settings, wait_for
from tests.support.providers import (
    OCTOPUSH_ACCOUNT,
    OCTOPUSH_KEY,
    OCTOPUSH_LOGIN,
    OPENSMS_ACCOUNT,
    OPENSMS_TOKEN,
    bulk_provider_settings,
)

pytestmark = pytest.mark.integration

SECRET = "hook-secret-1"


@dataclass
class Receiver:
    """A callback endpoint that records what arrives and answers from a script (then 200)."""

    url: str = ""
    received: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    script: list[int] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.json()))
        status = self.script.pop(0) if self.script else 200
        return web.json_response({"status": "received"}, status=status)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    target = Receiver()
    app = web.Application()
    app.router.add_post("/hook", target.handle)
    listen = f"127.0.0.1:{free_port()}"
    runner = await serve(app, listen)
    target.url = f"http://{listen}/hook"
    try:
        yield target
    finally:
        await runner.cleanup()


@pytest.fixture
async def simulator() -> AsyncIterator[ProviderSimulator]:
    sim = ProviderSimulator("127.0.0.1", free_port(), callback_delay_ms=10, seed=7)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


@pytest.fixture
async def ours() -> AsyncIterator[HttpClient]:
    """The HTTP client our provider modules send with."""
    async with HttpClient(timeout_s=5) as http:
        yield http


def send_body(webhook_url: str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        **FIXTURES["send_request"],
        "deliveryReport": {
            "webhookUrl": webhook_url,
            "deliveryReportType": "all",
            "webhookSecret": SECRET,
        },
    }
    body.update(changes)
    return body


async def post_send(
    client: aiohttp.ClientSession,
    sim: ProviderSimulator,
    body: Any,
    token: str | None = "sk_test_1",
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with client.post(f"{sim.url}/otpiq/api/sms", json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_send_answers_like_the_docs_then_sent_and_final_callbacks_arrive(
    simulator: ProviderSimulator, receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    status, answer = await post_send(client, simulator, send_body(receiver.url))

    assert status == 200
    assert set(answer) == set(FIXTURES["send_response"])
    assert answer["message"] == "SMS task created successfully"
    assert re.fullmatch(r"sms-[0-9a-f]{24}", answer["smsId"])
    assert answer["canCover"] is True

    await wait_for(lambda: len(receiver.received) == 2, 5, "two callbacks")
    (sent_headers, sent), (final_headers, final) = receiver.received
    assert sent_headers[WEBHOOK_SECRET_HEADER] == SECRET
    assert final_headers[WEBHOOK_SECRET_HEADER] == SECRET
    assert sent == {
        "smsId": answer["smsId"],
        "deliveryReportType": "all",
        "isFinal": False,
        "channel": "sms",
        "status": "sent",
        "senderId": "OTPIQ",
    }
    assert final == {**sent, "isFinal": True, "status": "delivered"}
    # What the simulator sends is what our own parser understands.
    for payload in (sent, final):
        [parsed] = Otpiq.parse_callback(orjson.dumps(payload), "")
        assert parsed.provider_message_id == answer["smsId"]

    async with client.get(f"{simulator.url}/_simulator/sends") as response:
        record = await response.json()
    assert record["total"] == 1
    [send] = record["sends"]
    assert send["provider"] == "otpiq"
    assert send["account"] == "sk_test_1"
    assert send["phone"] == "964750123456"
    assert send["text"] == "Your order has shipped"
    assert send["sender"] == "OTPIQ"
    assert send["provider_message_id"] == answer["smsId"]
    assert record["counts"] == [
        {"provider": "otpiq", "phone": "964750123456", "text": "Your order has shipped", "count": 1}
    ]
    assert record["answers"] == {"otpiq": {"200": 1}}


async def test_fail_rate_set_at_runtime_makes_final_callback_failed_with_reason(
    simulator: ProviderSimulator, receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    async with client.post(
        f"{simulator.url}/_simulator/config", json={"fail_rate": 1.0}
    ) as response:
        assert response.status == 200
        assert (await response.json())["fail_rate"] == 1.0
    body = send_body(receiver.url)
    body["deliveryReport"]["deliveryReportType"] = "final"
    status, answer = await post_send(client, simulator, body)
    assert status == 200

    await wait_for(lambda: len(receiver.received) == 1, 5, "the final callback")
    await wait_for(lambda: len(simulator.callbacks) == 1, 5, "the delivery record")
    _, final = receiver.received[0]
    assert final["smsId"] == answer["smsId"]
    assert final["deliveryReportType"] == "final"
    assert final["isFinal"] is True
    assert final["status"] == "failed"
    assert final["reason"] == "Carrier rejected the message"
    [parsed] = Otpiq.parse_callback(orjson.dumps(final), "")
    assert Otpiq.canonical(parsed.provider_status) == ("failed", SubStatus.UNDELIVERABLE)


@pytest.mark.parametrize(
    ("token", "body", "status", "message"),
    [
        (None, None, 401, "Unauthorized"),
        ("", None, 401, "Unauthorized"),
        ("sk_test_1", {"phoneNumber": "+964750123456"}, 400, "phoneNumber"),
        ("sk_test_1", {"phoneNumber": "12345"}, 400, "phoneNumber"),
        ("sk_test_1", {"smsType": "promo"}, 400, "smsType"),
        ("sk_test_1", {"customMessage": ""}, 400, "customMessage"),
        ("sk_test_1", {"senderId": "TWELVECHARSX"}, 400, "senderId"),
        ("sk_test_1", {"provider": "pigeon"}, 400, "provider"),
        ("sk_test_1", {"deliveryReport": {"deliveryReportType": "all"}}, 400, "webhookUrl"),
        ("sk_test_1", [1, 2], 400, "JSON object"),
    ],
)
async def test_invalid_sends_are_refused_like_the_real_api_and_not_recorded(
    simulator: ProviderSimulator,
    receiver: Receiver,
    client: aiohttp.ClientSession,
    token: str | None,
    body: Any,
    status: int,
    message: str,
) -> None:
    payload = send_body(receiver.url, **body) if isinstance(body, dict) else body
    if body is None:
        payload = send_body(receiver.url)
    answered, answer = await post_send(client, simulator, payload, token)
    assert answered == status
    assert set(answer) == {"message"}
    assert message in answer["message"]
    assert simulator.sends == []
    assert simulator.answers["otpiq"] == {str(status): 1}


async def test_validation_error_reads_as_invalid_number_in_our_client(
    simulator: ProviderSimulator, client: aiohttp.ClientSession, ours: HttpClient
) -> None:
    settings = make_settings(provider_url=simulator.url)
    provider = Otpiq(
        "otpiq-main",
        settings.providers["otpiq-main"],
        ours,
        callback_url(settings, "otpiq-main"),
    )
    [result] = await provider.send(
        [OutboundSms(message_id="m-1", destination="+12345", text="hi", sender_id="ACME")]
    )
    assert isinstance(result, SendError)
    assert not result.retryable
    assert result.sub_status == SubStatus.INVALID_NUMBER


async def test_our_client_sends_and_the_simulator_records_it_once(
    simulator: ProviderSimulator,
    receiver: Receiver,
    client: aiohttp.ClientSession,
    ours: HttpClient,
) -> None:
    settings = make_settings(provider_url=simulator.url)
    provider = Otpiq("otpiq-main", settings.providers["otpiq-main"], ours, receiver.url)
    sms = OutboundSms(message_id="m-1", destination="+447700900123", text="Hi €", sender_id="ACME")

    [result] = await provider.send([sms])

    assert isinstance(result, SendAccepted)
    [send] = simulator.sends
    assert (send.phone, send.text, send.sender) == ("447700900123", "Hi €", "ACME")
    assert result.provider_message_id == send.provider_message_id
    assert result.correlation_key == f"otpiq-main:{send.provider_message_id}"
    await wait_for(lambda: len(receiver.received) == 2, 5, "two callbacks")
    assert all(h[WEBHOOK_SECRET_HEADER] == OTPIQ_WEBHOOK_SECRET for h, _ in receiver.received)


async def test_http_error_rate_answers_500_without_sending(
    simulator: ProviderSimulator, receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    simulator.configure(http_error_rate=1.0)
    status, answer = await post_send(client, simulator, send_body(receiver.url))
    assert status == 500
    assert "message" in answer
    assert simulator.sends == []
    assert simulator.answers["otpiq"] == {"500": 1}
    await simulator_quiet(simulator)
    assert receiver.received == []


async def simulator_quiet(simulator: ProviderSimulator) -> None:
    """Long enough for any callback the simulator had planned to have been made."""
    await wait_for(lambda: not simulator._background, 5, "background callbacks")


async def test_callback_answered_5xx_is_retried_until_accepted(
    simulator: ProviderSimulator, receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    simulator.configure(callback_retry_delay_ms=20)
    receiver.script = [503, 500]  # the "sent" callback fails twice, then goes through
    status, _ = await post_send(client, simulator, send_body(receiver.url))
    assert status == 200

    await wait_for(lambda: len(simulator.callbacks) == 2, 5, "both callbacks delivered")
    statuses = [payload["status"] for _, payload in receiver.received]
    assert statuses == ["sent", "sent", "sent", "delivered"]
    sent, final = simulator.callbacks
    assert (sent.attempts, sent.http_status, sent.delivered) == (3, 200, True)
    assert (final.attempts, final.delivered) == (1, True)


async def test_callback_4xx_is_not_retried_and_unreachable_receiver_is_given_up_on(
    simulator: ProviderSimulator, receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    simulator.configure(callback_retry_delay_ms=10, callback_attempts=3)
    receiver.script = [401]
    await post_send(client, simulator, send_body(receiver.url))
    await wait_for(lambda: len(simulator.callbacks) == 2, 5, "both callbacks")
    rejected, final = simulator.callbacks
    assert (rejected.attempts, rejected.http_status, rejected.delivered) == (1, 401, False)
    assert final.delivered

    simulator.reset()
    nowhere = f"http://127.0.0.1:{free_port()}/hook"
    await post_send(client, simulator, send_body(nowhere))
    await wait_for(lambda: len(simulator.callbacks) == 2, 5, "both callbacks given up on")
    assert [(c.attempts, c.http_status, c.delivered) for c in simulator.callbacks] == [
        (3, None, False),
        (3, None, False),
    ]


async def test_same_seed_gives_the_same_outcome_mix(
    simulator: ProviderSimulator, receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    async def final_statuses() -> list[str]:
        simulator.reset()
        receiver.received.clear()
        simulator.configure(seed=42, fail_rate=0.5, callback_delay_ms=0)
        for _ in range(12):
            body = send_body(receiver.url)
            body["deliveryReport"]["deliveryReportType"] = "final"
            await post_send(client, simulator, body)
        await wait_for(lambda: len(simulator.callbacks) == 12, 5, "twelve callbacks")
        by_id = {c.provider_message_id: c.payload["status"] for c in simulator.callbacks}
        return [by_id[s.provider_message_id] for s in simulator.sends]

    first = await final_statuses()
    assert set(first) == {"delivered", "failed"}
    assert await final_statuses() == first


async def test_config_endpoint_refuses_bad_values_and_sends_can_be_reset(
    simulator: ProviderSimulator,
    receiver: Receiver,
    client: aiohttp.ClientSession,
) -> None:
    config_url = f"{simulator.url}/_simulator/config"
    for bad in ({"fail_rate": 2}, {"latency_ms": -1}, {"colour": "red"}, {"seed": "x"}, [1]):
        async with client.post(config_url, json=bad) as response:
            assert response.status == 400, bad
            assert "error" in await response.json()
    async with client.post(config_url, json={"latency_ms": 30, "fail_rate": 0.25}) as response:
        assert response.status == 200
    async with client.get(config_url) as response:
        options = await response.json()
    assert (options["latency_ms"], options["fail_rate"], options["seed"]) == (30.0, 0.25, 7)

    await post_send(client, simulator, send_body(receiver.url))
    assert len(simulator.sends) == 1
    async with client.delete(f"{simulator.url}/_simulator/sends") as response:
        assert response.status == 200
    async with client.get(f"{simulator.url}/_simulator/sends") as response:
        record = await response.json()
    assert (record["total"], record["sends"], record["counts"]) == (0, [], [])


# -- OpenSMS -------------------------------------------------------------------------------------


def bulk_provider(
    kind: type[OpenSms] | type[Octopush],
    simulator: ProviderSimulator,
    client: HttpClient,
) -> OpenSms | Octopush:
    settings = bulk_provider_settings(simulator.url)
    account = OPENSMS_ACCOUNT if kind is OpenSms else OCTOPUSH_ACCOUNT
    return kind(account, settings.providers[account], client, callback_url(settings, account))


def kenyan(count: int, text: str = "Habari yako") -> list[OutboundSms]:
    return [OutboundSms(f"m-ke-{i}", f"+25471234567{i}", text, "ACME") for i in range(count)]


def french(count: int, text: str = "Bonjour") -> list[OutboundSms]:
    return [OutboundSms(f"m-fr-{i}", f"+3360000000{i}", text, "ACME") for i in range(count)]


async def opensms_post(
    client: aiohttp.ClientSession, sim: ProviderSimulator, body: Any, token: str | None
) -> tuple[int, Any, Mapping[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    url = f"{sim.url}/opensms/api/v3/sms/send"
    async with client.post(url, json=body, headers=headers) as response:
        return response.status, await response.json(), response.headers


async def test_opensms_bulk_send_is_recorded_per_recipient_and_reports_arrive(
    simulator: ProviderSimulator,
    receiver: Receiver,
    client: aiohttp.ClientSession,
    ours: HttpClient,
) -> None:
    simulator.configure(callback_urls={OPENSMS_TOKEN: receiver.url})
    batch = kenyan(3)

    results = await bulk_provider(OpenSms, simulator, ours).send(batch)

    accepted = [result for result in results if isinstance(result, SendAccepted)]
    assert [a.message_id for a in accepted] == ["m-ke-0", "m-ke-1", "m-ke-2"]
    assert len({a.provider_message_id for a in accepted}) == 3
    assert [(s.phone, s.account, s.text, s.sender) for s in simulator.sends] == [
        (sms.destination, OPENSMS_TOKEN, "Habari yako", "ACME") for sms in batch
    ]
    assert [s.provider_message_id for s in simulator.sends] == [
        a.provider_message_id for a in accepted
    ]
    assert simulator.answers["opensms"] == {"200": 1}  # one call for the three

    await wait_for(lambda: len(receiver.received) == 6, 5, "six delivery reports")
    seen: dict[str, list[str]] = {}
    for _, payload in receiver.received:
        [parsed] = OpenSms.parse_callback(orjson.dumps(payload), "application/json")
        key = OpenSms.correlation_key(OPENSMS_ACCOUNT, parsed.provider_message_id, parsed.number)
        seen.setdefault(key, []).append(parsed.provider_status)
    assert seen == {a.correlation_key: ["pending", "delivered"] for a in accepted}


@pytest.mark.parametrize(
    ("token", "changes", "status", "code", "message"),
    [
        (None, {}, 401, None, "Unauthenticated"),
        ("tok", {"recipient": "+254712345678,0712"}, 400, 1001, "Invalid phone number"),
        ("tok", {"message": "x" * 161}, 400, 1002, "160"),
        ("tok", {"sender_id": "TWELVECHARSX"}, 400, 1004, "sender"),
        ("tok", {"type": "unicode"}, 400, 1006, "type"),
        ("tok", {"schedule_time": "2001-01-01 10:00"}, 400, 1008, "past"),
        ("tok", {"schedule_time": "tomorrow"}, 400, None, "format"),
        ("tok", {"message": ""}, 400, None, "message field"),
        ("tok", {"recipient": ""}, 400, None, "recipient field"),
    ],
)
async def test_opensms_refuses_invalid_sends_with_its_error_codes(
    simulator: ProviderSimulator,
    client: aiohttp.ClientSession,
    token: str | None,
    changes: dict[str, Any],
    status: int,
    code: int | None,
    message: str,
) -> None:
    body = {**OPENSMS_FIXTURES["send_request"], **changes}
    answered, answer, _ = await opensms_post(client, simulator, body, token)
    assert answered == status
    assert answer["status"] == "error"
    assert answer.get("code") == code
    assert message in answer["message"]
    assert simulator.sends == []


async def test_opensms_refusals_read_as_terminal_sub_statuses_in_our_client(
    simulator: ProviderSimulator, client: aiohttp.ClientSession, ours: HttpClient
) -> None:
    provider = bulk_provider(OpenSms, simulator, ours)
    [bad_number] = await provider.send([OutboundSms("m-1", "+2547", "hi", "ACME")])
    [too_long] = await provider.send(kenyan(1, "x" * 200))
    assert isinstance(bad_number, SendError) and isinstance(too_long, SendError)
    assert (bad_number.retryable, bad_number.sub_status) == (False, SubStatus.INVALID_NUMBER)
    assert (too_long.retryable, too_long.sub_status) == (False, SubStatus.REJECTED)
    assert simulator.sends == []


async def test_opensms_rate_limit_window_answers_429_with_a_wait(
    simulator: ProviderSimulator, client: aiohttp.ClientSession, ours: HttpClient
) -> None:
    protocol = simulator.protocol("opensms")
    assert isinstance(protocol, OpenSmsProtocol)
    protocol.rate_limit_per_minute = 1
    protocol.clock = lambda: 1_700_000_010.0  # both calls in one window, however slow the run
    body = OPENSMS_FIXTURES["send_request"]
    _, _, headers = await opensms_post(client, simulator, body, OPENSMS_TOKEN)
    assert headers["X-RateLimit-Limit"] == "1"
    assert headers["X-RateLimit-Remaining"] == "0"
    assert headers["X-RateLimit-Reset"] == "1700000040"

    [limited] = await bulk_provider(OpenSms, simulator, ours).send(kenyan(1))

    assert isinstance(limited, SendError)
    assert limited.retryable
    assert limited.status_code == 429
    assert limited.retry_after_s == 30.0  # Retry-After: the window ends 30 s after the clock
    assert len(simulator.sends) == 1  # the first call only
    assert simulator.answers["opensms"] == {"200": 1, "429": 1}


async def test_opensms_without_a_callback_url_sends_but_reports_nothing(
    simulator: ProviderSimulator,
    receiver: Receiver,
    client: aiohttp.ClientSession,
    ours: HttpClient,
) -> None:
    [result] = await bulk_provider(OpenSms, simulator, ours).send(kenyan(1))
    assert isinstance(result, SendAccepted)
    assert len(simulator.sends) == 1
    await simulator_quiet(simulator)
    assert simulator.callbacks == []


# -- Octopush ------------------------------------------------------------------------------------


async def octopush_post(
    client: aiohttp.ClientSession,
    sim: ProviderSimulator,
    body: Any,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    url = f"{sim.url}/octopush/v1/public/sms-campaign/send"
    sent_headers = {"api-key": OCTOPUSH_KEY, "api-login": OCTOPUSH_LOGIN}
    if headers is not None:
        sent_headers = dict(headers)
    async with client.post(url, json=body, headers=sent_headers) as response:
        return response.status, await response.json()


async def test_octopush_bulk_send_one_ticket_reports_per_recipient_and_no_resend(
    simulator: ProviderSimulator,
    receiver: Receiver,
    client: aiohttp.ClientSession,
    ours: HttpClient,
) -> None:
    simulator.configure(callback_urls={OCTOPUSH_KEY: receiver.url})
    provider = bulk_provider(Octopush, simulator, ours)
    batch = french(3)

    results = await provider.send(batch)

    accepted = [result for result in results if isinstance(result, SendAccepted)]
    assert len(accepted) == 3
    [ticket] = {a.provider_message_id for a in accepted}
    assert re.fullmatch(r"sms_[0-9a-f]{13}", ticket)
    assert [(s.phone, s.account, s.text, s.provider_message_id) for s in simulator.sends] == [
        (sms.destination, OCTOPUSH_KEY, "Bonjour", ticket) for sms in batch
    ]
    await wait_for(lambda: len(receiver.received) == 6, 5, "six delivery reports")
    seen: dict[str, list[str]] = {}
    for _, payload in receiver.received:
        [parsed] = Octopush.parse_callback(orjson.dumps(payload), "application/json")
        assert parsed.occurred_at is not None
        key = Octopush.correlation_key(OCTOPUSH_ACCOUNT, parsed.provider_message_id, parsed.number)
        seen.setdefault(key, []).append(parsed.provider_status)
    assert seen == {a.correlation_key: ["ACK", "DELIVERED"] for a in accepted}

    # The same batch again (a retry after a lost answer) is refused by request_id: no double send.
    again = await provider.send(batch)
    assert all(isinstance(r, SendError) and not r.retryable for r in again)
    assert all("duplicate request_id" in r.detail for r in again if isinstance(r, SendError))
    assert len(simulator.sends) == 3
    assert simulator.answers["octopush"] == {"201": 1, "400": 1}


async def test_octopush_failures_low_cost_and_simulation_mode(
    simulator: ProviderSimulator, receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    simulator.configure(callback_urls={OCTOPUSH_LOGIN: receiver.url}, fail_rate=1.0)
    body = {**OCTOPUSH_FIXTURES["send_request"], "request_id": "r-1"}
    status, answer = await octopush_post(client, simulator, body)
    assert status == 201
    assert set(answer) == set(OCTOPUSH_FIXTURES["send_response"])
    await wait_for(lambda: len(receiver.received) == 2, 5, "ACK and the final report")
    _, final = receiver.received[1]
    assert final["status"] == "NOT_DELIVERED"
    [parsed] = Octopush.parse_callback(orjson.dumps(final), "application/json")
    assert Octopush.canonical(parsed.provider_status) == ("failed", SubStatus.UNDELIVERABLE)

    low_cost = {**body, "type": "sms_low_cost", "request_id": "r-2"}
    assert (await octopush_post(client, simulator, low_cost))[0] == 201
    simulated = {**body, "simulation_mode": True, "request_id": "r-3"}
    status, answer = await octopush_post(client, simulator, simulated)
    assert status == 201 and answer["sms_ticket"]
    await simulator_quiet(simulator)
    assert len(simulator.sends) == 2  # the simulation is not sent
    assert len(receiver.received) == 2  # low cost has no delivery reports


@pytest.mark.parametrize(
    ("headers", "changes", "status", "code", "message"),
    [
        ({}, {}, 401, 101, "api-key"),
        ({"api-key": OCTOPUSH_KEY}, {}, 401, 101, "api-login"),
        (None, {"recipients": []}, 400, 103, "recipients"),
        (None, {"recipients": [{"phone_number": "+33600000000"}] * 501}, 400, None, "500"),
        (None, {"recipients": [{"phone_number": "0600000000"}]}, 400, None, "phone_number"),
        (None, {"recipients": ["+33600000000"]}, 400, None, "phone_number"),
        (None, {"text": ""}, 400, 107, "text"),
        (None, {"text": "x" * 1225}, 400, None, "1224"),
        (None, {"type": "sms_standard"}, 400, None, "type"),
        (None, {"sender": "A"}, 400, 106, "sender"),
        (None, {"purpose": "spam"}, 400, None, "purpose"),
        (None, {"with_replies": "yes"}, 400, None, "with_replies"),
        (None, {"request_id": 7}, 400, None, "request_id"),
    ],
)
async def test_octopush_refuses_invalid_sends(
    simulator: ProviderSimulator,
    client: aiohttp.ClientSession,
    headers: dict[str, str] | None,
    changes: dict[str, Any],
    status: int,
    code: int | None,
    message: str,
) -> None:
    body = {**OCTOPUSH_FIXTURES["send_request"], **changes}
    answered, answer = await octopush_post(client, simulator, body, headers)
    assert answered == status
    assert answer.get("code") == code
    assert message in answer["message"]
    assert simulator.sends == []


async def test_octopush_invalid_number_reads_as_invalid_number_in_our_client(
    simulator: ProviderSimulator, client: aiohttp.ClientSession, ours: HttpClient
) -> None:
    [result] = await bulk_provider(Octopush, simulator, ours).send(
        [OutboundSms("m-1", "+33", "hi", "ACME")]
    )
    assert isinstance(result, SendError)
    assert (result.retryable, result.sub_status) == (False, SubStatus.INVALID_NUMBER)


# -- customer replies ----------------------------------------------------------------------------


async def post_reply(
    client: aiohttp.ClientSession, sim: ProviderSimulator, body: Any
) -> tuple[int, Any]:
    async with client.post(f"{sim.url}/_simulator/reply", json=body) as response:
        return response.status, await response.json()


async def test_reply_posts_inbound_and_stop_callbacks_our_parser_reads(
    simulator: ProviderSimulator,
    receiver: Receiver,
    client: aiohttp.ClientSession,
    ours: HttpClient,
) -> None:
    simulator.configure(callback_urls={OCTOPUSH_KEY: receiver.url})
    [sent, _] = await bulk_provider(Octopush, simulator, ours).send(french(2))
    assert isinstance(sent, SendAccepted)
    await wait_for(lambda: len(receiver.received) == 4, 5, "the delivery reports")
    receiver.received.clear()
    reply = {"provider": "octopush", "account_key": OCTOPUSH_KEY, "number": "+33600000000"}

    status, delivery = await post_reply(client, simulator, {**reply, "text": "Oui merci"})
    assert status == 200
    assert delivery["delivered"] is True
    _, inbound = receiver.received[-1]
    assert inbound == delivery["payload"]
    assert set(inbound) == {"message_id", "number", "text", "sim_card_number", "reception_date"}
    [parsed] = Octopush.parse_callback(orjson.dumps(inbound), "application/json")
    assert (parsed.kind, parsed.text, parsed.number) == ("inbound", "Oui merci", "+33600000000")
    # The reply names the campaign that reached that number, so it joins the dispatch.
    key = Octopush.correlation_key(OCTOPUSH_ACCOUNT, parsed.provider_message_id, parsed.number)
    assert key == sent.correlation_key

    status, delivery = await post_reply(client, simulator, {**reply, "text": " stop "})
    assert status == 200
    [stop] = Octopush.parse_callback(orjson.dumps(delivery["payload"]), "application/json")
    assert (stop.kind, stop.text, stop.provider_message_id) == (
        "opt_out",
        " stop ",
        sent.provider_message_id,
    )
    assert "stop_date" in receiver.received[-1][1]

    status, delivery = await post_reply(
        client, simulator, {**reply, "number": "+33699999999", "text": "Qui est-ce ?"}
    )
    assert status == 200
    assert "message_id" not in delivery["payload"]  # nothing was sent to that number
    chosen = {**reply, "text": "Hi", "message_id": "sms_given"}
    status, delivery = await post_reply(client, simulator, chosen)
    assert delivery["payload"]["message_id"] == "sms_given"
    assert len(receiver.received) == 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"provider": "opensms"}, "only octopush"),
        ({"account_key": "unknown-key"}, "no callback URL"),
        ({"number": "0600000000"}, "international"),
        ({"text": None}, "required"),
        ({"message_id": 5}, "required"),
    ],
)
async def test_reply_refuses_what_no_provider_would_send(
    simulator: ProviderSimulator,
    receiver: Receiver,
    client: aiohttp.ClientSession,
    body: dict[str, Any],
    message: str,
) -> None:
    simulator.configure(callback_urls={OCTOPUSH_KEY: receiver.url})
    base = {"provider": "octopush", "account_key": OCTOPUSH_KEY, "number": "+33600000000"}
    status, answer = await post_reply(client, simulator, {**base, "text": "hi", **body})
    assert status == 400
    assert message in answer["error"]
    assert receiver.received == []


# -- callback URLs -------------------------------------------------------------------------------


async def test_callback_urls_are_configured_at_run_time_and_derived_from_the_config(
    simulator: ProviderSimulator, client: aiohttp.ClientSession
) -> None:
    config_url = f"{simulator.url}/_simulator/config"
    async with client.post(
        config_url, json={"callback_urls": {"k1": "http://a/1", "k2": "https://b/2"}}
    ) as response:
        assert response.status == 200
    async with client.post(config_url, json={"callback_urls": {"k1": None}}) as response:
        assert (await response.json())["callback_urls"] == {"k2": "https://b/2"}
    for bad in ({"k": "ftp://x"}, {"": "http://x"}, ["http://x"], {"k": 3}):
        async with client.post(config_url, json={"callback_urls": bad}) as response:
            assert response.status == 400, bad
    async with client.get(config_url) as response:
        assert (await response.json())["callback_urls"] == {"k2": "https://b/2"}

    settings = bulk_provider_settings(simulator.url)
    assert callback_urls_from_settings(settings) == {
        OPENSMS_TOKEN: callback_url(settings, OPENSMS_ACCOUNT),
        OCTOPUSH_KEY: callback_url(settings, OCTOPUSH_ACCOUNT),
    }  # OTPIQ gives its URL in each request

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--callback-url", "a=http://x/1", "--callback-url", "b=http://y"])
    assert callback_urls_from_args(args.callback_url) == {"a": "http://x/1", "b": "http://y"}
    with pytest.raises(OptionsError):
        callback_urls_from_args(["no-equals-sign"])


# -- what our send calls put on the wire ----------------------------------------------------------


@dataclass
class SentRequest:
    url: str = ""
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""


class RecordingClient(HttpClient):
    """Our HTTP client, keeping each request a provider module made."""

    def __init__(self) -> None:
        super().__init__(timeout_s=5)
        self.requests: list[SentRequest] = []

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout_s: float | None = None
    ) -> Answer:
        self.requests.append(SentRequest(url, CIMultiDict(headers), body))
        return await super().post(url, body, headers, timeout_s=timeout_s)


@pytest.fixture
async def recording_client() -> AsyncIterator[RecordingClient]:
    async with RecordingClient() as client:
        yield client


@pytest.mark.parametrize(
    ("kind", "path", "own_headers"),
    [
        (Otpiq, "/sms", {"Authorization": "Bearer sk_test_otpiq"}),
        (
            OpenSms,
            "/sms/send",
            {"Authorization": f"Bearer {OPENSMS_TOKEN}", "Accept": "application/json"},
        ),
        (
            Octopush,
            "/sms-campaign/send",
            {"api-key": OCTOPUSH_KEY, "api-login": OCTOPUSH_LOGIN, "cache-control": "no-cache"},
        ),
    ],
)
async def test_send_posts_the_request_body_as_json_with_the_providers_own_headers(
    simulator: ProviderSimulator,
    recording_client: RecordingClient,
    kind: type[Otpiq] | type[OpenSms] | type[Octopush],
    path: str,
    own_headers: dict[str, str],
) -> None:
    session = trace = recording_client
    settings = bulk_provider_settings(simulator.url)
    account = {Otpiq: "otpiq-main", OpenSms: OPENSMS_ACCOUNT, Octopush: OCTOPUSH_ACCOUNT}[kind]
    provider = kind(account, settings.providers[account], session, callback_url(settings, account))
    batch = french(2)

    results = await provider.send(batch)

    assert [r.message_id for r in results if isinstance(r, SendAccepted)] == ["m-fr-0", "m-fr-1"]
    # OTPIQ takes one number per call; the bulk providers take the batch in one call.
    if isinstance(provider, Otpiq):
        wanted = [provider.request_body(sms) for sms in batch]
    else:
        wanted = [provider.request_body(batch)]
    sent = [orjson.loads(request.body) for request in trace.requests]
    assert sorted(sent, key=orjson.dumps) == sorted(wanted, key=orjson.dumps)
    expected = {"Content-Type": "application/json", **own_headers}
    for request in trace.requests:
        assert request.url == provider.settings.base_url.rstrip("/") + path
        assert {name: request.headers.get(name) for name in expected} == expected


# -- injected 429s and lost answers, every provider --------------------------------------------


def client_of(
    kind: str, simulator: ProviderSimulator, client: HttpClient, receiver_url: str
) -> Otpiq | OpenSms | Octopush:
    if kind == "otpiq":
        settings = make_settings(provider_url=simulator.url)
        return Otpiq("otpiq-main", settings.providers["otpiq-main"], client, receiver_url)
    return bulk_provider(OpenSms if kind == "opensms" else Octopush, simulator, client)


def one_message(kind: str) -> list[OutboundSms]:
    return {"otpiq": [OutboundSms("m-1", "+447700900123", "Hi", "ACME")]}.get(
        kind, kenyan(1) if kind == "opensms" else french(1)
    )


@pytest.mark.parametrize("kind", ["otpiq", "opensms", "octopush"])
async def test_rate_limited_sends_are_429s_in_the_providers_shape_that_our_client_waits_on(
    kind: str,
    simulator: ProviderSimulator,
    receiver: Receiver,
    client: aiohttp.ClientSession,
    ours: HttpClient,
) -> None:
    simulator.configure(rate_limited_rate=1.0, rate_limited_wait_s=3.0)

    [result] = await client_of(kind, simulator, ours, receiver.url).send(one_message(kind))

    assert isinstance(result, SendError), result
    assert result.retryable and result.status_code == 429
    assert result.retry_after_s == pytest.approx(3.0)
    assert simulator.sends == []
    assert simulator.answers[kind] == {"429": 1}


@pytest.mark.parametrize("kind", ["otpiq", "opensms", "octopush"])
async def test_a_garbled_answer_to_an_accepted_send_is_never_taken_for_a_refusal(
    kind: str,
    simulator: ProviderSimulator,
    receiver: Receiver,
    client: aiohttp.ClientSession,
    ours: HttpClient,
) -> None:
    """The provider has the message; our client cannot know, so it must not say "retry"."""
    simulator.configure(garbled_rate=1.0)

    [result] = await client_of(kind, simulator, ours, receiver.url).send(one_message(kind))

    assert isinstance(result, SendError), result
    assert not result.retryable or result.maybe_accepted
    assert result.sub_status == SubStatus.PROVIDER_ERROR
    assert len(simulator.sends) == 1
    assert simulator.answers[kind] == {"200": 1}


def test_fault_rates_are_checked_and_set_from_the_command_line() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--rate-limited-rate", "0.2", "--garbled-rate", "0.1"])
    sim = ProviderSimulator("127.0.0.1", 0, {}, **options_from_args(args))
    assert (sim.options.rate_limited_rate, sim.options.garbled_rate) == (0.2, 0.1)
    assert sim.options.rate_limited_wait_s == 1.0
    with pytest.raises(OptionsError, match="garbled_rate"):
        sim.configure(garbled_rate=1.5)
    with pytest.raises(OptionsError, match="rate_limited_wait_s"):
        sim.configure(rate_limited_wait_s=-1)
