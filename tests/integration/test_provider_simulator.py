"""The provider simulator against real HTTP clients and a real callback receiver."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from services.simulators.providers import ProviderSimulator
from shared.broker import free_port
from shared.providers import callback_url
from shared.providers.base import OutboundSms, SendAccepted, SendError
from shared.providers.otpiq import FIXTURES, WEBHOOK_SECRET_HEADER, Otpiq
from shared.service import serve
from shared.statuses import SubStatus
from tests.support import OTPIQ_WEBHOOK_SECRET, make_settings, wait_for

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
    simulator: ProviderSimulator, client: aiohttp.ClientSession
) -> None:
    settings = make_settings(provider_url=simulator.url)
    provider = Otpiq(
        "otpiq-main",
        settings.providers["otpiq-main"],
        client,
        callback_url(settings, "otpiq-main"),
    )
    [result] = await provider.send(
        [OutboundSms(message_id="m-1", destination="+12345", text="hi", sender_id="ACME")]
    )
    assert isinstance(result, SendError)
    assert not result.retryable
    assert result.sub_status == SubStatus.INVALID_NUMBER


async def test_our_client_sends_and_the_simulator_records_it_once(
    simulator: ProviderSimulator, receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    settings = make_settings(provider_url=simulator.url)
    provider = Otpiq("otpiq-main", settings.providers["otpiq-main"], client, receiver.url)
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
    simulator: ProviderSimulator, receiver: Receiver, client: aiohttp.ClientSession
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
